"""load_volume / load_mask: orientation, rescaling exactly once, bad input."""

import warnings

import nibabel as nib
import numpy as np
import pytest

from _data_helpers import TINY, save, truncate_gz
from sigvlp.data.organs import organ_z_profile
from sigvlp.demo.synth import RESCALE_INTERCEPT, make_phantom, save_nifti
from sigvlp.data.volume import load_mask, load_volume


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(11, TINY, findings=["Lung nodule", "Cardiomegaly"])


def test_ras_and_lps_files_give_identical_arrays(phantom, tmp_path):
    ras, lps = tmp_path / "ras.nii.gz", tmp_path / "lps.nii.gz"
    save_nifti(phantom, ras, "RAS", mask_path=tmp_path / "ras_mask.nii.gz")
    save_nifti(phantom, lps, "LPS", mask_path=tmp_path / "lps_mask.nii.gz")
    # The stored arrays really differ (flipped x and y) ...
    raw_r = np.asarray(nib.load(ras).dataobj.get_unscaled())
    raw_l = np.asarray(nib.load(lps).dataobj.get_unscaled())
    assert not np.array_equal(raw_r, raw_l)
    assert nib.aff2axcodes(nib.load(lps).affine) == ("L", "P", "S")
    # ... and load to the same canonical volume.
    a, b = load_volume(ras), load_volume(lps)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert a.spacing == pytest.approx(b.spacing, rel=1e-6)
    assert a.spacing == pytest.approx(phantom.spacing, rel=1e-5)  # NIfTI stores float32
    np.testing.assert_array_equal(a.hu, phantom.hu)
    # The affine maps a (z, y, x) index to the phantom's world position of that voxel.
    idx = np.array([3, 5, 7, 1.0])
    want = np.array(phantom.origin) + idx[:3] * np.array(phantom.spacing)  # (z, y, x) world
    np.testing.assert_allclose((b.affine @ idx)[:3], want[::-1], atol=1e-3)
    ma = load_mask(tmp_path / "ras_mask.nii.gz", a.shape)
    mb = load_mask(tmp_path / "lps_mask.nii.gz", b.shape)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(ma, phantom.labels)


def test_header_rescale_applied_exactly_once(phantom, tmp_path):
    path = tmp_path / "v.nii.gz"
    save_nifti(phantom, path, "RAS")
    proxy = nib.load(path).dataobj  # nibabel moves scl_* from the header to the proxy on load
    assert (proxy.slope, proxy.inter) == (1.0, RESCALE_INTERCEPT)
    stored = np.asarray(nib.load(path).dataobj.get_unscaled())
    assert stored.min() >= 0  # stored = HU + 1024
    vol = load_volume(path)
    assert vol.hu.dtype in (np.int16, np.float32)
    np.testing.assert_array_equal(vol.hu, phantom.hu)
    # The same scaling also in the metadata row (CT-RATE v1 CSV): still applied once.
    vol2 = load_volume(path, {"RescaleSlope": "1", "RescaleIntercept": "-1024"})
    np.testing.assert_array_equal(vol2.hu, phantom.hu)


def test_v1_header_without_scaling_takes_csv(phantom, tmp_path):
    stored = (phantom.file_array(phantom.hu, "RAS").astype(np.int32) + 1024).astype(np.int16)
    path = save(tmp_path / "v1.nii.gz", stored, phantom.affine("RAS"))
    assert nib.load(path).dataobj.slope == 1.0 and nib.load(path).dataobj.inter == 0.0
    meta = {"RescaleSlope": "1.0", "RescaleIntercept": "-1024.0", "XYSpacing": "[1, 1]"}
    vol = load_volume(path, meta)
    np.testing.assert_array_equal(vol.hu, phantom.hu)
    # Without the CSV the stored values come back unchanged (no guessing).
    np.testing.assert_array_equal(load_volume(path).hu.astype(np.int32), phantom.hu.astype(np.int32) + 1024)
    with pytest.raises(ValueError, match="no RescaleSlope"):
        load_volume(path, {}, rescale="metadata")


