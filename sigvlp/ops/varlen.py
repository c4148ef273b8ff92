"""Varlen packing shared by every op and its callers: cu_seqlens from sequence lengths, and the
head dims the attention kernels serve.

A batch of B sequences packed along one token axis is described, as in flash_attn_varlen_func,
by cu_seqlens: int32 (B + 1,) with cu_seqlens[0] = 0 and cu_seqlens[b + 1] - cu_seqlens[b] the
length of sequence b.
"""

from __future__ import annotations

import itertools
import numbers
from typing import Sequence, Union

import torch

__all__ = ["SUPPORTED_HEAD_DIMS", "cu_seqlens_from_lengths"]

#: head_dim values rope_attention_varlen serves (its Triton and CUDA kernels are instantiated for
#: these; csrc/attention.cu switches over the same list). The one home of this list in sigvlp.
SUPPORTED_HEAD_DIMS = (32, 64, 96, 128)

#: cu_seqlens is int32: the packed total must stay below 2**31.
_INT32_MAX = 2**31 - 1


def cu_seqlens_from_lengths(lengths: Union[Sequence[int], torch.Tensor], device=None) -> torch.Tensor:
    """int32 (len(lengths) + 1,) cumulative offsets [0, l0, l0 + l1, ...] of packed sequences.

    lengths: a sequence of non-negative ints (numpy integers too) or a 1-D integer tensor; may be
    empty (then [0]). device: where the result lives (default: lengths' device for a tensor, else
    the CPU). The sum is computed in int64 and must fit int32 (< 2**31 tokens).
    Errors: TypeError for non-integer lengths, ValueError for negative ones or an int32 overflow,
    each naming `lengths`.
    """
    if isinstance(lengths, torch.Tensor):  # validated on the values: a host read for a device tensor
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths: expected an integer tensor, got dtype {str(lengths.dtype).removeprefix('torch.')}")
        if lengths.dim() != 1:
            raise ValueError(f"lengths: expected a 1-D tensor, got shape {tuple(lengths.shape)}")
        values = lengths.to(torch.int64)
        device = lengths.device if device is None else device
        negative = values.numel() > 0 and bool((values < 0).any())
        total = int(values.sum()) if values.numel() else 0
    else:  # host ints: checked in Python, no tensor is read back
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
            raise TypeError(f"lengths: expected a sequence of ints or a 1-D tensor, got {type(lengths).__name__}")
        bad = [v for v in lengths if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"lengths: expected ints, got {bad[0]!r} ({type(bad[0]).__name__})")
        ints = [int(v) for v in lengths]
        if any(v < 0 for v in ints):
            raise ValueError(f"lengths: expected non-negative lengths, got {ints[:16]}")
        offsets = [0, *itertools.accumulate(ints)]
        if offsets[-1] > _INT32_MAX:
            raise ValueError(f"lengths: the total {offsets[-1]} does not fit cu_seqlens' int32 (< 2**31)")
        return torch.tensor(offsets, dtype=torch.int32, device=device)
    if negative:
        raise ValueError(f"lengths: expected non-negative lengths, got {values.tolist()[:16]}")
    if total > _INT32_MAX:
        raise ValueError(f"lengths: the total {total} does not fit cu_seqlens' int32 (< 2**31)")
    cu = torch.zeros(values.numel() + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(values, 0, out=cu[1:])
    return cu.to(device=device, dtype=torch.int32)
