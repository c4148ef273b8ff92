"""Synthetic phantoms: determinism, abnormalities visible in their organ's HU, CT-RATE layout, CLI."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from _data_helpers import TINY, tiny_dataset
from sigvlp.data.chunks import load_findings_bank
from sigvlp.data.ctrate import CTRATE_LABELS, LABEL_COLUMNS, REPORT_COLUMNS, volume_relpath
from sigvlp.data.organs import ORGAN_GROUPS, ORGANS
from sigvlp.demo.synth import (DRAWN, HU, PREVALENCE, SYNTH_PRESETS, SynthConfig, ensure_default_dataset,
                               make_phantom, sample_findings)
from sigvlp.data.volume import load_mask, load_volume


def _organ(p, name):
    return np.isin(p.labels, ORGAN_GROUPS[name])


def _width_mm(p, mask):
    xs = np.nonzero(mask.any(axis=(0, 1)))[0]
    return (xs.max() - xs.min() + 1) * p.spacing[2] if xs.size else 0.0


def _top_slice(mask):
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    return zs.max() if zs.size else -1


def _statistic(p, finding):
    """The HU / shape statistic of the finding's organ a radiologist would read it from."""
    hu = p.hu.astype(np.float32)
    lung, heart = hu[_organ(p, "lung")], hu[_organ(p, "heart")]
    return {
        "Lung nodule": lambda: np.mean(lung > -300),  # solid tissue inside lung
        "Emphysema": lambda: np.mean(lung < -950),  # LAA-950
        "Lung opacity": lambda: np.mean((lung > -700) & (lung < -450)),  # ground glass
        "Consolidation": lambda: np.mean(lung > -100),
        "Atelectasis": lambda: np.mean(lung > -100),
        "Pleural effusion": lambda: np.mean((lung > -20) & (lung < 40)),  # fluid in the pleural space
        "Cardiomegaly": lambda: _width_mm(p, _organ(p, "heart")) / _width_mm(p, _organ(p, "lung") | _organ(p, "heart")),
        "Pericardial effusion": lambda: np.mean((heart > -15) & (heart < 22)),  # fluid density
        "Arterial wall calcification": lambda: np.sum(hu[_organ(p, "aorta")] > 130),
        "Coronary artery wall calcification": lambda: np.sum(heart > 130),
        "Hiatal hernia": lambda: _top_slice(_organ(p, "stomach")) - _top_slice(_organ(p, "liver")),
        "Medical material": lambda: np.sum(hu > 2000),
    }[finding]()


def test_phantoms_are_deterministic_by_seed():
    a, b, c = make_phantom(5, TINY), make_phantom(5, TINY), make_phantom(6, TINY)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.organ_sentences == b.organ_sentences and a.impression == b.impression
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_abnormality_is_visible_in_its_organ(seed):
    normal = make_phantom(seed, TINY, findings=[])
    assert sum(normal.labels_present.values()) == 0
    for finding in DRAWN:
        sick = make_phantom(seed, TINY, findings=[finding])
        # Same anatomy otherwise: the finding is the only change.
        assert sick.hu.shape == normal.hu.shape
        base, value = _statistic(normal, finding), _statistic(sick, finding)
        assert value > base, (finding, base, value)
        assert sick.labels_present[finding] == 1, finding
        assert sick.impression != normal.impression
        assert sick.organ_sentences != normal.organ_sentences, finding
    # Thresholds a reader would use, not just "more than before":
    assert _statistic(make_phantom(seed, TINY, findings=["Cardiomegaly"]), "Cardiomegaly") > 0.5
    assert _statistic(normal, "Arterial wall calcification") == 0
    assert _statistic(make_phantom(seed, TINY, findings=["Emphysema"]), "Emphysema") > 5 * _statistic(normal, "Emphysema")


def test_tissue_hu_is_realistic():
    p = make_phantom(3, TINY, findings=[])
    hu = p.hu.astype(np.float32)
    med = {name: float(np.median(hu[_organ(p, name)])) for name in ("lung", "heart", "liver", "aorta", "spine")}
    assert -900 < med["lung"] < -800
    assert 20 <= med["heart"] <= 60 and 40 <= med["aorta"] <= 60 and 50 <= med["liver"] <= 70
    assert med["spine"] > 200
    assert np.median(hu[p.labels == 0][hu[p.labels == 0] < -500]) == pytest.approx(HU["air"], abs=30)
    body_fat = (hu > -130) & (hu < -70)
    assert body_fat.mean() > 0.02  # subcutaneous / mediastinal fat present


