"""Variable-depth chunks along z and their organ-wise text (SigVLP's pairing).

A chunk is slices [z0, z1) of a preprocessed volume, its depth a multiple of the patch depth
between min_slices and max_slices. The organs "in" a chunk come from the volume's organ z-profile
(voxel count of each organ per slice, see sigvlp.data.organs): an organ counts when the chunk
holds at least ``min_organ_fraction`` of that organ's voxels, or when the organ is seen in at
least ``min_slice_fraction`` of the chunk's slices (a big organ spanning a thin chunk).

The chunk's text is the findings-bank sentences of its organs (in ORGANS order, each sentence
once even when the bank files it under several of the chunk's organs) followed by the volume's
general description.

Findings bank: JSONL (one object per line) or JSON (a list of such objects, or a mapping
VolumeName -> {"organs": ..., "general": ...})::

    {"VolumeName": "train_1_a_1.nii.gz",
     "organs": {"lung": ["sentence", ...], "heart": ["sentence"], ...},
     "general": "the report's general description (impression)"}

Organ keys must be names from sigvlp.data.organs.ORGANS; sentences are strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from sigvlp.data.csvfiles import check_text
from sigvlp.data.organs import ORGANS


@dataclass(frozen=True)
class ChunkConfig:
    patch: tuple[int, int, int] = (16, 16, 16)  # (t, h, w) voxels per token
    min_slices: int = 16
    max_slices: int = 128
    min_organ_fraction: float = 0.1
    min_slice_fraction: Optional[float] = 0.5  # None: voxel-fraction rule only
    general: bool = True  # append the volume's general description
    whole_fraction: float = 0.0  # probability that a drawn chunk is the whole volume (up to max_slices)

    def __post_init__(self):
        if len(self.patch) != 3 or any(int(p) != p or p < 1 for p in self.patch):
            raise ValueError(f"patch must be three positive integers, got {self.patch}")
        pt = self.patch[0]
        if self.min_slices < pt or self.min_slices % pt or self.max_slices % pt or self.max_slices < self.min_slices:
            raise ValueError(f"min_slices ({self.min_slices}) and max_slices ({self.max_slices}) must be multiples "
                             f"of the patch depth {pt} with patch depth <= min_slices <= max_slices")
        slice_ok = self.min_slice_fraction is None or 0 <= self.min_slice_fraction <= 1
        if not (0 <= self.min_organ_fraction <= 1 and slice_ok):
            raise ValueError("min_organ_fraction and min_slice_fraction must lie in [0, 1]")
        if not (isinstance(self.whole_fraction, (int, float)) and 0 <= self.whole_fraction <= 1):
            raise ValueError(f"whole_fraction: expected a probability in [0, 1], got {self.whole_fraction!r}")


CHUNK_PRESETS = {
    "sigvlp": ChunkConfig(),
    "tiny": ChunkConfig(patch=(4, 16, 16), min_slices=4, max_slices=32),
}


def chunk_preset(name: str) -> ChunkConfig:
    """A named ChunkConfig ("sigvlp": 16^3 patches, 16..128 slices; "tiny": 4 x 16 x 16, 4..32)."""
    try:
        return CHUNK_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown chunk preset {name!r}; known: {sorted(CHUNK_PRESETS)}") from None


class ChunkSampler:
    """Draws chunk boundaries (z0, z1) for a volume of `depth` slices: a depth uniform over the
    multiples of the patch depth in [min_slices, min(max_slices, depth)], then a uniform start;
    with probability config.whole_fraction the deepest such chunk (the whole volume when it fits)."""

    def __init__(self, config: ChunkConfig = ChunkConfig(), max_tokens: Optional[int] = None, plane_tokens: int = 1):
        self.config = config
        self.max_slices = config.max_slices
        if max_tokens is not None:  # a single chunk must fit the token budget
            fit = (max_tokens // max(plane_tokens, 1)) * config.patch[0]
            if fit < config.patch[0]:
                raise ValueError(f"token budget {max_tokens} is smaller than one slab of {plane_tokens} tokens")
            self.max_slices = min(self.max_slices, fit)

    def sample(self, depth: int, rng: np.random.Generator) -> tuple[int, int]:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        pt = self.config.patch[0]
        if depth < pt:  # shorter than one patch: the whole volume (collate pads to one patch)
            return 0, depth
        hi = min(self.max_slices, depth) // pt
        lo = min(max(self.config.min_slices // pt, 1), hi)
        if self.config.whole_fraction > 0 and rng.random() < self.config.whole_fraction:
            lo = hi  # the whole volume, or the deepest chunk that fits
        d = pt * int(rng.integers(lo, hi + 1))
        z0 = int(rng.integers(0, depth - d + 1))
        return z0, z0 + d


def organs_in_chunk(profile: Optional[np.ndarray], z0: int, z1: int, config: ChunkConfig = ChunkConfig()) -> list[str]:
    """Organ names (ORGANS order) present in slices [z0, z1) of a volume with this z-profile."""
    if profile is None:
        return []
    if profile.shape[0] != len(ORGANS):
        raise ValueError(f"organ profile has {profile.shape[0]} rows, expected {len(ORGANS)}")
    total = profile.sum(axis=1)
    inside = profile[:, z0:z1].sum(axis=1)
    frac = np.divide(inside, total, out=np.zeros(len(ORGANS)), where=total > 0)
    slice_frac = (profile[:, z0:z1] > 0).mean(axis=1) if z1 > z0 else np.zeros(len(ORGANS))
    spans = slice_frac >= config.min_slice_fraction if config.min_slice_fraction is not None else False
    keep = (inside > 0) & ((frac >= config.min_organ_fraction) | spans)
    return [ORGANS[i] for i in np.flatnonzero(keep)]


def chunk_text(entry: Optional[dict], organs: list[str], general: bool = True) -> str:
    """The text paired with a chunk: its organs' sentences (ORGANS order; a sentence filed under
    several of the chunk's organs appears once, at its first place), then the general description."""
    if entry is None:
        return ""
    by_organ = entry.get("organs", {})
    parts = list(dict.fromkeys(s for organ in ORGANS if organ in organs for s in by_organ.get(organ, ())))
    if general and entry.get("general"):
        parts.append(entry["general"])
    return " ".join(parts)


