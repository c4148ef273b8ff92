"""Prompt supervision: which CT-CLIP statement is true for which chunk."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def test_truth_rules():
    from sigvlp.train.prompts import PromptTopics, abnormality_prompts, organ_prompts

    records = [SimpleNamespace(name="a", labels={"Lung nodule": 1, "Cardiomegaly": 0, "Bronchiectasis": 0}),
               SimpleNamespace(name="b", labels={"Lung nodule": 0, "Cardiomegaly": 1, "Bronchiectasis": 0})]
    topics = PromptTopics.from_records(records, ["lung", "heart", "liver"], min_coverage=0.8)
    assert topics.labels == ["Cardiomegaly", "Lung nodule"]  # CT-RATE order; never-positive labels left out
    assert topics.texts[:2] == list(abnormality_prompts("Cardiomegaly")) == ["Cardiomegaly is present.",
                                                                              "Cardiomegaly is not present."]
    assert topics.texts[-2:] == list(organ_prompts("liver"))
    names = ["a", "a", "a", "b", "b"]
    organs = [["lung", "heart"], ["lung"], ["liver"], ["lung", "heart"], ["lung"]]
    cover = [1.0, 0.5, 1.0, 0.9, 1.0]
    got = topics.truth(names, organs, cover)
    expected = torch.tensor([
        [0, 0, 0, 1, 0],     # Cardiomegaly: b's chunk with the heart; b's lung-only chunk cannot show it
        [1, -1, 0, 0, 0],    # Lung nodule: a's whole chunk shows it, a's half chunk may miss it, no lung: absent
        [1, 1, 0, 1, 1],     # lung visible
        [1, 0, 0, 1, 0],     # heart visible
        [0, 0, 1, 0, 0],     # liver visible
    ])
    assert torch.equal(got, expected)
    assert torch.equal(topics.truth(names, organs)[1], torch.tensor([1, 1, 0, 0, 0]))  # no coverage: all count
