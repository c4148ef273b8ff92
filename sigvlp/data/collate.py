"""Packing chunks and texts into varlen batches (the tokenizers: sigvlp.data.tokenizers).

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
  j are a positive pair iff image_pair_ids[i] == text_pair_ids[j]. A non-empty text's id is a
  62-bit hash of the text (>= 0), so identical texts share an id in this batch and on every other
  rank (global negatives). An empty text (a chunk without findings) is never a positive of any
  other chunk: it gets a unique negative id, EMPTY_TEXT_ID_BASE (-2**62) + the sample's "uid" (or
  its batch index), far from the small negative values kernels use for padding rows.
- ``empty_texts``: int, how many chunks of the batch had an empty text.
- ``names``, ``organs``, ``z_ranges``, ``texts``: per-chunk bookkeeping (lists).

``collate_chunks`` checks its own output once per batch on the host (``validate_batch``):
cu_seqlens start at 0, never decrease and end at the row count, grid products equal the
lengths, max_seqlen is the longest length. The ops do not read CUDA tensor values back, so
this is where bad metadata is caught.

A chunk whose depth is not a multiple of pt (a volume shorter than one patch) is padded at
the bottom with -1 (air after windowing); H and W must be multiples of ph and pw.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from sigvlp.data.tokenizers import ByteTokenizer
from sigvlp.ops import cu_seqlens_from_lengths as _cu


def _grid(chunk, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, H, W) token grid of a (Z, Y, X) chunk (Z padded up to a multiple of pt); ValueError otherwise."""
    shape = tuple(np.shape(chunk))
    if len(shape) != 3:
        raise ValueError(f"chunk must be (Z, Y, X), got shape {shape}")
    if len(patch) != 3 or not all(isinstance(p, (int, np.integer)) and p >= 1 for p in patch):
        raise ValueError(f"patch must be three integers >= 1 (pt, ph, pw), got {patch!r}")
    pt, ph, pw = patch
    z, y, w = shape
    if z < 1:
        raise ValueError(f"chunk has no slices (shape {shape})")
    if y % ph or w % pw:
        raise ValueError(f"in-plane size {y} x {w} is not a multiple of the patch {ph} x {pw}")
    return -(-z // pt), y // ph, w // pw


def _patchify_into(out: torch.Tensor, chunk, patch: tuple[int, int, int], grid: tuple[int, int, int]) -> None:
    """out (T*H*W, pt*ph*pw) = the chunk's tokens (t-major; slices past Z are -1, the window's bottom),
    converted to out's dtype in the same copy (a strided read of the chunk, no intermediate)."""
    x = torch.as_tensor(chunk)
    pt, ph, pw = patch
    t, h, w = grid
    full = x.shape[0] // pt
    dst = out.view(t, h, w, pt, ph, pw)
    if full:
        dst[:full].copy_(x[:full * pt].reshape(full, pt, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5))
    rest = x.shape[0] - full * pt
    if rest:
        dst[full, :, :, :rest].copy_(x[full * pt:].reshape(rest, h, ph, w, pw).permute(1, 3, 0, 2, 4))
        dst[full, :, :, rest:].fill_(-1.0)


def patchify(chunk, patch: tuple[int, int, int], dtype: Optional[torch.dtype] = None
             ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(Z, Y, X) -> ((T*H*W, pt*ph*pw) tokens in t-major order, (T, H, W)); Z is padded with -1 up to a
    multiple of pt. dtype: of the tokens (default the chunk's). ValueError for another shape."""
    grid = _grid(chunk, patch)
    x = torch.as_tensor(chunk)
    out = torch.empty(math.prod(grid), math.prod(patch), dtype=dtype or x.dtype)
    _patchify_into(out, x, patch, grid)
    return out, grid


EMPTY_TEXT_ID_BASE = -(1 << 62)


def text_pair_id(text: str) -> int:
    """A 62-bit non-negative id of a non-empty text, equal on every process (blake2b)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 2


def pair_ids(texts: Sequence[str], uids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(len(texts),) int64: equal non-empty texts get equal ids (text_pair_id, >= 0); an empty text
    gets EMPTY_TEXT_ID_BASE + uid (uids: non-negative, default the positions), so it is nobody's
    positive but its own chunk's."""
    if uids is None:
        uids = range(len(texts))
    out = []
    for t, u in zip(texts, uids):
        if not isinstance(t, str):
            raise TypeError(f"texts must be str, got {type(t).__name__}")
        if not t and not 0 <= int(u) < (1 << 62):
            raise ValueError(f"uids must lie in [0, 2**62), got {u}")
        out.append(text_pair_id(t) if t else EMPTY_TEXT_ID_BASE + int(u))
    return torch.tensor(out, dtype=torch.int64)


def collate_chunks(samples: Sequence[dict], tokenizer=None, patch: tuple[int, int, int] = (16, 16, 16),
                   max_text_tokens: int = 256, dtype: torch.dtype = torch.float32) -> dict:
    """Pack samples ({"image": (Z, Y, X), "text": str, and optional "name", "organs", "z0",
    "uid"}) into one varlen batch (layout in the module docstring). "uid": a non-negative int
    unique to the chunk (across ranks and workers), used as the pair id of an empty text."""
    if not samples:
        raise ValueError("samples is empty")
    tokenizer = tokenizer or ByteTokenizer()
    grids = [_grid(s["image"], patch) for s in samples]
    sizes = [math.prod(g) for g in grids]
    patches = torch.empty(sum(sizes), math.prod(patch), dtype=dtype)
    for s, grid, rows in zip(samples, grids, patches.split(sizes)):
        _patchify_into(rows, s["image"], patch, grid)  # one strided copy per chunk, converted on the way
    texts = [s.get("text", "") or "" for s in samples]
    ids = [tokenizer.encode(t, max_text_tokens) for t in texts]
    text_pair = pair_ids(texts, [s.get("uid", i) for i, s in enumerate(samples)])
    batch = {
        "patches": patches,
        "cu_seqlens": _cu([g[0] * g[1] * g[2] for g in grids]),
        "max_seqlen": max(g[0] * g[1] * g[2] for g in grids),
        "grid_thw": torch.tensor(grids, dtype=torch.int32).reshape(-1, 3),
        "text_ids": torch.tensor([i for row in ids for i in row], dtype=torch.int64),
        "text_cu_seqlens": _cu([len(r) for r in ids]),
        "text_max_seqlen": max(len(r) for r in ids),
        "image_pair_ids": text_pair.clone(),
        "text_pair_ids": text_pair,
        "empty_texts": sum(1 for t in texts if not t),
        "names": [s.get("name") for s in samples],
        "organs": [s.get("organs", []) for s in samples],
        "z_ranges": [(s.get("z0", 0), s.get("z0", 0) + int(np.shape(s["image"])[0])) for s in samples],
        "texts": texts,
    }
    validate_batch(batch)
    return batch


def _check_cu(name: str, cu: torch.Tensor, total: int, max_seqlen: int, lengths=None) -> list:
    if cu.dtype != torch.int32 or cu.ndim != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected (batch + 1,) int32, got {tuple(cu.shape)} {cu.dtype}")
    c = cu.tolist()
    if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] != total:
        raise ValueError(f"{name}: must start at 0, never decrease and end at {total} rows; got {c}")
    lens = [b - a for a, b in zip(c, c[1:])]
    if lengths is not None and lens != lengths:
        raise ValueError(f"{name}: lengths {lens} differ from the grid products {lengths}")
    if max(lens) != max_seqlen:
        raise ValueError(f"{name}: max_seqlen {max_seqlen} differs from the longest length {max(lens)}")
    return lens


def validate_batch(batch: dict) -> None:
    """Host-side check of a collate_chunks batch (CPU tensors); ValueError naming the field.
    Run once per batch by collate_chunks: the ops skip value checks on CUDA tensors."""
    grid = batch["grid_thw"]
    if grid.dtype != torch.int32 or grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw: expected (batch, 3) int32, got {tuple(grid.shape)} {grid.dtype}")
    g = grid.tolist()
    if any(v < 1 for row in g for v in row):
        raise ValueError(f"grid_thw: every (T, H, W) must be >= 1, got {g}")
    if batch["cu_seqlens"].numel() != len(g) + 1:
        raise ValueError(f"cu_seqlens: {batch['cu_seqlens'].numel()} entries for {len(g)} grids")
    _check_cu("cu_seqlens", batch["cu_seqlens"], int(batch["patches"].shape[0]), int(batch["max_seqlen"]),
              [t * h * w for t, h, w in g])
    tcu = batch["text_cu_seqlens"]
    if tcu.numel() != len(g) + 1:
        raise ValueError(f"text_cu_seqlens: {tcu.numel()} entries for {len(g)} chunks")
    lens = _check_cu("text_cu_seqlens", tcu, int(batch["text_ids"].numel()), int(batch["text_max_seqlen"]))
    if min(lens) < 1:
        raise ValueError(f"text_cu_seqlens: every text needs at least one token, got lengths {lens}")
    for key in ("image_pair_ids", "text_pair_ids"):
        ids = batch[key]
        if ids.dtype != torch.int64 or tuple(ids.shape) != (len(g),):
            raise ValueError(f"{key}: expected ({len(g)},) int64, got {tuple(ids.shape)} {ids.dtype}")
