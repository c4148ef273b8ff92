"""Issue 15's inputs, each with the right value: the double-rescale rule, degenerate geometry,
spacing from the metadata CSV."""

import logging

import nibabel as nib
import numpy as np
import pytest

from _data_helpers import save
from sigvlp.data.preprocess import PreprocessCache, preset
from sigvlp.data.volume import load_volume

CSV = {"RescaleSlope": "1", "RescaleIntercept": "-1024"}  # what CT-RATE's metadata says for every file


def _body_cropped_hu(rng):
    """A chest volume cropped to the body, already HU: no outside air; lungs about -850, soft
    tissue 0..80, bone up to 1200 (the first input of issue 15)."""
    z, y, x = 30, 48, 48
    hu = rng.integers(0, 81, size=(z, y, x)).astype(np.int16)  # soft tissue
    yy, xx = np.mgrid[:y, :x]
    for cx in (14, 34):  # two lungs
        lung = (yy - 24) ** 2 / 16 ** 2 + (xx - cx) ** 2 / 8 ** 2 <= 1
        hu[:, lung] = (-850 + rng.normal(0, 30, size=(z, int(lung.sum())))).astype(np.int16)
    spine = (yy - 42) ** 2 + (xx - 24) ** 2 <= 9
    hu[:, spine] = rng.integers(300, 1201, size=(z, int(spine.sum())))
    return hu


