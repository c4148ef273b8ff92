"""Reading CT volumes: NIfTI -> HU in canonical (z, y, x) order, rescaled exactly once.

Orientation: every volume is turned to nibabel's closest canonical RAS+ (no resampling, only
axis flips/permutations), then its array is transposed from nibabel's (i, j, k) = (x, y, z) to
(z, y, x), z being the slice axis. The same scan written in LPS and in RAS gives identical arrays.

Rescaling: stored values become HU by ``hu = raw * slope + intercept`` from the NIfTI header
(scl_slope / scl_inter) or, for CT-RATE v1 files whose header lacks them, from the metadata CSV
row (``RescaleSlope`` / ``RescaleIntercept``). Already-HU files rescaled again (the CT-CLIP bug:
CSV intercept -1024 applied to v2 files) put air near -2024 HU; we detect that from where the air
lands and never apply the second rescale.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

#: HU of air; used to tell whether stored values are already HU.
AIR_HU = -1000.0


@dataclass
class Volume:
    """A CT volume in canonical orientation.

    hu: (z, y, x) HU array, int16 when the rescale is exact in integers, else float32.
    spacing: (z, y, x) voxel size in mm.
    affine: 4x4 map from (z, y, x, 1) voxel indices to RAS+ world mm.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Optional[str] = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)


