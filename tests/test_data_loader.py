"""One call from a dataset folder to batches: make_loader(dataset), rank sharding, empty texts,
masks_dir detection, ds.cached, the collate's own host-side validation, the organ label map."""

import logging
import shutil

import numpy as np
import pytest
import torch

from _data_helpers import tiny_dataset
from sigvlp.data.chunks import chunk_preset
from sigvlp.data.collate import collate_chunks, validate_batch
from sigvlp.data.ctrate import CTRateDataset, build_cache, volume_relpath
from sigvlp.data.loader import ChunkSource, LoaderConfig, make_loader
from sigvlp.data.organs import ORGANS, label_to_organ_index
from sigvlp.data.preprocess import CachedVolume, PreprocessCache, preset
from sigvlp.data.volume import load_mask

CHUNK = chunk_preset("tiny")  # (4, 16, 16) patches, 4..32 slices


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return PreprocessCache(tmp_path_factory.mktemp("loader_cache"), preset("tiny"))


def _names(loader, epoch=0):
    loader.dataset.set_epoch(epoch)
    return [n for b in loader for n in b["names"]]


# ----------------------------------------------------------------------------- one call
def test_dataset_to_batches_in_one_call(root, cache):
    ds = CTRateDataset(root, "train")  # masks and findings bank found under root
    assert ds.masks_dir == root / "masks" and ds.findings_bank is not None
    assert all(r.mask_path and r.findings for r in ds.records)
    loader = make_loader(ds, CHUNK, LoaderConfig(token_budget=256, num_workers=0), cache=cache)
    batch = next(iter(loader))
    for key in ("patches", "cu_seqlens", "max_seqlen", "grid_thw", "text_ids", "text_cu_seqlens",
                "text_max_seqlen", "image_pair_ids", "text_pair_ids", "names", "organs", "z_ranges", "texts"):
        assert key in batch, key
    assert batch["empty_texts"] == 0 and all(batch["texts"])
    assert set(_names(loader)) == {r.name for r in ds.records}
    # ds.cached: (record, CachedVolume) pairs, from the same cache (hits now).
    hits = cache.hits
    cached = ds.cached(cache)
    assert [r.name for r, _ in cached] == [r.name for r in ds.records]
    assert all(isinstance(cv, CachedVolume) for _, cv in cached) and cache.hits == hits + len(ds)
    # A preset name or None gives the default cache folder (here $SIGVLP_CACHE).
    assert make_loader(ds, CHUNK, LoaderConfig(num_workers=0), cache=cache).dataset.sources[0].shape[1] == 64


