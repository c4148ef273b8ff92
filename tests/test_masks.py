"""TotalSegmentator masks in every format it writes (multilabel with and without its label table,
v1-order maps, folders of binary files, CT-RATE's ts_total files) and the `sigvlp masks` command
(TotalSegmentator itself is replaced by a stand-in: its weights cannot be fetched here)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _data_helpers import save, save_labels, write_ctrate
from sigvlp.data.ctrate import CTRateDataset, volume_relpath
from sigvlp.data.masks import TOTAL_CLASSES, label_table, load_total_labels

# Ids written out from TotalSegmentator's map_to_binary.py (class_map["total"] and ["total_v1"]).
V2 = {"spleen": 1, "liver": 5, "pancreas": 7, "lung_upper_lobe_left": 10, "lung_lower_lobe_right": 14,
      "esophagus": 15, "trachea": 16, "sacrum": 25, "vertebrae_S1": 26, "vertebrae_L1": 31, "vertebrae_T1": 43,
      "vertebrae_C1": 50, "heart": 51, "aorta": 52, "spinal_cord": 79, "brain": 90, "skull": 91, "rib_left_1": 92,
      "rib_right_12": 115, "sternum": 116, "costal_cartilages": 117}
V1 = {"liver": 5, "aorta": 7, "pancreas": 10, "lung_upper_lobe_left": 13, "lung_lower_lobe_right": 17,
      "heart_myocardium": 44, "heart_atrium_left": 45, "pulmonary_artery": 49, "face": 93}


def test_class_table_is_totalsegmentators_current_total_map():
    assert len(TOTAL_CLASSES) == 117 and sorted(TOTAL_CLASSES) == list(range(1, 118))
    assert {name: i for i, name in TOTAL_CLASSES.items() if name in V2} == V2
    assert len(set(TOTAL_CLASSES.values())) == 117
    from sigvlp.data.organs import RIB_IDS, TS_IDS, VERTEBRA_IDS  # the organ groups' own ids agree

    for name, i in {**TS_IDS, **VERTEBRA_IDS, **RIB_IDS}.items():
        assert TOTAL_CLASSES[i] == name


def _organ_slab_xyz():
    """(x, y, z) = (6, 5, 4) label map: liver, aorta, pancreas, a lung lobe, heart in distinct boxes."""
    lab = np.zeros((6, 5, 4), np.uint8)
    lab[0:2, 0:2, 0] = V2["liver"]
    lab[2:4, 0:2, 1] = V2["aorta"]
    lab[4:6, 0:2, 2] = V2["pancreas"]
    lab[0:3, 3:5, 3] = V2["lung_upper_lobe_left"]
    lab[3:6, 3:5, 3] = V2["heart"]
    return lab


def test_multilabel_with_and_without_its_label_table(tmp_path):
    lab = _organ_slab_xyz()
    plain = save_labels(tmp_path / "plain.nii.gz", lab)
    named = save_labels(tmp_path / "named.nii.gz", lab, {i: n for i, n in TOTAL_CLASSES.items()})
    assert label_table(plain) is None and label_table(named) == TOTAL_CLASSES
    for p in (plain, named):
        out = load_total_labels(p, shape=(4, 5, 6))
        assert out.dtype == np.uint8 and np.array_equal(out, lab.transpose(2, 1, 0))
    with pytest.raises(ValueError, match="shape"):
        load_total_labels(plain, shape=(4, 5, 7))


def test_v1_order_map_is_remapped_by_its_label_table_and_the_unnamed_risk_is_real(tmp_path, caplog):
    v2 = _organ_slab_xyz()
    v1 = np.zeros_like(v2)
    for name in ("liver", "aorta", "pancreas", "lung_upper_lobe_left"):
        v1[v2 == V2[name]] = V1[name]
    v1[3:6, 3:5, 3] = V1["heart_myocardium"]  # v1 splits the heart; all of it is "heart" in v2
    v1[5, 4, 3] = V1["heart_atrium_left"]
    v1[0, 4, 0] = V1["pulmonary_artery"]  # no v2 class: background
    v1_table = {V1[n]: n for n in V1}
    with caplog.at_level(logging.INFO, logger="sigvlp.data"):
        out = load_total_labels(save_labels(tmp_path / "v1.nii.gz", v1, v1_table))
    assert np.array_equal(out, v2.transpose(2, 1, 0))
    assert any("remapped by the label table" in r.getMessage() and "7 aorta -> 52" in r.getMessage()
               for r in caplog.records)
    # without its table the same file passes the id range check and reads as other organs:
    # v1's 7 (aorta) becomes v2's 7 (pancreas). This is the documented risk.
    blind = load_total_labels(save_labels(tmp_path / "v1-plain.nii.gz", v1))
    assert np.array_equal(blind, v1.transpose(2, 1, 0)) and TOTAL_CLASSES[int(blind[1, 0, 2])] == "pancreas"


def test_label_tables_of_other_tasks_or_missing_ids_are_refused(tmp_path):
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 1, 2
    with pytest.raises(ValueError, match=r"names \['lung', 'lung_nodules'\].*not TotalSegmentator 'total' classes"):
        load_total_labels(save_labels(tmp_path / "nod.nii.gz", lab, {1: "lung", 2: "lung_nodules"}))
    with pytest.raises(ValueError, match=r"voxel ids \[2\] are not named by the file's label table"):
        load_total_labels(save_labels(tmp_path / "part.nii.gz", lab, {1: "aorta"}))  # 1 -> 52 moves ids


def test_folder_of_binary_masks_equals_the_multilabel_map(tmp_path):
    lab = _organ_slab_xyz()
    folder = tmp_path / "segmentations"
    for name, i in V2.items():  # TotalSegmentator writes every class, most of them empty
        save(folder / f"{name}.nii.gz", (lab == i).astype(np.uint8), dtype=np.uint8)
    save(folder / "lung_nodules.nii.gz", np.ones_like(lab), dtype=np.uint8)  # another task's file: ignored
    (folder / "statistics.json").write_text("{}")
    assert np.array_equal(load_total_labels(folder, shape=(4, 5, 6)), lab.transpose(2, 1, 0))
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match="no binary mask named after a TotalSegmentator 'total' class"):
        load_total_labels(empty)
    save(folder / "liver.nii.gz", (lab == V2["liver"]).astype(np.uint8) * 3, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"liver\.nii\.gz: mask labels must lie in \[0, 1\]"):
        load_total_labels(folder)


def _dataset_with(tmp_path, kind):
    """A v2 dataset of two volumes whose masks come in one format: ts_total multilabel files,
    TotalSegmentator binary-mask folders, or v1-order multilabel files with their table."""
    root = tmp_path / kind
    names = ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]
    write_ctrate(root, names, layout="v2", masks=root / "dataset" / "ts_seg" / "ts_total")
    if kind == "ts_total":
        return root
    for n in names:
        f = root / "dataset" / "ts_seg" / "ts_total" / volume_relpath(n, "v2")
        lab = np.asarray(nib.load(str(f)).dataobj)
        f.unlink()
        if kind == "folder":
            for name in ("liver", "heart", "aorta"):
                save(f.parent / n.replace(".nii.gz", "") / f"{name}.nii.gz", (lab == V2[name]).astype(np.uint8),
                     dtype=np.uint8)
        else:
            v1 = np.where(lab == V2["heart"], V1["heart_myocardium"], lab).astype(np.uint8)
            save_labels(f, v1, {V1["liver"]: "liver", V1["heart_myocardium"]: "heart_myocardium"})
    return root


def test_every_mask_format_gives_the_same_organ_profiles_in_the_cache(tmp_path):
    from sigvlp.data import ORGANS, PreprocessCache, preset

    profiles = {}
    for kind in ("ts_total", "folder", "v1_named"):
        ds = CTRateDataset(_dataset_with(tmp_path, kind), "train")
        assert len(ds) == 2 and all(r.mask_path for r in ds), kind
        cache = PreprocessCache(tmp_path / f"cache-{kind}", preset("tiny"))
        profiles[kind] = [cv.organ_profile for _, cv in ds.cached(cache)]
    ref = profiles["ts_total"]
    liver, heart = ORGANS.index("liver"), ORGANS.index("heart")
    assert all(p[liver].sum() > 0 and p[heart].sum() > 0 for p in ref)
    for kind in ("folder", "v1_named"):
        assert all(np.array_equal(a, b) for a, b in zip(ref, profiles[kind])), kind


# ----------------------------------------------------------------------------- sigvlp masks


def _fake_totalsegmentator(calls, fail=()):
    """A stand-in for totalsegmentator.python_api.totalsegmentator: writes a multilabel map with
    its label table (liver in the lower half of the slices) the way --ml does."""

    def segment(input, output, ml=False, fast=False, device="gpu", quiet=False, task="total"):
        img = nib.load(input) if isinstance(input, str) else input
        calls.append({"input": input, "output": Path(output), "ml": ml, "fast": fast, "device": device,
                      "data": np.asarray(img.dataobj)})
        if any(f in str(getattr(img, "get_filename", lambda: "")() or input) for f in fail):
            Path(output).write_bytes(b"half a file")  # a crash mid-write must not leave a "done" mask
            raise RuntimeError("CUDA out of memory")
        lab = np.zeros(img.shape, np.uint8)
        lab[..., : img.shape[2] // 2] = V2["liver"]
        save_labels(output, lab, dict(TOTAL_CLASSES))

    return segment


def _masks(argv):
    from sigvlp.cli import main

    return main(["masks", *argv, "--quiet"])


def test_sigvlp_masks_segments_what_has_no_mask_resumes_and_reports_failures(tmp_path, monkeypatch, capsys):
    import sigvlp.data.segment as seg

    root = tmp_path / "CT-RATE"
    names = ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    write_ctrate(root, names, layout="v2", masks=root / "dataset" / "ts_seg" / "ts_total")
    for n in names[1:]:  # only the first has a ts_total mask
        (root / "dataset" / "ts_seg" / "ts_total" / volume_relpath(n, "v2")).unlink()
    calls = []
    monkeypatch.setattr(seg, "import_totalsegmentator", lambda: _fake_totalsegmentator(calls, fail=("train_2_",)))
    assert _masks([str(root), "--fast", "--device", "cpu"]) == 1
    out = capsys.readouterr()
    assert "4 train volumes (v2), 1 with a mask, 3 to segment" in out.out
    assert "wrote 2 masks, 1 failed" in out.out and "failed " in out.err and "CUDA out of memory" in out.err
    assert [c["input"] for c in calls] == [str(root / "dataset" / volume_relpath(n, "v2")) for n in names[1:]]
    assert all(c["ml"] and c["fast"] and c["device"] == "cpu" for c in calls)
    written = {n: root / "masks" / volume_relpath(n, "v2") for n in names[1:]}
    assert written[names[1]].is_file() and written[names[3]].is_file() and not written[names[2]].exists()
    assert not [p for p in (root / "masks").rglob("*") if p.name.startswith(".partial")]
    ds = CTRateDataset(root, "train")  # masks_dir="auto" finds ts_total's and ours
    assert {r.name for r in ds} == set(names) - {names[2]}
    assert Path({r.name: r.mask_path for r in ds}[names[1]]) == written[names[1]]
    calls.clear()  # a rerun segments only the failed volume
    monkeypatch.setattr(seg, "import_totalsegmentator", lambda: _fake_totalsegmentator(calls))
    assert _masks([str(root)]) == 0
    assert [c["output"].name for c in calls] == [f".partial-{__import__('os').getpid()}-{names[2]}"]
    assert len(CTRateDataset(root, "train")) == 4
    calls.clear()
    assert _masks([str(root)]) == 0 and calls == []  # all done: nothing to run


def test_sigvlp_masks_gives_totalsegmentator_hu(tmp_path, monkeypatch):
    import sigvlp.data.segment as seg

    # a v1 file whose HU need the metadata rescale: TotalSegmentator gets HU in the file's grid
    ramp = lambda name: (np.arange(8 * 8 * 6, dtype=np.int16).reshape(8, 8, 6) % 201)  # noqa: E731
    root = tmp_path / "v1"
    write_ctrate(root, ["train_1_a_1.nii.gz"], layout="v1", value=ramp)
    calls = []
    monkeypatch.setattr(seg, "import_totalsegmentator", lambda: _fake_totalsegmentator(calls))
    assert _masks([str(root), "--layout", "v1"]) == 0
    assert isinstance(calls[0]["input"], nib.Nifti1Image)
    assert np.array_equal(calls[0]["data"], ramp(None) - 1024.0)
    assert (root / "masks" / volume_relpath("train_1_a_1.nii.gz")).is_file()
    # the same values in the v2 layout are HU already: the file itself is passed
    write_ctrate(tmp_path / "v2", ["train_1_a_1.nii.gz"], layout="v2", value=ramp)
    assert _masks([str(tmp_path / "v2")]) == 0
    assert calls[1]["input"] == str(tmp_path / "v2" / "dataset" / volume_relpath("train_1_a_1.nii.gz", "v2"))
    assert np.array_equal(calls[1]["data"], ramp(None))


def test_sigvlp_masks_without_totalsegmentator_says_how_to_install(tmp_path, monkeypatch, capsys):
    write_ctrate(tmp_path / "d", ["train_1_a_1.nii.gz"], layout="v2")
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", None)
    assert _masks([str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[seg]"' in err[0]
    assert _masks([str(tmp_path / "absent")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
