"""Preprocessing, cache, chunks and organ pairing, collate, CT-RATE reader, DataLoader."""

import csv
import dataclasses
import os

import numpy as np
import pytest
import torch

from _data_helpers import TINY, copy_dataset, save, tiny_dataset, truncate_gz
from sigvlp.data.chunks import CHUNK_PRESETS, ChunkConfig, ChunkSampler, chunk_text, load_findings_bank, organs_in_chunk
from sigvlp.data.collate import collate_chunks, pair_ids, patchify
from sigvlp.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from sigvlp.data.ctrate import CTRateDataset, build_cache, volume_relpath
from sigvlp.data.loader import ChunkSource, LoaderConfig, make_loader
from sigvlp.data.organs import ORGANS, organ_z_profile
from sigvlp.data.preprocess import PRESETS, PreprocessCache, PreprocessConfig, preprocess_array, preset
from sigvlp.demo.synth import make_phantom, save_nifti
from sigvlp.data.volume import load_volume

CFG = PRESETS["tiny"]  # 3 mm slices, 64 x 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tiny_dataset(tmp_path_factory)
    return CTRateDataset(out, "train", masks_dir=out / "masks", findings=out / "findings" / "train_findings.jsonl")


# ----------------------------------------------------------------------------- preprocessing
def test_preprocess_keeps_variable_depth_and_windows():
    rng = np.random.default_rng(0)
    for n, sz in ((40, 1.0), (13, 5.0), (7, 0.75)):
        hu = rng.integers(-1500, 2500, size=(n, 30, 20)).astype(np.int16)
        out = preprocess_array(hu, (sz, 0.8, 0.9), CFG)
        assert out.shape == (max(1, round(n * sz / CFG.z_spacing)), 64, 64)  # z resampled, never cropped/padded
        assert out.min() >= -1 and out.max() <= 1
    flat = np.full((6, 8, 8), -1000, np.int16)
    assert np.allclose(preprocess_array(flat, (3.0, 1, 1), CFG), -1)
    flat[:] = 1000
    assert np.allclose(preprocess_array(flat, (3.0, 1, 1), CFG), 1)
    flat[:] = 0
    assert np.allclose(preprocess_array(flat, (3.0, 1, 1), CFG), 0)


def test_spacing_mode_crops_and_pads_in_plane_only():
    cfg = PreprocessConfig(z_spacing=2.0, inplane="spacing", xy_spacing=1.0, size=32)
    hu = np.zeros((10, 20, 50), np.int16)  # 20 x 50 mm at 1 mm: padded in y, cropped in x
    out = preprocess_array(hu, (2.0, 1.0, 1.0), cfg)
    assert out.shape == (10, 32, 32)
    assert np.allclose(out[:, :6], -1) and np.allclose(out[:, 6:26], 0)  # air padding, tissue kept


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="inplane"):
        PreprocessConfig(inplane="stretch")
    with pytest.raises(ValueError, match="hu_window"):
        PreprocessConfig(hu_window=(100, -100))
    with pytest.raises(ValueError, match="unknown preprocessing preset"):
        preset("nope")
    assert preset("ctclip").size == 480 and preset("sigvlp").z_spacing == 1.5
    assert len({c.key() for c in PRESETS.values()}) == len(PRESETS)


