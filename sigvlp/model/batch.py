"""Preprocessed volumes -> the model's packed input (the collate's image layout)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sigvlp.ops import cu_seqlens_from_lengths

__all__ = ["volume_batch"]


def volume_batch(volumes: Sequence, patch_size: Sequence[int]) -> dict:
    """Pack whole preprocessed volumes for ``SigVLP.encode_volume`` / ``SigVLP(batch)``.

    volumes: list of (z, y, x) float arrays or tensors in [-1, 1] (sigvlp.data preprocess output),
    any depth z; y and x multiples of ph and pw. patch_size: (pt, ph, pw) voxels per token.
    The depth is padded at the bottom to a multiple of pt with -1 (air), as collate_chunks does.
    Returns dict(patches (total_tokens, pt*ph*pw) float32 in t-major token order, cu_seqlens
    (B + 1,) int32, max_seqlen int, grid_thw (B, 3) int32 (T, H, W) tokens per volume), on the CPU.
    """
    from sigvlp.data.collate import patchify

    if isinstance(volumes, (np.ndarray, torch.Tensor)):
        raise TypeError("volumes: expected a list of (z, y, x) arrays, got a single array (wrap it in a list)")
    if len(volumes) == 0:
        raise ValueError("volumes: expected at least one volume")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size: expected three positive ints, got {tuple(patch_size)}")
    patches, grids = [], []
    for i, v in enumerate(volumes):
        arr = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).to(torch.float32)
        if arr.ndim != 3 or arr.shape[0] == 0:
            raise ValueError(f"volumes[{i}]: expected a non-empty (z, y, x) array, got shape {tuple(arr.shape)}")
        try:
            tok, grid = patchify(arr, patch)
        except ValueError as e:
            raise ValueError(f"volumes[{i}]: {e}") from None
        patches.append(tok)
        grids.append(grid)
    lengths = [t * h * w for t, h, w in grids]
    return {"patches": torch.cat(patches, 0), "cu_seqlens": cu_seqlens_from_lengths(lengths), "max_seqlen": max(lengths),
            "grid_thw": torch.tensor(grids, dtype=torch.int32).reshape(-1, 3)}
