"""sigvlp embed: NIfTI RAS vs LPS give the same embedding, a DICOM series (written with pydicom from a
phantom) gives its NIfTI's embedding, folders, any depth, unreadable inputs skipped and reported."""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sigvlp.demo.synth import SYNTH_PRESETS, make_phantom, save_nifti
from sigvlp.data.volume import load_volume
from sigvlp.embed import add_arguments, find_inputs, load_dicom_series, run
from sigvlp.model import SigVLP, SigVLPConfig, volume_batch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    SigVLP(SigVLPConfig.preset("tiny", layers=1, text_layers=1)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(1, SYNTH_PRESETS["tiny"])


def _embed(ckpt, out, *inputs, extra=()):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([*map(str, inputs), "--ckpt", str(ckpt), "--out", str(out), "--quiet", *extra])
    rc = run(args)
    if not out.is_file():
        return rc, None, None
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return rc, tensors, meta


def write_dicom_series(vol, folder, *, seed=0, series_uid="1.2.826.0.1.3680043.8.498.1"):
    """Write a Volume (HU, canonical RAS (z, y, x)) as a DICOM CT series in the usual axial LPS
    display orientation (columns to patient left, rows to posterior: both axes flipped against
    RAS), stored = HU + 1024 with RescaleIntercept -1024, files in shuffled order."""
    from _dicom_series import ct_dataset

    folder.mkdir(parents=True, exist_ok=True)
    A = vol.affine  # (z, y, x, 1) -> RAS mm
    nz, ny, nx = vol.hu.shape
    to_lps = np.array([-1.0, -1.0, 1.0])
    row_dir = to_lps * -A[:3, 2] / np.linalg.norm(A[:3, 2])  # increasing column = decreasing x
    col_dir = to_lps * -A[:3, 1] / np.linalg.norm(A[:3, 1])  # increasing row = decreasing y
    order = np.random.default_rng(seed).permutation(nz)
    for n, z in enumerate(order):
        ipp = to_lps * (A @ np.array([z, ny - 1, nx - 1, 1.0]))[:3]
        ds = ct_dataset(series_uid)
        ds.InstanceNumber = int(n + 1)
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(vol.spacing[1]), float(vol.spacing[2])]
        ds.SliceThickness = float(vol.spacing[0])
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        stored = (vol.hu[z, ::-1, ::-1].astype(np.int32) + 1024).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(str(folder / f"IM{n:04d}"), enforce_file_format=True)
    return folder


def test_ras_and_lps_give_the_same_embedding(tmp_path, ckpt, phantom):
    save_nifti(phantom, tmp_path / "ras.nii.gz", "RAS")
    save_nifti(phantom, tmp_path / "lps.nii.gz", "LPS")
    rc, t, meta = _embed(ckpt, tmp_path / "e.safetensors", tmp_path / "ras.nii.gz", tmp_path / "lps.nii.gz")
    assert rc == 0 and json.loads(meta["inputs"]) == [str(tmp_path / "ras.nii.gz"), str(tmp_path / "lps.nii.gz")]
    torch.testing.assert_close(t["pooled"][0], t["pooled"][1], atol=1e-6, rtol=0)
    n = int(t["cu_seqlens"][1])
    torch.testing.assert_close(t["tokens"][:n], t["tokens"][n:], atol=1e-5, rtol=0)
    assert t["grid_thw"][0].tolist() == t["grid_thw"][1].tolist()
    # control: the embedding does see orientation (a left-right mirrored scan differs)
    mirrored = make_phantom(1, SYNTH_PRESETS["tiny"])
    mirrored.hu = np.ascontiguousarray(mirrored.hu[:, :, ::-1])
    save_nifti(mirrored, tmp_path / "mirror.nii.gz", "RAS")
    _, t2, _ = _embed(ckpt, tmp_path / "m.safetensors", tmp_path / "mirror.nii.gz")
    assert (t2["pooled"][0] - t["pooled"][0]).abs().max() > 1e-3


def test_dicom_series_equals_its_nifti(tmp_path, ckpt, phantom):
    pytest.importorskip("pydicom")
    save_nifti(phantom, tmp_path / "ct.nii.gz", "LPS")
    vol = load_volume(tmp_path / "ct.nii.gz")
    write_dicom_series(vol, tmp_path / "dicom")
    dvol = load_dicom_series(tmp_path / "dicom")
    np.testing.assert_array_equal(dvol.hu, vol.hu)
    assert dvol.hu.dtype == np.int16
    np.testing.assert_allclose(dvol.affine, vol.affine, atol=1e-4)
    np.testing.assert_allclose(dvol.spacing, vol.spacing, rtol=1e-6)
    rc, t, meta = _embed(ckpt, tmp_path / "e.safetensors", tmp_path / "ct.nii.gz", tmp_path / "dicom")
    assert rc == 0 and len(json.loads(meta["inputs"])) == 2
    torch.testing.assert_close(t["pooled"][0], t["pooled"][1], atol=1e-6, rtol=0)


