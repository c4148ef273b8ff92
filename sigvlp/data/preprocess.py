"""Preprocessing (resample, window) and the on-disk cache of preprocessed volumes.

The slice axis is resampled to a target spacing but never cropped or padded to a fixed depth;
in-plane either the whole field of view is resized to size x size ("resize") or resampled to
a spacing and centre-cropped/padded to size x size ("spacing"). HU are clipped to a window and
scaled to [-1, 1].

Cache: one safetensors file per volume, under a directory named by a hash of the config (a
changed config never sees stale entries), keyed by the source file's path, size and mtime (and
its mask's). Each file holds ``image`` (z, size, size) float16 in [-1, 1], ``organ_profile``
(len(ORGANS), z) int32 organ voxel counts per preprocessed slice, and JSON metadata. Chunks are
read through safetensors' memory map, so a chunk read touches only its slices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from sigvlp.data.organs import ORGANS, organ_z_profile

CACHE_FORMAT = 1  # bump when the stored layout or the preprocessing code changes meaning


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


def preprocess_array(hu: np.ndarray, spacing, config: PreprocessConfig) -> np.ndarray:
    """(z, y, x) HU -> (z', size, size) float32 in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    z, y, x = hu.shape
    sz, sy, sx = spacing
    lo, hi = config.hu_window
    t = torch.from_numpy(np.ascontiguousarray(hu)).to(torch.float32)
    # Window first: interpolation then never smears out-of-window values (metal, padding).
    t = t.clamp_(lo, hi)
    if config.inplane == "resize":
        hw = (config.size, config.size)
    else:
        hw = (max(1, int(round(y * sy / config.xy_spacing))), max(1, int(round(x * sx / config.xy_spacing))))
    if hw != (y, x):
        t = F.interpolate(t[:, None], size=hw, mode="bilinear", align_corners=False,
                          antialias=hw[0] < y or hw[1] < x)[:, 0]
    depth = output_depth(z, sz, config)
    if depth != z:
        # Linear along z only (the in-plane size already matches).
        t = F.interpolate(t[None, None], size=(depth, *hw), mode="trilinear", align_corners=False)[0, 0]
    if config.inplane == "spacing":
        t = _center_crop_pad(t, config.size, fill=lo)
    t = (t - lo) * (2.0 / (hi - lo)) - 1.0
    return t.clamp_(-1.0, 1.0).numpy()


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


def _file_stamp(path) -> Optional[list]:
    if path is None:
        return None
    st = os.stat(path)
    return [os.path.abspath(os.fspath(path)), st.st_size, st.st_mtime_ns]


@dataclass
class CachedVolume:
    """A preprocessed volume on disk. read(z0, z1) maps only those slices."""

    file: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    organ_profile: Optional[np.ndarray] = field(default=None, repr=False)
    source: Optional[str] = None
    name: Optional[str] = None

    def read(self, z0: int = 0, z1: Optional[int] = None) -> np.ndarray:
        from safetensors import safe_open

        z1 = self.shape[0] if z1 is None else z1
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise ValueError(f"{self.file}: slice range [{z0}, {z1}) outside [0, {self.shape[0]})")
        with safe_open(self.file, framework="np") as f:
            return f.get_slice("image")[z0:z1]

    @classmethod
    def open(cls, file) -> "CachedVolume":
        from safetensors import safe_open

        with safe_open(os.fspath(file), framework="np") as f:
            meta = json.loads(f.metadata()["sigvlp"])
            profile = f.get_tensor("organ_profile") if "organ_profile" in f.keys() else None
            shape = tuple(f.get_slice("image").get_shape())
        return cls(file=os.fspath(file), shape=shape, spacing=tuple(meta["spacing"]),
                   organ_profile=profile, source=meta.get("source"), name=meta.get("name"))


class PreprocessCache:
    """Preprocess each volume once; later reads come from ``root/<config hash>/``."""

    def __init__(self, root, config: PreprocessConfig = PreprocessConfig()):
        self.config = config
        self.dir = Path(root) / f"pp-{config.key()}"
        self.hits = 0
        self.misses = 0

    def entry_path(self, path, mask_path=None, metadata: Optional[Mapping] = None) -> Path:
        scaling = None
        if metadata is not None:
            scaling = [str(metadata.get("RescaleSlope", "")), str(metadata.get("RescaleIntercept", ""))]
        blob = json.dumps([_file_stamp(path), _file_stamp(mask_path), scaling])
        digest = hashlib.sha1(blob.encode()).hexdigest()[:16]
        stem = Path(path).name.split(".")[0]
        return self.dir / f"{stem}-{digest}.safetensors"

    def get(self, path, mask_path=None, metadata: Optional[Mapping] = None, name: Optional[str] = None) -> CachedVolume:
        entry = self.entry_path(path, mask_path, metadata)
        if entry.exists():
            try:
                cached = CachedVolume.open(entry)
                self.hits += 1
                return cached
            except Exception:  # a torn or foreign file: rebuild it
                pass
        self.misses += 1
        return self._build(entry, path, mask_path, metadata, name)

    def _build(self, entry: Path, path, mask_path, metadata, name) -> CachedVolume:
        from safetensors.numpy import save_file

        from sigvlp.data.volume import load_mask, load_volume

        vol = load_volume(path, metadata)
        image = preprocess_array(vol.hu, vol.spacing, self.config)
        depth = image.shape[0]
        profile = None
        tensors = {"image": image.astype(np.float16)}
        if mask_path is not None:
            labels = load_mask(mask_path, vol.shape)
            src = organ_z_profile(labels, mask_path)
            profile = np.zeros((len(ORGANS), depth), dtype=np.int32)
            np.add.at(profile.T, source_to_output_slice(vol.shape[0], depth), src.T)
            tensors["organ_profile"] = profile
        spacing = (vol.spacing[0] * vol.shape[0] / depth,
                   *(((self.config.xy_spacing,) * 2) if self.config.inplane == "spacing"
                     else (vol.spacing[1] * vol.shape[1] / self.config.size,
                           vol.spacing[2] * vol.shape[2] / self.config.size)))
        meta = {"spacing": spacing, "source": os.path.abspath(path), "name": name or Path(path).name,
                "config": dataclasses.asdict(self.config), "format": CACHE_FORMAT}
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"sigvlp": json.dumps(meta)})
            os.replace(tmp, entry)  # atomic: concurrent workers never see a half-written entry
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return CachedVolume(file=str(entry), shape=tuple(image.shape), spacing=spacing,
                            organ_profile=profile, source=os.path.abspath(path), name=meta["name"])
