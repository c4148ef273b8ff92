"""Packing chunks and texts into varlen batches, and the tokenizers.

Batch layout (``collate_chunks`` returns a dict of these):

- ``patches``: (total_tokens, pt*ph*pw) float. Chunk b is a (T*pt, H*ph, W*pw) array cut into
  T x H x W patches of pt x ph x pw voxels; its tokens are rows cu_seqlens[b]:cu_seqlens[b+1]
  in t-major order: token n sits at t = n // (H*W), h = (n // W) % H, w = n % W. Inside a
  row the voxels are (pt, ph, pw) C-order, the layout of a Conv3d weight of shape
  (dim, 1, pt, ph, pw): ``patches @ conv.weight.reshape(dim, -1).T`` equals the stride = kernel
  Conv3d patch embedding.
- ``cu_seqlens``: (batch + 1,) int32 token offsets; ``max_seqlen``: int.
- ``grid_thw``: (batch, 3) int32, (T, H, W) in tokens per chunk (the 3D RoPE positions).
- ``text_ids``: (total_text_tokens,) int64 token ids, one text per chunk, each
  [BOS] ... [EOS] truncated to max_text_tokens; ``text_cu_seqlens`` (batch + 1,) int32;
  ``text_max_seqlen``: int.
- ``image_pair_ids`` / ``text_pair_ids``: (batch,) int64 for the sigmoid loss: chunk i and text
  j are a positive pair iff image_pair_ids[i] == text_pair_ids[j]. Identical texts share an id,
  so two chunks described by the same sentences are positives for each other's texts.
- ``names``, ``organs``, ``z_ranges``, ``texts``: per-chunk bookkeeping (lists).

A chunk whose depth is not a multiple of pt (a volume shorter than one patch) is padded at
the bottom with -1 (air after windowing); H and W must be multiples of ph and pw.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, any text. ids 0..2 are PAD, BOS, EOS."""

    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET

    def encode(self, text: str, max_tokens: Optional[int] = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        if max_tokens is not None:
            ids = ids[: max(max_tokens - 2, 0)]
        return [self.BOS, *ids, self.EOS]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never downloads)."""

    def __init__(self, path):
        from pathlib import Path

        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such tokenizer folder")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("an HF tokenizer needs the 'transformers' package; the byte tokenizer does not") from e
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.tok)

    def encode(self, text: str, max_tokens: Optional[int] = None) -> list[int]:
        return list(self.tok(text, truncation=max_tokens is not None, max_length=max_tokens)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec=None):
    """None or "byte": ByteTokenizer; a folder path: HFTokenizer."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def patchify(chunk, patch: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(Z, Y, X) -> ((T*H*W, pt*ph*pw) tokens in t-major order, (T, H, W))."""
    from einops import rearrange

    x = torch.as_tensor(chunk)
    if x.ndim != 3:
        raise ValueError(f"chunk must be (Z, Y, X), got shape {tuple(x.shape)}")
    pt, ph, pw = patch
    z, y, w = x.shape
    if y % ph or w % pw:
        raise ValueError(f"in-plane size {y} x {w} is not a multiple of the patch {ph} x {pw}")
    if z % pt:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pt - z % pt), value=-1.0)
    grid = (x.shape[0] // pt, y // ph, w // pw)
    tokens = rearrange(x, "(t pt) (h ph) (w pw) -> (t h w) (pt ph pw)", pt=pt, ph=ph, pw=pw)
    return tokens, grid


def pair_ids(texts: Sequence[str]) -> torch.Tensor:
    """Equal texts get equal ids (the index of their first occurrence)."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(t, i) for i, t in enumerate(texts)], dtype=torch.int64)


def _cu(lengths) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if len(lengths):
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu


def collate_chunks(samples: Sequence[dict], tokenizer=None, patch: tuple[int, int, int] = (16, 16, 16),
                   max_text_tokens: int = 256, dtype: torch.dtype = torch.float32) -> dict:
    """Pack samples ({"image": (Z, Y, X), "text": str, and optional "name", "organs", "z0"})
    into one varlen batch (layout in the module docstring)."""
    if not samples:
        raise ValueError("samples is empty")
    tokenizer = tokenizer or ByteTokenizer()
    patches, grids = [], []
    for s in samples:
        tok, grid = patchify(s["image"], patch)
        patches.append(tok.to(dtype))
        grids.append(grid)
    texts = [s.get("text", "") for s in samples]
    ids = [tokenizer.encode(t, max_text_tokens) for t in texts]
    text_pair = pair_ids(texts)
    return {
        "patches": torch.cat(patches, 0),
        "cu_seqlens": _cu([g[0] * g[1] * g[2] for g in grids]),
        "max_seqlen": max(g[0] * g[1] * g[2] for g in grids),
        "grid_thw": torch.tensor(grids, dtype=torch.int32).reshape(-1, 3),
        "text_ids": torch.tensor([i for row in ids for i in row], dtype=torch.int64),
        "text_cu_seqlens": _cu([len(r) for r in ids]),
        "text_max_seqlen": max(len(r) for r in ids),
        "image_pair_ids": text_pair.clone(),
        "text_pair_ids": text_pair,
        "names": [s.get("name") for s in samples],
        "organs": [s.get("organs", []) for s in samples],
        "z_ranges": [(s.get("z0", 0), s.get("z0", 0) + int(np.shape(s["image"])[0])) for s in samples],
        "texts": texts,
    }


def pack_by_token_budget(token_counts: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy, order-keeping groups of indices whose token counts sum to <= budget."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(token_counts):
        if n > budget:
            raise ValueError(f"item {i} has {n} tokens, more than the budget {budget}")
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups
