"""Evaluation with too little data: a split of 3 (and of 1) phantom volumes, an untrained tiny
model. Every section that cannot be computed says so in one line in the table and as a structured
{"skipped": reason} in report.json (never a stringified dict); no empty or half-drawn plot is
written (report.json's plots_skipped says why); no library warning leaks."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the eval extra (scikit-learn) is not installed")
pytest.importorskip("matplotlib", reason="the eval extra (matplotlib) is not installed")

from sigvlp.demo.synth import SYNTH_PRESETS, write_dataset  # noqa: E402
from sigvlp.eval import suite as S  # noqa: E402
from sigvlp.eval.plots import unplottable, write_plots  # noqa: E402
from sigvlp.eval.report import SECTIONS, check_skipped, format_table, validate_report  # noqa: E402
from sigvlp.eval.sections import retrieval_section  # noqa: E402
from sigvlp.model import SigVLP, SigVLPConfig  # noqa: E402

MAX_LINE = 300  # the longest line the table may print


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return SigVLP(SigVLPConfig.preset("tiny")).save_pretrained(tmp_path_factory.mktemp("small_ckpt"))


def _data(tmp_path_factory, n_valid):
    root = tmp_path_factory.mktemp(f"small_{n_valid}")
    return write_dataset(root, n_train=3, n_valid=n_valid, seed=3, config=SYNTH_PRESETS["tiny"], workers=1)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _data(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return _data(tmp_path_factory, 1)


def _check_skipped(entry, where):
    """A skipped entry: a dict whose "skipped" is one short line of text (no dict in it)."""
    assert isinstance(entry, dict) and isinstance(entry.get("skipped"), str), (where, entry)
    text = entry["skipped"]
    assert text and "\n" not in text and len(text) <= 200 and "{" not in text, (where, text)


def _check_report(report, out):
    """Structured skips throughout; every plot written has data, every plot not written has a reason."""
    validate_report(report)
    for key in SECTIONS:
        sec = report[key]
        if "skipped" in sec:
            _check_skipped(sec, key)
    for key, group in (("zero_shot", "labels_skipped"), ("organs", "organs_skipped")):
        for name, entry in report[key].get(group, {}).items():
            _check_skipped(entry, f"{key}.{group}[{name!r}]")
            assert isinstance(entry["positives"], int) and isinstance(entry["negatives"], int)
            assert repr(name) in entry["skipped"]
    written = {p.stem for p in out.glob("*.png")}
    assert written == set(report["plots"])
    for name, why in report["plots_skipped"].items():
        assert name not in written and isinstance(why, str) and "\n" not in why and len(why) <= 200


def test_cli_on_three_volumes_skips_in_one_line_each_and_warns_nothing(three, ckpt, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "sigvlp", "eval", "--ckpt", str(ckpt), "--data", str(three), "--out", str(out),
           "--bootstrap", "50", "--chunks-per-volume", "2", "--seg-volumes", "2", "--depths", "4", "8",
           "--no-progress", "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr == ""  # no matplotlib / scikit-learn / numpy warning, nothing else
    lines = p.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= MAX_LINE and "{'" not in p.stdout, p.stdout
    report = json.loads((out / "report.json").read_text())
    _check_report(report, out)
    # 3 volumes: no label has 5 positives and 5 negatives, so zero-shot and the depth sweep are skipped
    assert "skipped" in report["zero_shot"] and len(report["zero_shot"]["labels_skipped"]) == 18
    assert "skipped" in report["depth_sweep"]
    for key in ("zero_shot", "depth_sweep"):
        assert sum(ln.startswith(f"{key}: skipped (") for ln in lines) == 1, p.stdout
    assert not (out / "f1_vs_slices.png").exists() and "f1_vs_slices" in report["plots_skipped"]
    assert "plots not written: " in p.stdout
    # an organ radar needs three organs; the map is drawn uncoloured (no abnormality scored)
    if len(report["organs"].get("organs_used", [])) < 3:
        assert "organ_radar" in report["plots_skipped"]
    assert "embedding_map" in report["plots"]
    # R@k over 3 candidates for k >= 3 is 1 whatever the model: a skipped entry and "-", never 1.000
    for part in ("volume_to_report", "report_to_volume"):
        m = report["retrieval"][part]
        assert m["n_candidates"] == 3 and isinstance(m["R@1"], float), m
        assert [m[f"R@{k}"] for k in (5, 10, 50)] == [{"skipped": f"{k} >= 3 candidates: trivially 1"}
                                                    for k in (5, 10, 50)]
        row = next(ln for ln in lines if ln.startswith(part + " "))
        assert row.split()[3:6] == ["-", "-", "-"] and "1.000" not in row, row
        assert f"{part}: R@5, R@10, R@50 not reported (k >= 3 candidates: trivially 1)" in lines


def test_api_on_one_volume_skips_every_section_it_cannot_compute(one, ckpt, tmp_path):
    cfg = S.EvalConfig(n_bootstrap=20, min_positives=1, min_negatives=1, chunks_per_volume=2, depths=(4, 8),
                       seg_volumes=1, progress=False, cache=str(tmp_path / "cache"))
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (matplotlib, sklearn, numpy) fails the test
        report = S.evaluate(ckpt, one, cfg, out=out)
    _check_report(report, out)
    # one volume: no label has a positive and a negative; nothing to rank against; no 2-D map
    assert "1 volume" in report["zero_shot"]["skipped"], report["zero_shot"]
    assert "skipped" in report["depth_sweep"]
    assert "skipped" in report["retrieval"] and "1 volume" in report["retrieval"]["skipped"]
    assert "skipped" in report["embedding_map"] and "1 volume" in report["embedding_map"]["skipped"]
    assert not set(report["plots"]) & {"f1_vs_slices", "embedding_map", "zero_shot_auroc"}
    table = format_table(report)
    for key in ("zero_shot", "retrieval", "depth_sweep", "embedding_map"):
        assert sum(ln.startswith(f"{key}: skipped (") for ln in table.splitlines()) == 1, table
    assert max(len(ln) for ln in table.splitlines()) <= MAX_LINE and "{'" not in table


# ----------------------------------------------------------------------------- plots from fixed reports
def _point(slices, auroc=None, f1=None):
    return {"slices": slices, "tokens": slices * 4, "encoder_flops": 1e6 * slices, "mean_auroc": auroc,
            "mean_f1_weighted": f1, "n_labels": 0 if auroc is None else 2, "n_volumes": 3}


@pytest.mark.parametrize("points, written", [
    ([_point(4), _point(8), _point(16)], False),  # no scored label at any depth: no curve
    ([_point(4, 0.6, 0.5)], False),  # one depth: no curve
    ([_point(4, 0.6, 0.5), _point(8), _point(16, 0.7, 0.6)], True),
])
def test_f1_vs_slices_needs_two_scored_depths(tmp_path, points, written):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = {"depth_sweep": {"points": points}}
        skipped, paths = unplottable(report), write_plots(report, tmp_path)
    assert ("f1_vs_slices" in paths) == written == (tmp_path / "f1_vs_slices.png").exists()
    if not written:
        assert "f1_vs_slices" in skipped and "\n" not in skipped["f1_vs_slices"]


def test_organ_radar_needs_three_organs(tmp_path):
    per = {o: {"auroc": 0.7, "f1": 0.6} for o in ("heart", "trachea")}
    organs = {"organs_used": ["heart", "trachea"], "zero_shot": {"per_organ": per, "mean": {}},
              "linear_probe": {"skipped": "no train split embeddings"}}
    skipped, paths = unplottable({"organs": organs}), write_plots({"organs": organs}, tmp_path)
    assert not paths and not list(tmp_path.glob("*.png")) and "2 organs" in skipped["organ_radar"]


def test_organ_table_names_the_organs_it_could_not_score():
    per = {o: {"auroc": 0.7, "f1": 0.6, "n_pos": 9} for o in ("heart", "lung")}
    organs = {"organs_used": ["heart", "lung"], "zero_shot": {"per_organ": per, "mean": {"auroc": 0.7, "f1": 0.6}},
              "linear_probe": {"skipped": "no train split embeddings"},
              "organs_skipped": {"kidney": {"positives": 2, "negatives": 30, "skipped": "too few positive chunks"},
                                 "liver": {"positives": 32, "negatives": 0, "skipped": "too few negative chunks"}}}
    lines = format_table({"organs": organs, "config": {"min_positives": 5, "min_negatives": 5}}).splitlines()
    said = [ln for ln in lines if "organs not scored" in ln]
    assert said == ["organs not scored (< 5 positive or < 5 negative chunks; positives/negatives): kidney (2/30), "
                    "liver (32/0)"], lines
    organs["organs_skipped"] = {}
    assert "not scored" not in format_table({"organs": organs})


def test_organ_radar_shows_a_series_that_is_zero_everywhere(tmp_path, monkeypatch):
    import sigvlp.eval.plots as P

    names = ["heart", "lung", "liver"]
    organs = {"organs_used": names,
              "zero_shot": {"per_organ": {o: {"auroc": 0.6, "f1": 0.0} for o in names}},
              "linear_probe": {"per_organ": {o: {"auroc": 0.9, "f1": 0.8} for o in names}}}
    figs = []
    real = P._save
    monkeypatch.setattr(P, "_save", lambda fig, path: (figs.append(fig), real(fig, path))[1])
    P.plot_organ_radar(organs, tmp_path / "radar.png")
    ax = figs[0].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    zero = [k for k in lines if k.startswith("zero shot F1")]
    assert zero == ["zero shot F1 (0 for every organ)"], list(lines)
    assert lines[zero[0]].get_marker() not in (None, "", "None") and lines[zero[0]].get_markersize() > 0
    assert not any("every organ" in k for k in lines if k != zero[0])
    assert zero[0] in [t.get_text() for t in ax.get_legend().get_texts()]


def test_embedding_map_without_scored_labels_has_no_empty_legend(tmp_path):
    coords = np.random.default_rng(0).standard_normal((6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend without labelled artists
        report = {"embedding_map": {"method": "pca", "n": 6}}
        skipped, paths = unplottable(report, map_coords=coords), write_plots(report, tmp_path, map_coords=coords)
    assert (tmp_path / "embedding_map.png").is_file() and "embedding_map" in paths and "embedding_map" not in skipped


def test_validate_report_refuses_a_stringified_dict_as_skip_reason():
    check_skipped({"skipped": "only 2 volumes (needs >= 3)"}, "x")
    for bad in ({"skipped": str({"a": {"positives": 0}})}, {"skipped": "two\nlines"}, {"skipped": 3},
                {"skipped": "x" * 400}):
        with pytest.raises(ValueError, match="report: x"):
            check_skipped(bad, "x")


# ----------------------------------------------------------------------------- trivial recall, min-count, train error
def test_chunk_retrieval_reports_only_k_below_its_candidates():
    rng = np.random.default_rng(0)
    vol, chunks = rng.standard_normal((3, 8)), rng.standard_normal((7, 8))
    texts = ["a", "b", "c", "d", "e", "f", ""]  # 6 chunks with text, one without
    sec = retrieval_section(vol, vol, ["x", "y", "z"], chunks, chunks, texts)
    ch = sec["chunk_to_organ_text"]
    assert ch["n_candidates"] == 6 and isinstance(ch["R@1"], float) and isinstance(ch["R@5"], float)
    assert ch["R@10"] == {"skipped": "10 >= 6 candidates: trivially 1"} and "skipped" in ch["R@50"]
    table = format_table({"retrieval": sec})
    assert "chunk_to_organ_text: R@10, R@50 not reported (k >= 6 candidates: trivially 1)" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("chunk_to_organ_text "))
    assert row.split()[4:6] == ["-", "-"] and "{" not in table, table


def test_depth_sweep_without_zero_shot_applies_the_min_count_rule(three, ckpt, tmp_path):
    import csv

    with open(three / "dataset" / "multi_abnormality_labels" / "valid_predicted_labels.csv") as f:
        rows = list(csv.DictReader(f))
    positives = {k: sum(int(float(r[k])) for r in rows) for k in rows[0] if k != "VolumeName"}
    assert max(positives.values()) == 1  # the phantoms' labels: at most 1 positive of 3 volumes

    def sweep(min_positives, min_negatives):
        cfg = S.EvalConfig(sections=("depth_sweep",), min_positives=min_positives, min_negatives=min_negatives,
                           depths=(4, 8), progress=False, plots=False, cache=str(tmp_path / "cache"))
        return S.evaluate(ckpt, three, cfg)["depth_sweep"]

    sec = sweep(2, 1)  # no label has 2 positives: skipped like zero_shot, never scored on 1 positive
    assert "skipped" in sec and "no label has >= 2 positive and >= 1 negative volumes" in sec["skipped"], sec
    check_skipped(sec, "depth_sweep")
    assert sorted(sec["labels_skipped"]) == sorted(positives)
    sec = sweep(1, 2)  # the labels with one positive (and two negatives) are scored, the others not
    assert [p["n_labels"] for p in sec["points"]] == [sum(v == 1 for v in positives.values())] * 2


def test_unreadable_train_split_is_one_line_with_details_beside(three, ckpt, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(three, root, ignore=shutil.ignore_patterns(".sigvlp_cache"))
    broken = sorted((root / "dataset" / "train").rglob("*.nii.gz"))
    for path in broken:
        path.write_bytes(b"not a NIfTI")
    cfg = S.EvalConfig(sections=("organs", "segmentation"), min_positives=1, min_negatives=1, chunks_per_volume=2,
                       progress=False, plots=False, cache=str(tmp_path / "cache"))
    report = S.evaluate(ckpt, root, cfg)
    ds = report["dataset"]
    assert "\n" not in ds["train_error"] and "has no usable volumes" in ds["train_error"], ds
    assert sum(str(p) in line for p in broken for line in ds["train_error_detail"]) == len(broken)
    for sec in (report["segmentation"], report["organs"]["linear_probe"]):
        check_skipped(sec, "probe")
        assert "'train' split could not be opened" in sec["skipped"]
    table = format_table(report)
    assert f"probe split 'train' not opened: {ds['train_error']}" in table.splitlines()
    with pytest.raises(ValueError, match="train_error must be one line"):
        validate_report({**report, "dataset": {**ds, "train_error": ds["train_error"] + "\nmore"}})
