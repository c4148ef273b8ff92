"""Report sections from fixed arrays, the JSON schema, the table and the plots (no model)."""

import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the eval extra (scikit-learn) is not installed")
pytest.importorskip("matplotlib", reason="the eval extra (matplotlib) is not installed")

from sigvlp.eval.report import SCHEMA, format_table, validate_report, write_report  # noqa: E402
from sigvlp.eval.sections import (depth_sweep_point, dice_counts, fit_linear_probe,  # noqa: E402
                                  fit_segmentation_probe, organ_section, pair_probability, predict_voxels,
                                  retrieval_section, segmentation_section, zero_shot_section)

LABELS = ["Cardiomegaly", "Emphysema", "Lung nodule", "Rare"]
ORGANS = ["lung", "heart", "liver"]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_pair_probability_is_the_two_way_softmax():
    rng = np.random.default_rng(0)
    img, pos, neg = (_unit(rng.standard_normal(shape)) for shape in ((5, 8), (3, 8), (3, 8)))
    p = pair_probability(img, pos, neg, logit_scale=10.0, logit_bias=-10.0)
    lp, ln = 10 * img @ pos.T - 10, 10 * img @ neg.T - 10
    ref = np.exp(lp) / (np.exp(lp) + np.exp(ln))
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert np.isfinite(pair_probability(img, pos, neg, logit_scale=1e4)).all()  # no overflow


def _report(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 60, 16
    y = rng.integers(0, 2, (n, len(LABELS)))
    y[:, 3] = 0
    y[:2, 3] = 1  # "Rare": 2 positives, below min_positives
    emb = _unit(rng.standard_normal((n, d)) + 1.5 * y[:, :1] * np.eye(d)[0])
    pos_t, neg_t = _unit(rng.standard_normal((len(LABELS), d))), _unit(rng.standard_normal((len(LABELS), d)))
    pos_t[0] = np.eye(d)[0]
    scores = pair_probability(emb, pos_t, neg_t, 10.0)
    zs = zero_shot_section(y, scores, LABELS, ("{label} is present.", "{label} is not present."), n_bootstrap=200)
    assert zs["labels_used"] == LABELS[:3] and "Rare" in zs["labels_skipped"]
    assert zs["per_label"]["Cardiomegaly"]["auroc"] > 0.75  # the planted signal

    m = 120
    oy = rng.integers(0, 2, (m, len(ORGANS)))
    feats = rng.standard_normal((m, d)) + 2.0 * oy @ np.eye(len(ORGANS), d)
    probe = fit_linear_probe(feats[:80], oy[:80], feats[80:])
    org = organ_section(oy[80:], rng.random((40, len(ORGANS))), ORGANS, ("The {organ} is visible.", "x"),
                        probe_train=oy[:80], probe_scores=probe)
    assert org["linear_probe"]["mean"]["auroc"] > 0.9  # separable features

    texts = [f"report {i % 50}" for i in range(n)]  # ten duplicated texts
    ret = retrieval_section(emb, emb + 0.01 * rng.standard_normal((n, d)), texts, feats, feats, ["t"] * m)
    assert ret["volume_to_report"]["R@1"] > 0.9

    # segmentation: 2 classes separable from the features
    tok = rng.standard_normal((400, d))
    lab = (tok[:, 0] > 0).astype(int)
    clf = fit_segmentation_probe(tok, lab, n_classes=len(ORGANS) + 1)
    vox = predict_voxels(clf, tok[:64], (1, 8, 8), (2, 2, 2), depth=2, n_classes=len(ORGANS) + 1)
    assert vox.shape == (2, 16, 16)
    gt = np.kron(lab[:64].reshape(1, 8, 8), np.ones((2, 2, 2), int))
    inter, size = dice_counts(vox, gt, len(ORGANS) + 1)
    seg = segmentation_section(inter, size, ORGANS, n_train_tokens=400)
    assert seg["per_organ_dice"]["lung"] > 0.8

    points = [depth_sweep_point(s, 16 * s, {"total": 1e9 * s}, y[:, :3], scores[:, :3], LABELS[:3])
              for s in (4, 8, 16)]
    report = {"schema": SCHEMA, "seconds": 1.0, "device": "cpu",
              "checkpoint": {"path": "ckpt", "sha256": "0" * 64, "config": {}},
              "dataset": {"root": "data", "split": "valid", "n_volumes": n},
              "config": {}, "zero_shot": zs, "organs": org, "retrieval": ret, "segmentation": seg,
              "depth_sweep": {"points": points}, "embedding_map": {"method": "pca", "n": n}, "plots": {}}
    return report, emb, y


def test_report_schema_roundtrip_and_table(tmp_path):
    report, _, _ = _report(tmp_path)
    validate_report(report)
    path = write_report(report, tmp_path / "report.json")
    loaded = json.loads(path.read_text())
    validate_report(loaded)
    assert loaded["zero_shot"]["per_label"]["Cardiomegaly"]["auroc_ci"][0] <= \
        loaded["zero_shot"]["per_label"]["Cardiomegaly"]["auroc"]
    table = format_table(loaded)
    for word in ("Cardiomegaly", "MEAN", "volume_to_report", "Dice", "slices", "Rare"):
        assert word in table


@pytest.mark.parametrize("breaks, match", [
    (lambda r: r.pop("checkpoint"), "missing top-level key 'checkpoint'"),
    (lambda r: r["zero_shot"]["per_label"]["Emphysema"].pop("f1_weighted"), r"per_label\['Emphysema'\] lacks"),
    (lambda r: r["zero_shot"]["labels_used"].append("Foo"), "disagree"),
    (lambda r: r["retrieval"]["volume_to_report"].pop("R@10"), "retrieval.volume_to_report lacks"),
    (lambda r: r.update(schema="other/1"), "schema"),
    (lambda r: r["retrieval"]["volume_to_report"].update(n_candidates=5), r"R@5 with 5 candidates is trivially 1"),
    (lambda r: r["retrieval"]["volume_to_report"].update({"R@1": {"skipped": "x"}}), r"R@1 must be a number"),
])
def test_report_schema_rejects(tmp_path, breaks, match):
    report, _, _ = _report(tmp_path)
    breaks(report)
    with pytest.raises(ValueError, match=match):
        validate_report(report)


def test_skipped_sections_are_valid(tmp_path):
    report, _, _ = _report(tmp_path)
    for key in ("organs", "retrieval", "segmentation", "depth_sweep"):
        report[key] = {"skipped": "not run"}
    validate_report(report)
    assert "segmentation: skipped (not run)" in format_table(report)


def test_plots_written_and_non_empty(tmp_path):
    from sigvlp.eval.plots import embedding_map, write_plots

    report, emb, y = _report(tmp_path)
    coords, method = embedding_map(emb)
    assert coords.shape == (len(emb), 2) and method in ("umap", "pca")
    paths = write_plots(report, tmp_path / "plots", map_coords=coords, map_labels=y[:, :3], map_names=LABELS[:3])
    assert set(paths) == {"zero_shot_auroc", "organ_radar", "f1_vs_slices", "embedding_map"}
    for p in paths.values():
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_parser_and_package_import_need_neither_sklearn_nor_matplotlib():
    import subprocess
    import sys

    code = ("import argparse, sys, sigvlp.eval as ev, sigvlp.ops; ev.add_arguments(argparse.ArgumentParser()); "
            "bad = [m for m in ('sklearn', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