def test_findings_prevalence_and_normals():
    cfg = SynthConfig()
    draws = [sample_findings(s, cfg) for s in range(3000)]
    normal = np.mean([len(d) == 0 for d in draws])
    assert normal >= cfg.normal_fraction - 0.03
    for name, p in PREVALENCE.items():
        rate = np.mean([name in d for d in draws])
        assert rate == pytest.approx(p * (1 - cfg.normal_fraction), abs=0.035), name
    assert len(DRAWN) >= 8 and set(DRAWN) <= set(CTRATE_LABELS)


def test_default_geometry_varies_in_slices_spacing_and_orientation(tmp_path_factory):
    shapes = [make_phantom(s, SYNTH_PRESETS["small"]) for s in range(6)]
    zs = {p.hu.shape[0] for p in shapes}
    sp = {p.spacing[0] for p in shapes}
    assert len(zs) > 2 and len(sp) > 2
    assert all(60 <= p.hu.shape[0] <= 400 for p in shapes)
    assert all(0.75 <= p.spacing[0] <= 5 for p in shapes)
    assert len({p.hu.shape[1] for p in shapes}) > 1


def test_dataset_layout_csvs_masks_and_bank(tmp_path_factory):
    out = tiny_dataset(tmp_path_factory)
    axcodes = set()
    for split, csv_split, n in (("train", "train", 6), ("valid", "validation", 2)):
        with open(out / "dataset" / "radiology_text_reports" / f"{csv_split}_reports.csv") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == REPORT_COLUMNS
            reports = list(reader)
        with open(out / "dataset" / "multi_abnormality_labels" / f"{split}_predicted_labels.csv") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == LABEL_COLUMNS
            labels = {r["VolumeName"]: r for r in reader}
        with open(out / "dataset" / "metadata" / f"{csv_split}_metadata.csv") as f:
            metas = {r["VolumeName"]: r for r in csv.DictReader(f)}
        bank = load_findings_bank(out / "findings" / f"{split}_findings.jsonl")
        assert len(reports) == n
        for rep in reports:
            name = rep["VolumeName"]
            assert name.endswith(".nii.gz") and name.startswith(f"{split}_")
            path = out / "dataset" / volume_relpath(name)
            vol = load_volume(path)
            meta = metas[name]
            assert int(meta["NumberofSlices"]) == vol.shape[0]
            assert float(meta["ZSpacing"]) == pytest.approx(vol.spacing[0], rel=1e-5)
            assert json.loads(meta["XYSpacing"])[0] == pytest.approx(vol.spacing[1], rel=1e-4)
            mask = load_mask(out / "masks" / volume_relpath(name), vol.shape)
            assert set(np.unique(mask)) >= {5, 10, 51, 52}
            axcodes.add(nib.aff2axcodes(nib.load(path).affine))
            entry = bank[name]
            assert set(entry["organs"]) <= set(ORGANS) and entry["general"] == rep["Impressions_EN"]
            positives = [k for k in CTRATE_LABELS if labels[name][k] == "1"]
            assert (rep["Impressions_EN"].startswith("No significant")) == (not positives)
            for sentences in entry["organs"].values():
                for s in sentences:
                    assert s in rep["Findings_EN"]
    assert axcodes == {("R", "A", "S"), ("L", "P", "S")}