def _check_entry(entry, where: str) -> tuple[str, dict]:
    if not isinstance(entry, dict) or not isinstance(entry.get("VolumeName"), str):
        raise ValueError(f"{where}: each entry needs a string 'VolumeName'")
    organs = entry.get("organs", {})
    if not isinstance(organs, dict):
        raise ValueError(f"{where}: 'organs' must map organ -> list of sentences")
    for organ, sentences in organs.items():
        if organ not in ORGANS:
            raise ValueError(f"{where}: unknown organ {organ!r} for {entry['VolumeName']} (known: {', '.join(ORGANS)})")
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise ValueError(f"{where}: organ {organ!r} of {entry['VolumeName']} must hold a list of strings")
    general = entry.get("general", "")
    if not isinstance(general, str):
        raise ValueError(f"{where}: 'general' of {entry['VolumeName']} must be a string")
    check_text(entry["VolumeName"], f"{where}: VolumeName")
    check_text({"organs": organs, "general": general}, f"{where} ({entry['VolumeName']})")
    return entry["VolumeName"], {"organs": organs, "general": general}


def load_findings_bank(path) -> dict[str, dict]:
    """VolumeName -> {"organs": {organ: [sentences]}, "general": str} from a .jsonl or .json file
    (UTF-8, BOM allowed). ValueError naming the file (and line or index) for invalid JSON or entries,
    and for text with no UTF-8 encoding (invalid bytes, lone surrogate escapes), naming the volume."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such findings bank")
    bank: dict[str, dict] = {}
    # invalid UTF-8 bytes become lone surrogates, reported with the entry by _check_entry
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                check_text(line, f"{path}:{n}")
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            name, entry = _check_entry(obj, f"{path}:{n}")
            bank[name] = entry
        return bank
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    items = obj if isinstance(obj, list) else [{"VolumeName": k, **v} for k, v in obj.items()]
    for i, item in enumerate(items):
        name, entry = _check_entry(item, f"{path}[{i}]")
        bank[name] = entry
    return bank
