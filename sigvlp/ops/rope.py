"""sigvlp.ops.rope3d: 3D rotary position embedding over varlen packed sequences.

Semantics (the spec; `rope3d_reference` is its readable form):
- x is (total_tokens, nheads, head_dim); sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1].
- Each token has a position (t, h, w): from grid_thw (sequence b is a T x H x W grid in t-major
  order, token n at t = n // (H*W), h = (n // W) % H, w = n % W) or given per token (positions).
- sections = (n_t, n_h, n_w) rotary pairs per axis; default splits head_dim/2 pairs 2:3:3 with
  the remainder to t (head_dim 64 -> (8, 12, 12)). Pair p belongs to t for p < n_t, then h,
  then w; pairs past n_t + n_h + n_w are left as they are.
- Pair j of axis a (n_a pairs) turns by pos_a * theta ** (-j / n_a). A pair is (i, i + head_dim/2)
  by default, (2i, 2i+1) when interleaved. Angles and the rotation are fp32; the result has
  x's dtype. inverse=True turns by the negative angle; the gradient is the inverse rotation.
- Value checks (cu_seqlens starts at 0, non-decreasing, ends at total_tokens; T*H*W equals each
  length) read the index tensors on the host: always for CPU tensors, for CUDA tensors only with
  validate=True or SIGVLP_VALIDATE=1, so the GPU path makes no device-to-host copy. The kernels
  are memory-safe for any int32 values: a wrong value gives wrong angles, never a bad access; every
  output element is still written, each pair still turned by some angle (its norm kept), and the
  pairs past the sections still copied unchanged.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from sigvlp.ops import _checks
from sigvlp.ops import cuda_module
from sigvlp.ops.backends import Backend, BackendSet, empty_output, resolve_request, validation_enabled
from sigvlp.ops.registry import OpSpec, as64, leaf, rand64, register, weighted_grads
from sigvlp.ops.varlen import cu_seqlens_from_lengths

__all__ = ["rope3d", "rope3d_reference", "default_sections", "grid_positions", "rotary_angles"]


def default_sections(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs (t, h, w) for head_dim: half = head_dim/2 pairs split t:h:w = 2:3:3, remainder to t."""
    half = head_dim // 2
    n_hw = (half * 3) // 8
    return (half - 2 * n_hw, n_hw, n_hw)


