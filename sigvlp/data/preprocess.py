"""Preprocessing (resample, window) and the on-disk cache of preprocessed volumes.

The slice axis is resampled to a target spacing but never cropped or padded to a fixed depth;
in-plane either the whole field of view is resized to size x size ("resize") or resampled to
a spacing and centre-cropped/padded to size x size ("spacing"). HU are clipped to a window and
scaled to [-1, 1]. ``preprocess_array`` works in blocks of output slices, so its temporaries are
bounded (min(32 MB, a quarter of the input)) whatever the depth.

Cache: one safetensors file per volume, under a directory named by a hash of the config and
CACHE_FORMAT (a changed config or format never sees old entries). Each file holds ``image``
(z, size, size) float16 in [-1, 1]; with a mask, ``organ_profile`` (len(ORGANS), z) int32 organ
voxel counts per preprocessed slice and ``organ_map`` (z, size, size) uint8, the organ of each
preprocessed voxel (nearest neighbour; 0 background, k = ORGANS[k - 1]); and JSON metadata (the
rescale decision, geometry notes, output spacing, format). Chunks are read through safetensors'
memory map, so a chunk read touches only its slices.

Entry key (``PreprocessCache.entry_path``): the source's path relative to the dataset root (its
file name when no root is given), its size and a content fingerprint (``file_fingerprint``), the
same for the mask, the metadata fields that steer loading (RescaleSlope/Intercept, XYSpacing,
ZSpacing) and the already_hu option. No absolute path and no mtime: moving or copying the
dataset (without preserved times) keeps every entry, and a changed file changes its key.
Manifest (``manifest/*.jsonl`` in the cache directory): a line per built (or failed) entry keyed
by the source's absolute path, size and mtime (the same for the mask), the steering metadata and
already_hu; ``get`` finds an entry through it with one stat per file, without opening or
fingerprinting the source, and falls back to the content key when the line is missing or stale.
Each process appends to its own file (``<host>-<pid>.jsonl``), so processes and machines sharing
the folder never write the same file; a torn last line is ignored.
An entry of another CACHE_FORMAT is never read as this one: ``CachedVolume.open`` refuses it and
``PreprocessCache.get`` rebuilds it. tests/test_data_cache.py holds a golden output per
CACHE_FORMAT and fails when preprocessing results change without a bump.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from sigvlp.data.masks import load_total_labels
from sigvlp.data.organs import ORGANS, organ_z_profile

CACHE_FORMAT = 2  # bump when the stored layout or the preprocessing results change (golden test)
# 2: organ_map, rescale decision and metadata spacing, content-keyed entries


@dataclass(frozen=True)
class PreprocessConfig:
    z_spacing: float = 1.5  # mm between output slices
    inplane: str = "resize"  # "resize": whole FOV to size x size; "spacing": resample + crop/pad
    size: int = 256  # output H = W
    xy_spacing: float = 0.75  # mm, "spacing" mode only
    hu_window: tuple[float, float] = (-1000.0, 1000.0)

    def __post_init__(self):
        if self.inplane not in ("resize", "spacing"):
            raise ValueError(f"inplane must be 'resize' or 'spacing', got {self.inplane!r}")
        if not (self.z_spacing > 0 and self.xy_spacing > 0):
            raise ValueError(f"spacings must be > 0, got z {self.z_spacing}, xy {self.xy_spacing}")
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size}")
        lo, hi = self.hu_window
        if not hi > lo:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {self.hu_window}")

    def key(self) -> str:
        blob = json.dumps([CACHE_FORMAT, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


PRESETS: dict[str, PreprocessConfig] = {
    # ours: 1.5 mm slices, FOV resized to 256^2 (16 x 16 patches per slice group)
    "sigvlp": PreprocessConfig(),
    # CT-CLIP's spacing (0.75 x 0.75 x 1.5 mm) and in-plane 480^2, without its z crop/pad
    "ctclip": PreprocessConfig(z_spacing=1.5, inplane="spacing", xy_spacing=0.75, size=480),
    # Merlin's 1.5 x 1.5 x 3 mm, 224^2
    "merlin": PreprocessConfig(z_spacing=3.0, inplane="spacing", xy_spacing=1.5, size=224),
    # small, for phantoms, tests and CPU runs
    "tiny": PreprocessConfig(z_spacing=3.0, inplane="resize", size=64),
}


def preset(name: str) -> PreprocessConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing preset {name!r}; known: {sorted(PRESETS)}") from None


def output_depth(num_slices: int, z_spacing_in: float, config: PreprocessConfig) -> int:
    return max(1, int(round(num_slices * z_spacing_in / config.z_spacing)))


def source_to_output_slice(num_slices: int, depth: int) -> np.ndarray:
    """For each source slice, the output slice its centre falls in (align_corners=False)."""
    centres = (np.arange(num_slices) + 0.5) * depth / num_slices
    return np.minimum(centres.astype(np.int64), depth - 1)


def _z_plan(z: int, depth: int):
    """Linear resampling of z slices to depth (torch's align_corners=False rule): for each output
    slice the two source slices and the weight of the second."""
    if depth == z:
        idx = np.arange(z)
        return idx, idx, np.zeros(z, np.float32)
    src = np.maximum((np.arange(depth) + 0.5) * (z / depth) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), z - 1)
    hi = np.minimum(lo + 1, z - 1)
    return lo, hi, (src - lo).astype(np.float32)


def inplane_size(y: int, x: int, sy: float, sx: float, config: PreprocessConfig) -> tuple[int, int]:
    """(h, w) after the in-plane resampling, before any crop/pad."""
    if config.inplane == "resize":
        return config.size, config.size
    return max(1, int(round(y * sy / config.xy_spacing))), max(1, int(round(x * sx / config.xy_spacing)))


def preprocess_array(hu: np.ndarray, spacing, config: PreprocessConfig, *, out_dtype=np.float32) -> np.ndarray:
    """(z, y, x) HU (any real dtype) and (z, y, x) spacing in mm -> (z', size, size) array of
    out_dtype in [-1, 1], z' = output_depth(z, spacing[0], config). Block by block along z:
    extra memory is the output plus min(32 MB, a quarter of the input) of temporaries."""
    import torch
    import torch.nn.functional as F

    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"hu must be a non-empty (z, y, x) array, got shape {hu.shape}")
    z, y, x = hu.shape
    sz, sy, sx = spacing
    lo_hu, hi_hu = config.hu_window
    hw = inplane_size(y, x, sy, sx, config)
    depth = output_depth(z, sz, config)
    lo, hi, w = _z_plan(z, depth)
    out = np.empty((depth, config.size, config.size), dtype=out_dtype)
    # Output slices per block: source slab (float32, before and after the in-plane resize) plus
    # the two gathered slabs of the z interpolation stay within min(32 MB, a quarter of the input).
    budget = min(32 * 2 ** 20, max(4 * 2 ** 20, hu.nbytes // 4))
    per_out = max(1.0, z / depth) * 4 * (y * x + hw[0] * hw[1]) + 8 * hw[0] * hw[1]
    block = max(1, int(budget // per_out))
    for j0 in range(0, depth, block):
        j1 = min(depth, j0 + block)
        s0, s1 = int(lo[j0]), int(hi[j1 - 1]) + 1
        t = torch.from_numpy(np.ascontiguousarray(hu[s0:s1])).to(torch.float32)
        # Window first: interpolation then never smears out-of-window values (metal, padding).
        t = t.clamp_(lo_hu, hi_hu)
        if hw != (y, x):
            t = F.interpolate(t[:, None], size=hw, mode="bilinear", align_corners=False,
                              antialias=hw[0] < y or hw[1] < x)[:, 0]
        if depth != z:  # linear along z only (the in-plane size already matches)
            a = t[torch.from_numpy(lo[j0:j1] - s0)]
            t = a.lerp_(t[torch.from_numpy(hi[j0:j1] - s0)], torch.from_numpy(w[j0:j1])[:, None, None])
        if config.inplane == "spacing":
            t = _center_crop_pad(t, config.size, fill=lo_hu)
        t = (t - lo_hu) * (2.0 / (hi_hu - lo_hu)) - 1.0
        out[j0:j1] = t.clamp_(-1.0, 1.0).numpy()
    return out


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _crop_pad_index(idx: np.ndarray, size: int) -> np.ndarray:
    """Centre crop/pad of an index array to `size` (as _center_crop_pad), -1 where padded."""
    n = idx.size
    if n >= size:
        start = (n - size) // 2
        return idx[start:start + size]
    before = (size - n) // 2
    out = np.full(size, -1, np.int64)
    out[before:before + n] = idx
    return out


def organ_map(labels: np.ndarray, spacing, config: PreprocessConfig, depth: int) -> np.ndarray:
    """(z, y, x) TotalSegmentator ids -> (depth, size, size) uint8 organ map on the preprocessed
    grid (nearest neighbour; 0 background, k for ORGANS[k - 1]), the geometry preprocess_array uses."""
    from sigvlp.data.organs import label_to_organ_index

    z, y, x = labels.shape
    lut = np.zeros(256, np.uint8)
    lut[: len(label_to_organ_index())] = (label_to_organ_index() + 1).astype(np.uint8)
    hw = inplane_size(y, x, spacing[1], spacing[2], config)
    iy, ix = _nearest(y, hw[0]), _nearest(x, hw[1])
    if config.inplane == "spacing":
        iy, ix = _crop_pad_index(iy, config.size), _crop_pad_index(ix, config.size)
    iz = source_index_nearest(z, depth)
    vy, vx = iy >= 0, ix >= 0
    out = np.zeros((depth, config.size, config.size), np.uint8)
    for j in range(depth):
        out[j][np.ix_(vy, vx)] = lut[labels[iz[j]][np.ix_(iy[vy], ix[vx])]]
    return out


def source_index_nearest(num_slices: int, depth: int) -> np.ndarray:
    """For each output slice, the source slice its centre falls in."""
    return _nearest(num_slices, depth)


def _center_crop_pad(t, size: int, fill: float):
    import torch.nn.functional as F

    for dim in (1, 2):
        n = t.shape[dim]
        if n > size:
            start = (n - size) // 2
            t = t.narrow(dim, start, size)
        elif n < size:
            before = (size - n) // 2
            pad = [0, 0, 0, 0]
            pad[(2 - dim) * 2:(2 - dim) * 2 + 2] = [before, size - n - before]
            t = F.pad(t, pad, value=fill)
    return t


_FP_EDGE, _FP_BLOCK = 4096, 1024


def file_fingerprint(path) -> str:
    """A cheap content fingerprint (hex). .gz files: size, the first and last 4 KiB (the gzip
    trailer holds the CRC-32 and length of the whole uncompressed content, so any change of the
    voxels or header shows there) and four 1 KiB blocks at fixed fractions, 12 KiB read per file;
    other files are hashed whole (a sampled hash could miss a changed voxel there)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if path.endswith(".gz") and size > 2 * _FP_EDGE:
            ranges = [(0, _FP_EDGE), (size - _FP_EDGE, _FP_EDGE)]
            ranges += [(size * k // 5, _FP_BLOCK) for k in range(1, 5)]
            for offset, n in ranges:
                f.seek(offset)
                h.update(f.read(n))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _source_key(path, root) -> Optional[list]:
    if path is None:
        return None
    path = Path(path)
    rel = None
    if root is not None:
        try:
            rel = path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            rel = None
    if path.is_dir():  # a folder of binary masks: its NIfTI files' names, sizes and fingerprints
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith((".nii", ".nii.gz")))
        return [rel or path.name, [[f.name, os.path.getsize(f), file_fingerprint(f)] for f in files]]
    return [rel or path.name, os.path.getsize(path), file_fingerprint(path)]


_KEY_METADATA = ("RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")


class StaleCacheEntry(ValueError):
    """A cache file of another CACHE_FORMAT (or not one of ours)."""


@dataclass
class CachedVolume:
    """A preprocessed volume on disk; read(z0, z1) maps only those slices.

    shape: (z, size, size) of the image; spacing: (z, y, x) mm of the preprocessed grid;
    organ_profile: (len(ORGANS), z) int32 or None (no mask); has_organ_map: organ_map stored;
    rescale: the source's RescaleDecision as a dict.
    """

    file: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    organ_profile: Optional[np.ndarray] = field(default=None, repr=False)
    source: Optional[str] = None
    name: Optional[str] = None
    has_organ_map: bool = False
    rescale: Optional[dict] = field(default=None, repr=False)

    def _range(self, z0: int, z1: Optional[int]) -> tuple[int, int]:
        z1 = self.shape[0] if z1 is None else z1
        if not (isinstance(z0, (int, np.integer)) and isinstance(z1, (int, np.integer))) or not 0 <= z0 < z1 <= self.shape[0]:
            raise ValueError(f"{self.file}: slice range [{z0}, {z1}) outside [0, {self.shape[0]}) or not integers")
        return int(z0), int(z1)

    def read(self, z0: int = 0, z1: Optional[int] = None) -> np.ndarray:
        """Slices [z0, z1) of the image: (z1 - z0, size, size) float16 in [-1, 1]."""
        from safetensors import safe_open

        z0, z1 = self._range(z0, z1)
        with safe_open(self.file, framework="np") as f:
            return f.get_slice("image")[z0:z1]

    def organ_map(self, z0: int = 0, z1: Optional[int] = None) -> np.ndarray:
        """Slices [z0, z1) of the organ map: (z1 - z0, size, size) uint8, 0 background, k for
        ORGANS[k - 1]. ValueError when the volume was cached without a mask."""
        from safetensors import safe_open

        z0, z1 = self._range(z0, z1)
        if not self.has_organ_map:
            raise ValueError(f"{self.file}: no organ map cached for {self.name} (the volume had no mask)")
        with safe_open(self.file, framework="np") as f:
            return f.get_slice("organ_map")[z0:z1]

    def organ_labels(self, patch: tuple[int, int, int], z0: int = 0, z1: Optional[int] = None) -> np.ndarray:
        """The organ label of each patch of slices [z0, z1): (ceil((z1 - z0) / pt), size / ph,
        size / pw) int64, the majority organ-map value (0 background, k for ORGANS[k - 1]; ties
        go to the lower value) over the patch's voxels. The depth is padded to a multiple of pt
        with background, as collate pads the image, so the map lines up with the chunk's tokens
        (t-major: token n of the chunk has label labels.reshape(-1)[n])."""
        from sigvlp.data.organs import ORGANS

        if len(patch) != 3 or any(int(p) != p or p < 1 for p in patch):
            raise ValueError(f"patch must be three positive integers, got {patch}")
        pt, ph, pw = (int(p) for p in patch)
        if self.shape[1] % ph or self.shape[2] % pw:
            raise ValueError(f"{self.file}: in-plane size {self.shape[1]} x {self.shape[2]} is not a multiple "
                             f"of the patch {ph} x {pw}")
        m = self.organ_map(z0, z1)
        if m.shape[0] % pt:
            m = np.concatenate([m, np.zeros((pt - m.shape[0] % pt, *m.shape[1:]), np.uint8)])
        t, h, w = m.shape[0] // pt, m.shape[1] // ph, m.shape[2] // pw
        blocks = m.reshape(t, pt, h, ph, w, pw)
        best = np.zeros((t, h, w), np.int64)
        top = np.full((t, h, w), -1, np.int64)
        for k in range(len(ORGANS) + 1):
            c = (blocks == k).sum(axis=(1, 3, 5))
            better = c > top
            best[better], top[better] = k, c[better]
        return best

    @classmethod
    def open(cls, file) -> "CachedVolume":
        """Open an entry; StaleCacheEntry when it is of another CACHE_FORMAT."""
        from safetensors import safe_open

        with safe_open(os.fspath(file), framework="np") as f:
            raw = (f.metadata() or {}).get("sigvlp")
            meta = json.loads(raw) if raw else {}
            if meta.get("format") != CACHE_FORMAT:
                raise StaleCacheEntry(f"{file}: cache format {meta.get('format')}, this code reads {CACHE_FORMAT}")
            keys = set(f.keys())
            profile = f.get_tensor("organ_profile") if "organ_profile" in keys else None
            shape = tuple(f.get_slice("image").get_shape())
        return cls(file=os.fspath(file), shape=shape, spacing=tuple(meta["spacing"]), organ_profile=profile,
                   source=meta.get("source"), name=meta.get("name"), has_organ_map="organ_map" in keys,
                   rescale=meta.get("rescale"))


class PreprocessCache:
    """Preprocess each volume once; later reads come from ``root/pp-<config hash>/``."""

    def __init__(self, root, config: PreprocessConfig = PreprocessConfig()):
        if not isinstance(config, PreprocessConfig):
            raise TypeError(f"config must be a PreprocessConfig, got {type(config).__name__} (use preset(name))")
        self.config = config
        self.dir = Path(root) / f"pp-{config.key()}"
        self.hits = 0
        self.misses = 0
        self._manifest: Optional[dict] = None

    def __getstate__(self):  # worker processes read the manifest themselves
        return {**self.__dict__, "_manifest": None}

    @staticmethod
    def manifest_key(path, mask_path=None, metadata: Optional[Mapping] = None,
                     already_hu: Optional[bool] = None) -> str:
        """The manifest key of a source: absolute paths, sizes and mtimes (ns) of the volume and
        its mask (a mask folder: its files'), the steering metadata fields, already_hu."""
        def stat(p):
            if p is None:
                return None
            p = Path(os.path.abspath(p))
            if p.is_dir():
                return [str(p), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir())]]
            st = p.stat()
            return [str(p), st.st_size, st.st_mtime_ns]

        fields = None if metadata is None else [str(metadata.get(k, "")) for k in _KEY_METADATA]
        return json.dumps([stat(path), stat(mask_path), fields, already_hu])

    def manifest(self, reload: bool = False) -> dict:
        """{manifest key: {"entry": file name} or {"error": message}} from every process's file."""
        if self._manifest is None or reload:
            out: dict = {}
            for f in sorted((self.dir / "manifest").glob("*.jsonl")):
                for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        rec = json.loads(line)
                        out[rec["key"]] = {k: v for k, v in rec.items() if k != "key"}
                    except (ValueError, KeyError, TypeError):  # a torn last line of a killed writer
                        continue
            self._manifest = out
        return self._manifest

    def record(self, key: str, *, entry: Optional[Path] = None, error: Optional[str] = None) -> None:
        """Append a manifest line (this process's own file) for a built entry or a failure."""
        rec = {"key": key, **({"entry": Path(entry).name} if entry is not None else {"error": str(error)})}
        folder = self.dir / "manifest"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.manifest()[key] = {k: v for k, v in rec.items() if k != "key"}

    def lookup(self, key: str) -> Optional[dict]:
        """The manifest record of a key whose entry file still exists (or a failure), else None."""
        rec = self.manifest().get(key)
        if rec is not None and "entry" in rec and not (self.dir / rec["entry"]).exists():
            return None
        return rec

    def entry_path(self, path, mask_path=None, metadata: Optional[Mapping] = None, *, root=None,
                   already_hu: Optional[bool] = None) -> Path:
        fields = None
        if metadata is not None:
            fields = [str(metadata.get(k, "")) for k in _KEY_METADATA]
        blob = json.dumps([_source_key(path, root), _source_key(mask_path, root), fields, already_hu])
        digest = hashlib.sha1(blob.encode()).hexdigest()[:16]
        stem = Path(path).name.split(".")[0]
        return self.dir / f"{stem}-{digest}.safetensors"

    def get(self, path, mask_path=None, metadata: Optional[Mapping] = None, name: Optional[str] = None, *,
            root=None, already_hu: Optional[bool] = None) -> CachedVolume:
        """The cached volume for this source (built when missing, torn or of an old format).
        root: the dataset folder (the key uses the path relative to it). Errors: those of
        load_volume / load_mask (ValueError naming the file), FileNotFoundError."""
        key = self.manifest_key(path, mask_path, metadata, already_hu)
        rec = self.lookup(key)
        if rec and "entry" in rec:  # one stat per file: no fingerprint read
            cached = self._open(self.dir / rec["entry"], path)
            if cached is not None:
                return cached
        entry = self.entry_path(path, mask_path, metadata, root=root, already_hu=already_hu)
        cached = self._open(entry, path)
        if cached is None:
            self.misses += 1
            cached = self._build(entry, path, mask_path, metadata, name, already_hu)
        if not rec or rec.get("entry") != entry.name:
            self.record(key, entry=entry)
        return cached

    def _open(self, entry: Path, path) -> Optional[CachedVolume]:
        if not entry.exists():
            return None
        try:
            cached = CachedVolume.open(entry)
        except Exception:  # a torn, foreign or old-format file: rebuilt by the caller
            return None
        cached.source = os.fspath(path)
        self.hits += 1
        return cached

    def _build(self, entry: Path, path, mask_path, metadata, name, already_hu) -> CachedVolume:
        from safetensors.numpy import save_file

        from sigvlp.data.volume import load_volume

        vol = load_volume(path, metadata, already_hu=already_hu)
        image = preprocess_array(vol.hu, vol.spacing, self.config, out_dtype=np.float16)
        src_shape, src_spacing = vol.shape, vol.spacing
        meta = {"rescale": vol.rescale.as_dict(), "geometry": vol.geometry}
        del vol  # the HU volume goes before the mask is read
        depth = image.shape[0]
        profile = None
        tensors = {"image": image}
        if mask_path is not None:
            labels = load_total_labels(mask_path, src_shape)
            src = organ_z_profile(labels, mask_path)
            profile = np.zeros((len(ORGANS), depth), dtype=np.int32)
            np.add.at(profile.T, source_to_output_slice(src_shape[0], depth), src.T)
            tensors["organ_profile"] = profile
            tensors["organ_map"] = organ_map(labels, src_spacing, self.config, depth)
            del labels
        spacing = (src_spacing[0] * src_shape[0] / depth,
                   *(((self.config.xy_spacing,) * 2) if self.config.inplane == "spacing"
                     else (src_spacing[1] * src_shape[1] / self.config.size,
                           src_spacing[2] * src_shape[2] / self.config.size)))
        meta.update({"spacing": spacing, "source": os.fspath(path), "name": name or Path(path).name,
                     "config": dataclasses.asdict(self.config), "format": CACHE_FORMAT})
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"sigvlp": json.dumps(meta)})
            os.replace(tmp, entry)  # atomic: concurrent workers never see a half-written entry
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return CachedVolume(file=str(entry), shape=tuple(image.shape), spacing=spacing, organ_profile=profile,
                            source=os.fspath(path), name=meta["name"], has_organ_map=mask_path is not None,
                            rescale=meta["rescale"])