def test_cli_and_default_dataset(tmp_path):
    from sigvlp.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--n-train", "2", "--n-valid", "1", "--seed", "4",
                 "--preset", "tiny", "--workers", "1"]) == 0
    assert len(list((out / "dataset" / "train").rglob("*.nii.gz"))) == 2
    assert len(list((out / "dataset" / "valid").rglob("*.nii.gz"))) == 1

    d = ensure_default_dataset(tmp_path / "default", n_train=2, n_valid=1, preset="tiny", workers=1)
    stamp = (d / "synth.json").stat().st_mtime_ns
    files = sorted(p.name for p in d.rglob("*.nii.gz"))
    assert ensure_default_dataset(d, n_train=2, n_valid=1, preset="tiny", workers=1) == d
    assert (d / "synth.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    ensure_default_dataset(d, n_train=3, n_valid=1, preset="tiny", workers=1)  # other parameters: regenerated
    assert len(sorted(p.name for p in d.rglob("*.nii.gz"))) > len(files)


def test_dataset_is_deterministic(tmp_path):
    from sigvlp.demo.synth import write_dataset

    a = write_dataset(tmp_path / "a", 2, 1, seed=9, config=TINY, workers=1)
    b = write_dataset(tmp_path / "b", 2, 1, seed=9, config=TINY, workers=2)
    for f in sorted(a.rglob("*.csv")) + sorted(a.rglob("*.jsonl")):
        assert f.read_text() == (b / f.relative_to(a)).read_text()
    for f in sorted(a.rglob("*.nii.gz")):
        np.testing.assert_array_equal(np.asarray(nib.load(f).dataobj.get_unscaled()),
                                      np.asarray(nib.load(b / f.relative_to(a)).dataobj.get_unscaled()))


def test_bad_synth_arguments(tmp_path):
    from sigvlp.demo.synth import write_dataset

    with pytest.raises(ValueError, match="n_train"):
        write_dataset(tmp_path, -1, 0)
    with pytest.raises(ValueError, match="not drawn"):
        make_phantom(0, TINY, findings=["Bronchiectasis"])


def test_import_boundaries():
    """sigvlp.ops never pulls in the data package; the synth package and its CLI module stay free of torch."""
    import subprocess
    import sys

    code = ("import sys, sigvlp.ops; assert not [m for m in sys.modules if m.startswith('sigvlp.data')]; "
            "import sigvlp.demo.synth")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, sigvlp.demo.synth.cli; assert 'torch' not in sys.modules, 'synth imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- make_phantom steps
# sha256 (first 20 hex) of make_phantom's output (hu, labels, findings, text, geometry) recorded
# before make_phantom was split into named steps: the split must not change any phantom.
PHANTOM_DIGESTS = {
    (0, None): "bf7c65a49330389434cd",
    (1, None): "d7ff8dc6dfff8a9ea34a",
    (2, "all"): "a8f0dee3f7fb28f80a4f",
    (3, "none"): "544a24dad423efb1873a",
    (7, "three"): "3d335b0150d89b8debde",
}


def _phantom_digest(p):
    import hashlib

    h = hashlib.sha256()
    h.update(p.hu.tobytes())
    h.update(str(p.hu.shape).encode())
    h.update(p.labels.tobytes())
    rest = {"findings": p.findings, "sentences": p.organ_sentences, "impression": p.impression, "clinical": p.clinical,
            "technique": p.technique, "patient": p.patient, "spacing": p.spacing, "origin": p.origin}
    h.update(json.dumps(rest, sort_keys=True, default=float).encode())
    return h.hexdigest()[:20]


def test_phantom_output_is_unchanged_by_the_step_split():
    forced = {None: None, "all": list(DRAWN), "none": [],
              "three": ["Pleural effusion", "Medical material", "Hiatal hernia"]}
    for (seed, which), want in PHANTOM_DIGESTS.items():
        assert _phantom_digest(make_phantom(seed, TINY, findings=forced[which])) == want, (seed, which)


def test_make_phantom_is_built_from_named_steps(monkeypatch):
    """Behaviour, not source text: make_phantom runs the anatomy steps in order, then the step of
    each present abnormality (and no other), then noise and the report."""
    from sigvlp.demo.synth import anatomy, lesions, phantom

    assert sorted(lesions.ABNORMALITY_STEPS) == sorted(DRAWN)  # one named step per abnormality
    calls = []

    def spy(name, step):
        def run(*args):
            calls.append(name)
            return step(*args)
        return run

    names = ["geometry", "body_wall", "abdomen", "lungs", "heart", "skeleton", "vessels_airway"]
    assert [f.__name__ for f in anatomy.ANATOMY_STEPS] == names
    monkeypatch.setattr(phantom, "ANATOMY_STEPS", tuple(spy(f.__name__, f) for f in anatomy.ANATOMY_STEPS))
    for name in ("noise_and_quantise", "report_fields"):
        monkeypatch.setattr(phantom, name, spy(name, getattr(phantom, name)))
    for name, step in list(lesions.ABNORMALITY_STEPS.items()):
        monkeypatch.setitem(lesions.ABNORMALITY_STEPS, name, spy(name, step))
    findings = ["Pleural effusion", "Hiatal hernia"]
    make_phantom(3, TINY, findings=findings)
    present = [name for name in lesions.ABNORMALITY_STEPS if name in findings]
    assert sorted(present) == sorted(findings)
    assert calls == names + present + ["noise_and_quantise", "report_fields"]


# ----------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("args, option", [
    (["--n-train", "-1"], "--n-train"),
    (["--n-valid", "x"], "--n-valid"),
    (["--size", "100", "50"], "--size"),
    (["--slices", "0", "5"], "--slices"),
    (["--workers", "-2"], "--workers"),
])
def test_bad_synth_options_are_one_line_usage_errors(tmp_path, capsys, args, option):
    from sigvlp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sigvlp synth: error: argument " + option), last
    assert not (tmp_path / "o").exists()