def _resolve_sections(sections, head_dim: int) -> tuple[int, int, int]:
    if sections is None:
        return default_sections(head_dim)
    if isinstance(sections, torch.Tensor) or not isinstance(sections, Sequence) or len(sections) != 3:
        raise TypeError(f"sections: expected a sequence of 3 ints (n_t, n_h, n_w), got {sections!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in sections):
        raise TypeError(f"sections: expected 3 ints, got {sections!r}")
    if any(s < 0 for s in sections):
        raise ValueError(f"sections: expected non-negative pair counts, got {tuple(sections)}")
    if sum(sections) > head_dim // 2:
        raise ValueError(
            f"sections: at most head_dim/2 = {head_dim // 2} rotary pairs in all, got {tuple(sections)} "
            f"(sum {sum(sections)})"
        )
    return tuple(int(s) for s in sections)


# ----------------------------------------------------------------------------- reference


def grid_positions(cu_seqlens: torch.Tensor, grid_thw: torch.Tensor, total_tokens: Optional[int] = None
                   ) -> torch.Tensor:
    """(total_tokens, 3) float32 (t, h, w) of every packed token, t-major within its sequence's grid.

    total_tokens: the packed length when known (no device-to-host read of cu_seqlens[-1])."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1]) if total_tokens is None else int(total_tokens)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    n = torch.arange(total, device=cu.device) - cu[seq]
    H = grid_thw[seq, 1].long().clamp(min=1)
    W = grid_thw[seq, 2].long().clamp(min=1)
    return torch.stack([n // (H * W), (n // W) % H, n % W], dim=1).float()


def rotary_angles(positions: torch.Tensor, sections: Sequence[int], head_dim: int, theta: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(tokens, head_dim/2) angles: pair j of axis a turns by pos_a * theta ** (-j / n_a); 0 past the sections."""
    angles = []
    for axis, n_a in enumerate(sections):
        j = torch.arange(n_a, device=positions.device, dtype=dtype)
        inv_freq = torch.pow(torch.tensor(theta, dtype=dtype, device=positions.device), -j / max(n_a, 1))
        angles.append(positions[:, axis : axis + 1].to(dtype) * inv_freq)
    rest = head_dim // 2 - sum(sections)
    angles.append(torch.zeros(positions.shape[0], rest, dtype=dtype, device=positions.device))
    return torch.cat(angles, dim=1)


def rope3d_reference(x, cu_seqlens, grid_thw=None, *, positions=None, theta=10000.0, sections=None,
                     interleaved=False, inverse=False, compute_dtype=torch.float32):
    """Readable rope3d: the CPU path and the test oracle. compute_dtype=float64 gives the exact answer."""
    head_dim = x.shape[-1]
    sections = _resolve_sections(sections, head_dim)
    if positions is None:
        positions = grid_positions(cu_seqlens, grid_thw, x.shape[0])
    angles = rotary_angles(positions, sections, head_dim, theta, compute_dtype)[:, None, :]  # (tokens, 1, half)
    cos, sin = torch.cos(angles), torch.sin(angles)
    if inverse:
        sin = -sin
    xc = x.to(compute_dtype)
    if interleaved:
        a, b = xc[..., 0::2], xc[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = xc[..., : head_dim // 2], xc[..., head_dim // 2 :]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- backends
# Each runner writes rope3d(x) into `out` (same shape, contiguous last dim); arguments validated.


def _run_torch(x, out, cu_seqlens, grid_thw, positions, theta, sections, interleaved, inverse):
    out.copy_(rope3d_reference(x, cu_seqlens, grid_thw, positions=positions, theta=theta, sections=sections,
                               interleaved=interleaved, inverse=inverse))


def _run_triton(x, out, cu_seqlens, grid_thw, positions, theta, sections, interleaved, inverse):
    from sigvlp.kernels import rope as triton_rope  # noqa: PLC0415 (Triton loads on first use)

    triton_rope.rope3d(x, out, cu_seqlens=cu_seqlens, grid_thw=grid_thw, positions=positions, sections=sections,
                       theta=theta, interleaved=interleaved, inverse=inverse)


def _run_cuda(x, out, cu_seqlens, grid_thw, positions, theta, sections, interleaved, inverse):
    total, nheads, head_dim = x.shape
    cuda_module.module().rope3d(
        x=cuda_module.ptr(x), out=cuda_module.ptr(out), dtype=cuda_module.dtype_code(x.dtype),
        total_tokens=total, nheads=nheads, head_dim=head_dim,
        x_stride_token=x.stride(0), x_stride_head=x.stride(1),
        out_stride_token=out.stride(0), out_stride_head=out.stride(1),
        cu_seqlens=cuda_module.ptr(cu_seqlens), batch=cu_seqlens.shape[0] - 1,
        grid_thw=cuda_module.ptr(grid_thw), positions=cuda_module.ptr(positions),
        log2_theta=math.log2(theta), n_t=sections[0], n_h=sections[1], n_w=sections[2],
        interleaved=interleaved, inverse=inverse, stream=cuda_module.stream_ptr(x.device),
    )


BACKENDS = BackendSet("rope3d", [
    Backend("cuda", _run_cuda),
    Backend("triton", _run_triton),
    Backend("torch", _run_torch),
])


# ----------------------------------------------------------------------------- torch op


@torch.library.custom_op("sigvlp::rope3d", mutates_args=())
def _rope3d_op(x: torch.Tensor, cu_seqlens: torch.Tensor, grid_thw: Optional[torch.Tensor],
               positions: Optional[torch.Tensor], theta: float, sections: list[int], interleaved: bool,
               inverse: bool, backend: str, validate: bool) -> torch.Tensor:
    if validation_enabled(validate, x.device):
        _checks.check_cu_seqlens_values(cu_seqlens, x.shape[0])
        if grid_thw is not None:
            _checks.check_grid_thw_values(grid_thw, cu_seqlens)
    impl = BACKENDS.select(backend, device=x.device, dtype=x.dtype, head_dim=x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    positions = positions.contiguous() if positions is not None else None
    grid_thw = grid_thw.contiguous() if grid_thw is not None else None
    out = empty_output(x.shape, x.dtype, x.device)
    impl.run(x, out, cu_seqlens.contiguous(), grid_thw, positions, theta, tuple(sections), interleaved, inverse)
    return out


@_rope3d_op.register_fake
def _(x, cu_seqlens, grid_thw, positions, theta, sections, interleaved, inverse, backend, validate):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    _, cu_seqlens, grid_thw, positions, theta, sections, interleaved, inverse, backend, _validate = inputs
    ctx.save_for_backward(cu_seqlens, grid_thw, positions)
    ctx.args = (theta, sections, interleaved, inverse, backend)


def _backward(ctx, grad):
    cu_seqlens, grid_thw, positions = ctx.saved_tensors
    theta, sections, interleaved, inverse, backend = ctx.args
    # A rotation's transpose is its inverse: the gradient turns back by the same angles. The
    # index values were checked (when asked) by the forward.
    grad_x = _rope3d_op(grad, cu_seqlens, grid_thw, positions, theta, sections, interleaved, not inverse, backend,
                        False)
    return grad_x, None, None, None, None, None, None, None, None, None


_rope3d_op.register_autograd(_backward, setup_context=_setup_context)


def rope3d(x: torch.Tensor, cu_seqlens: torch.Tensor, grid_thw: Optional[torch.Tensor] = None, *,
           positions: Optional[torch.Tensor] = None, theta: float = 10000.0,
           sections: Optional[Sequence[int]] = None, interleaved: bool = False, inverse: bool = False,
           backend: Optional[str] = None, validate: bool = False) -> torch.Tensor:
    """Rotate x (total_tokens, nheads, head_dim) by 3D RoPE; see the module docstring for semantics.

    Give exactly one of grid_thw (int32 (batch, 3), T*H*W == each sequence length) or positions
    (float32 (total_tokens, 3)). backend: None/"auto", "torch", "triton" or "cuda".
    validate: also check cu_seqlens / grid_thw values on CUDA tensors (a device-to-host copy;
    CPU tensors are always checked; SIGVLP_VALIDATE=1 turns it on everywhere). Bad values raise
    ValueError naming the argument.
    Returns a tensor of x's shape and dtype. Errors: TypeError/ValueError naming the argument.
    """
    _checks.check_tensor(x, "x", dtypes=(torch.float32, torch.float16, torch.bfloat16), ndim=3)
    head_dim = x.shape[-1]
    if head_dim % 2 != 0:
        raise ValueError(f"x: head_dim (last dim) must be even, got {head_dim}")
    _checks.check_cu_seqlens(cu_seqlens, x.device)
    if (grid_thw is None) == (positions is None):
        raise ValueError("grid_thw, positions: give exactly one of them "
                         f"(got {'both' if grid_thw is not None else 'neither'})")
    batch = cu_seqlens.shape[0] - 1
    if grid_thw is not None:
        _checks.check_grid_thw(grid_thw, batch, x.device)
    else:
        _checks.check_positions(positions, x.shape[0], x.device)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1.0:
        raise ValueError(f"theta: expected a finite number > 1, got {theta!r}")
    sections = _resolve_sections(sections, head_dim)
    for flag_name, flag in (("interleaved", interleaved), ("inverse", inverse), ("validate", validate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name}: expected a bool, got {type(flag).__name__}")
    backend = resolve_request(backend, BACKENDS.names) if backend not in (None, "auto") else "auto"
    return _rope3d_op(x, cu_seqlens, grid_thw, positions, float(theta), list(sections), interleaved, inverse, backend,
                      validate)


# ----------------------------------------------------------------------------- registry


def _selftest_case(dtype, device, gen):
    """Three sequences (grids 2x3x4, 3x1x5, 1x1x1), 3 heads of 64: rope3d and its gradient."""
    grid = torch.tensor([[2, 3, 4], [3, 1, 5], [1, 1, 1]], dtype=torch.int32)
    cu = cu_seqlens_from_lengths([24, 15, 1])
    x = leaf(rand64(gen, 40, 3, 64), dtype, device)
    w = rand64(gen, 40, 3, 64)

    def run(backend):
        out = rope3d(x, cu.to(device), grid.to(device), backend=backend)
        return [out], weighted_grads([out], [x], [w])

    def oracle():
        x64 = as64(x)
        out = rope3d_reference(x64, cu, grid, compute_dtype=torch.float64)
        return [out], weighted_grads([out], [x64], [w])

    return run, oracle


def _launch_survey(lengths, rows):
    cu = cu_seqlens_from_lengths(lengths)
    grid = torch.tensor([[1, 1, n] for n in lengths], dtype=torch.int32)
    x = torch.randn(sum(lengths), 4, 64, dtype=torch.bfloat16)
    rope3d(x, cu, grid, backend="triton")
    rope3d(x.float(), cu, positions=torch.zeros(sum(lengths), 3), backend="triton")


#: The Triton configurations gpu_check's GPU tests and benches launch (OpSpec.launch_configs), kwargs
#: of sigvlp.precompile's rope3d case: tests/test_rope.py test_gpu_backends (every dtype, grid and
#: positions, interleaved or not, head_dim 64; bench_rope: the grid ones), bench_attention's
#: rope3d + varlen attention baseline (bf16, head_dim 128).
_GPU_LAUNCHES = tuple(dict(dtype=d, head_dim=64, positions=p, interleaved=i)
                      for d in (torch.float32, torch.float16, torch.bfloat16) for p in (False, True)
                      for i in (False, True)) + (dict(dtype=torch.bfloat16, head_dim=128, positions=False,
                                                      interleaved=False),)


SPEC = register(OpSpec(
    name="rope3d", backends=BACKENDS, selftest=_selftest_case, selftest_facts={"head_dim": 64},
    test_file="tests/test_rope.py", launch_survey=_launch_survey, launch_configs=_GPU_LAUNCHES, bench="benches/bench_rope.py", bench_cap_s=8,
))
