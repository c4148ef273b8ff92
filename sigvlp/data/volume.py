"""Reading CT volumes: NIfTI -> HU in canonical (z, y, x) order, rescaled exactly once.

Orientation: every volume is turned to nibabel's closest canonical RAS+ (no resampling, only
axis flips/permutations), then its array is transposed from nibabel's (i, j, k) = (x, y, z) to
(z, y, x), z being the slice axis. The same scan written in LPS and in RAS gives identical arrays.

Geometry: the affine is the one nibabel's rules select (sform when sform_code > 0, else qform
when qform_code > 0, else pixdim alone) and is checked before use: a non-finite, zero or
singular 3 x 3 part, or pixdim[1:4] <= 0, raises ValueError naming the file and the header
field; an sform that differs from a valid qform is used and the difference logged.

Spacing: from the affine, cross-checked against the CT-RATE metadata row (``XYSpacing``, a
string like "[0.34, 0.34]" = (row, column) = (y, x) mm, and ``ZSpacing``) when it has them.
When an axis disagrees by more than 1% (``SPACING_RTOL``), ``spacing="auto"`` (default) uses the
metadata's value for that axis (CT-RATE's metadata comes from the DICOM source, as CT-CLIP's
preprocessing assumes; a header with unit pixdim is the usual culprit) and logs both;
``spacing="header"`` keeps the header, ``spacing="metadata"`` requires the metadata,
``spacing="strict"`` refuses a disagreement. The decision is ``Volume.geometry``.

Rescaling (hu = stored * slope + intercept) is decided from evidence that anatomy cannot fool:
the stored dtype and value range before any scaling, the header's own scl_slope/scl_inter, and
the metadata CSV's RescaleSlope/RescaleIntercept (see ``decide_rescale``). Physically no voxel of
a CT lies below about -1024 HU: a stored padding constant aside (the minimum, when it is a
spike separated from every other value), a scaling that would put more than ``EVIDENCE_SHARE`` of
the voxels below ``HU_FLOOR`` is impossible. For a file without header scaling and a CSV that
says e.g. slope 1 / intercept -1024:

- the stored values are plausible HU and the CSV rescale is not -> already HU (CT-RATE v2), the
  CSV rescale is not applied (the CT-CLIP double-rescale bug);
- the CSV rescale is plausible and the stored values are not -> raw, rescale once;
- both plausible: raw when no stored value is negative (unscaled scanner values never are),
  else ambiguous;
- ambiguous or neither plausible: ValueError naming the file and the option that settles it
  (``already_hu=True`` for HU files, ``already_hu=False`` to apply the CSV rescale).

The decision is returned (``Volume.rescale``, a RescaleDecision) and logged on "sigvlp.data".
After rescaling, a sanity check refuses volumes with more than ``SANITY_SHARE`` of the voxels
below ``HU_FLOOR`` or above ``HU_CEIL``.

Memory: the stored array is decoded once (nibabel reads it into one buffer), rescaled in place
when the result fits its dtype (int16 with an integer intercept), converted slab by slab
otherwise (float64 never survives), and reoriented by a free transpose (NIfTI arrays are
Fortran-ordered, so (x, y, z) -> (z, y, x) is C-contiguous) plus in-place flips. Peak extra
memory of load_volume is about the volume itself for int16 files.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

import numpy as np

log = logging.getLogger("sigvlp.data")

#: HU of air.
AIR_HU = -1000.0
#: No real CT voxel lies below this (air is -1000, scanners clip at -1024; margin for noise).
HU_FLOOR = -1100.0
#: Above this a share of voxels is nonsense (metal reaches 3071 on the standard scale).
HU_CEIL = 4000.0
#: Share of (non-padding) voxels beyond HU_FLOOR that rules a scaling out as evidence.
EVIDENCE_SHARE = 1e-4
#: Share beyond HU_FLOOR / HU_CEIL after rescaling that makes load_volume refuse the volume.
SANITY_SHARE = 0.01
#: Relative tolerance between the header's and the metadata's voxel spacing.
SPACING_RTOL = 0.01
#: A stored minimum is a padding constant when it holds this share and no value lies within PAD_GAP.
PAD_SHARE, PAD_GAP = 1e-3, 64
_SLAB_BYTES = 32 * 2 ** 20


@dataclass(frozen=True)
class RescaleDecision:
    """How stored values became HU: hu = stored * slope + intercept.

    source: "header" (the NIfTI scl_slope/scl_inter), "metadata" (the CSV's RescaleSlope /
    RescaleIntercept), "none" (no scaling anywhere) or "already_hu" (the CSV's rescale was
    refused: the stored values are HU). stored_*: dtype and range before scaling; padding: the
    stored padding constant excluded from the checks (None when there is none).
    """

    source: str
    slope: float
    intercept: float
    reason: str
    stored_dtype: str
    stored_min: float
    stored_max: float
    padding: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Volume:
    """A CT volume in canonical orientation.

    hu: (z, y, x) HU array, int16 when the rescale is exact in integers, else float32.
    spacing: (z, y, x) voxel size in mm.
    affine: 4x4 map from (z, y, x, 1) voxel indices to RAS+ world mm.
    rescale: the RescaleDecision; geometry: which header field gave the affine ("sform",
    "qform" or "pixdim") and where each spacing came from.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Optional[str] = None
    rescale: Optional[RescaleDecision] = None
    geometry: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)