def _metadata_scaling(metadata: Optional[Mapping], path) -> Optional[tuple[float, float]]:
    if metadata is None:
        return None
    keys = ("RescaleSlope", "RescaleIntercept")
    if not all(k in metadata and str(metadata[k]).strip() not in ("", "nan", "None") for k in keys):
        return None
    try:
        return float(metadata["RescaleSlope"]), float(metadata["RescaleIntercept"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: metadata RescaleSlope/RescaleIntercept are not numbers ({e})") from None


def _air_fractions(raw: np.ndarray, slope: float, inter: float) -> tuple[float, float]:
    """Fractions of (subsampled) voxels that land near air HU with this rescale, and near the
    value air would take if the stored data were already HU and got rescaled again."""
    sub = raw[::4, ::4, ::4].astype(np.float32) * slope + inter
    doubled = AIR_HU * slope + inter
    near_air = float(np.mean(np.abs(sub - AIR_HU) < 120))
    near_double = float(np.mean(np.abs(sub - doubled) < 120))
    return near_air, near_double


def _looks_double_rescaled(raw: np.ndarray, slope: float, inter: float) -> bool:
    if abs((AIR_HU * slope + inter) - AIR_HU) < 300:  # rescale too mild to tell (or identity)
        return False
    near_air, near_double = _air_fractions(raw, slope, inter)
    return near_double > 0.005 and near_double > near_air


def _to_hu(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """raw * slope + inter without ever holding float64; int16 when exact."""
    exact_int = float(slope).is_integer() and float(inter).is_integer()
    if exact_int and np.issubdtype(raw.dtype, np.integer):
        lo = int(raw.min()) * slope + inter if raw.size else 0
        hi = int(raw.max()) * slope + inter if raw.size else 0
        lo, hi = min(lo, hi), max(lo, hi)
        if -32768 <= lo and hi <= 32767:
            if slope == 1 and inter == 0 and raw.dtype == np.int16:
                return raw
            out = raw.astype(np.int32)
            if slope != 1:
                out *= int(slope)
            if inter != 0:
                out += int(inter)
            return out.astype(np.int16)
    out = raw.astype(np.float32)
    if slope != 1:
        out *= np.float32(slope)
    if inter != 0:
        out += np.float32(inter)
    return out


def canonical_raw(img, path=None) -> tuple[np.ndarray, np.ndarray]:
    """The image's stored (unscaled) array reoriented to RAS+, and its affine (nibabel's (i, j, k)
    order). Done by hand: nibabel's as_closest_canonical applies the scaling in float64."""
    from nibabel import orientations as ornt_mod

    try:
        raw = np.asarray(img.dataobj.get_unscaled() if hasattr(img.dataobj, "get_unscaled") else img.dataobj)
    except Exception as e:  # gzip/EOF/zlib errors from a truncated or corrupt file
        raise ValueError(f"{path}: cannot read voxel data ({type(e).__name__}: {e})") from None
    while raw.ndim > 3 and raw.shape[-1] == 1:  # (x, y, z, 1) from some converters
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {tuple(raw.shape)}")
    affine = img.affine
    ornt = ornt_mod.io_orientation(affine)
    to_ras = ornt_mod.ornt_transform(ornt, ornt_mod.axcodes2ornt("RAS"))
    if not np.array_equal(to_ras, [[0, 1], [1, 1], [2, 1]]):
        raw = ornt_mod.apply_orientation(raw, to_ras)
        affine = affine @ ornt_mod.inv_ornt_aff(to_ras, img.shape[:3])
    return raw, affine


def load_volume(path, metadata: Optional[Mapping] = None, *, rescale: str = "auto") -> Volume:
    """Read a .nii/.nii.gz CT volume as HU in canonical (z, y, x) order.

    metadata: a CT-RATE metadata row (mapping with RescaleSlope / RescaleIntercept), used when the
    header carries no scaling (CT-RATE v1 files).
    rescale: "auto" (header, else metadata unless the data is already HU: then a warning and no
    second rescale), "header" (ignore metadata), "metadata" (require and apply the metadata
    scaling; ValueError if that would rescale already-HU data twice).
    """
    import nibabel as nib

    if rescale not in ("auto", "header", "metadata"):
        raise ValueError(f"rescale must be 'auto', 'header' or 'metadata', got {rescale!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if len(img.shape) < 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {tuple(img.shape)}")
    if any(s == 0 for s in img.shape):
        raise ValueError(f"{path}: empty image (shape {tuple(img.shape)}, 0 slices?)")

    raw, affine = canonical_raw(img, path)
    h_slope = float(getattr(img.dataobj, "slope", 1.0))
    h_inter = float(getattr(img.dataobj, "inter", 0.0))
    header_scaled = (h_slope, h_inter) != (1.0, 0.0)
    meta = _metadata_scaling(metadata, path) if rescale != "header" else None
    if rescale == "metadata" and meta is None:
        raise ValueError(f"{path}: rescale='metadata' but the metadata has no RescaleSlope/RescaleIntercept")

    slope, inter = h_slope, h_inter
    if meta is not None and meta != (1.0, 0.0):
        if header_scaled:
            if not np.allclose(meta, (h_slope, h_inter)):
                raise ValueError(
                    f"{path}: header scaling (slope {h_slope}, intercept {h_inter}) conflicts with the "
                    f"metadata's (slope {meta[0]}, intercept {meta[1]}); refusing to guess which is right")
            # Same values in both: applied once, from the header.
        elif _looks_double_rescaled(raw, *meta):
            msg = (f"{path}: stored values are already HU (air near {AIR_HU:.0f}); applying the metadata "
                   f"rescale (slope {meta[0]}, intercept {meta[1]}) would rescale twice (air near "
                   f"{AIR_HU * meta[0] + meta[1]:.0f} HU)")
            if rescale == "metadata":
                raise ValueError(msg + "; refusing")
            warnings.warn(msg + "; the metadata rescale was not applied", stacklevel=2)
        else:
            slope, inter = meta

    hu = _to_hu(raw, slope, inter)
    if hu.dtype.kind == "f" and not np.isfinite(hu).all():
        bad = int(np.size(hu) - np.count_nonzero(np.isfinite(hu)))
        raise ValueError(f"{path}: {bad} voxel(s) are NaN or infinite")

    # (i, j, k) = (x, y, z) -> (z, y, x); the affine's columns follow the index order.
    hu = np.ascontiguousarray(hu.transpose(2, 1, 0))
    affine_zyx = np.asarray(affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    spacing = tuple(float(s) for s in np.sqrt((affine_zyx[:3, :3] ** 2).sum(axis=0)))
    if not all(s > 0 and np.isfinite(s) for s in spacing):
        raise ValueError(f"{path}: degenerate affine, voxel spacing {spacing}")
    return Volume(hu=hu, spacing=spacing, affine=affine_zyx, path=path)


def load_mask(path, shape: Optional[tuple[int, int, int]] = None, *, max_label: int = 255) -> np.ndarray:
    """A label map (e.g. TotalSegmentator ids) in the same canonical (z, y, x) order as
    load_volume. shape: the image's canonical shape, checked. Labels must be integers."""
    import nibabel as nib

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such mask file")
    try:
        img = nib.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable NIfTI mask ({type(e).__name__}: {e})") from None
    raw, _ = canonical_raw(img, path)
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    labels = _to_hu(raw, slope, inter)
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{path}: mask labels must be integers")
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > max_label:
        raise ValueError(f"{path}: mask labels must lie in [0, {max_label}], found [{lo}, {hi}]")
    labels = np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0))
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{path}: mask shape {tuple(labels.shape)} differs from its image's {tuple(shape)}")
    return labels