def test_dicom_errors(tmp_path, phantom):
    pytest.importorskip("pydicom")
    save_nifti(phantom, tmp_path / "ct.nii.gz", "RAS")
    vol = load_volume(tmp_path / "ct.nii.gz")
    write_dicom_series(vol, tmp_path / "two", series_uid="1.2.3")
    write_dicom_series(vol, tmp_path / "other", series_uid="1.2.4")
    (tmp_path / "other" / "IM0000").rename(tmp_path / "two" / "extra")
    with pytest.raises(ValueError, match="2 series"):
        load_dicom_series(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM image slices"):
        load_dicom_series(tmp_path / "empty")


def test_folder_any_depth_and_unreadable_skipped(tmp_path, ckpt, phantom):
    """A folder: every NIfTI inside is embedded at its full depth (no crop), a corrupt file is reported
    and skipped, the rest written; the pooled embeddings equal the model's on the preprocessed volume."""
    from sigvlp.data.preprocess import output_depth, preprocess_array

    d = tmp_path / "in"
    save_nifti(phantom, d / "a.nii.gz", "RAS")
    deep = make_phantom(2, SYNTH_PRESETS["tiny"])
    deep.hu = np.concatenate([deep.hu] * 4, axis=0)  # far deeper than the tiny chunks (32 slices)
    deep.labels = np.concatenate([deep.labels] * 4, axis=0)
    save_nifti(deep, d / "sub" / "deep.nii.gz", "LPS")
    (d / "broken.nii.gz").write_bytes(gzip.compress(b"not a nifti")[:20])
    rc, t, meta = _embed(ckpt, tmp_path / "e.safetensors", d, tmp_path / "missing.nii.gz")
    assert rc == 1
    names = json.loads(meta["inputs"])
    assert names == [str(d / "a.nii.gz"), str(d / "sub" / "deep.nii.gz")]
    skipped = {s["input"] for s in json.loads(meta["skipped"])}
    assert skipped == {str(d / "broken.nii.gz"), str(tmp_path / "missing.nii.gz")}
    model = SigVLP.from_pretrained(ckpt).eval()
    cfg = model.config
    pre = cfg.preprocess_config()
    for i, path in enumerate(names):
        vol = load_volume(path)
        depth = output_depth(vol.shape[0], vol.spacing[0], pre)
        assert int(t["depth"][i]) == depth
        assert t["grid_thw"][i].tolist() == [-(-depth // cfg.patch_size[0]), 4, 4]
        with torch.no_grad():
            want, _ = model.encode_volume(**volume_batch([preprocess_array(vol.hu, vol.spacing, pre)], cfg.patch_size))
        torch.testing.assert_close(t["pooled"][i : i + 1], want, atol=1e-6, rtol=0)
    chunk = cfg.chunk_config()
    assert int(t["grid_thw"][1, 0]) > chunk.max_slices // chunk.patch[0]  # deeper than any training chunk
    assert t["tokens"].shape == (int(t["cu_seqlens"][-1]), cfg.width)


def test_nothing_readable_and_no_tokens(tmp_path, ckpt, phantom):
    rc, t, _ = _embed(ckpt, tmp_path / "e.safetensors", tmp_path / "nope.nii.gz")
    assert rc == 2 and t is None
    save_nifti(phantom, tmp_path / "a.nii", "RAS")
    rc, t, _ = _embed(ckpt, tmp_path / "f.safetensors", tmp_path / "a.nii", extra=["--no-tokens"])
    assert rc == 0 and "tokens" not in t and t["pooled"].shape == (1, 64)


def test_run_folder_checkpoint(tmp_path, ckpt, phantom):
    """--ckpt may be a training run folder or its checkpoints folder: the latest step_* is used."""
    import shutil

    run_dir = tmp_path / "run"
    for step in (10, 200):
        shutil.copytree(ckpt, run_dir / "checkpoints" / f"step_{step:08d}")
    save_nifti(phantom, tmp_path / "a.nii.gz", "RAS")
    rc, t, meta = _embed(run_dir, tmp_path / "e.safetensors", tmp_path / "a.nii.gz")
    assert rc == 0 and meta["checkpoint"].endswith("step_00000200")
    # the run's checkpoints folder names the same checkpoint (sigvlp.checkpoint's rule, as eval)
    rc, t2, meta = _embed(run_dir / "checkpoints", tmp_path / "e2.safetensors", tmp_path / "a.nii.gz")
    assert rc == 0 and meta["checkpoint"].endswith("step_00000200") and torch.equal(t2["pooled"], t["pooled"])
    (tmp_path / "empty").mkdir()
    rc, _, _ = _embed(tmp_path / "empty", tmp_path / "f.safetensors", tmp_path / "a.nii.gz")
    assert rc == 2 and not (tmp_path / "f.safetensors").exists()


def test_find_inputs(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.dcm").write_bytes(b"")
    (tmp_path / "v.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hi")
    assert find_inputs([tmp_path]) == [("nifti", str(tmp_path / "v.nii.gz")), ("dicom", str(tmp_path / "s"))]
    assert find_inputs([tmp_path / "s" / "x.dcm"]) == [("dicom", str(tmp_path / "s"))]
    assert find_inputs([tmp_path / "none"]) == [("missing", str(tmp_path / "none"))]


# ----------------------------------------------------------------------------- CT-RATE metadata, CLI errors


def _raw_v1(phantom, path):
    """A CT-RATE v1 file: stored values HU + 1024 (>= 0 here), no header scaling."""
    import nibabel as nib

    save_nifti(phantom, path)
    img = nib.load(str(path))
    raw = np.asarray(img.dataobj.get_unscaled())
    assert raw.min() >= 0
    out = nib.Nifti1Image(raw.astype(np.int16), img.affine)
    out.header.set_xyzt_units("mm")
    out.header.set_slope_inter(1.0, 0.0)
    nib.save(out, str(path))
    return path


def _metadata_csv(path, name):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("VolumeName,RescaleSlope,RescaleIntercept\n" f"{name},1,-1024\n")
    return path


def test_ctrate_v1_file_uses_the_metadata_csv(tmp_path, ckpt, phantom):
    name = "valid_7_a_1.nii.gz"
    ref_file = tmp_path / "ref" / name
    save_nifti(phantom, ref_file)  # header-scaled: load_volume gives HU without metadata
    rc, ref, _ = _embed(ckpt, tmp_path / "ref.safetensors", ref_file)
    assert rc == 0
    root = tmp_path / "CT-RATE"
    raw = _raw_v1(phantom, root / "dataset" / "valid" / "valid_7" / "valid_7_a" / name)
    _metadata_csv(root / "dataset" / "metadata" / "validation_metadata.csv", name)
    hu = load_volume(raw, {"RescaleSlope": "1", "RescaleIntercept": "-1024"}).hu
    assert np.array_equal(hu, load_volume(ref_file).hu)
    # found by layout, from the file and from the dataset folder
    for i, inp in enumerate((raw, root / "dataset" / "valid")):
        rc, got, _ = _embed(ckpt, tmp_path / f"lay{i}.safetensors", inp)
        assert rc == 0
        torch.testing.assert_close(got["pooled"], ref["pooled"], rtol=0, atol=1e-6)
    # the same file outside the layout: --metadata gives the row
    loose = tmp_path / "loose" / name
    loose.parent.mkdir()
    loose.write_bytes(raw.read_bytes())
    csv = _metadata_csv(tmp_path / "meta.csv", name)
    rc, got, _ = _embed(ckpt, tmp_path / "given.safetensors", loose, extra=("--metadata", str(csv)))
    assert rc == 0
    torch.testing.assert_close(got["pooled"], ref["pooled"], rtol=0, atol=1e-6)
    # --already-hu yes: the metadata rescale is not applied (stored values read as HU): different
    rc, got, _ = _embed(ckpt, tmp_path / "yes.safetensors", raw, extra=("--already-hu", "yes"))
    if rc == 0:
        assert not torch.allclose(got["pooled"], ref["pooled"], atol=1e-3)
    else:
        assert rc == 2 and got is None


@pytest.mark.parametrize("case", ["missing", "dataset", "norun", "file"])
def test_bad_ckpt_exits_2(tmp_path, capsys, phantom, case):
    save_nifti(phantom, tmp_path / "a.nii.gz")
    ck = {"missing": tmp_path / "nowhere", "dataset": tmp_path, "norun": tmp_path / "run",
          "file": tmp_path / "a.nii.gz"}[case]
    if case == "norun":
        (ck / "checkpoints").mkdir(parents=True)
    rc, _, _ = _embed(ck, tmp_path / "o.safetensors", tmp_path / "a.nii.gz")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sigvlp embed: error: --ckpt:") and len(err.strip().splitlines()) == 1


def test_bad_out_device_backend_exit_2(tmp_path, capsys, ckpt, phantom):
    save_nifti(phantom, tmp_path / "a.nii.gz")
    (tmp_path / "dir.safetensors").mkdir()
    for out, extra, flag in ((tmp_path / "dir.safetensors", (), "--out"), (tmp_path / "o.npz", (), "--out"),
                             (tmp_path / "o.safetensors", ("--device", "nonsense"), "--device")):
        rc, _, _ = _embed(ckpt, out, tmp_path / "a.nii.gz", extra=extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"sigvlp embed: error: {flag}:"), err
    if not torch.cuda.is_available():
        rc, _, _ = _embed(ckpt, tmp_path / "o.safetensors", tmp_path / "a.nii.gz", extra=("--device", "cuda"))
        assert rc == 2 and "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _embed(ckpt, tmp_path / "o.safetensors", tmp_path / "a.nii.gz", extra=("--backend", "bogus"))
    assert e.value.code == 2 and "--backend" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_existing_out_needs_overwrite(tmp_path, capsys, ckpt, phantom):
    save_nifti(phantom, tmp_path / "a.nii.gz")
    out = tmp_path / "earlier.safetensors"
    out.write_bytes(b"the user's earlier embeddings")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rc = run(parser.parse_args([str(tmp_path / "a.nii.gz"), "--ckpt", str(ckpt), "--out", str(out), "--quiet"]))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sigvlp embed: error: --out:") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"the user's earlier embeddings"
    rc, tensors, _ = _embed(ckpt, out, tmp_path / "a.nii.gz", extra=("--overwrite",))
    assert rc == 0 and tensors, rc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "earlier.safetensors"]  # no temporary left


def test_read_only_out_exits_2_before_work(tmp_path, capsys, ckpt, phantom, monkeypatch):
    import sigvlp.model

    save_nifti(phantom, tmp_path / "a.nii.gz")
    ro = Path("/sys/sigvlp-readonly-test") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(sigvlp.model.SigVLP, "from_pretrained", no_model)
    rc, _, _ = _embed(ckpt, ro / "e.safetensors", tmp_path / "a.nii.gz")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sigvlp embed: error: --out:") and "cannot write" in err
    assert len(err.strip().splitlines()) == 1


def test_embed_output_follows_umask(tmp_path, ckpt, phantom):
    import os
    import stat

    save_nifti(phantom, tmp_path / "a.nii.gz")
    old = os.umask(0o022)
    try:
        rc, _, _ = _embed(ckpt, tmp_path / "o.safetensors", tmp_path / "a.nii.gz")
    finally:
        os.umask(old)
    assert rc == 0 and stat.S_IMODE(os.stat(tmp_path / "o.safetensors").st_mode) == 0o644


def test_ambiguous_file_is_skipped_with_load_volume_message(tmp_path, ckpt, capsys):
    import nibabel as nib

    name = "valid_9_a_1.nii.gz"
    root = tmp_path / "CT-RATE"
    f = root / "valid" / "valid_9" / "valid_9_a" / name
    f.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(100, 1500, size=(32, 32, 8)).astype(np.int16)
    data[0, 0, :] = -5  # a negative stored value: both readings plausible
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(f))
    _metadata_csv(root / "metadata" / "validation_metadata.csv", name)
    with pytest.raises(ValueError, match="already_hu") as e:
        load_volume(f, {"RescaleSlope": "1", "RescaleIntercept": "-1024"})
    rc, _, _ = _embed(ckpt, tmp_path / "o.safetensors", f)
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "o.safetensors").exists()
    assert str(e.value).splitlines()[0] in err
    rc, t, _ = _embed(ckpt, tmp_path / "o2.safetensors", f, extra=("--already-hu", "no"))
    assert rc == 0 and t["pooled"].shape[0] == 1


def test_missing_inputs_are_one_line_before_any_work(tmp_path, ckpt):
    """Every INPUT missing: one error line naming it, exit 2, no progress fragments, nothing written
    (checked in a fresh process: stderr is exactly that line)."""
    import subprocess
    import sys

    out = tmp_path / "e.safetensors"
    missing = tmp_path / "nonexistent"
    p = subprocess.run([sys.executable, "-m", "sigvlp", "embed", str(missing), "--ckpt", str(ckpt), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == "" and not out.exists()
    assert p.stderr == f"sigvlp embed: error: INPUT: {missing}: no such file, or a folder without NIfTI or DICOM files\n"


def test_a_missing_input_among_others_is_reported_before_the_bar(tmp_path, ckpt, phantom, capsys):
    save_nifti(phantom, tmp_path / "a.nii.gz", "RAS")
    rc, t, meta = _embed(ckpt, tmp_path / "e.safetensors", tmp_path / "nope", tmp_path / "a.nii.gz")
    err = capsys.readouterr().err
    assert rc == 1 and t["pooled"].shape[0] == 1
    assert err.splitlines()[0] == f"sigvlp embed: skipped {tmp_path / 'nope'}: no such file, or a folder without " \
                                  "NIfTI or DICOM files"
    assert [s["input"] for s in json.loads(meta["skipped"])] == [str(tmp_path / "nope")]
