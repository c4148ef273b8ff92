"""DICOM series -> volume (sigvlp.data.dicom, through dcm2niix): the field cases that hand-stacking
got wrong, checked against the analytic phantom the series were sampled from (tests/_dicom_series.py):
a gantry-tilted series (a rod along the table axis must stay put), uneven or missing slices (each
slice must sit at the height its content encodes), an empty RescaleIntercept (refused, never read as
0), and several series in one folder (refused)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("dcm2niix")

from _dicom_series import (MARKER_HU_PER_MM, marker_height_error_mm, marker_heights,  # noqa: E402
                           rod_centres, rod_drift_mm, write_series)

from sigvlp.data.dicom import load_dicom_series  # noqa: E402

Z40 = np.arange(40) * 2.5 - 50.0  # 40 slices, 2.5 mm apart along the table
PIXEL = 2.0  # mm
#: the marker encodes height as round(4 * z) HU, so a slice's height reads back to 1 / (2 * 4) mm
HEIGHT_FLOOR = 0.5 / MARKER_HU_PER_MM


def test_plain_series_exact(tmp_path):
    vol = load_dicom_series(write_series(tmp_path / "s", Z40, pixel_mm=PIXEL))
    assert vol.hu.shape == (40, 96, 96) and vol.hu.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, (2.5, PIXEL, PIXEL), rtol=1e-6)
    assert rod_drift_mm(vol) < 0.05
    assert marker_height_error_mm(vol) <= HEIGHT_FLOOR
    assert vol.hu.min() == -1000 and vol.hu.max() == 1000  # stored + intercept applied exactly once


def test_gantry_tilt_rod_stays_put(tmp_path):
    """20 degrees of gantry tilt: hand-stacking along the slice normal drifted the rod 32 mm over 40
    slices. Read right, the volume is on the patient axes and the rod keeps its voxel and its place."""
    vol = load_dicom_series(write_series(tmp_path / "s", Z40, tilt_deg=20.0, pixel_mm=PIXEL))
    assert (np.count_nonzero(np.abs(vol.affine[:3, :3]) > 1e-6, axis=0) == 1).all()  # on the patient axes
    zs, yx = rod_centres(vol)
    assert (zs[-1] - zs[0]) * vol.spacing[0] >= 0.9 * (Z40[-1] - Z40[0])  # the scanned range (ends cut by the tilt)
    assert rod_drift_mm(vol) <= PIXEL / 2  # dcm2niix shifts rows by whole pixels: within half a pixel
    assert np.ptp(yx, axis=0).max() <= 0.5  # the rod does not move through the array
    told, read = marker_heights(vol)
    assert np.ptp(read) >= 0.9 * (Z40[-1] - Z40[0])  # the marker is found along the scanned range
    assert np.abs(told - read).max() <= 0.5  # resampled: a voxel's height known to ~1/4 pixel


@pytest.mark.parametrize("case", ["uneven", "one_missing"])
def test_uneven_or_missing_slices_at_their_heights(tmp_path, case):
    """Slices 1.25 mm then 2.5 mm apart, or one slice missing: hand-stacking at the mean spacing put
    structures 12 mm (uneven) and 3 mm (one missing) away from their height. Read right, every slice
    is equidistant and its content is the phantom's at the height the affine gives it."""
    z = (np.concatenate([np.arange(20) * 1.25, 23.75 + np.arange(1, 21) * 2.5]) - 50 if case == "uneven"
         else np.delete(Z40, 17))
    vol = load_dicom_series(write_series(tmp_path / "s", z, pixel_mm=PIXEL))
    step = 1.25 if case == "uneven" else 2.5
    assert vol.spacing[0] == pytest.approx(step, rel=1e-5)
    assert vol.hu.shape[0] == round((z.max() - z.min()) / step) + 1
    assert marker_height_error_mm(vol) <= HEIGHT_FLOOR  # linear in z: interpolation is exact
    assert rod_drift_mm(vol) < 0.05


def test_many_missing_slices_refused(tmp_path):
    folder = write_series(tmp_path / "s", np.delete(Z40, range(15, 20)), pixel_mm=PIXEL)
    with pytest.raises(ValueError, match=r"15(\.0)? mm gap.*missing slices"):
        load_dicom_series(folder)


@pytest.mark.parametrize("tags,what", [((1, ""), "RescaleIntercept"), (("", -1024), "RescaleSlope"),
                                       ((1, "n/a"), "RescaleIntercept")])
def test_empty_or_unreadable_rescale_refused(tmp_path, tags, what):
    """Stored values are HU + 1024; an empty RescaleIntercept read as 0 put air at +24 HU, silently."""
    folder = write_series(tmp_path / "s", Z40[:8], pixel_mm=PIXEL, rescale=(1, -1024), tags=tags)
    with pytest.raises(ValueError, match=f"{what}.*refus"):
        load_dicom_series(folder)


def test_mixed_series_refused(tmp_path):
    write_series(tmp_path / "a", Z40[:6], series_uid="1.2.3")
    write_series(tmp_path / "b", Z40[:6], series_uid="1.2.4")
    (tmp_path / "b" / "IM0000").rename(tmp_path / "a" / "extra")
    with pytest.raises(ValueError, match="2 series"):
        load_dicom_series(tmp_path / "a")
