"""DICOM CT series -> ``Volume`` (HU, canonical RAS+ (z, y, x)) through dcm2niix.

The series is converted by dcm2niix (Chris Rorden's converter; the ``dcm2niix`` PyPI package ships
the binary) into a NIfTI file in a temporary folder, which ``sigvlp.data.load_volume`` then reads
exactly as any NIfTI file: header rescale applied once, HU plausibility check, canonical order.
dcm2niix handles what stacking slices by hand got wrong:

- gantry tilt: dcm2niix writes a tilt-corrected volume (``*_Tilt_*``: the shear removed, an
  orthogonal grid in the tilted frame); it is resampled (trilinear, nibabel.processing) onto the
  patient axes at the same voxel sizes, so structures along the table axis stay on one voxel
  column; outside the scanned field is -1024 HU;
- uneven or missing slices: dcm2niix writes an equidistant volume (``*_Eq_*``, linear
  interpolation at the smallest step); a gap wider than ``MAX_GAP`` times the median step
  (several missing slices in a row) is refused: interpolating across it would invent anatomy.

Before conversion every header is read with pydicom (tags only, no pixels) and a series is
refused, with a ValueError naming the folder, when: it holds no image slices; the folder holds
several SeriesInstanceUIDs; RescaleSlope or RescaleIntercept is missing, empty or not a number on
any slice (an empty intercept read as 0 puts air at +24 HU), or differs between slices; two slices
share a position; the slices have different sizes or orientations. Needs pydicom and dcm2niix
(core dependencies; an ImportError says which is missing).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from sigvlp.data.volume import Volume, load_volume

__all__ = ["load_dicom_series", "is_dicom_file", "read_series_headers", "check_series", "MAX_GAP"]

log = logging.getLogger("sigvlp.data")

#: The largest step between neighbouring slices accepted, in median steps (one missing slice is 2).
MAX_GAP = 2.5
_NIFTI = (".nii", ".nii.gz")


def is_dicom_file(p) -> bool:
    """A ``.dcm`` file, or a file with the DICM preamble (bytes 128-131)."""
    p = Path(p)
    if p.name.lower().endswith(_NIFTI):
        return False
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _pydicom():
    try:
        import pydicom  # optional at import time: only DICOM input needs it
    except ImportError as e:
        raise ImportError("reading DICOM needs pydicom: pip install pydicom (a sigvlp dependency)") from e
    return pydicom


def _dcm2niix_binary() -> str:
    try:
        import dcm2niix  # optional at import time: only DICOM input needs it
    except ImportError as e:
        raise ImportError("reading DICOM needs dcm2niix: pip install dcm2niix (a sigvlp dependency)") from e
    return dcm2niix.bin


def read_series_headers(folder) -> list:
    """pydicom datasets (tags only) of the image slices directly in ``folder`` (not its subfolders):
    files with PixelData and ImagePositionPatient / ImageOrientationPatient. Unreadable and
    non-DICOM files are ignored. FileNotFoundError for a missing folder."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such DICOM folder")
    slices = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.lower().endswith(_NIFTI):
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "Rows" in ds:
            slices.append(ds)
    return slices


def _rescale(ds, folder) -> tuple[float, float]:
    out = []
    for key in ("RescaleSlope", "RescaleIntercept"):
        try:
            raw = ds[key].value if key in ds else None
        except ValueError as e:  # pydicom converts DS text on access
            raw, what = None, f"not a number ({e})"
        else:
            what = "missing" if key not in ds else "empty" if raw in (None, "", b"") else None
        if what is None:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                what = f"not a number ({raw!r})"
            else:
                what = None if np.isfinite(value) and (key != "RescaleSlope" or value != 0) else f"{value!r}"
        if what is not None:
            raise ValueError(f"{folder}: {key} is {what} in {Path(ds.filename).name}; refusing the series "
                             f"(the stored values cannot be turned into HU without it)")
        out.append(value)
    return out[0], out[1]


def _steps(slices, folder) -> np.ndarray:
    """Distances (mm) between neighbouring slices along the slice normal, sorted by position."""
    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient], dtype=np.float64)
    for ds in slices[1:]:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise ValueError(f"{folder}: slices have different ImageOrientationPatient; refusing the series")
    normal = np.cross(iop[:3], iop[3:])
    dist = np.sort([float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in slices])
    steps = np.diff(dist)
    if np.any(steps < 1e-4):
        raise ValueError(f"{folder}: two or more slices share a position along the slice normal; refusing the series")
    return steps