# ----------------------------------------------------------------------------- cache
def test_cache_hit_miss_and_invalidation(tmp_path):
    p = make_phantom(2, TINY)
    src, mask = tmp_path / "v.nii.gz", tmp_path / "m.nii.gz"
    save_nifti(p, src, "LPS", mask_path=mask)
    cache = PreprocessCache(tmp_path / "cache", CFG)
    a = cache.get(src, mask)
    assert (cache.hits, cache.misses) == (0, 1)
    b = cache.get(src, mask)
    assert (cache.hits, cache.misses) == (1, 1) and a.file == b.file
    # Same content as preprocessing directly, stored as float16.
    want = preprocess_array(load_volume(src).hu, load_volume(src).spacing, CFG)
    np.testing.assert_allclose(b.read().astype(np.float32), want, atol=1e-3)
    np.testing.assert_array_equal(b.read(3, 9), b.read()[3:9])
    assert b.organ_profile.shape == (len(ORGANS), a.shape[0])
    np.testing.assert_array_equal(b.organ_profile.sum(1), organ_z_profile(p.labels).sum(1))
    # A new cache object on the same folder and config: hit.
    again = PreprocessCache(tmp_path / "cache", CFG)
    again.get(src, mask)
    assert (again.hits, again.misses) == (1, 0)
    # A changed config never reuses the entry.
    other = PreprocessCache(tmp_path / "cache", dataclasses.replace(CFG, hu_window=(-1000.0, 400.0)))
    c = other.get(src, mask)
    assert (other.hits, other.misses) == (0, 1) and c.file != a.file
    assert not np.array_equal(c.read(), a.read())
    # A changed source file is a miss.
    save_nifti(make_phantom(3, TINY), src, "RAS", mask_path=mask)
    os.utime(src, ns=(1, 1))
    d = again.get(src, mask)
    assert again.misses == 1 and d.file != a.file
    # A torn entry is rebuilt, not trusted.
    with open(d.file, "r+b") as f:
        f.truncate(100)
    again.get(src, mask)
    assert again.misses == 2


def test_cache_resamples_organ_profile_consistently(tmp_path):
    p = make_phantom(4, TINY)
    src, mask = tmp_path / "v.nii.gz", tmp_path / "m.nii.gz"
    save_nifti(p, src, "RAS", mask_path=mask)
    cached = PreprocessCache(tmp_path / "c", CFG).get(src, mask)
    scale = cached.shape[0] / p.hu.shape[0]
    for organ in ("liver", "trachea", "heart"):
        row = ORGANS.index(organ)
        src_z = np.nonzero(organ_z_profile(p.labels)[row])[0]
        out_z = np.nonzero(cached.organ_profile[row])[0]
        # Organ extents map through the z resampling (within a slice of rounding).
        assert abs(out_z.min() - src_z.min() * scale) <= 1 + scale
        assert abs(out_z.max() - (src_z.max() + 1) * scale) <= 1 + scale


# ----------------------------------------------------------------------------- chunks
def test_chunk_sampler_depths():
    cfg = ChunkConfig(patch=(4, 16, 16), min_slices=8, max_slices=24)
    sampler = ChunkSampler(cfg)
    rng = np.random.default_rng(0)
    depths = set()
    for _ in range(300):
        z0, z1 = sampler.sample(50, rng)
        d = z1 - z0
        assert 0 <= z0 < z1 <= 50 and d % 4 == 0 and 8 <= d <= 24
        depths.add(d)
    assert depths == {8, 12, 16, 20, 24}
    assert sampler.sample(3, rng) == (0, 3)  # shorter than a patch: the whole volume
    assert all(sampler.sample(10, rng)[1] <= 10 for _ in range(50))
    capped = ChunkSampler(cfg, max_tokens=32, plane_tokens=16)  # 2 slabs fit the budget
    assert all(np.diff(capped.sample(50, rng))[0] <= 8 for _ in range(50))
    with pytest.raises(ValueError, match="multiples"):
        ChunkConfig(patch=(4, 16, 16), min_slices=6)


