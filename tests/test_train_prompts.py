"""Prompt supervision: which CT-CLIP statement is true for which chunk."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


def test_truth_rules():
    from sigvlp.prompts import PromptTopics, abnormality_prompts, organ_prompts

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


def _decorrelation_loops(statements):
    """The penalty written out: mean over ordered topic pairs of the squared cosine of directions."""
    k = statements.shape[0] // 2
    dirs = [statements[2 * i] - statements[2 * i + 1] for i in range(k)]
    total, pairs = 0.0, 0
    for i in range(k):
        for j in range(k):
            if i != j:
                cos = float(dirs[i] @ dirs[j]) / (float(dirs[i].norm()) * float(dirs[j].norm()))
                total += cos * cos
                pairs += 1
    return total / pairs


def test_direction_decorrelation_matches_loops_and_extremes():
    import pytest

    from sigvlp.prompts import direction_decorrelation

    g = torch.Generator().manual_seed(0)
    for k, d in ((2, 3), (5, 8), (24, 64)):
        x = torch.randn(2 * k, d, generator=g, dtype=torch.float64)
        assert abs(float(direction_decorrelation(x)) - _decorrelation_loops(x)) < 1e-12
        x32 = x.float()
        assert abs(float(direction_decorrelation(x32)) - _decorrelation_loops(x)) < 1e-6
    eye = torch.eye(6, dtype=torch.float64)
    orth = torch.stack([eye[0], -eye[0], eye[1], -eye[1], eye[2], 0 * eye[2]])  # d = 2e0, 2e1, e2
    assert float(direction_decorrelation(orth)) == 0.0
    base = torch.randn(8, generator=g, dtype=torch.float64)
    par = torch.stack([v for s in (1.0, -2.0, 0.5) for v in (s * base, torch.zeros(8, dtype=torch.float64))])
    assert abs(float(direction_decorrelation(par)) - 1.0) < 1e-12  # parallel or antiparallel: cos^2 = 1
    one = torch.randn(2, 4, generator=g)
    assert float(direction_decorrelation(one)) == 0.0  # a single topic has no pair
    x = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: direction_decorrelation(t), (x,))
    for bad in (torch.zeros(5, 4), torch.zeros(4)):
        with pytest.raises(ValueError, match="statements"):
            direction_decorrelation(bad)
    for bad in ([[0.0, 1.0], [1.0, 0.0]], np.zeros((4, 3)), torch.zeros(4, 3, dtype=torch.int64),
                torch.zeros(4, 3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="statements"):
            direction_decorrelation(bad)


def _per_topic_loop(img, ptxt, scale, truth):
    """The prompt loss as two sigvlp.ops.sigmoid_loss calls per topic (the loop it replaced)."""
    from sigvlp.ops import sigmoid_loss

    text_ids = torch.tensor([0, 1])
    zero = torch.zeros_like(scale)
    total = img.new_zeros(())
    for k in range(truth.shape[0]):
        for value in (1, 0):
            rows = truth[k] == value
            n = int(rows.sum())
            if n == 0:
                continue
            x = img if n == truth.shape[1] else img[rows.nonzero()[:, 0]]
            ids = torch.full((n,), 1 - value, dtype=torch.int64)
            total = total + 0.5 * sigmoid_loss(x, ptxt[2 * k:2 * k + 2], scale, zero, image_ids=ids,
                                               text_ids=text_ids)
    return total / max(truth.shape[0], 1)


def test_topic_sigmoid_loss_equals_the_per_topic_sigmoid_loss_loop():
    """Value and gradients (image, statements, scale) of the batched loss against the per-topic
    sigmoid_loss calls, to float32 rounding; topics all present, all absent, all unknown, mixed."""
    from sigvlp.prompts import topic_sigmoid_loss

    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [-1] * 7, [1, 0, -1, 1, 0, 0, 1],
                          [0, -1, -1, -1, 1, -1, -1]])
    img = torch.nn.functional.normalize(torch.randn(7, 24, generator=g), dim=1)
    stm = torch.nn.functional.normalize(torch.randn(10, 24, generator=g), dim=1)
    results = []
    for fn in (_per_topic_loop, topic_sigmoid_loss):
        leaves = [x.clone().requires_grad_() for x in (img, stm, torch.tensor(9.0))]
        loss = fn(*leaves, truth)
        loss.backward()
        results.append((loss.detach(), *[x.grad for x in leaves]))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    assert results[1][0] > 0 and results[1][2][4:6].abs().sum() == 0  # the unknown topic has no gradient
    assert float(topic_sigmoid_loss(img, stm[:0], torch.tensor(9.0), truth[:0])) == 0.0
    with pytest.raises(ValueError, match="truth"):
        topic_sigmoid_loss(img, stm, torch.tensor(9.0), truth[:, :3])