def test_already_hu_data_is_never_rescaled_twice(phantom, tmp_path):
    # CT-RATE v2 style: HU stored, no header scaling, but the CSV still says intercept -1024.
    path = save(tmp_path / "v2.nii.gz", phantom.file_array(phantom.hu, "RAS"), phantom.affine("RAS"))
    meta = {"RescaleSlope": 1, "RescaleIntercept": -1024}
    vol = load_volume(path, meta)
    assert vol.rescale.source == "already_hu" and "already HU" in vol.rescale.reason
    np.testing.assert_array_equal(vol.hu, phantom.hu)
    with pytest.raises(ValueError, match=r"v2\.nii\.gz.*already HU.*twice"):
        load_volume(path, meta, rescale="metadata")


def test_header_and_metadata_conflict_is_refused(phantom, tmp_path):
    path = tmp_path / "v.nii.gz"
    save_nifti(phantom, path, "RAS")
    with pytest.raises(ValueError, match="conflicts"):
        load_volume(path, {"RescaleSlope": 1, "RescaleIntercept": -1000})


def test_fractional_slope_gives_float32_never_float64(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4000, size=(9, 8, 7)).astype(np.int16)
    path = save(tmp_path / "f.nii.gz", raw, slope=0.5, inter=-1024.0, dtype=np.int16)
    vol = load_volume(path)
    assert vol.hu.dtype == np.float32
    want = (raw.astype(np.float64) * 0.5 - 1024).transpose(2, 1, 0)
    np.testing.assert_allclose(vol.hu, want, rtol=0, atol=1e-3)
    assert vol.shape == (7, 8, 9) and vol.spacing == (1.0, 1.0, 1.0)


def test_trailing_singleton_dim_is_accepted(tmp_path):
    raw = np.zeros((6, 5, 4, 1), np.int16)
    vol = load_volume(save(tmp_path / "s.nii", raw))
    assert vol.shape == (4, 5, 6)


# ----------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_volume(tmp_path / "nope.nii.gz")


def test_truncated_gzip_names_the_file(phantom, tmp_path):
    path = tmp_path / "cut.nii.gz"
    save_nifti(phantom, path, "RAS")
    truncate_gz(path, 0.5)
    with pytest.raises(ValueError, match="cut.nii.gz"):
        load_volume(path)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(ValueError, match="junk.nii.gz"):
        load_volume(path)


@pytest.mark.parametrize("shape", [(8, 8), (4, 4, 4, 3)])
def test_non_3d_is_refused(tmp_path, shape):
    path = save(tmp_path / "bad.nii", np.zeros(shape, np.int16))
    with pytest.raises(ValueError, match=r"bad\.nii.*3-D"):
        load_volume(path)


def test_zero_slices_is_refused(tmp_path):
    path = save(tmp_path / "empty.nii", np.zeros((4, 4, 0), np.int16))
    with pytest.raises(ValueError, match=r"empty\.nii.*0 slices"):
        load_volume(path)


def test_nan_voxels_are_refused(tmp_path):
    data = np.zeros((4, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    path = save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(ValueError, match=r"nan\.nii\.gz.*1 voxel\(s\) are NaN"):
        load_volume(path)


def test_mask_shape_mismatch_and_unknown_label(tmp_path):
    path = save(tmp_path / "m.nii.gz", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(ValueError, match=r"m\.nii\.gz.*differs"):
        load_mask(path, (6, 5, 5))
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[1, 1, 1] = 200  # not a TotalSegmentator id
    with pytest.raises(ValueError, match=r"mask7.*unknown organ label.*200"):
        organ_z_profile(labels, "mask7")
    neg = save(tmp_path / "neg.nii.gz", np.full((2, 2, 2), -3, np.int16))
    with pytest.raises(ValueError, match=r"neg\.nii\.gz.*labels must lie"):
        load_mask(neg)


def test_bad_rescale_option():
    with pytest.raises(ValueError, match="rescale"):
        load_volume("x.nii.gz", rescale="twice")


def test_organ_profile_counts_and_lobes_merge():
    labels = np.zeros((5, 3, 3), np.uint8)
    labels[0:3, 0, 0] = 10  # lung upper lobe left
    labels[2:5, 1, 1] = 14  # lung lower lobe right
    labels[4, 2, 2] = 51  # heart
    from sigvlp.data.organs import ORGANS

    prof = organ_z_profile(labels)
    assert prof[ORGANS.index("lung")].tolist() == [1, 1, 2, 1, 1]
    assert prof[ORGANS.index("heart")].tolist() == [0, 0, 0, 0, 1]
    assert prof.sum() == np.count_nonzero(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        organ_z_profile(labels)
