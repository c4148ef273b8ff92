"""Encoder FLOPs of one forward pass: torch.utils.flop_counter for the standard ops, plus the
analytic attention FLOPs of the custom ``sigvlp::rope_attention_varlen`` op, which the counter
has no formula for (it counts its matmuls as zero).

Attention convention (FlashAttention papers, REFERENCES.md): forward = 4 * Lq * Lk * nheads *
head_dim per sequence (QK^T and PV, 2 FLOPs per multiply-add), halved when causal.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_OP = "rope_attention_varlen"


class _AttentionFlops(TorchDispatchMode):
    """Adds up the analytic FLOPs of every rope_attention_varlen forward call it sees."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if _OP in name and "backward" not in name:
            bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
            bound.update(kwargs)
            self.flops += attention_flops(bound["q"], bound.get("cu_seqlens"), bound.get("cu_seqlens_k"),
                                          causal=bool(bound.get("causal", False)))
            self.calls += 1
        return func(*args, **kwargs)


def attention_flops(q: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: Optional[torch.Tensor] = None,
                    causal: bool = False) -> int:
    """Forward FLOPs of varlen attention: 4 * sum_i Lq_i * Lk_i * nheads * head_dim (/2 causal).
    q (total_q, nheads, head_dim); cu_seqlens int32 (batch + 1,); cu_seqlens_k defaults to it.
    Reads the offsets on the host (evaluation only, never a training path)."""
    cq = cu_seqlens.detach().to("cpu", torch.int64)
    ck = cq if cu_seqlens_k is None else cu_seqlens_k.detach().to("cpu", torch.int64)
    lq, lk = (cq[1:] - cq[:-1]), (ck[1:] - ck[:-1])
    pairs = int((lq * lk).sum())
    f = 4 * pairs * int(q.shape[1]) * int(q.shape[2])
    return f // 2 if causal else f


@torch.no_grad()
def encoder_flops(model, depth: int, height: int, width: int, *, device=None) -> dict:
    """FLOPs of ``model.encode_volume`` on one (depth, height, width) volume (values -1, the air
    of the windowed data; FLOPs do not depend on values).

    Returns {"total", "counted" (torch.utils.flop_counter), "attention_analytic" (added when
    the counter did not see the custom attention op), "tokens", "attention_calls"}."""
    from torch.utils.flop_counter import FlopCounterMode

    from sigvlp.model import volume_batch

    device = device or next(model.parameters()).device
    patch = tuple(model.config.patch_size)
    batch = volume_batch([np.full((depth, height, width), -1.0, dtype=np.float32)], patch)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    attn = _AttentionFlops()
    with counter, attn:
        model.encode_volume(batch["patches"], batch["cu_seqlens"], batch["max_seqlen"], batch["grid_thw"])
    counted = int(counter.get_total_flops())
    seen = any(_OP in str(op) and n > 0 for op, n in counter.get_flop_counts().get("Global", {}).items())
    analytic = 0 if seen else int(attn.flops)
    return {"total": counted + analytic, "counted": counted, "attention_analytic": analytic,
            "tokens": int(batch["patches"].shape[0]), "attention_calls": attn.calls}