def test_default_cache_folder_comes_from_sigvlp_cache(root, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGVLP_CACHE", str(tmp_path / "sc"))
    ds = CTRateDataset(root, "valid")
    make_loader(ds, CHUNK, LoaderConfig(num_workers=0), cache="tiny")
    assert len(list((tmp_path / "sc" / "preprocess").rglob("*.safetensors"))) == len(ds) == 2


def test_build_cache_entries_are_not_sources(root, cache):
    ds = CTRateDataset(root, "valid")
    entries, _ = build_cache(ds, cache)
    with pytest.raises(TypeError, match="pass the dataset itself"):
        make_loader(entries, CHUNK)
    with pytest.raises(TypeError, match="cache must be"):
        make_loader(ds, CHUNK, cache=42)


# ----------------------------------------------------------------------------- masks_dir
def test_masks_dir_one_level_too_deep_is_explained(root):
    with pytest.raises(ValueError, match=r"'train' level of the masks tree.*pass the masks root .*masks"):
        CTRateDataset(root, "train", masks_dir=root / "masks" / "train")


def test_masks_dir_without_any_mask_is_an_error_not_a_silent_skip(root, tmp_path):
    (tmp_path / "elsewhere" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no organ mask found for any of the 6 train volumes.*expected e\.g\."):
        CTRateDataset(root, "train", masks_dir=tmp_path / "elsewhere")
    ds = CTRateDataset(root, "train", masks_dir=None)  # explicitly none: fine, no masks
    assert len(ds) == 6 and not any(r.mask_path for r in ds.records)


def test_masks_found_from_the_dataset_subfolder(root):
    ds = CTRateDataset(root / "dataset", "valid", findings=None)  # root given one level down
    assert ds.masks_dir == root / "masks" and all(r.mask_path for r in ds.records)


# ----------------------------------------------------------------------------- rank sharding
def test_ranks_see_disjoint_volumes_whose_union_is_all(root, cache):
    ds = CTRateDataset(root, "train")
    cfg = LoaderConfig(token_budget=256, chunks_per_volume=2, num_workers=0, seed=5)
    for epoch in (0, 1):
        seen = [set(_names(make_loader(ds, CHUNK, cfg, cache=cache, rank=r, world_size=2), epoch)) for r in (0, 1)]
        assert seen[0] and seen[1] and not seen[0] & seen[1]
        assert seen[0] | seen[1] == {r.name for r in ds.records}
    # The shard changes with the epoch (shuffled per epoch, same permutation on every rank).
    shard = [sorted(set(_names(make_loader(ds, CHUNK, cfg, cache=cache, rank=0, world_size=2), e))) for e in range(4)]
    assert len({tuple(s) for s in shard}) > 1
    # Two workers of one rank together read exactly that rank's shard.
    two = make_loader(ds, CHUNK, LoaderConfig(token_budget=256, num_workers=2, seed=5), cache=cache, rank=1,
                      world_size=2)
    one = make_loader(ds, CHUNK, cfg, cache=cache, rank=1, world_size=2)
    assert set(_names(two)) == set(_names(one))
    with pytest.raises(ValueError, match="rank"):
        make_loader(ds, CHUNK, cfg, cache=cache, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size 7"):
        make_loader(ds, CHUNK, cfg, cache=cache, rank=0, world_size=7)


# ----------------------------------------------------------------------------- empty texts
def test_empty_texts_are_never_positives_of_each_other():
    texts = ["", "Lung nodule.", "", "Lung nodule.", "", "Heart normal."]
    samples = [{"image": np.zeros((4, 16, 16), np.float32), "text": t} for t in texts]
    batch = collate_chunks(samples, patch=(4, 16, 16))
    pos = batch["image_pair_ids"][:, None] == batch["text_pair_ids"][None, :]
    want = torch.tensor([[i == j or (a == b and a != "") for j, b in enumerate(texts)] for i, a in enumerate(texts)])
    assert torch.equal(pos, want)
    assert batch["empty_texts"] == 3
    # Across ranks: equal texts share an id (a content hash), distinct uids never collide.
    other = collate_chunks([dict(s, uid=100 + i) for i, s in enumerate(samples)], patch=(4, 16, 16))
    assert other["text_pair_ids"][1] == batch["text_pair_ids"][1]
    assert not set(other["text_pair_ids"][[0, 2, 4]].tolist()) & set(batch["text_pair_ids"][[0, 2, 4]].tolist())


def test_loader_counts_logs_and_optionally_drops_empty_texts(root, cache, caplog):
    entries = CTRateDataset(root, "train").cached(cache)
    sources = [ChunkSource.from_cache(cv, rec.findings if i % 2 else None) for i, (rec, cv) in enumerate(entries)]
    cfg = LoaderConfig(token_budget=10 ** 4, chunks_per_volume=2, num_workers=0, shuffle=False)
    loader = make_loader(sources, CHUNK, cfg)
    with caplog.at_level(logging.WARNING, logger="sigvlp.data"):
        batches = list(loader)
    ids = torch.cat([b["text_pair_ids"] for b in batches])
    texts = [t for b in batches for t in b["texts"]]
    empty = [i for i, t in enumerate(texts) if not t]
    assert len(empty) == 6 and sum(b["empty_texts"] for b in batches) == 6
    assert len(set(ids[empty].tolist())) == 6  # unique within the epoch, across batches
    assert loader.dataset.stats["empty_text"] == 6 and "6 of 12 chunks had an empty text" in caplog.text
    dropped = list(make_loader(sources, CHUNK, LoaderConfig(token_budget=10 ** 4, num_workers=0, shuffle=False,
                                                            empty_text="drop")))
    assert all(t for b in dropped for t in b["texts"]) and sum(len(b["texts"]) for b in dropped) == 6
    with pytest.raises(ValueError, match="empty_text"):
        LoaderConfig(empty_text="keep")


def test_records_without_a_bank_fall_back_to_the_report(root, cache):
    ds = CTRateDataset(root, "valid", findings=None)
    src = ChunkSource.from_record(*ds.cached(cache)[0])
    assert src.findings == {"organs": {}, "general": ds[0].report["Findings_EN"]}


# ----------------------------------------------------------------------------- validation
def test_collate_validates_its_output():
    samples = [{"image": np.zeros((8, 16, 16), np.float32), "text": "a"},
               {"image": np.zeros((4, 16, 16), np.float32), "text": "b"}]
    good = collate_chunks(samples, patch=(4, 16, 16))
    validate_batch(good)
    bad = dict(good, cu_seqlens=torch.tensor([0, 3, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0, never decrease"):
        validate_batch(bad)
    bad = dict(good, cu_seqlens=torch.tensor([0, 1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens: lengths .* differ from the grid products"):
        validate_batch(bad)
    bad = dict(good, grid_thw=torch.tensor([[2, 1, 1], [2, 1, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="grid products"):
        validate_batch(bad)
    with pytest.raises(ValueError, match="max_seqlen"):
        validate_batch(dict(good, max_seqlen=5))
    with pytest.raises(ValueError, match="text_cu_seqlens"):
        validate_batch(dict(good, text_cu_seqlens=torch.tensor([0, 2, 1], dtype=torch.int32)))
    with pytest.raises(ValueError, match="int32"):
        validate_batch(dict(good, cu_seqlens=good["cu_seqlens"].long()))


def test_package_does_not_export_importlib():
    import sigvlp.data as data

    assert not hasattr(data, "importlib") and "importlib" not in dir(data)
    assert "make_loader" in data.__all__ and "pack_by_token_budget" not in data.__all__


# ----------------------------------------------------------------------------- organ labels
def test_organ_labels_at_patch_resolution(root, cache):
    ds = CTRateDataset(root, "train")
    rec, cv = ds.cached(cache)[0]
    labels = load_mask(rec.mask_path)
    organ = label_to_organ_index()[labels] + 1  # (z, y, x) 0 background, k = ORGANS[k-1]
    z, y, x = organ.shape
    d = cv.shape[0]
    # Independent reference of the stored map: nearest source voxel of each output voxel centre.
    iz = np.minimum(((np.arange(d) + 0.5) * z / d).astype(int), z - 1)
    iy = np.minimum(((np.arange(64) + 0.5) * y / 64).astype(int), y - 1)
    ix = np.minimum(((np.arange(64) + 0.5) * x / 64).astype(int), x - 1)
    want_map = organ[np.ix_(iz, iy, ix)]
    np.testing.assert_array_equal(cv.organ_map(), want_map)
    got = cv.organ_labels((4, 16, 16))
    assert got.shape == (-(-d // 4), 4, 4) and got.dtype == np.int64
    padded = np.concatenate([want_map, np.zeros((got.shape[0] * 4 - d, 64, 64), want_map.dtype)])
    for t, h, w in [(0, 0, 0), (got.shape[0] // 2, 2, 1), (got.shape[0] - 1, 3, 3), (1, 1, 2)]:
        block = padded[4 * t:4 * t + 4, 16 * h:16 * h + 16, 16 * w:16 * w + 16]
        counts = np.bincount(block.ravel(), minlength=len(ORGANS) + 1)
        assert got[t, h, w] == int(np.argmax(counts))
    assert set(np.unique(got)) - {0} and max(np.unique(got)) <= len(ORGANS)
    sub = cv.organ_labels((4, 16, 16), 4, 12)
    np.testing.assert_array_equal(sub, got[1:3])
    with pytest.raises(ValueError, match="multiple of the patch"):
        cv.organ_labels((4, 24, 24))


def test_organ_labels_without_mask_is_a_clear_error(root, tmp_path):
    ds = CTRateDataset(root, "valid", masks_dir=None)
    _, cv = ds.cached(PreprocessCache(tmp_path / "c", preset("tiny")))[0]
    assert not cv.has_organ_map
    with pytest.raises(ValueError, match="no organ map cached"):
        cv.organ_labels((4, 16, 16))


def test_copy_of_masks_tree_with_a_missing_mask_skips_only_that_volume(root, tmp_path):
    ds_root = tmp_path / "ds"
    shutil.copytree(root, ds_root)
    (ds_root / "masks" / volume_relpath("valid_1_a_1.nii.gz")).unlink()
    ds = CTRateDataset(ds_root, "valid")
    assert [r.name for r in ds.records] == ["valid_2_a_1.nii.gz"] and len(ds.scan.skipped) == 1


def test_readme_data_example_is_short_and_uses_the_one_call():
    """The README's Data example (run by tests/test_readme.py) stays within six lines."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("\n## Data\n"):]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert blocks, "README Data section lost its example"
    lines = [ln for ln in blocks[0].splitlines() if ln.strip()]
    assert len(lines) <= 6 and any("make_loader(ds" in ln for ln in lines)


def test_auto_masks_ignore_a_masks_root_without_this_split(root, tmp_path):
    ds_root = tmp_path / "ds"
    shutil.copytree(root / "dataset", ds_root / "dataset")
    shutil.copytree(root / "masks" / "train", ds_root / "masks" / "train")  # only train was segmented
    assert CTRateDataset(ds_root, "train").masks_dir == ds_root / "masks"
    valid = CTRateDataset(ds_root, "valid")
    assert valid.masks_dir is None and len(valid) == 2 and not valid.scan.skipped
