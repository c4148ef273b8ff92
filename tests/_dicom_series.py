"""Synthetic DICOM CT series for the DICOM tests, written with pydicom from an analytic phantom.

The phantom lives in patient LPS mm (DICOM's frame): air (-1000 HU) outside a water cylinder
(40 HU, radius 100 mm, along z); a bone rod (1000 HU, radius 6 mm) along the table axis z at
(x, y) = ROD_XY; a marker square whose value encodes its own height (HU = 4 * z_mm), so every
slice of a read volume can be checked against the z its affine claims, independently of the
reader. Each slice samples the phantom at its pixel centres from the ImagePositionPatient /
ImageOrientationPatient / PixelSpacing written into it, so a gantry tilt or a missing slice is
geometry the reader must honour, not a label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROD_XY = (30.0, -20.0)  # LPS mm
MARKER_XY = (-40.0, 30.0)  # centre of the height-marker square (half-width 10 mm)
MARKER_HU_PER_MM = 4.0


def phantom_hu(p: np.ndarray) -> np.ndarray:
    """HU of the phantom at LPS points p (..., 3)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    hu = np.where(x ** 2 + y ** 2 <= 100.0 ** 2, 40.0, -1000.0)
    hu = np.where((x - ROD_XY[0]) ** 2 + (y - ROD_XY[1]) ** 2 <= 6.0 ** 2, 1000.0, hu)
    marker = (np.abs(x - MARKER_XY[0]) <= 10.0) & (np.abs(y - MARKER_XY[1]) <= 10.0)
    return np.where(marker, MARKER_HU_PER_MM * z, hu)


def ct_dataset(series_uid: str):
    """An empty CT image dataset with its file meta (explicit VR little endian) and UIDs."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", series_uid
    return ds


def write_series(folder: Path, z_positions: Sequence[float], *, tilt_deg: float = 0.0, size: int = 96,
                 pixel_mm: float = 2.0, series_uid: str = "1.2.826.0.1.3680043.8.498.7",
                 rescale: Optional[tuple] = (1, -1024), tags: Optional[tuple] = None,
                 thickness: Optional[float] = None, seed: int = 0) -> Path:
    """Write one axial CT series: slice k at table position z_positions[k] (mm); tilt_deg: gantry
    tilt about the patient x axis (ImageOrientationPatient's column direction (0, cos t, -sin t),
    GantryDetectorTilt set), positions still moving along z only, as scanners write them.
    rescale: the true (slope, intercept): stored = round((HU - intercept) / slope); tags: the
    (RescaleSlope, RescaleIntercept) written (default: rescale; "" writes an empty element, any
    other string is written verbatim); rescale None stores HU and writes neither tag.
    Files are written in shuffled order."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    t = np.deg2rad(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])  # increasing column index: towards patient left
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])  # increasing row index: posterior (tilted)
    half = (size - 1) / 2 * pixel_mm
    jj, ii = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    slope, inter = (1.0, 0.0) if rescale is None else (float(rescale[0]), float(rescale[1]))
    tags = rescale if tags is None else tags
    order = np.random.default_rng(seed).permutation(len(z_positions))
    study = generate_uid()
    for n, k in enumerate(order):
        ipp = np.array([-half, -half * np.cos(t), float(z_positions[k]) + half * np.sin(t)])
        pts = ipp + ii[..., None] * pixel_mm * row_dir + jj[..., None] * pixel_mm * col_dir
        stored = np.round((phantom_hu(pts) - inter) / slope).astype(np.int16)
        ds = ct_dataset(series_uid)
        ds.StudyInstanceUID = study
        ds.SeriesNumber, ds.InstanceNumber, ds.PatientID = 1, int(k + 1), "PHANTOM"
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.GantryDetectorTilt = float(tilt_deg)
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness = float(thickness if thickness is not None else np.min(np.diff(sorted(z_positions))))
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if tags is not None:
            for key, value in zip(("RescaleSlope", "RescaleIntercept"), tags):
                text = (value if isinstance(value, str) else str(value)).encode()
                text += b" " * (len(text) % 2)  # DICOM values have even length
                tag = Tag(key)  # written raw: pydicom would refuse to build a DS that is no number
                ds[tag] = RawDataElement(tag, "DS", len(text), text, 0, False, True)
            ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(str(folder / f"IM{n:04d}"), enforce_file_format=True)
    return folder


def rod_centres(vol) -> tuple[np.ndarray, np.ndarray]:
    """(slice indices, (n, 2) rod centroids (y, x) in voxels) of the slices of a read Volume (RAS
    (z, y, x)) whose rod cross-section is whole (at least 90% of the largest): a tilted slab cuts
    the rod at its two ends."""
    counts = np.array([np.count_nonzero(vol.hu[z] > 500) for z in range(vol.hu.shape[0])])
    zs = np.flatnonzero(counts >= 0.9 * counts.max())
    return zs, np.array([np.argwhere(vol.hu[z] > 500).mean(axis=0) for z in zs])


def rod_drift_mm(vol) -> float:
    """Largest distance (mm, in the x-y plane) between the rod's centroid in a slice of a read
    Volume (via its affine) and the true rod, over the slices where the rod is whole."""
    zs, yx = rod_centres(vol)
    ras = [vol.affine @ np.array([z, c[0], c[1], 1.0]) for z, c in zip(zs, yx)]
    true_ras = np.array([-ROD_XY[0], -ROD_XY[1]])
    return max(float(np.hypot(*(r[:2] - true_ras))) for r in ras)


def marker_heights(vol) -> tuple[np.ndarray, np.ndarray]:
    """(height the affine gives, height the marker encodes) in mm, for the slices of a read Volume
    whose marker-centre voxel holds data (not the -1024 HU fill outside a resampled field)."""
    a = vol.affine
    centre_ras = np.array([-MARKER_XY[0], -MARKER_XY[1]])
    told, read = [], []
    for z in range(vol.hu.shape[0]):
        yx = np.linalg.solve(a[:2, 1:3], centre_ras - a[:2, 3] - a[:2, 0] * z)  # in-plane voxel of the centre
        j, i = (int(round(v)) for v in yx)
        if vol.hu[z, j, i] != -1024:
            told.append(float((a @ np.array([z, j, i, 1.0]))[2]))
            read.append(float(vol.hu[z, j, i]) / MARKER_HU_PER_MM)
    return np.array(told), np.array(read)


def marker_height_error_mm(vol) -> float:
    """Largest |height the affine gives a slice - height its marker encodes| (mm), over the slices
    with data at the marker."""
    told, read = marker_heights(vol)
    return float(np.abs(told - read).max())