# ------------------------------------------------------------------------------ stored values
def _slabs(a: np.ndarray):
    """Contiguous-ish slabs of `a` along its slowest axis (bounded temporaries)."""
    ax = int(np.argmax([abs(s) for s in a.strides])) if a.ndim else 0
    n = a.shape[ax] if a.ndim else 1
    per = max(1, _SLAB_BYTES // max(1, a.nbytes // max(n, 1)))
    for i in range(0, n, per):
        idx = [slice(None)] * a.ndim
        idx[ax] = slice(i, min(n, i + per))
        yield tuple(idx)


class StoredStats:
    """Counts over the stored (unscaled) values, in stored units: min/max and counts below or
    above thresholds, each one slab-wise pass (bounded temporaries), memoised."""

    def __init__(self, raw: np.ndarray):
        self.raw = raw
        self.n = int(raw.size)
        self.dtype = raw.dtype
        self._memo = {}
        lo, hi = math.inf, -math.inf
        for sl in _slabs(raw):
            s = raw[sl]
            if s.size:
                lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        self.min, self.max = (lo, hi) if lo <= hi else (0.0, 0.0)
        self.padding = self._padding()

    def _count(self, op: str, t: float) -> int:
        key = (op, float(t))
        if key not in self._memo:
            if op == "<" and t <= self.min or op == ">" and t >= self.max:
                self._memo[key] = 0
            elif op == "<" and t > self.max or op == ">" and t < self.min:
                self._memo[key] = self.n
            else:
                cmp = np.less if op == "<" else np.greater
                if self.dtype.kind in "iu":  # compare in the stored dtype: no float temporaries
                    t = math.ceil(t) if op == "<" else math.floor(t)
                    t = self.dtype.type(t)
                self._memo[key] = sum(int(np.count_nonzero(cmp(self.raw[sl], t))) for sl in _slabs(self.raw))
        return self._memo[key]

    def count_below(self, t: float) -> int:
        """Values < t."""
        return self._count("<", t)

    def count_above(self, t: float) -> int:
        """Values > t."""
        return self._count(">", t)

    def _padding(self) -> Optional[float]:
        if self.n == 0:
            return None
        v0 = self.min
        at = self.n - self.count_above(v0)
        near = self.n - self.count_above(v0 + PAD_GAP) - at
        return v0 if at >= PAD_SHARE * self.n and near == 0 and at < self.n else None

    def share_outside(self, slope: float, inter: float, floor: float = HU_FLOOR,
                      ceil: Optional[float] = None) -> float:
        """Share of non-padding voxels whose value * slope + inter lies below floor (or above ceil)."""
        if slope == 0:
            return 1.0
        pad = 0 if self.padding is None else self.n - self.count_above(self.padding)
        total = self.n - pad
        if total <= 0:
            return 0.0
        t = (floor - inter) / slope
        bad = self.count_below(t) if slope > 0 else self.count_above(t)
        if self.padding is not None and (self.padding * slope + inter) < floor:
            bad -= pad
        if ceil is not None:
            u = (ceil - inter) / slope
            bad += self.count_above(u) if slope > 0 else self.count_below(u)
        return max(bad, 0) / total

    @property
    def nonpad_min(self) -> float:
        """The smallest stored value that is not padding."""
        if self.padding is None:
            return self.min
        lows = [float(s[s > self.padding].min()) for s in (self.raw[sl] for sl in _slabs(self.raw))
                if (s > self.padding).any()]
        return min(lows) if lows else self.padding


# ------------------------------------------------------------------------------ rescale
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


def _settle_hint() -> str:
    return ("pass already_hu=True if the stored values are HU (CT-RATE v2 files), or already_hu=False to "
            "apply the metadata rescale (CT-RATE v1); CTRateDataset(..., already_hu=...) passes it on")


def decide_rescale(stats: StoredStats, header: tuple[float, float], meta: Optional[tuple[float, float]],
                   path, *, rescale: str = "auto", already_hu: Optional[bool] = None) -> RescaleDecision:
    """The rescale of a volume from its stored values' statistics, the header's (slope, inter)
    and the metadata's (or None); rules in the module docstring. ValueError when ambiguous."""
    h_slope, h_inter = header
    header_scaled = (h_slope, h_inter) != (1.0, 0.0)
    base = dict(stored_dtype=str(stats.dtype), stored_min=stats.min, stored_max=stats.max, padding=stats.padding)
    pad = f", padding {stats.padding:g} excluded" if stats.padding is not None else ""
    rng = f"stored {stats.dtype} in [{stats.min:g}, {stats.max:g}]{pad}"
    if rescale == "header" or meta is None or already_hu is True or meta == (1.0, 0.0):
        why = ("rescale='header'" if rescale == "header" else "already_hu=True" if already_hu is True
               else "no metadata scaling" if meta is None else "metadata scaling is the identity")
        if header_scaled:
            return RescaleDecision("header", h_slope, h_inter, f"header scl_slope/scl_inter ({why}); {rng}", **base)
        if already_hu is True and meta not in (None, (1.0, 0.0)):
            return RescaleDecision("already_hu", 1.0, 0.0, f"already_hu=True: metadata rescale {meta} not applied; "
                                   f"{rng}", **base)
        return RescaleDecision("none", 1.0, 0.0, f"no scaling in the header ({why}); {rng}", **base)
    if header_scaled:
        if not np.allclose(meta, (h_slope, h_inter)):
            raise ValueError(
                f"{path}: header scaling (slope {h_slope}, intercept {h_inter}) conflicts with the metadata's "
                f"(slope {meta[0]}, intercept {meta[1]}); refusing to guess which is right (already_hu=True uses "
                f"the header's and ignores the metadata)")
        return RescaleDecision("header", h_slope, h_inter, f"header and metadata agree, applied once; {rng}", **base)
    if already_hu is False:
        return RescaleDecision("metadata", meta[0], meta[1], f"already_hu=False: metadata rescale; {rng}", **base)
    as_is = stats.share_outside(1.0, 0.0)
    rescaled = stats.share_outside(*meta)
    ok_as_is, ok_rescaled = as_is <= EVIDENCE_SHARE, rescaled <= EVIDENCE_SHARE
    twice = (f"{path}: stored values are already HU ({rng}); the metadata rescale (slope {meta[0]:g}, intercept "
             f"{meta[1]:g}) would put {100 * rescaled:.2f}% of the voxels below {HU_FLOOR:g} HU (rescaled twice)")
    if rescale == "metadata":
        if ok_as_is and not ok_rescaled:
            raise ValueError(twice + "; refusing (rescale='metadata')")
        return RescaleDecision("metadata", meta[0], meta[1], f"rescale='metadata'; {rng}", **base)
    if ok_as_is and not ok_rescaled:
        return RescaleDecision("already_hu", 1.0, 0.0, twice.split(": ", 1)[1] + "; not applied", **base)
    if ok_rescaled and not ok_as_is:
        return RescaleDecision("metadata", meta[0], meta[1], f"unscaled stored values ({rng}: {100 * as_is:.2f}% "
                               f"below {HU_FLOOR:g} as HU); metadata rescale applied once", **base)
    if ok_rescaled and ok_as_is and stats.nonpad_min >= 0:
        return RescaleDecision("metadata", meta[0], meta[1], f"no stored value is negative ({rng}): unscaled "
                               f"scanner values; metadata rescale applied once", **base)
    what = "both readings are plausible" if ok_as_is else "neither reading is plausible"
    raise ValueError(f"{path}: cannot tell whether the stored values are HU ({rng}): {what} (as stored: "
                     f"{100 * as_is:.3f}% below {HU_FLOOR:g} HU; with the metadata rescale slope {meta[0]:g}, "
                     f"intercept {meta[1]:g}: {100 * rescaled:.3f}%); {_settle_hint()}")


def _sanity_check(stats: StoredStats, d: RescaleDecision, path):
    low = stats.share_outside(d.slope, d.intercept)
    both = stats.share_outside(d.slope, d.intercept, HU_FLOOR, HU_CEIL)
    if both > SANITY_SHARE:
        raise ValueError(f"{path}: after the {d.source} rescale (slope {d.slope:g}, intercept {d.intercept:g}) "
                         f"{100 * low:.1f}% of the voxels lie below {HU_FLOOR:g} HU and {100 * (both - low):.1f}% "
                         f"above {HU_CEIL:g} HU: not a CT in HU; {_settle_hint()}")


def _apply_rescale(raw: np.ndarray, stats: StoredStats, slope: float, inter: float) -> np.ndarray:
    """raw * slope + inter, int16 when exact in integers, else float32; in place when the dtype
    allows, else slab by slab (never a float64 or int32 copy of the whole volume)."""
    exact_int = float(slope).is_integer() and float(inter).is_integer()
    if raw.dtype.kind in "iu" and exact_int:
        ends = (stats.min * slope + inter, stats.max * slope + inter)
        if -32768 <= min(ends) and max(ends) <= 32767:
            s, b = int(slope), int(inter)
            if raw.dtype == np.int16 and raw.flags.writeable and -32768 <= s * stats.min <= 32767 \
                    and -32768 <= s * stats.max <= 32767:
                if s != 1:
                    raw *= np.int16(s)
                if b != 0:
                    raw += np.int16(b)
                return raw
            out = np.empty(raw.shape, np.int16, order="F" if raw.flags.f_contiguous else "C")
            for sl in _slabs(raw):
                v = raw[sl].astype(np.int32)
                if s != 1:
                    v *= s
                if b != 0:
                    v += b
                out[sl] = v
            return out
    if raw.dtype == np.float32 and raw.flags.writeable:
        out = raw
    else:
        out = np.empty(raw.shape, np.float32, order="F" if raw.flags.f_contiguous else "C")
        for sl in _slabs(raw):
            out[sl] = raw[sl]
    if slope != 1 or inter != 0:
        for sl in _slabs(out):
            v = out[sl]
            if slope != 1:
                v *= np.float32(slope)
            if inter != 0:
                v += np.float32(inter)
    return out


# ------------------------------------------------------------------------------ geometry
def _raw_header(img, path):
    """The header as stored: nibabel's load silently turns negative pixdim positive and zero into 1."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(path) as f:
            return type(img.header).from_fileobj(f, check=False)
    except Exception:  # not a plain single-file NIfTI: nibabel's (checked) header
        return img.header


def checked_affine(img, path) -> tuple[np.ndarray, str]:
    """The affine nibabel's rules select, checked; (affine, "sform" | "qform" | "pixdim")."""
    hdr = img.header
    if not hasattr(hdr, "get_sform"):  # not NIfTI (e.g. Analyze): nibabel's affine, checked below
        affine, source = np.asarray(img.affine, dtype=np.float64), "affine"
    else:
        pixdim = np.asarray(_raw_header(img, path)["pixdim"][1:4], dtype=np.float64)
        if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
            raise ValueError(f"{path}: degenerate geometry: header pixdim[1:4] (voxel sizes) = {pixdim.tolist()}, "
                             f"expected positive finite values")
        s_code, q_code = int(hdr["sform_code"]), int(hdr["qform_code"])
        if s_code > 0:
            affine, source = np.asarray(hdr.get_sform(), dtype=np.float64), "sform"
        elif q_code > 0:
            affine, source = np.asarray(hdr.get_qform(), dtype=np.float64), "qform"
        else:
            affine, source = np.asarray(hdr.get_base_affine(), dtype=np.float64), "pixdim"
    m = affine[:3, :3]
    if not np.isfinite(affine).all():
        raise ValueError(f"{path}: degenerate affine: the {source} has non-finite entries {affine[:3].tolist()}")
    norms = np.sqrt((m ** 2).sum(axis=0))
    if not (norms > 0).all():
        raise ValueError(f"{path}: degenerate affine: the {source}'s 3 x 3 part has zero columns (voxel sizes "
                         f"{norms.tolist()} mm for axes i, j, k)")
    sv = np.linalg.svd(m, compute_uv=False)
    if sv[-1] <= 1e-6 * sv[0]:
        raise ValueError(f"{path}: degenerate affine: the {source}'s 3 x 3 part is singular (singular values "
                         f"{sv.tolist()}): its axes do not span 3-D space")
    if source == "sform" and int(hdr["qform_code"]) > 0:
        try:
            q = np.asarray(hdr.get_qform(), dtype=np.float64)
        except Exception:
            q = None
        if q is not None and not np.allclose(q, affine, atol=1e-3 * float(norms.min()) + 1e-4):
            log.warning("%s: sform and qform differ; using the sform (nibabel's rule: sform when sform_code > 0)"
                        "\n sform %s\n qform %s", path, affine[:3].round(4).tolist(), q[:3].round(4).tolist())
            source = "sform (differs from qform)"
    return affine, source


def _metadata_spacing(metadata: Optional[Mapping], path) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(z, y, x) mm from the metadata row's ZSpacing and XYSpacing ("[row, column]"); None where absent."""
    out = [None, None, None]
    if metadata is None:
        return tuple(out)
    xy = str(metadata.get("XYSpacing", "") or "").strip()
    if xy and xy.lower() not in ("nan", "none"):
        vals = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", xy)
        if len(vals) not in (1, 2) or not all(float(v) > 0 for v in vals):
            raise ValueError(f"{path}: metadata XYSpacing {xy!r} is not '[row, column]' in positive mm")
        out[1], out[2] = float(vals[0]), float(vals[-1])
    z = str(metadata.get("ZSpacing", "") or "").strip()
    if z and z.lower() not in ("nan", "none"):
        try:
            out[0] = float(z)
        except ValueError:
            raise ValueError(f"{path}: metadata ZSpacing {z!r} is not a number") from None
        if not out[0] > 0:
            raise ValueError(f"{path}: metadata ZSpacing {z!r} must be > 0 mm")
    return tuple(out)


def reconcile_spacing(header: tuple[float, float, float], metadata: Optional[Mapping], path,
                      mode: str = "auto") -> tuple[tuple[float, float, float], dict]:
    """(z, y, x) spacing to use and a note per axis; rule in the module docstring."""
    meta = _metadata_spacing(metadata, path) if mode != "header" else (None, None, None)
    if mode == "metadata" and None in meta:
        raise ValueError(f"{path}: spacing='metadata' but the metadata lacks XYSpacing/ZSpacing")
    out, notes = list(header), {}
    for ax, name in enumerate("zyx"):
        h, m = header[ax], meta[ax]
        if m is None:
            notes[name] = "header"
            continue
        if abs(h - m) <= SPACING_RTOL * max(h, m):
            notes[name] = "header (agrees with metadata)"
            continue
        if mode == "strict":
            raise ValueError(f"{path}: {name} spacing {h:g} mm in the header, {m:g} mm in the metadata "
                             f"({'ZSpacing' if name == 'z' else 'XYSpacing'}); refusing (spacing='strict')")
        out[ax] = m
        notes[name] = f"metadata ({m:g} mm; header said {h:g} mm)"
        log.warning("%s: %s spacing %g mm in the header, %g mm in the metadata; using the metadata's",
                    path, name, h, m)
    return tuple(out), notes


# ------------------------------------------------------------------------------ reading
def _open(path, what="NIfTI file"):
    import nibabel as nib

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such {'mask ' if 'mask' in what else ''}file")
    try:
        return path, nib.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None


def _read_into(img, path) -> Optional[np.ndarray]:
    """The stored array of a single-file NIfTI read straight into its final buffer (nibabel's own
    .gz read holds the data twice at its peak). None when the file is not of that kind."""
    from nibabel.arrayproxy import ArrayProxy
    from nibabel.openers import ImageOpener

    proxy = img.dataobj
    if not isinstance(proxy, ArrayProxy) or not os.fspath(path).endswith(".nii.gz"):
        return None
    dtype = np.dtype(proxy.dtype)
    arr = np.empty(proxy.shape, dtype=dtype, order=proxy.order)
    flat = memoryview(arr.reshape(-1, order="A")).cast("B")
    step = 16 * 2 ** 20
    with ImageOpener(path) as f:
        f.seek(proxy.offset)
        pos = 0
        while pos < len(flat):
            n = f.readinto(flat[pos:pos + step])
            if not n:
                raise EOFError(f"file ends after {pos} of {len(flat)} data bytes")
            pos += n
    if not dtype.isnative:
        arr = arr.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return arr


def _stored(img, path) -> np.ndarray:
    """The stored (unscaled) array, 3-D, as decoded (nibabel's (i, j, k), Fortran order)."""
    try:
        dataobj = img.dataobj
        raw = _read_into(img, path)
        if raw is None:
            raw = np.asarray(dataobj.get_unscaled() if hasattr(dataobj, "get_unscaled") else dataobj)
    except Exception as e:  # gzip/EOF/zlib errors from a truncated or corrupt file
        raise ValueError(f"{path}: cannot read voxel data ({type(e).__name__}: {e})") from None
    while raw.ndim > 3 and raw.shape[-1] == 1:  # (x, y, z, 1) from some converters
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {tuple(raw.shape)}")
    return raw


def _flip_inplace(a: np.ndarray, axes) -> None:
    """Reverse `a` (C-contiguous (z, y, x)) along `axes` in place, one slice of temporary memory."""
    axes = set(axes)
    if 1 in axes or 2 in axes:
        sel = (slice(None, None, -1) if 1 in axes else slice(None), slice(None, None, -1) if 2 in axes else slice(None))
        for k in range(a.shape[0]):
            a[k] = a[k][sel].copy()
    if 0 in axes:
        n = a.shape[0]
        for k in range(n // 2):
            tmp = a[k].copy()
            a[k] = a[n - 1 - k]
            a[n - 1 - k] = tmp


def to_canonical_zyx(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j, k) array + affine -> ((z, y, x) C-contiguous array in RAS+ order, 4x4 affine for
    (z, y, x) indices). A free transpose for Fortran-ordered arrays; flips are done in place
    (the array is modified), a permutation of axes costs one copy."""
    from nibabel import orientations as ornt_mod

    ornt = ornt_mod.io_orientation(affine)
    to_ras = ornt_mod.ornt_transform(ornt, ornt_mod.axcodes2ornt("RAS"))
    out_axes = to_ras[:, 0].astype(int)
    view = arr.transpose(np.argsort(out_axes)).transpose(2, 1, 0)
    if not (view.flags.c_contiguous and view.flags.writeable):
        view = np.ascontiguousarray(view)
        if not view.flags.writeable:
            view = view.copy()
    flips = [2 - int(out_axes[i]) for i in range(3) if to_ras[i, 1] < 0]
    if flips:
        _flip_inplace(view, flips)
    if not np.array_equal(to_ras, [[0, 1], [1, 1], [2, 1]]):
        affine = affine @ ornt_mod.inv_ornt_aff(to_ras, arr.shape[:3])
    return view, np.asarray(affine, dtype=np.float64)[:, [2, 1, 0, 3]]


def load_volume(path, metadata: Optional[Mapping] = None, *, rescale: str = "auto",
                already_hu: Optional[bool] = None, spacing: str = "auto") -> Volume:
    """Read a .nii/.nii.gz CT volume as HU in canonical (z, y, x) order.

    metadata: a CT-RATE metadata row (RescaleSlope / RescaleIntercept, XYSpacing / ZSpacing).
    rescale: "auto" (decide_rescale's rules), "header" (ignore the metadata's scaling),
    "metadata" (apply the metadata's scaling; ValueError if the data is already HU).
    already_hu: None (decide from the data), True (the image after its header scaling is HU:
    never apply the metadata rescale), False (apply the metadata rescale to header-unscaled data).
    spacing: "auto", "header", "metadata" or "strict" (module docstring).
    Returns a Volume (hu int16 or float32, never float64) with its RescaleDecision.
    Errors: FileNotFoundError; ValueError naming the file for unreadable data, non-3-D or empty
    images, degenerate geometry, NaN voxels, ambiguous or implausible rescaling.
    """
    if rescale not in ("auto", "header", "metadata"):
        raise ValueError(f"rescale must be 'auto', 'header' or 'metadata', got {rescale!r}")
    if already_hu not in (None, True, False):
        raise ValueError(f"already_hu must be None, True or False, got {already_hu!r}")
    if spacing not in ("auto", "header", "metadata", "strict"):
        raise ValueError(f"spacing must be 'auto', 'header', 'metadata' or 'strict', got {spacing!r}")
    path, img = _open(path)
    if len(img.shape) < 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {tuple(img.shape)}")
    if any(s == 0 for s in img.shape):
        raise ValueError(f"{path}: empty image (shape {tuple(img.shape)}, 0 slices?)")
    affine, affine_source = checked_affine(img, path)

    raw = _stored(img, path)
    if raw.dtype.kind == "f":
        bad = sum(int(np.size(raw[sl]) - np.count_nonzero(np.isfinite(raw[sl]))) for sl in _slabs(raw))
        if bad:
            raise ValueError(f"{path}: {bad} voxel(s) are NaN or infinite")
    stats = StoredStats(raw)
    header = (float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0)))
    meta = _metadata_scaling(metadata, path) if rescale != "header" else None
    if rescale == "metadata" and meta is None:
        raise ValueError(f"{path}: rescale='metadata' but the metadata has no RescaleSlope/RescaleIntercept")
    if already_hu is False and meta is None and header == (1.0, 0.0):
        raise ValueError(f"{path}: already_hu=False but neither the header nor the metadata has a rescale")
    decision = decide_rescale(stats, header, meta, path, rescale=rescale, already_hu=already_hu)
    _sanity_check(stats, decision, path)
    log.info("%s: rescale %s (slope %g, intercept %g): %s", path, decision.source, decision.slope,
             decision.intercept, decision.reason)
    hu = _apply_rescale(raw, stats, decision.slope, decision.intercept)
    del raw, stats

    hu, affine_zyx = to_canonical_zyx(hu, affine)
    header_spacing = tuple(float(s) for s in np.sqrt((affine_zyx[:3, :3] ** 2).sum(axis=0)))
    spacing_zyx, notes = reconcile_spacing(header_spacing, metadata, path, spacing)
    if spacing_zyx != header_spacing:
        affine_zyx = affine_zyx.copy()
        affine_zyx[:3, :3] *= np.asarray(spacing_zyx) / np.asarray(header_spacing)
    return Volume(hu=hu, spacing=spacing_zyx, affine=affine_zyx, path=path, rescale=decision,
                  geometry={"affine": affine_source, "spacing": notes})


def load_mask(path, shape: Optional[tuple[int, int, int]] = None, *, max_label: int = 255) -> np.ndarray:
    """A label map (e.g. TotalSegmentator ids) in the same canonical (z, y, x) order as
    load_volume, uint8. shape: the image's canonical shape, checked. Labels must be integers
    in [0, max_label]. uint8 files are used as decoded (no intermediate copies)."""
    path, img = _open(path, "NIfTI mask")
    affine, _ = checked_affine(img, path)
    raw = _stored(img, path)
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    if (slope, inter) != (1.0, 0.0) or raw.dtype.kind == "f":
        raw = _apply_rescale(raw, StoredStats(raw), slope, inter)
        if raw.dtype.kind == "f":
            for sl in _slabs(raw):
                s = raw[sl]
                if not np.isfinite(s).all() or not np.array_equal(s, np.round(s)):
                    raise ValueError(f"{path}: mask labels must be integers")
    if raw.dtype != np.uint8:
        lo, hi = (float(raw.min()), float(raw.max())) if raw.size else (0, 0)
        if lo < 0 or hi > max_label:
            raise ValueError(f"{path}: mask labels must lie in [0, {max_label}], found [{lo:g}, {hi:g}]")
        raw = raw.astype(np.uint8, order="K")
    elif max_label < 255 and raw.size and int(raw.max()) > max_label:
        raise ValueError(f"{path}: mask labels must lie in [0, {max_label}], found [0, {int(raw.max())}]")
    labels, _ = to_canonical_zyx(raw, affine)
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{path}: mask shape {tuple(labels.shape)} differs from its image's {tuple(shape)}")
    return labels
