"""One training micro-step over a typed batch: ``Batch`` and ``train_step``.

``Batch`` holds a collate batch (sigvlp.data.collate_chunks; layout in sigvlp/data/collate.py)
with its device tensors apart from its host metadata. ``Batch.to(device)`` moves every tensor
field (the fields typed ``torch.Tensor``: no hand-kept key list) in one go and refuses a second
move; the host metadata (sequence lengths as Python ints, names, organs, slice ranges, texts)
never leaves the host, so nothing in the step reads a device value back for bookkeeping.

``train_step(model, batch, losses)`` is the forward, the objective (sigvlp.train.losses.Losses:
the sigmoid loss plus the extra terms it was built with) and the backward of one micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

__all__ = ["Batch", "train_step"]


@dataclass(frozen=True)
class Batch:
    """A packed varlen micro-batch.

    Device tensors: patches (total_tokens, pt*ph*pw) float; cu_seqlens (B + 1,) int32; grid_thw
    (B, 3) int32; text_ids (total_text_tokens,) int64; text_cu_seqlens (M + 1,) int32;
    image_pair_ids (B,) int64; text_pair_ids (B,) int64.
    Host metadata: max_seqlen / text_max_seqlen (Python ints), empty_texts (int), and per chunk
    names, organs, z_ranges ((z0, z1) slices of its volume), texts.
    device: where the tensors are (None: still where the collate made them, the host).
    """

    patches: torch.Tensor
    cu_seqlens: torch.Tensor
    grid_thw: torch.Tensor
    text_ids: torch.Tensor
    text_cu_seqlens: torch.Tensor
    image_pair_ids: torch.Tensor
    text_pair_ids: torch.Tensor
    max_seqlen: int
    text_max_seqlen: int
    empty_texts: int = 0
    names: tuple = ()
    organs: tuple = ()
    z_ranges: tuple = ()
    texts: tuple = ()
    device: Optional[torch.device] = None

    #: the tensor fields, moved by ``to`` (derived from the annotations above)
    TENSOR_FIELDS: ClassVar[tuple[str, ...]]

    @classmethod
    def from_collate(cls, batch: dict) -> "Batch":
        """A Batch of a collate_chunks dict (host tensors). ValueError naming missing keys."""
        if isinstance(batch, Batch):
            return batch
        if not isinstance(batch, dict):
            raise TypeError(f"batch: expected a collate_chunks dict, got {type(batch).__name__}")
        required = (*cls.TENSOR_FIELDS, "max_seqlen", "text_max_seqlen")
        missing = [k for k in required if k not in batch]
        if missing:
            raise ValueError(f"batch: missing key(s) {missing} (expected a collate_chunks batch)")
        host = {k: tuple(batch[k]) for k in ("names", "organs", "z_ranges", "texts") if k in batch}
        return cls(**{k: batch[k] for k in required}, empty_texts=int(batch.get("empty_texts", 0)), **host)

    def to(self, device) -> "Batch":
        """This batch with every tensor on `device` (non_blocking), metadata unchanged.
        RuntimeError when the batch was moved already (a batch moves once)."""
        if self.device is not None:
            raise RuntimeError(f"batch: already moved to {self.device}; a batch is moved to the device once")
        device = torch.device(device)
        moved = {k: getattr(self, k).to(device, non_blocking=True) for k in self.TENSOR_FIELDS}
        return dataclasses.replace(self, device=device, **moved)

    def with_texts(self, ids: torch.Tensor, lengths: torch.Tensor, max_len: int) -> "Batch":
        """This batch with extra texts appended after its own (ids: their concatenated token ids,
        lengths: (n,) int64 token counts, on this batch's device; max_len: the longest, an int).
        Pair ids and host metadata stay those of the batch's own texts."""
        base = self.text_cu_seqlens
        cu = torch.cat([base, (base[-1].to(torch.int64) + lengths.cumsum(0)).to(torch.int32)])
        return dataclasses.replace(self, text_ids=torch.cat([self.text_ids, ids]), text_cu_seqlens=cu,
                                   text_max_seqlen=max(int(self.text_max_seqlen), int(max_len)))

    def model_inputs(self) -> dict:
        """The dict SigVLP.forward takes."""
        return {"patches": self.patches, "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen,
                "grid_thw": self.grid_thw, "text_ids": self.text_ids, "text_cu_seqlens": self.text_cu_seqlens,
                "text_max_seqlen": self.text_max_seqlen}

    @property
    def num_chunks(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.patches.shape[0])

    @property
    def num_slices(self) -> int:
        return sum(z1 - z0 for z0, z1 in self.z_ranges)


Batch.TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(Batch) if f.type in ("torch.Tensor", torch.Tensor))


def train_step(model, batch: Batch, losses, *, grad_accum: int = 1,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> dict[str, torch.Tensor]:
    """Forward, objective and backward of one micro-batch.

    model: SigVLP (or its DDP / compiled wrapper) on batch's device. batch: a Batch already moved
    there. losses: a sigvlp.train.losses.Losses (it may append its statements to the texts).
    The gradient of total / grad_accum is accumulated into the parameters (the caller steps the
    optimizer). autocast: a context factory around the forward (bf16 autocast or none).
    Returns {"main": ..., <term name>: ...} detached scalar losses (unweighted).
    """
    batch = losses.prepare(batch)
    with autocast():
        out = model(batch.model_inputs())
    total, parts = losses(out, batch)
    (total / grad_accum).backward()
    return {k: v.detach() for k, v in parts.items()}
