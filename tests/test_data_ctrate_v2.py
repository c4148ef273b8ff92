"""CT-RATE as downloaded today (v2: dataset/<split>_fixed/..., HU files, TotalSegmentator masks in
dataset/ts_seg/ts_total/...) and before (v1: dataset/<split>/...), on small trees in the exact
layout written by the tests."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from _data_helpers import save_labels, write_ctrate
from sigvlp.data.ctrate import CTRateDataset, split_folders, volume_relpath

NAMES = ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_b_1.nii.gz", "valid_3_a_1.nii.gz"]
TRAIN = sorted(n for n in NAMES if n.startswith("train"))


@pytest.fixture
def v2(tmp_path):
    """A v2 tree with CT-RATE's ts_seg masks, and the other two ts_seg tasks beside them holding
    files of the same names (which must never be read as CT or as organ masks)."""
    root = tmp_path / "CT-RATE"
    ts = root / "dataset" / "ts_seg"
    write_ctrate(root, NAMES, layout="v2", masks=ts / "ts_total")
    for task in ("ts_lung_nodules", "ts_pleural_pericard_effusion"):
        for n in NAMES:
            save_labels(ts / task / volume_relpath(n, "v2"), np.ones((8, 8, 6), np.uint8))
    return root


def test_v2_tree_reads_volumes_only_from_train_fixed_with_ts_total_masks(v2):
    ds = CTRateDataset(v2, "train")
    assert ds.layout == "v2" and ds.already_hu is True
    assert [r.name for r in ds] == TRAIN  # the ts_seg files of the same names are not volumes
    ts_total = v2 / "dataset" / "ts_seg" / "ts_total"
    for r in ds:
        assert Path(r.path) == v2 / "dataset" / "train_fixed" / volume_relpath(r.name, "v2").split("/", 1)[1]
        assert Path(r.mask_path) == ts_total / volume_relpath(r.name, "v2")
    assert ds.masks_dirs == [ts_total]
    # the dataset folder itself as the root finds the same
    inner = CTRateDataset(v2 / "dataset", "valid")
    assert [r.name for r in inner] == ["valid_3_a_1.nii.gz"] and inner.masks_dir == ts_total


def test_v2_volumes_are_never_rescaled_again(tmp_path, caplog):
    # stored values 0..200 with a metadata intercept of -1024: plausible both ways, so the data alone
    # (v1 rules) would apply the CSV rescale; in the v2 layout the files are HU and must stay so.
    ramp = lambda name: np.arange(8 * 8 * 6, dtype=np.int16).reshape(8, 8, 6) % 201  # noqa: E731
    v2 = write_ctrate(tmp_path / "v2", ["train_1_a_1.nii.gz"], layout="v2", value=ramp)
    v1 = write_ctrate(tmp_path / "v1", ["train_1_a_1.nii.gz"], layout="v1", value=ramp)
    expected = ramp(None).transpose(2, 1, 0)  # canonical (z, y, x) of an identity affine
    ds2 = CTRateDataset(tmp_path / "v2", "train", masks_dir=None)
    vol2 = ds2.load(0)
    assert np.array_equal(vol2.hu, expected) and vol2.rescale.source == "already_hu"
    ds1 = CTRateDataset(tmp_path / "v1", "train", masks_dir=None)
    vol1 = ds1.load(0)  # the same stored values under v1: the CSV rescale is applied once
    assert ds1.layout == "v1" and ds1.already_hu is None
    assert np.array_equal(vol1.hu, expected - 1024) and vol1.rescale.source == "metadata"
    # the cache path uses the same decision
    from sigvlp.data import PreprocessCache, preset

    entries = ds2.cached(PreprocessCache(tmp_path / "cache", preset("tiny")))
    assert entries[0][1].rescale["source"] == "already_hu"
    with pytest.raises(ValueError, match="already HU.*rescale twice"):
        CTRateDataset(tmp_path / "v2", "train", masks_dir=None, already_hu=False)
    assert Path(v2["train_1_a_1.nii.gz"]).is_file() and Path(v1["train_1_a_1.nii.gz"]).is_file()


def test_v1_and_v2_together_use_v2_said_once_and_layout_chooses(tmp_path, caplog):
    root = tmp_path / "both"
    write_ctrate(root, ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"], layout="v2")
    write_ctrate(root, ["train_1_a_1.nii.gz", "train_9_a_1.nii.gz"], layout="v1")
    with caplog.at_level(logging.WARNING, logger="sigvlp.data"):
        ds = CTRateDataset(root, "train", masks_dir=None)
        CTRateDataset(root, "train", masks_dir=None)
    said = [r for r in caplog.records if "both CT-RATE v2" in r.getMessage()]
    assert len(said) == 1 and "using v2" in said[0].getMessage()
    assert ds.layout == "v2" and [r.name for r in ds] == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]
    assert all("/train_fixed/" in r.path for r in ds)
    v1 = CTRateDataset(root, "train", masks_dir=None, layout="v1")
    assert v1.layout == "v1" and [r.name for r in v1] == ["train_1_a_1.nii.gz", "train_9_a_1.nii.gz"]
    assert all("/train/" in r.path for r in v1) and v1.already_hu is None
    assert split_folders(root, "train", "v2") == ("v2", [root / "dataset" / "train_fixed"])
    with pytest.raises(ValueError, match="layout must be one of auto, v2, v1"):
        CTRateDataset(root, "train", layout="v3")


def test_duplicate_volume_name_is_an_error_naming_both_paths(tmp_path):
    root = tmp_path / "dup"
    paths = write_ctrate(root, ["train_1_a_1.nii.gz"], layout="v2")
    twin = root / "train_fixed" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz"  # at the root as well
    twin.parent.mkdir(parents=True)
    shutil.copy(paths["train_1_a_1.nii.gz"], twin)
    with pytest.raises(ValueError) as e:
        CTRateDataset(root, "train", masks_dir=None)
    msg = str(e.value)
    assert "train_1_a_1.nii.gz found twice" in msg and str(paths["train_1_a_1.nii.gz"]) in msg and str(twin) in msg


def test_volumes_outside_the_split_folders_are_never_searched(tmp_path):
    root = tmp_path / "flat"
    write_ctrate(root, ["train_1_a_1.nii.gz"], layout="v2")
    stray = root / "elsewhere" / "train_7_a_1.nii.gz"  # found by the old recursive fallback
    stray.parent.mkdir()
    shutil.copy(root / "dataset" / volume_relpath("train_1_a_1.nii.gz", "v2"), stray)
    assert [r.name for r in CTRateDataset(root, "train", masks_dir=None)] == ["train_1_a_1.nii.gz"]
    shutil.rmtree(root / "dataset" / "train_fixed")
    with pytest.raises(FileNotFoundError, match=r"no 'train' volume folder.*train_fixed.*dataset/train/"):
        CTRateDataset(root, "train", masks_dir=None)
    with pytest.raises(FileNotFoundError, match=r"no v1 'train' volume folder \(looked for [^,]*dataset/train, "):
        CTRateDataset(root, "train", masks_dir=None, layout="v1")


def test_masks_trees_with_fixed_split_folders_match_either_layout(tmp_path):
    # a v1 dataset whose masks tree names its split folders train_fixed, and a v2 dataset whose
    # masks tree uses plain train/: both are found, by the default and by an explicit masks_dir
    v1 = tmp_path / "v1"
    write_ctrate(v1, TRAIN, layout="v1", masks=v1 / "masks_v2style")
    shutil.move(v1 / "masks_v2style" / "train", v1 / "masks" / "train_fixed")
    v2 = tmp_path / "v2"
    write_ctrate(v2, TRAIN, layout="v2", masks=v2 / "tmp_masks")
    (v2 / "masks").mkdir()
    shutil.move(v2 / "tmp_masks" / "train_fixed", v2 / "masks" / "train")
    for root, expect in ((v1, "masks/train_fixed"), (v2, "masks/train")):
        for masks in ("auto", root / "masks"):
            ds = CTRateDataset(root, "train", masks_dir=masks)
            assert [r.name for r in ds] == TRAIN and all(expect in r.mask_path for r in ds), (root, masks)
    with pytest.raises(ValueError, match="'train' level of the masks tree"):
        CTRateDataset(v1, "train", masks_dir=v1 / "masks" / "train_fixed")


def test_masks_from_ts_seg_and_from_sigvlp_masks_combine(tmp_path):
    root = tmp_path / "mix"
    write_ctrate(root, TRAIN, layout="v2", masks=root / "dataset" / "ts_seg" / "ts_total")
    # one volume's ts_total mask is missing; `sigvlp masks` wrote it under DATA/masks instead
    missing = root / "dataset" / "ts_seg" / "ts_total" / volume_relpath(TRAIN[0], "v2")
    ours = root / "masks" / volume_relpath(TRAIN[0], "v2")
    ours.parent.mkdir(parents=True)
    shutil.move(missing, ours)
    ds = CTRateDataset(root, "train")
    assert {r.name: Path(r.mask_path) for r in ds}[TRAIN[0]] == ours
    assert all("ts_total" in r.mask_path for r in ds if r.name != TRAIN[0])


def test_embed_metadata_lookup_knows_both_layouts(tmp_path):
    from sigvlp.embed import MetadataLookup

    v2 = write_ctrate(tmp_path / "v2", ["valid_3_a_1.nii.gz"], layout="v2")["valid_3_a_1.nii.gz"]
    v1 = write_ctrate(tmp_path / "v1", ["valid_3_a_1.nii.gz"], layout="v1")["valid_3_a_1.nii.gz"]
    auto = MetadataLookup()
    assert auto.row(v2)["RescaleIntercept"] == "-1024" and auto.already_hu(v2) is True
    assert auto.row(v1)["RescaleIntercept"] == "-1024" and auto.already_hu(v1) is None
    only_v1 = MetadataLookup(layout="v1")
    assert only_v1.row(v2) is None and only_v1.already_hu(v2) is None and only_v1.row(v1) is not None
    with pytest.raises(ValueError, match="--layout"):
        MetadataLookup(layout="v9")


def test_layout_is_a_setting_of_train_and_eval():
    from sigvlp.cli import build_parser
    from sigvlp.eval.suite import EvalConfig
    from sigvlp.train.config import TrainConfig

    assert TrainConfig(layout="v1").layout == "v1"
    with pytest.raises(ValueError, match="layout: expected"):
        TrainConfig(layout="fixed")
    with pytest.raises(ValueError, match="layout: expected"):
        EvalConfig(layout="fixed")
    parser = build_parser()
    for argv in (["eval", "--ckpt", "c", "--data", "d", "--layout", "v2"], ["masks", "d", "--layout", "v2"],
                 ["embed", "x.nii.gz", "--ckpt", "c", "--out", "o.safetensors", "--layout", "v2"]):
        assert parser.parse_args(argv).layout == "v2"
    with pytest.raises(SystemExit):
        parser.parse_args(["masks", "d", "--layout", "v3"])