def _small_fov_hu(rng):
    """A small field-of-view reconstruction, already HU: -3024 outside the circle, soft tissue
    inside, only about 0.2% of the voxels near -1000 (the trachea) (the second input)."""
    z, y, x = 20, 64, 64
    hu = rng.integers(20, 81, size=(z, y, x)).astype(np.int16)
    yy, xx = np.mgrid[:y, :x]
    hu[:, (yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 32 ** 2] = -3024
    trachea = (yy - 30) ** 2 + (xx - 30) ** 2 <= 1  # 5 voxels per slice: 0.12% of all, 0.16% inside
    hu[:, trachea] = rng.integers(-1010, -989, size=(z, int(trachea.sum())))
    return hu


def _raw_scanner(rng):
    """Unscaled scanner values 0..~3000 (HU + 1024), no scaling in the header (a v1 file)."""
    return (_body_cropped_hu(rng).astype(np.int32) + 1024).astype(np.int16)


def _file(tmp_path, name, zyx, **kw):
    return save(tmp_path / name, np.ascontiguousarray(zyx.transpose(2, 1, 0)), **kw)


# ----------------------------------------------------------------------------- rescale rule
def test_body_cropped_hu_volume_loads_unchanged(tmp_path):
    hu = _body_cropped_hu(np.random.default_rng(0))
    vol = load_volume(_file(tmp_path, "cropped.nii.gz", hu), CSV)
    np.testing.assert_array_equal(vol.hu, hu)  # lungs stay near -850, not -1874
    assert vol.rescale.source == "already_hu" and vol.hu.dtype == np.int16
    assert "already HU" in vol.rescale.reason and vol.rescale.stored_min < -800


def test_small_fov_padded_volume_loads_unchanged(tmp_path):
    hu = _small_fov_hu(np.random.default_rng(1))
    assert 0.001 < np.mean(np.abs(hu + 1000) < 50) < 0.003
    vol = load_volume(_file(tmp_path, "fov.nii.gz", hu), CSV)
    np.testing.assert_array_equal(vol.hu, hu)  # minimum stays -3024, not -4048
    assert vol.rescale.source == "already_hu" and vol.rescale.padding == -3024


def test_genuine_raw_file_is_rescaled_once(tmp_path):
    raw = _raw_scanner(np.random.default_rng(2))
    assert raw.min() >= 0 and raw.max() <= 3000
    vol = load_volume(_file(tmp_path, "raw.nii.gz", raw), CSV)
    np.testing.assert_array_equal(vol.hu, raw.astype(np.int32) - 1024)
    assert vol.rescale.source == "metadata" and vol.rescale.intercept == -1024
    # unsigned storage of the same values: same HU, int16.
    vol = load_volume(_file(tmp_path, "raw_u16.nii.gz", raw.astype(np.uint16)), CSV)
    assert vol.hu.dtype == np.int16
    np.testing.assert_array_equal(vol.hu, raw.astype(np.int32) - 1024)


def test_ambiguous_evidence_is_refused_with_the_option_that_settles_it(tmp_path):
    # Stored -50..2000 with a few negatives: as HU no air/lung at all, as raw nothing below -1074 HU.
    rng = np.random.default_rng(3)
    vals = rng.integers(-50, 2000, size=(10, 16, 16)).astype(np.int16)
    path = _file(tmp_path, "ambiguous.nii.gz", vals)
    with pytest.raises(ValueError, match=r"ambiguous\.nii\.gz: cannot tell.*already_hu=True.*already_hu=False"):
        load_volume(path, CSV)
    np.testing.assert_array_equal(load_volume(path, CSV, already_hu=True).hu, vals)
    np.testing.assert_array_equal(load_volume(path, CSV, already_hu=False).hu, vals.astype(np.int32) - 1024)
    assert load_volume(path, CSV, already_hu=True).rescale.source == "already_hu"


def test_sanity_check_refuses_nonsense_after_rescaling(tmp_path):
    hu = _body_cropped_hu(np.random.default_rng(4))
    # HU stored, but the header itself says intercept -1024: lungs would land near -1874.
    path = _file(tmp_path, "bad_header.nii.gz", hu, slope=1.0, inter=-1024.0, dtype=np.int16)
    with pytest.raises(ValueError, match=r"bad_header\.nii\.gz: after the header rescale.*below -1100 HU.*already_hu"):
        load_volume(path)
    # Forcing the CSV rescale onto HU data: refused the same way.
    with pytest.raises(ValueError, match=r"after the metadata rescale"):
        load_volume(_file(tmp_path, "forced.nii.gz", hu), CSV, already_hu=False)
    # A slope that sends bone far above 4000 HU.
    with pytest.raises(ValueError, match=r"above 4000 HU"):
        load_volume(_file(tmp_path, "slope.nii.gz", _raw_scanner(np.random.default_rng(5)), slope=10.0, inter=0.0,
                          dtype=np.int16))


def test_no_csv_no_header_scaling_keeps_stored_values(tmp_path):
    hu = _body_cropped_hu(np.random.default_rng(6))
    vol = load_volume(_file(tmp_path, "plain.nii.gz", hu))
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.rescale.source == "none"


def test_float64_storage_comes_back_float32(tmp_path):
    hu = _body_cropped_hu(np.random.default_rng(7)).astype(np.float64) + 0.25
    vol = load_volume(_file(tmp_path, "f64.nii.gz", hu, dtype=np.float64))
    assert vol.hu.dtype == np.float32
    np.testing.assert_allclose(vol.hu, hu, rtol=0, atol=1e-4)


def test_decision_is_logged_and_cached(tmp_path, caplog):
    hu = _small_fov_hu(np.random.default_rng(8))
    path = _file(tmp_path, "logged.nii.gz", hu)
    with caplog.at_level(logging.INFO, logger="sigvlp.data"):
        load_volume(path, CSV)
    assert "logged.nii.gz: rescale already_hu" in caplog.text
    cv = PreprocessCache(tmp_path / "c", preset("tiny")).get(path, metadata=CSV)
    assert cv.rescale["source"] == "already_hu" and cv.rescale["padding"] == -3024


# ----------------------------------------------------------------------------- geometry
def _raw_header_file(tmp_path, name, edit):
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), None)
    edit(img.header)
    nib.save(img, str(tmp_path / name))
    return tmp_path / name


def test_all_zero_sform_names_file_and_field(tmp_path):
    def zero(h):
        h.set_sform(np.zeros((4, 4)), code=1)
        h.set_qform(None, code=0)
    path = _raw_header_file(tmp_path, "zero_sform.nii.gz", zero)
    with pytest.raises(ValueError, match=r"zero_sform\.nii\.gz: degenerate affine: the sform's 3 x 3 part has zero"):
        load_volume(path)


def test_nan_sform_names_file_and_field(tmp_path):
    def nan(h):
        a = np.eye(4)
        a[1, 1] = np.nan
        h.set_sform(a, code=1)
    path = _raw_header_file(tmp_path, "nan_sform.nii.gz", nan)
    with pytest.raises(ValueError, match=r"nan_sform\.nii\.gz: degenerate affine: the sform has non-finite"):
        load_volume(path)