def test_chunk_sampler_whole_fraction():
    """whole_fraction 0.3: about 30% of the chunks are the deepest that fit (the whole volume when
    it fits); the others keep the uniform depth draw, which may also land on the deepest."""
    base = ChunkConfig(patch=(4, 16, 16), min_slices=8, max_slices=40)
    rng = np.random.default_rng(1)
    n = 2000
    whole = ChunkSampler(dataclasses.replace(base, whole_fraction=0.3))
    draws = [whole.sample(36, rng) for _ in range(n)]
    full = sum(d == (0, 36) for d in draws) / n
    p_uniform = 1 / 8  # depths 8..36 in steps of 4: 8 choices, 36 is one
    assert abs(full - (0.3 + 0.7 * p_uniform)) < 0.035, full
    assert all(z1 - z0 == 40 for z0, z1 in (whole.sample(60, rng) for _ in range(200)) if z1 - z0 > 36)
    always = ChunkSampler(dataclasses.replace(base, whole_fraction=1.0))
    assert all(np.diff(always.sample(60, rng))[0] == 40 for _ in range(50))  # capped at max_slices
    assert all(np.diff(always.sample(30, rng))[0] == 28 for _ in range(50))  # deepest multiple of 4 that fits
    # whole_fraction 0 draws exactly what the sampler drew before the option existed: these are the
    # draws of sigvlp/data/chunks.py as of commit 69f70d7^ (seed 5, depth 50), recorded once.
    before_the_option = [(15, 47), (34, 42), (13, 37), (6, 34), (0, 40), (13, 29), (9, 37), (1, 13), (2, 10),
                         (38, 50), (25, 37), (4, 36)]
    r5 = np.random.default_rng(5)
    assert [ChunkSampler(base).sample(50, r5) for _ in range(12)] == before_the_option
    # ... and whole_fraction 0.3 (seed 5, depth 36): (0, 36) where the whole volume was drawn.
    r5 = np.random.default_rng(5)
    assert [whole.sample(36, r5) for _ in range(12)] == [(23, 31), (2, 30), (0, 36), (5, 29), (0, 36), (0, 36),
                                                         (16, 28), (0, 36), (20, 36), (4, 36), (4, 32), (0, 28)]
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="whole_fraction"):
            dataclasses.replace(base, whole_fraction=bad)


def test_organs_in_chunk_known_positions():
    labels = np.zeros((40, 4, 4), np.uint8)
    labels[0:30, 0, :] = 12  # lung: slices 0..29, 4 voxels per slice
    labels[10:20, 1, 1] = 51  # heart: 10..19
    labels[25:40, 2, :2] = 5  # liver: 25..39
    prof = organ_z_profile(labels)
    cfg = ChunkConfig(patch=(4, 4, 4), min_slices=4, max_slices=40, min_organ_fraction=0.3, min_slice_fraction=0.5)
    assert organs_in_chunk(prof, 0, 8, cfg) == ["lung"]  # 27% of the lung, but lung spans every slice
    assert organs_in_chunk(prof, 8, 20, cfg) == ["lung", "heart"]
    assert organs_in_chunk(prof, 32, 40, cfg) == ["liver"]
    assert organs_in_chunk(prof, 19, 23, cfg) == ["lung"]  # 10% of the heart, in a quarter of the slices
    strict = dataclasses.replace(cfg, min_slice_fraction=None)
    assert organs_in_chunk(prof, 0, 8, strict) == []  # only the voxel-fraction rule left
    assert organs_in_chunk(None, 0, 8, cfg) == []


def test_phantom_chunks_pair_with_their_organs(dataset, tmp_path):
    entries, report = build_cache(dataset, PreprocessCache(tmp_path / "c", CFG))
    assert not report.skipped
    rec, cached = entries[0]
    depth = cached.shape[0]
    top = organs_in_chunk(cached.organ_profile, depth - 8, depth, CHUNK_PRESETS["tiny"])
    bottom = organs_in_chunk(cached.organ_profile, 0, 8, CHUNK_PRESETS["tiny"])
    assert "trachea" in top and "liver" not in top
    assert "liver" in bottom and "trachea" not in bottom
    text = chunk_text(rec.findings, bottom)
    for s in rec.findings["organs"]["liver"]:
        assert s in text
    for s in rec.findings["organs"].get("trachea", []):
        assert s not in text
    assert text.endswith(rec.findings["general"])
    assert chunk_text(rec.findings, bottom, general=False) != text