def default_cache_root(dataset_root=None) -> Path:
    """Where make_loader / CTRateDataset.cached put the preprocessing cache when given none:
    $SIGVLP_CACHE/preprocess, else DATASET/.sigvlp_cache when writable, else
    ~/.cache/sigvlp/preprocess. Entries are keyed by content, so one folder serves many datasets."""
    env = os.environ.get("SIGVLP_CACHE")
    if env:
        return Path(env) / "preprocess"
    if dataset_root is not None and os.access(dataset_root, os.W_OK):
        return Path(dataset_root) / ".sigvlp_cache"
    return Path.home() / ".cache" / "sigvlp" / "preprocess"


def as_cache(cache, dataset_root=None):
    """A PreprocessCache from: a PreprocessCache (as is), a PreprocessConfig or preset name
    (in the default cache folder), or None (the "sigvlp" preset in the default folder)."""
    if isinstance(cache, PreprocessCache):
        return cache
    if cache is None:
        cache = PreprocessConfig()
    if isinstance(cache, str):
        cache = preset(cache)
    if not isinstance(cache, PreprocessConfig):
        raise TypeError(f"cache must be a PreprocessCache, PreprocessConfig, preset name or None, "
                        f"got {type(cache).__name__}")
    return PreprocessCache(default_cache_root(dataset_root), cache)