def test_no_volumes_at_all_is_a_one_line_usage_error(tmp_path, capsys):
    from sigvlp.cli import main
    from sigvlp.demo.synth import write_dataset

    out = tmp_path / "o"
    assert main(["synth", "--out", str(out), "--n-train", "0", "--n-valid", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ("sigvlp synth: error: argument --n-train/--n-valid: both are 0, "
                                                   "nothing to write (give at least one volume)\n")
    assert not out.exists()
    with pytest.raises(ValueError, match="n_train and n_valid are both 0"):
        write_dataset(out, 0, 0)
    assert not out.exists()


def test_out_pointing_at_a_file_is_a_usage_error(tmp_path, capsys):
    from sigvlp.cli import main

    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [f"sigvlp synth: error: argument --out: {f} exists and is not a folder "
                                           "(see sigvlp synth --help)"]


def test_rerun_into_a_used_folder_needs_overwrite_which_removes_old_volumes(tmp_path, capsys):
    from sigvlp.cli import main

    out = tmp_path / "o"
    base = ["synth", "--out", str(out), "--preset", "tiny", "--workers", "1", "--n-valid", "1"]
    assert main(base + ["--n-train", "3"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(base + ["--n-train", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sigvlp synth: error: argument --out:") and "--overwrite" in err[-1]
    assert len(list((out / "dataset" / "train").rglob("*.nii.gz"))) == 3  # untouched
    assert main(base + ["--n-train", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "dataset" / "train").rglob("*.nii.gz")) == ["train_1_a_1.nii.gz"]
    assert len(list((out / "masks").rglob("*.nii.gz"))) == 2 and (out / "notes.txt").read_text() == "mine"
    from sigvlp.data.ctrate import CTRateDataset

    ds = CTRateDataset(out, "train")
    assert len(ds) == 1 and not ds.scan.skipped  # no volumes without rows


def test_synth_help_shows_defaults(capsys):
    from sigvlp.cli import main

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--n-train N_TRAIN training volumes (default: 200)", "(default: 50)", "(default: small)",
                 "--overwrite"):
        assert text in out, text


def _fake_ctrate(root):
    """A CT-RATE-like folder that sigvlp synth did not write (no synth.json), with a user notes file."""
    files = {"dataset/train/train_1/train_1_a/train_1_a_1.nii.gz": b"scan",
             "dataset/radiology_text_reports/train_reports.csv": b"VolumeName\ntrain_1_a_1.nii.gz\n",
             "dataset/multi_abnormality_labels/train_predicted_labels.csv": b"VolumeName\n",
             "masks/train/train_1/train_1_a/train_1_a_1.nii.gz": b"mask",
             "findings/train_findings.jsonl": b"{}\n",
             "dataset/my_notes.txt": b"mine"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_a_folder_synth_did_not_write(tmp_path, capsys):
    from sigvlp.cli import main
    from sigvlp.demo.synth import write_dataset

    root = tmp_path / "ctrate"
    files = _fake_ctrate(root)
    assert main(["synth", "--out", str(root), "--n-train", "1", "--n-valid", "0", "--preset", "tiny",
                 "--workers", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sigvlp synth: error: argument --out:")
    assert str(root) in err[0] and "does not look like a sigvlp synth output" in err[0]
    assert _snapshot(root) == files
    with pytest.raises(ValueError, match="does not look like a sigvlp synth output") as exc:
        ensure_default_dataset(root, n_train=1, n_valid=0, preset="tiny", workers=1)
    assert str(root) in str(exc.value) and _snapshot(root) == files
    with pytest.raises(ValueError, match="does not look like a sigvlp synth output"):
        write_dataset(root, 1, 0, config=TINY, workers=1, overwrite=True)
    assert _snapshot(root) == files
    (root / "synth.json").write_text("my own notes, not json")  # a synth.json that synth did not write
    with pytest.raises(ValueError, match="not a marker written by sigvlp synth"):
        ensure_default_dataset(root, n_train=1, n_valid=0, preset="tiny", workers=1)
    assert _snapshot(root) == {**files, "synth.json": b"my own notes, not json"}


def test_overwrite_deletes_only_the_files_the_previous_run_listed(tmp_path):
    from sigvlp.cli import main

    out = tmp_path / "o"
    base = ["synth", "--out", str(out), "--preset", "tiny", "--workers", "1", "--n-valid", "0"]
    assert main(base + ["--n-train", "2"]) == 0
    mine = {"dataset/my_notes.txt": b"mine", "masks/train/train_2/extra.txt": b"also mine",
            "dataset/train/train_9/train_9_a/train_9_a_1.nii.gz": b"my scan"}
    for rel, data in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    assert main(base + ["--n-train", "1", "--overwrite"]) == 0
    snap = _snapshot(out)
    assert {k: snap[k] for k in mine} == mine  # the user's files survive
    assert not (out / "dataset/train/train_2").exists()  # synth's old volume and its emptied folders are gone
    assert not (out / "masks/train/train_2/train_2_a").exists()
    assert sorted(p.name for p in (out / "masks").rglob("*.nii.gz")) == ["train_1_a_1.nii.gz"]
    assert json.loads((out / "synth.json").read_text())["n_train"] == 1


def test_ensure_default_dataset_resumes_an_interrupted_run(tmp_path):
    d = ensure_default_dataset(tmp_path / "d", n_train=1, n_valid=0, preset="tiny", workers=1)
    info = json.loads((d / "synth.json").read_text())
    assert "complete" not in info
    (d / "synth.json").write_text(json.dumps({**info, "complete": False}))  # as left by a killed run
    (d / "dataset" / "radiology_text_reports" / "train_reports.csv").unlink()
    assert ensure_default_dataset(d, n_train=1, n_valid=0, preset="tiny", workers=1) == d
    assert json.loads((d / "synth.json").read_text()) == info
    assert (d / "dataset" / "radiology_text_reports" / "train_reports.csv").is_file()


def test_dataset_root_that_is_a_file_says_so(tmp_path):
    from sigvlp.data.ctrate import CTRateDataset

    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(FileNotFoundError) as exc:
        CTRateDataset(f, "train")
    assert str(exc.value) == f"{f} is a file, expected a dataset folder"
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        CTRateDataset(tmp_path / "absent", "train")


def test_demo_preset_findings_stay_visible_after_preprocessing():
    """The demo's phantoms (lesions twice their size, at least 9 mm in radius) are meant to be read
    after the demo's preprocessing (64 px, 3 mm): every finding changes at least 8 voxels of that
    grid by more than 100 HU, and a scaled finding changes more voxels than the unscaled one of the
    same anatomy."""
    import dataclasses

    from sigvlp.data.preprocess import preprocess_array, preset

    demo, pp = SYNTH_PRESETS["demo"], preset("tiny")
    plain = dataclasses.replace(demo, lesion_scale=1.0, min_lesion_mm=None)

    def changed(cfg, seed, finding):
        a, b = make_phantom(seed, cfg, findings=[]), make_phantom(seed, cfg, findings=[finding])
        d = np.abs(preprocess_array(b.hu, b.spacing, pp) - preprocess_array(a.hu, a.spacing, pp)) * 1000
        return int((d > 100).sum())

    for finding in DRAWN:
        if finding in ("Cardiomegaly", "Medical material"):
            continue  # not lesion-sized: the heart's size, a device
        n_demo = changed(demo, 4, finding)
        assert n_demo >= 8, (finding, n_demo)
        assert n_demo > changed(plain, 4, finding), finding
    nodule = make_phantom(4, demo, findings=["Lung nodule"]).findings["Lung nodule"]["nodules"]
    assert all(n["diameter_mm"] >= 18 for n in nodule)


def test_lesion_options_are_checked():
    import dataclasses

    for bad in (0.0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="lesion_scale"):
            dataclasses.replace(TINY, lesion_scale=bad)
    with pytest.raises(ValueError, match="min_lesion_mm"):
        dataclasses.replace(TINY, min_lesion_mm=-2.0)