def test_findings_bank_formats_and_errors(tmp_path):
    good = {"VolumeName": "train_1_a_1.nii.gz", "organs": {"lung": ["Clear."]}, "general": "Normal."}
    (tmp_path / "b.json").write_text(__import__("json").dumps([good]))
    assert load_findings_bank(tmp_path / "b.json")["train_1_a_1.nii.gz"]["organs"]["lung"] == ["Clear."]
    (tmp_path / "bad.jsonl").write_text('{"VolumeName": "x.nii.gz", "organs": {"brain": ["?"]}}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*unknown organ 'brain'"):
        load_findings_bank(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"VolumeName": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1.*invalid JSON"):
        load_findings_bank(tmp_path / "broken.jsonl")


# ----------------------------------------------------------------------------- collate
def test_patch_layout_is_t_major_and_matches_conv3d():
    rng = np.random.default_rng(1)
    pt, ph, pw = 2, 4, 4
    chunks = [rng.standard_normal((6, 8, 12)).astype(np.float32), rng.standard_normal((4, 8, 12)).astype(np.float32)]
    batch = collate_chunks([{"image": c, "text": f"t{i}"} for i, c in enumerate(chunks)], patch=(pt, ph, pw))
    assert batch["grid_thw"].dtype == torch.int32 and batch["grid_thw"].tolist() == [[3, 2, 3], [2, 2, 3]]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 18, 30]
    assert batch["max_seqlen"] == 18 and batch["patches"].shape == (30, pt * ph * pw)
    for b, c in enumerate(chunks):
        T, H, W = batch["grid_thw"][b].tolist()
        tokens = batch["patches"][batch["cu_seqlens"][b]:batch["cu_seqlens"][b + 1]]
        for n in range(T * H * W):
            t, h, w = n // (H * W), (n // W) % H, n % W
            want = c[t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw].reshape(-1)
            np.testing.assert_array_equal(tokens[n].numpy(), want)
        conv = torch.nn.Conv3d(1, 5, (pt, ph, pw), stride=(pt, ph, pw), bias=False)
        ref = conv(torch.from_numpy(c)[None, None])[0].permute(1, 2, 3, 0).reshape(-1, 5)
        np.testing.assert_allclose((tokens @ conv.weight.reshape(5, -1).T).detach(), ref.detach(), atol=1e-5)


def test_fp16_chunks_of_any_depth_pack_exactly_into_float32_tokens():
    """The loader hands fp16 slices to the collate, which converts while packing: every token equals
    the explicit slice of the chunk (padded with -1 past its depth), exactly."""
    rng = np.random.default_rng(2)
    pt, ph, pw = 4, 4, 2
    chunks = [rng.uniform(-1, 1, (z, 8, 6)).astype(np.float16) for z in (5, 8, 3, 1)]
    batch = collate_chunks([{"image": c, "text": "t"} for c in chunks], patch=(pt, ph, pw))
    assert batch["patches"].dtype == torch.float32 and batch["cu_seqlens"].tolist() == [0, 12, 24, 30, 36]
    for b, c in enumerate(chunks):
        padded = np.concatenate([c.astype(np.float32), -np.ones((-len(c) % pt, 8, 6), np.float32)])
        tokens = batch["patches"][batch["cu_seqlens"][b]:batch["cu_seqlens"][b + 1]]
        T, H, W = batch["grid_thw"][b].tolist()
        assert T == -(-len(c) // pt)
        for n in range(T * H * W):
            t, h, w = n // (H * W), (n // W) % H, n % W
            want = padded[t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw].reshape(-1)
            np.testing.assert_array_equal(tokens[n].numpy(), want)
    tokens, grid = patchify(chunks[0], (pt, ph, pw))
    assert tokens.dtype == torch.float16 and grid == (2, 2, 3)
    assert torch.equal(tokens.float(), batch["patches"][:12])


def test_text_tokens_and_pair_ids():
    texts = ["Heart normal.", "Lung nodule.", "Heart normal.", "Épanchement"]
    samples = [{"image": np.zeros((4, 4, 4), np.float32), "text": t} for t in texts]
    batch = collate_chunks(samples, patch=(4, 4, 4), max_text_tokens=8)
    cu = batch["text_cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == batch["text_ids"].numel()
    tok = ByteTokenizer()
    for i, t in enumerate(texts):
        ids = batch["text_ids"][cu[i]:cu[i + 1]].tolist()
        assert ids[0] == tok.BOS and ids[-1] == tok.EOS and len(ids) <= 8
        assert t.encode()[: len(ids) - 2] == tok.decode(ids).encode()[: len(ids) - 2]
    assert tok.decode(tok.encode("Épanchement")) == "Épanchement"
    img, txt = batch["image_pair_ids"], batch["text_pair_ids"]
    positives = (img[:, None] == txt[None, :])
    want = torch.tensor([[a == b for b in texts] for a in texts])
    assert torch.equal(positives, want)
    ids = pair_ids(["a", "b", "a"]).tolist()
    assert ids[0] == ids[2] != ids[1] and min(ids) >= 0


def test_collate_bad_input():
    with pytest.raises(ValueError, match="multiple of the patch"):
        patchify(np.zeros((4, 10, 8), np.float32), (4, 4, 4))
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        patchify(np.zeros((4, 8), np.float32), (4, 4, 4))
    with pytest.raises(ValueError, match="no slices"):
        patchify(np.zeros((0, 8, 8), np.float16), (4, 4, 4))
    for bad in ((0, 4, 4), (4, 4), (4.0, 4, 4)):
        with pytest.raises(ValueError, match="patch must be three integers"):
            patchify(np.zeros((4, 8, 8), np.float32), bad)
    with pytest.raises(ValueError, match="empty"):
        collate_chunks([])
    with pytest.raises(TypeError, match="str"):
        ByteTokenizer().encode(b"bytes")
    tokens, grid = patchify(np.zeros((3, 8, 8), np.float32), (4, 4, 4))  # padded to one patch
    assert grid == (1, 2, 2) and torch.all(tokens.reshape(4, 4, -1)[:, :, :].reshape(4, 4, 4, 4)[:, 3] == -1)


def test_hf_tokenizer_needs_a_local_folder(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        HFTokenizer(tmp_path / "no-such-tokenizer")


def test_word_tokenizer_vocabulary_and_ids():
    import re

    from sigvlp.data.tokenizers import WordTokenizer

    corpus = ["A 7 mm nodule is seen.", "No nodule; the heart is normal.", "Emphysema is present."]
    vocab = WordTokenizer.build_vocab(corpus)
    # independent count: lowercased words and punctuation runs, most frequent first, ties in lexical order
    words = [w for t in corpus for w in re.findall(r"\w+|[^\w\s]+", t.lower())]
    counts = {w: words.count(w) for w in set(words)}
    assert vocab == tuple(sorted(counts, key=lambda w: (-counts[w], w)))
    assert WordTokenizer.build_vocab(list(reversed(corpus))) == vocab  # depends only on the corpus
    tok = load_tokenizer("word", vocab=vocab)
    assert isinstance(tok, WordTokenizer) and tok.vocab_size == len(vocab) + 4
    ids = tok.encode("EMPHYSEMA is seen, zebra.")
    want = [vocab.index(w) + 4 if w in vocab else tok.UNK for w in ("emphysema", "is", "seen", ",", "zebra", ".")]
    assert ids == [tok.BOS, *want, tok.EOS]
    assert tok.decode(ids) == "emphysema is seen [UNK] [UNK] ."
    assert tok.encode("") == [tok.BOS, tok.EOS]
    assert tok.encode("a b c d e", max_tokens=4) == [tok.BOS, *tok.encode("a b")[1:-1], tok.EOS]
    assert len(tok.encode("a b c d e", max_tokens=4)) == 4
    batch = collate_chunks([{"image": np.zeros((4, 4, 4), np.float32), "text": "No nodule."}], tokenizer=tok,
                           patch=(4, 4, 4))
    assert batch["text_ids"].tolist() == tok.encode("No nodule.")
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="vocab"):
        load_tokenizer("word")  # no word list
    with pytest.raises(ValueError, match="vocab"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="vocab"):
        WordTokenizer(["a", "[UNK]"])
    with pytest.raises(TypeError, match="vocab"):
        WordTokenizer("abc")
    for bad in (None, 5, {"a", "b"}, (w for w in ["a", "b"])):
        with pytest.raises(TypeError, match="vocab"):
            WordTokenizer(bad)
    for bad in ([], ["Pleural"], ["pleural effusion"], ["x-ray"], [" "]):  # empty, or entries that never match
        with pytest.raises(ValueError, match="vocab"):
            WordTokenizer(bad)
    with pytest.raises(TypeError, match="texts"):
        WordTokenizer.build_vocab("abc def")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="min_frequency"):
            WordTokenizer.build_vocab(corpus, min_frequency=bad)


# ----------------------------------------------------------------------------- CT-RATE reader
def test_ctrate_reader_reads_the_layout(dataset):
    assert len(dataset) == 6 and not dataset.scan.skipped
    rec = dataset[0]
    assert rec.name == "train_1_a_1.nii.gz" and rec.path.endswith(volume_relpath(rec.name))
    assert rec.report["Impressions_EN"] and rec.metadata["RescaleIntercept"] == "-1024"
    assert set(rec.labels) == set(__import__("sigvlp.data.ctrate", fromlist=["x"]).CTRATE_LABELS)
    assert rec.mask_path and rec.findings["general"] == rec.report["Impressions_EN"]
    vol = dataset.load(0)
    assert vol.hu.min() >= -1024 and vol.shape[0] == int(rec.metadata["NumberofSlices"])


def _drop_row(csv_path, name):
    rows = list(csv.DictReader(open(csv_path)))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["VolumeName"] != name)


def test_scan_skips_counts_and_reports_bad_volumes(tmp_path_factory, tmp_path):
    root = copy_dataset(tiny_dataset(tmp_path_factory), tmp_path / "ds")
    _drop_row(root / "dataset" / "metadata" / "train_metadata.csv", "train_2_a_1.nii.gz")
    (root / "masks" / volume_relpath("train_3_a_1.nii.gz")).unlink()
    bad = root / "dataset" / volume_relpath("train_4_a_1.nii.gz")
    bad.write_bytes(b"garbage")
    ds = CTRateDataset(root, "train", masks_dir=root / "masks")
    assert len(ds) == 3 and ds.scan.seen == 6 and len(ds.scan.skipped) == 3
    summary = ds.scan.summary()
    assert "train_2_a_1.nii.gz" in summary and "metadata CSV" in summary
    assert "train_3_a_1" in summary and "no organ mask" in summary
    assert "train_4_a_1" in summary and "unreadable" in summary
    with pytest.raises(ValueError, match=r"train_2_a_1\.nii\.gz.*no row"):
        CTRateDataset(root, "train", masks_dir=root / "masks", on_error="raise")


def test_build_cache_skips_volumes_that_fail_to_decode(tmp_path_factory, tmp_path):
    root = copy_dataset(tiny_dataset(tmp_path_factory), tmp_path / "ds")
    truncate_gz(root / "dataset" / volume_relpath("train_5_a_1.nii.gz"), 0.6)  # header fine, data cut
    m = root / "masks" / volume_relpath("train_6_a_1.nii.gz")
    save(m, np.zeros((3, 3, 3), np.uint8))  # wrong shape
    ds = CTRateDataset(root, "train", masks_dir=root / "masks")
    assert len(ds) == 6  # the scan reads headers only
    cache = PreprocessCache(tmp_path / "c", CFG)
    entries, report = build_cache(ds, cache)
    assert len(entries) == 4 and len(report.skipped) == 2
    reasons = dict(report.skipped)
    assert any("train_5_a_1" in p for p in reasons) and any("differs" in r for r in reasons.values())
    assert all(("train_5_a_1" in r) or ("train_6_a_1" in r) for r in reasons.values())  # messages name the file
    with pytest.raises(ValueError, match="train_5_a_1"):
        build_cache(ds, cache, on_error="raise")


def test_reader_applies_csv_scaling_to_v1_files(tmp_path_factory, tmp_path):
    root = copy_dataset(tiny_dataset(tmp_path_factory), tmp_path / "ds")
    path = root / "dataset" / volume_relpath("train_1_a_1.nii.gz")
    import nibabel as nib

    img = nib.load(path)
    stored = np.asarray(img.dataobj.get_unscaled())
    save(path, stored, img.affine)  # v1 style: same stored values, no scl_* in the header
    ds = CTRateDataset(root, "train")
    original = load_volume(tiny_dataset(tmp_path_factory) / "dataset" / volume_relpath("train_1_a_1.nii.gz")).hu
    np.testing.assert_array_equal(ds.load(0).hu, original)  # HU via the metadata CSV
    assert not np.array_equal(load_volume(path).hu, original)  # without the CSV: stored values


def test_missing_csv_is_a_clear_error(tmp_path):
    (tmp_path / "dataset" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no reports CSV"):
        CTRateDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        CTRateDataset(tmp_path, "test")


# ----------------------------------------------------------------------------- loader
def _batches(sources, **kw):
    cfg = LoaderConfig(token_budget=192, chunks_per_volume=3, **kw)
    out = []
    for b in make_loader(sources, CHUNK_PRESETS["tiny"], cfg):
        out.append((b["patches"].sum().item(), tuple(b["cu_seqlens"].tolist()), tuple(b["names"]),
                    tuple(b["texts"]), tuple(b["z_ranges"])))
    return out


def test_loader_is_seeded_reproducible_and_within_budget(dataset, tmp_path):
    entries, _ = build_cache(dataset, PreprocessCache(tmp_path / "c", CFG))
    sources = [ChunkSource.from_cache(c, r.findings) for r, c in entries]
    a = _batches(sources, num_workers=2, seed=3)
    b = _batches(sources, num_workers=2, seed=3)
    c = _batches(sources, num_workers=2, seed=4)
    assert a == b and a != c
    assert all(cu[-1] <= 192 for _, cu, *_ in a)
    assert {n for batch in a for n in batch[2]} == {r.name for r, _ in entries}
    assert sum(len(x[2]) for x in a) == 3 * len(sources)
    # Chunk voxels equal the cached slices they name.
    one = next(iter(make_loader(sources[:1], CHUNK_PRESETS["tiny"], LoaderConfig(token_budget=192, num_workers=0))))
    z0, z1 = one["z_ranges"][0]
    first = patchify(entries[0][1].read(z0, z1).astype(np.float32), CHUNK_PRESETS["tiny"].patch)[0]
    np.testing.assert_array_equal(one["patches"][: first.shape[0]].numpy(), first.numpy())


def test_loader_memory_budget_is_checked(dataset, tmp_path):
    entries, _ = build_cache(dataset, PreprocessCache(tmp_path / "c", CFG))
    sources = [ChunkSource.from_cache(c) for _, c in entries]
    with pytest.raises(ValueError, match="max_worker_mb"):
        make_loader(sources, CHUNK_PRESETS["tiny"], LoaderConfig(token_budget=10 ** 6, max_worker_mb=64))
    with pytest.raises(ValueError, match="empty"):
        make_loader([], CHUNK_PRESETS["tiny"])
