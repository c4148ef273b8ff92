"""Error measures, the per-op per-dtype error bounds, and independent low-precision runs of the
ops' formulas: the one home of the accuracy rules used by `sigvlp selftest`, tests/ and the CUDA
emulation cases (tests/emu/emu_cases.py).

Two kinds of bound:

- `tolerance(op, backend, dtype)`: a fixed bound on `rel_err` = max |got - oracle| / max |oracle|
  against an fp64 oracle, from the table `ULPS` (a multiple of the dtype's unit roundoff
  `UNIT_ROUNDOFF`: 2^-24 float32, 2^-11 float16, 2^-8 bfloat16). Used where one bound must cover
  many shapes (the self-test's small fixed cases).
- the precision floor (`assert_at_floor`): a result's max error against the fp64 oracle may be at
  most `factor` x the error of an *independent* low-precision run of the same formula, plus a
  small slack. The floor never comes from the backend under test (nor from the torch backend's
  code, which is the reference implementation `sigvlp.ops` runs): `rope3d_low_precision` and
  `newton_schulz_low_precision` below restate each op's spec in a few lines of their own (complex
  rotation; the plain matrix iteration) and evaluate it at the op's working precision.

The table's multiples: the largest error of any backend on the self-test's cases (torch, Triton
interpreter and CUDA emulation measured on the CPU), x 1.2-2.5 in float16 / bfloat16 and x 2-8 in
float32 (GPU float32 dots may use the 3xTF32 split). Measured, in units of u: rope3d 1.1
(float16), 1.6 (bfloat16), 1.6 (float32) -- an input and an output rounding, at most 3u by
analysis; rope_attention_varlen 1.5 / 1.4 / 8.2; sigmoid_loss 0.8 / 0.9 / 11.6; newton_schulz 9.8
/ 6.7 / 53 (five iterations amplify rounding).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from sigvlp.ops.rope import default_sections

__all__ = ["UNIT_ROUNDOFF", "ULPS", "tolerance", "rel_err", "max_err", "assert_at_floor",
           "rope3d_low_precision", "assert_rope3d_at_floor", "newton_schulz_low_precision"]

#: unit roundoff u = 2^-(mantissa bits + 1): a correctly rounded result's relative error is <= u.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

#: rel_err bound of each op, in units of the dtype's unit roundoff. "float32-kernel": float32 on
#: the Triton / CUDA backends (IEEE dots or the 3xTF32 split, other summation orders).
ULPS: dict[str, dict[str, float]] = {
    "rope3d": {"float32": 8, "float32-kernel": 8, "float16": 3, "bfloat16": 3},
    "rope_attention_varlen": {"float32": 16, "float32-kernel": 64, "float16": 4, "bfloat16": 4},
    "sigmoid_loss": {"float32": 16, "float32-kernel": 64, "float16": 3, "bfloat16": 3},
    "newton_schulz": {"float32": 128, "float32-kernel": 512, "float16": 20, "bfloat16": 12},
}


def tolerance(op: str, backend: str, dtype: torch.dtype) -> float:
    """The rel_err bound of `op` on `backend` at `dtype` (ULPS[op] x UNIT_ROUNDOFF[dtype])."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 and backend != "torch":
        name = "float32-kernel"
    return ULPS[op][name] * UNIT_ROUNDOFF[dtype]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (a shape mismatch or NaN/inf in got -> inf)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return float("inf")
    if not want.numel():
        return 0.0
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| (0 when empty). -inf entries (e.g. an attention row that sees no key) must
    sit at the same places in both and count as 0; NaN in either gives NaN."""
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} vs {tuple(want.shape)}")
    if not got.numel():
        return 0.0
    a, b = got.detach().double().cpu(), want.detach().double().cpu()
    ninf_a, ninf_b = a == -math.inf, b == -math.inf
    assert torch.equal(ninf_a, ninf_b), "-inf in different places"
    diff = (a.masked_fill(ninf_a, 0.0) - b.masked_fill(ninf_b, 0.0)).abs()
    return math.nan if diff.isnan().any() else diff.max().item()


def assert_at_floor(got: torch.Tensor, exact: torch.Tensor, floor_run: torch.Tensor, *, name: str = "output",
                    factor: float = 2.0, slack: float = 0.0) -> None:
    """got's max error vs the fp64 `exact` is at most factor x that of `floor_run` (an independent
    low-precision run of the formula) + slack. NaN in got (an element the kernel never wrote: the
    tests poison op outputs with NaN) fails."""
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten, NaN-poisoned elements?)"
    err, floor = max_err(got, exact), max_err(floor_run, exact)
    assert err <= factor * floor + slack, (f"{name}: error {err:.3g} vs precision floor {floor:.3g} "
                                           f"(bound {factor:g} x floor + {slack:.3g})")


# ----------------------------------------------------------------------------- rope3d


def _grid_positions(cu_seqlens: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """(tokens, 3) float64 (t, h, w), t-major in each sequence's T x H x W grid (a host loop)."""
    cu = cu_seqlens.detach().cpu().long().tolist()
    grid = grid_thw.detach().cpu().long().tolist()
    rows = []
    for b in range(len(cu) - 1):
        n = torch.arange(cu[b + 1] - cu[b], dtype=torch.int64)
        H, W = grid[b][1], grid[b][2]
        rows.append(torch.stack([n // (H * W), (n // W) % H, n % W], dim=1))
    return torch.cat(rows).double() if rows else torch.zeros(0, 3, dtype=torch.float64)


def rope3d_low_precision(x: torch.Tensor, cu_seqlens: torch.Tensor, grid_thw: Optional[torch.Tensor] = None, *,
                         positions: Optional[torch.Tensor] = None, theta: float = 10000.0,
                         sections: Optional[Sequence[int]] = None, interleaved: bool = False,
                         inverse: bool = False, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """rope3d's spec (sigvlp.ops.rope) evaluated at its working precision, written apart from
    sigvlp.ops.rope's code: pair j of an axis with n pairs turns by pos * theta^(-j/n), each factor
    and the angle rounded to compute_dtype (fp32, as the spec says), the pair (a, b) multiplied as
    the complex number a + ib by exp(+-i angle) in compute_dtype, the result rounded to x's dtype.
    compute_dtype=float64 gives the exact answer (an oracle)."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    sections = tuple(default_sections(head_dim) if sections is None else sections)
    pos = _grid_positions(cu_seqlens, grid_thw) if positions is None else positions.detach().cpu().double()
    angle = torch.zeros(x.shape[0], half, dtype=compute_dtype)
    start = 0
    for axis, n_a in enumerate(sections):
        inv_freq = (theta ** (-torch.arange(n_a, dtype=torch.float64) / max(n_a, 1))).to(compute_dtype)
        angle[:, start : start + n_a] = pos[:, axis : axis + 1].to(compute_dtype) * inv_freq
        start += n_a
    turn = torch.polar(torch.ones_like(angle), -angle if inverse else angle)[:, None, :]
    xc = x.detach().cpu().to(compute_dtype)
    a, b = (xc[..., 0::2], xc[..., 1::2]) if interleaved else (xc[..., :half], xc[..., half:])
    z = torch.complex(a.contiguous(), b.contiguous()) * turn
    if interleaved:
        out = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    else:
        out = torch.cat([z.real, z.imag], dim=-1)
    return out.to(x.dtype)


def assert_rope3d_at_floor(out: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor,
                           grid_thw: Optional[torch.Tensor] = None, **kwargs) -> None:
    """rope3d's output `out` for input x (same keyword arguments as rope3d: positions, theta,
    sections, interleaved, inverse): max error vs the fp64 oracle (`rope3d_low_precision` in
    float64: not the torch backend's code either) at most 4x that of `rope3d_low_precision` at x's
    precision, + one unit roundoff of the largest
    value (for inputs whose floor is 0). 4x, not 2x: at large angles (positions ~100-1000) the
    fp32 rounding of the frequency and of the angle dominates, and two evaluations put their worst
    rounding on different elements: over 240 random draws of positions < 300 the torch backend's
    max error was up to 1.9x the independent run's, the Triton kernel's up to 3.5x (median 1.0)."""
    exact = rope3d_low_precision(x.detach().double(), cu_seqlens, grid_thw, compute_dtype=torch.float64, **kwargs)
    floor_run = rope3d_low_precision(x, cu_seqlens, grid_thw, **kwargs)
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    assert_at_floor(out, exact, floor_run, factor=4.0, slack=UNIT_ROUNDOFF[x.dtype] * scale)


# ----------------------------------------------------------------------------- newton_schulz


def newton_schulz_low_precision(G: torch.Tensor, triples: Sequence[Sequence[float]],
                                dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> torch.Tensor:
    """The Newton-Schulz iteration of the spec (sigvlp.ops.newton_schulz), written apart from its
    code: X_0 = G / max(||G||_F, eps) (norm in fp64), then per (a, b, c) in `triples`
    A = X X^T, X = a X + (b A + c A A) X on the wide side, every operand rounded to `dtype` and
    every product accumulated in fp32 (fp64 for dtype float64). Returns (..., m, n) in `dtype`."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    X = G.detach().cpu().double()
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    tall = X.shape[-2] > X.shape[-1]
    X = (X.mT if tall else X).to(dtype)
    for a, b, c in triples:
        Xa = X.to(acc)
        A = (Xa @ Xa.mT).to(dtype).to(acc)
        B = (b * A + c * (A @ A)).to(dtype).to(acc)
        X = (a * Xa + B @ Xa).to(dtype)
    return X.mT if tall else X