def test_singular_sform_is_refused(tmp_path):
    def flat(h):
        a = np.eye(4)
        a[:3, 2] = a[:3, 0]  # k parallel to i
        h.set_sform(a, code=1)
    with pytest.raises(ValueError, match=r"flat\.nii\.gz: degenerate affine: the sform's 3 x 3 part is singular"):
        load_volume(_raw_header_file(tmp_path, "flat.nii.gz", flat))


@pytest.mark.parametrize("value", [-1.0, 0.0])
def test_negative_or_zero_pixdim_is_refused(tmp_path, value):
    def pix(h):
        h.set_qform(np.eye(4), code=1)
        h.set_sform(np.eye(4), code=1)
        h["pixdim"][2] = value
    path = _raw_header_file(tmp_path, "pixdim.nii.gz", pix)
    with pytest.raises(ValueError, match=r"pixdim\.nii\.gz: degenerate geometry: header pixdim\[1:4\]"):
        load_volume(path)


def test_sform_differing_from_qform_uses_sform_and_says_so(tmp_path, caplog):
    def differ(h):
        h.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
        h.set_sform(np.diag([0.5, 0.5, 2.0, 1.0]), code=1)
    path = _raw_header_file(tmp_path, "differ.nii.gz", differ)
    with caplog.at_level(logging.WARNING, logger="sigvlp.data"):
        vol = load_volume(path)
    assert vol.spacing == (2.0, 0.5, 0.5)
    assert vol.geometry["affine"] == "sform (differs from qform)" and "sform and qform differ" in caplog.text

    def qonly(h):
        h.set_qform(np.diag([0.7, 0.7, 3.0, 1.0]), code=1)
        h.set_sform(None, code=0)
    vol = load_volume(_raw_header_file(tmp_path, "qform.nii.gz", qonly))
    assert vol.geometry["affine"] == "qform" and vol.spacing == pytest.approx((3.0, 0.7, 0.7))


# ----------------------------------------------------------------------------- spacing
def test_unit_pixdim_header_takes_the_csv_spacing(tmp_path, caplog):
    hu = _body_cropped_hu(np.random.default_rng(9))
    path = _file(tmp_path, "unit.nii.gz", hu)  # eye(4) affine: 1 mm everywhere
    meta = dict(CSV, XYSpacing="[0.7, 0.7]", ZSpacing="1.5")
    with caplog.at_level(logging.WARNING, logger="sigvlp.data"):
        vol = load_volume(path, meta, already_hu=True)
    assert vol.spacing == (1.5, 0.7, 0.7)
    assert vol.geometry["spacing"]["z"].startswith("metadata") and "z spacing 1 mm in the header" in caplog.text
    np.testing.assert_allclose(np.sqrt((vol.affine[:3, :3] ** 2).sum(0)), (1.5, 0.7, 0.7))
    # The cache resamples the slice axis by the CSV's spacing: 30 slices x 1.5 mm / 3 mm = 15.
    cv = PreprocessCache(tmp_path / "c", preset("tiny")).get(path, metadata=meta, already_hu=True)
    assert cv.shape[0] == 15 and cv.spacing[0] == pytest.approx(3.0)
    assert load_volume(path, meta, already_hu=True, spacing="header").spacing == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"unit\.nii\.gz: z spacing 1 mm in the header, 1.5 mm in the metadata"):
        load_volume(path, meta, already_hu=True, spacing="strict")


def test_agreeing_spacing_keeps_the_header_and_bad_strings_are_named(tmp_path):
    hu = _body_cropped_hu(np.random.default_rng(10))
    aff = np.diag([0.7421875, 0.7421875, 1.25, 1.0])
    path = _file(tmp_path, "ok.nii.gz", hu, affine=aff)
    vol = load_volume(path, dict(CSV, XYSpacing="[0.742188 0.742188]", ZSpacing=1.25), already_hu=True)
    assert vol.spacing == pytest.approx((1.25, 0.7421875, 0.7421875), rel=1e-7)
    assert vol.geometry["spacing"]["x"] == "header (agrees with metadata)"
    with pytest.raises(ValueError, match=r"ok\.nii\.gz: metadata XYSpacing 'n/a mm'"):
        load_volume(path, dict(CSV, XYSpacing="n/a mm"), already_hu=True)
    with pytest.raises(ValueError, match="spacing must be"):
        load_volume(path, spacing="csv")