def check_series(folder, slices) -> dict:
    """Check the headers of one series (module docstring); returns {"slices", "slope", "intercept",
    "steps_mm": (min, median, max)}. ValueError naming the folder for what cannot be made right."""
    if not slices:
        raise ValueError(f"{folder}: no DICOM image slices with ImagePositionPatient found")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in slices})
    if len(series) > 1:
        counts = {s: sum(str(ds.get("SeriesInstanceUID", "")) == s for ds in slices) for s in series}
        raise ValueError(f"{folder}: holds {len(series)} series ({counts}); put each series in its own folder")
    scalings = {_rescale(ds, folder) for ds in slices}
    if len(scalings) > 1:
        raise ValueError(f"{folder}: slices have different RescaleSlope/RescaleIntercept ({sorted(scalings)}); "
                         f"refusing the series")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: slices have different sizes ({sorted(sizes)}); refusing the series")
    (slope, inter), = scalings
    info = {"slices": len(slices), "slope": slope, "intercept": inter}
    if len(slices) > 1:
        steps = _steps(slices, folder)
        med = float(np.median(steps))
        if steps.max() > MAX_GAP * med:
            raise ValueError(f"{folder}: a {steps.max():g} mm gap between slices {med:g} mm apart (median): missing "
                             f"slices; refusing the series (more than {MAX_GAP:g} median steps cannot be "
                             f"interpolated faithfully)")
        info["steps_mm"] = (float(steps.min()), med, float(steps.max()))
    return info


def _convert(folder, out_dir: Path) -> Path:
    """Run dcm2niix on ``folder`` alone (no subfolders, no defaults file, no JSON sidecar); the
    NIfTI to read: the equidistant and tilt-corrected versions before the plain one."""
    cmd = [_dcm2niix_binary(), "-g", "i", "-d", "0", "-b", "n", "-z", "n", "-f", "series", "-o", str(out_dir),
           str(folder)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    made = sorted(p for p in out_dir.iterdir() if p.name.endswith(".nii"))
    if r.returncode != 0 or not made:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        raise ValueError(f"{folder}: dcm2niix could not convert the series (exit {r.returncode}): {tail}")
    plain = [p for p in made if "_Tilt_" not in p.name and "_Eq_" not in p.name]
    if len(plain) != 1:
        raise ValueError(f"{folder}: dcm2niix made {len(plain)} volumes ({[p.name for p in plain]}); expected one "
                         f"series")
    rank = sorted(made, key=lambda p: ("_Eq_" in p.name, "_Tilt_" in p.name), reverse=True)
    return rank[0]


def _to_patient_axes(path: Path) -> Path:
    """Resample a tilt-corrected (oblique) NIfTI onto the patient axes, trilinear, same voxel sizes,
    -1024 HU outside; written beside it as int16 HU."""
    import nibabel as nib
    import nibabel.processing  # needs scipy: imported only for tilted series

    img = nib.load(str(path))
    out = nibabel.processing.resample_to_output(img, voxel_sizes=img.header.get_zooms()[:3], order=1, cval=-1024.0)
    hu = np.rint(np.asarray(out.dataobj, dtype=np.float32)).clip(-32768, 32767).astype(np.int16)
    res = nib.Nifti1Image(hu, out.affine)
    res.header.set_xyzt_units("mm")
    dst = path.with_name(path.name.replace(".nii", "_axes.nii"))
    nib.save(res, str(dst))
    return dst


def load_dicom_series(folder) -> Volume:
    """Read a folder holding one DICOM CT series as a ``Volume`` (HU, canonical RAS+ (z, y, x),
    spacing in mm, affine for (z, y, x) indices; ``geometry["dicom"]`` says what the conversion did).
    The same scan gives the same array from DICOM and from its NIfTI. Errors: ValueError naming the
    folder (module docstring), FileNotFoundError, ImportError without pydicom or dcm2niix."""
    folder = Path(folder)
    info = check_series(folder, read_series_headers(folder))
    with tempfile.TemporaryDirectory(prefix="sigvlp-dicom-") as tmp:
        path = _convert(folder, Path(tmp))
        notes = ["dcm2niix"]
        if "_Eq_" in path.name:
            notes.append(f"uneven slices {info['steps_mm']} mm resampled to equidistant (dcm2niix)")
        if "_Tilt_" in path.name:
            notes.append("gantry tilt corrected (dcm2niix) and resampled to the patient axes")
            path = _to_patient_axes(path)
        vol = load_volume(path)
        if not isinstance(vol.hu, np.ndarray) or not vol.hu.flags.owndata:  # may map the temporary file
            vol.hu = np.array(vol.hu, copy=True)
    vol.path = str(folder)
    vol.geometry = {**vol.geometry, "dicom": "; ".join(notes)}
    if len(notes) > 1:
        log.warning("%s: %s", folder, "; ".join(notes[1:]))
    return vol
