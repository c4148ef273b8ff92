"""Helpers for varlen test inputs shared by op tests."""

from __future__ import annotations

import torch

from sigvlp.ops import cu_seqlens_from_lengths

# Lengths that cover empty and single-token sequences and straddle power-of-two block sizes.
EDGE_LENGTHS = (0, 1, 63, 65, 127, 129)


def cu_seqlens_of(lengths, device="cpu") -> torch.Tensor:
    return cu_seqlens_from_lengths(list(lengths), device)


def grid_for_length(n: int) -> tuple[int, int, int]:
    """A (T, H, W) grid with T*H*W == n and several distinct positions per axis when possible."""
    if n == 0:
        return (0, 4, 4)
    for h in (4, 3, 2):
        for w in (4, 3, 2):
            if n % (h * w) == 0:
                return (n // (h * w), h, w)
    return (n, 1, 1)


def grids_of(lengths, device="cpu") -> torch.Tensor:
    return torch.tensor([grid_for_length(n) for n in lengths], dtype=torch.int32, device=device)


def sequence_slices(cu_seqlens: torch.Tensor):
    cu = cu_seqlens.tolist()
    return [slice(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
