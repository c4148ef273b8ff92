"""sigvlp.ops.newton_schulz: batched Newton-Schulz orthogonalisation (the cost of Muon).

Semantics (the spec; `newton_schulz_reference` is its readable form):
- G is (..., m, n); the leading dims are a batch of independent matrices. A tall matrix
  (m > n) is handled as its transpose, so the work is always on the small (min(m, n))
  Gram side, and the result is transposed back: NS(G^T) = NS(G)^T.
- Each matrix is normalised, X_0 = G / max(||G||_F, eps), then step k (k = 0 .. steps-1) with
  coefficients (a_k, b_k, c_k) computes
      A = X X^T,   B = b_k A + c_k A A,   X = a_k X + B X.
  coefficients is one (a, b, c) triple used for every step, or a sequence of exactly `steps`
  per-step triples (such as sigvlp.optim.POLAR_EXPRESS_COEFFICIENTS).
- Precision: operands (X, A, B) are held in a compute dtype and every product accumulates in
  fp32 (fp64 for fp64, torch backend only). `precision` chooses the compute dtype:
  None (default): bf16 for CUDA tensors (as torch.optim.Muon), fp32 elsewhere (fp64 input
  stays fp64); "bf16" / "fp32": that dtype on every backend; "input": G's own dtype. The
  result is cast back to G's dtype. So bf16 reproduces torch.optim.Muon's bf16 iteration and
  "fp32" is the fp32 mode of every backend.
- A zero matrix gives zeros (the eps clamp), never NaN. The result has G's shape and dtype.

Backends: "torch" (any device; the CPU path and the oracle), "triton" (symmetric Gram and
A A products on one triangle of tiles mirrored on store, X' = a X + B X as one GEMM with its
epilogue fused; batched over the leading dims in one launch per kernel) and "cuda" (the same
three kernels on tensor cores, sm_80+).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

from sigvlp.ops import _checks
from sigvlp.ops import cuda_module
from sigvlp.ops.backends import Backend, BackendSet, empty_output, resolve_request
from sigvlp.ops.registry import KeyRatio, OpSpec, rand64, register

__all__ = [
    "newton_schulz",
    "newton_schulz_reference",
    "resolve_coefficients",
    "DEFAULT_COEFFICIENTS",
    "MAX_STEPS",
]

#: Keller Jordan's quintic (maximal slope at zero), torch.optim.Muon's default.
DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: Same bound as torch.optim.Muon: more steps than this is a mistake, not a setting.
MAX_STEPS = 100
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def resolve_coefficients(coefficients, steps: int, name: str = "coefficients",
                         steps_name: str = "steps") -> list[tuple[float, float, float]]:
    """Per-step (a, b, c) triples from one triple or a sequence of `steps` triples.

    Raises TypeError/ValueError naming the argument (`name`, `steps_name`) for anything else
    (empty, ragged, non-finite, wrong length).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{steps_name}: expected an int, got {type(steps).__name__}")
    if not 0 <= steps < MAX_STEPS:
        raise ValueError(f"{steps_name}: expected 0 <= {steps_name} < {MAX_STEPS}, got {steps}")
    if isinstance(coefficients, (str, bytes, torch.Tensor)) or not isinstance(coefficients, Sequence):
        raise TypeError(f"{name}: expected an (a, b, c) triple or a sequence of per-step triples, "
                        f"got {type(coefficients).__name__}")
    if len(coefficients) == 0:
        raise ValueError(f"{name}: empty; expected an (a, b, c) triple or a sequence of per-step triples")
    if all(_is_number(v) for v in coefficients):
        if len(coefficients) != 3:
            raise ValueError(f"{name}: a single triple needs exactly 3 numbers (a, b, c), got {len(coefficients)}")
        triples = [tuple(coefficients)] * steps
    else:
        triples = []
        for i, t in enumerate(coefficients):
            if isinstance(t, (str, bytes)) or not isinstance(t, Sequence) or len(t) != 3 \
                    or not all(_is_number(v) for v in t):
                raise TypeError(f"{name}[{i}]: expected an (a, b, c) triple of numbers, got {t!r}")
            triples.append(tuple(t))
        if len(triples) != steps:
            raise ValueError(f"{name}: a schedule of {len(triples)} per-step triples needs "
                             f"{steps_name}={len(triples)}, got {steps_name}={steps}")
    out = [tuple(float(v) for v in t) for t in triples]
    if not all(math.isfinite(v) for t in out for v in t):
        raise ValueError(f"{name}: coefficients must be finite, got {out}")
    return out


# ----------------------------------------------------------------------------- reference


def newton_schulz_reference(G: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS,
                            eps: float = 1e-7) -> torch.Tensor:
    """Readable Newton-Schulz: the CPU path and the test oracle (pass fp64 for the exact answer).

    Operands stay in G's dtype with products accumulated by torch's matmul (fp32 for bf16/fp16),
    the iteration torch.optim.Muon runs, batched over the leading dims with baddbmm.
    """
    return _reference_iteration(G, resolve_coefficients(coefficients, steps), eps)


def _reference_iteration(G: torch.Tensor, triples, eps: float) -> torch.Tensor:
    shape = G.shape
    m, n = shape[-2], shape[-1]
    X = G.reshape(-1, m, n)
    tall = m > n
    if tall:
        X = X.mT
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32
                                    if X.dtype != torch.float64 else torch.float64)
    X = (X.to(norm.dtype) / norm.clamp(min=eps)).to(G.dtype)
    for a, b, c in triples:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X.reshape(shape)


# ----------------------------------------------------------------------------- backends
# Each runner writes NS(G) into `out` (G's shape and dtype, contiguous). G is (batch, m, n)
# (contiguous or a transposed view), triples the per-step coefficients.


def _run_torch(G, out, triples, eps):
    out.copy_(_reference_iteration(G, triples, eps))


def _wide_work(G, out):
    """(batch, p, q) views with p <= q of the input and the output, and whether they are transposed."""
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        return G.mT, out.mT, True
    return G, out, False


def _inv_norms(X: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 (batch,) reciprocal of max(||X_i||_F, eps): the normalisation, fused into the kernels' loads."""
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), dtype=torch.float32)
    return norm.clamp(min=eps).reciprocal().contiguous()


def _run_triton(G, out, triples, eps):
    from sigvlp.kernels import newton_schulz as triton_ns  # noqa: PLC0415 (Triton loads on first use)

    X, Y, _ = _wide_work(G, out)
    triton_ns.newton_schulz(X, Y, _inv_norms(X, eps), triples)


def _run_cuda(G, out, triples, eps):
    X, Y, _ = _wide_work(G, out)
    X = X.contiguous()  # the tile loads read whole rows (a tall input is transposed once here)
    batch, p, q = X.shape
    inv = _inv_norms(X, eps)
    gram = torch.empty((batch, p, p), dtype=X.dtype, device=X.device)
    poly = torch.empty((batch, p, p), dtype=X.dtype, device=X.device)
    scratch0 = torch.empty((batch, p, q), dtype=X.dtype, device=X.device)
    scratch1 = Y if Y.is_contiguous() else torch.empty((batch, p, q), dtype=X.dtype, device=X.device)
    cuda_module.module().newton_schulz(
        x=cuda_module.ptr(X), out=cuda_module.ptr(Y), dtype=cuda_module.dtype_code(X.dtype), batch=batch, rows=p, cols=q,
        out_stride_batch=Y.stride(0), out_stride_row=Y.stride(1), out_stride_col=Y.stride(2),
        inv_norm=cuda_module.ptr(inv), coefficients=[float(v) for t in triples for v in t], steps=len(triples),
        gram=cuda_module.ptr(gram), poly=cuda_module.ptr(poly), scratch0=cuda_module.ptr(scratch0), scratch1=cuda_module.ptr(scratch1),
        stream=cuda_module.stream_ptr(X.device),
    )


# Auto order: Triton before CUDA here. The Triton GEMMs are software-pipelined (and use wgmma on
# Hopper); the CUDA kernels are plain WMMA tiles without cp.async stages, so until a GPU
# measurement says otherwise the Triton path is the expected faster one. backend="cuda" forces CUDA.
BACKENDS = BackendSet("newton_schulz", [
    Backend("triton", _run_triton),
    Backend("cuda", _run_cuda),
    Backend("torch", _run_torch, dtypes=_INPUT_DTYPES),
])


# ----------------------------------------------------------------------------- torch op


@torch.library.custom_op("sigvlp::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, steps: int, coefficients: list[float], eps: float,
                      backend: str) -> torch.Tensor:
    impl = BACKENDS.select(backend, device=G.device, dtype=G.dtype)
    out = empty_output(G.shape, G.dtype, G.device)
    m, n = G.shape[-2], G.shape[-1]
    if out.numel() == 0:
        return out
    triples = [tuple(coefficients[3 * i: 3 * i + 3]) for i in range(steps)]
    G3 = G.reshape(-1, m, n)
    impl.run(G3, out.view(-1, m, n), triples, eps)
    return out


@_newton_schulz_op.register_fake
def _(G, steps, coefficients, eps, backend):
    return torch.empty(G.shape, dtype=G.dtype, device=G.device)


_PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(G: torch.Tensor, precision: Optional[str]) -> torch.dtype:
    """The dtype the iteration's operands are held in (see the module docstring)."""
    if precision is None:
        if G.device.type == "cuda":
            return torch.bfloat16
        return torch.float64 if G.dtype == torch.float64 else torch.float32
    if precision == "input":
        return G.dtype
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: expected None, 'bf16', 'fp32' or 'input', got {precision!r}")
    return _PRECISIONS[precision]


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7, *,
                  backend: Optional[str] = None, precision: Optional[str] = None) -> torch.Tensor:
    """Orthogonalise each matrix of G (..., m, n) by `steps` Newton-Schulz iterations.

    coefficients: one (a, b, c) triple or a sequence of `steps` per-step triples. eps: the
    Frobenius norm is clamped at eps before dividing. backend: None/"auto", "torch", "triton"
    or "cuda" (keyword-only, as for every op). precision: None (bf16 operands on GPU, fp32 on
    CPU), "bf16", "fp32" or "input". Returns a tensor of G's shape and dtype. Makes no
    device-to-host copy. See the module docstring for semantics and precision. No autograd.
    Errors: TypeError/ValueError naming the argument; BackendError when the backend cannot serve G.
    """
    _checks.check_tensor(G, "G")
    if G.is_complex() or not G.dtype.is_floating_point:
        raise TypeError(f"G: expected a real floating-point tensor, got dtype {str(G.dtype).removeprefix('torch.')}")
    if G.dtype not in _INPUT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _INPUT_DTYPES)
        raise TypeError(f"G: expected dtype {names}, got {str(G.dtype).removeprefix('torch.')}")
    if G.dim() < 2:
        raise ValueError(f"G: expected a matrix or a batch of matrices (..., m, n), got shape {tuple(G.shape)}")
    if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    triples = resolve_coefficients(coefficients, steps)
    backend = resolve_request(backend, BACKENDS.names) if backend not in (None, "auto") else "auto"
    flat = [v for t in triples for v in t]
    work_dtype = compute_dtype(G, precision)
    out = _newton_schulz_op(G.to(work_dtype), int(steps), flat, float(eps), backend)
    return out.to(G.dtype)


# ----------------------------------------------------------------------------- registry


def _selftest_case(dtype, device, gen):
    """A batch of three wide 40 x 72 matrices and one tall 56 x 24 (handled as its transpose),
    5 steps of the default coefficients in the input's precision. No backward."""
    G = rand64(gen, 3, 40, 72).to(dtype)
    T = rand64(gen, 56, 24).to(dtype)

    def run(backend):
        return [newton_schulz(g.to(device), backend=backend, precision="input") for g in (G, T)], []

    def oracle():
        return [newton_schulz_reference(g.double()) for g in (G, T)], []

    return run, oracle


def _launch_survey(lengths, rows):
    for precision in ("bf16", "fp32"):
        newton_schulz(torch.randn(2, 256, 512), steps=1, backend="triton", precision=precision)


#: The Triton configurations gpu_check's GPU tests and benches launch (OpSpec.launch_configs), kwargs
#: of sigvlp.precompile's Newton-Schulz case: tests/test_newton_schulz.py (fp32 mode, batched and
#: not), tests/test_muon.py and the benches (bf16; one matrix, a batch, a tall one).
_GPU_LAUNCHES = (dict(precision="fp32", shape=(96, 160)), dict(precision="fp32", shape=(2, 96, 160)),
                 dict(precision="bf16", shape=(96, 160)), dict(precision="bf16", shape=(2, 96, 160)),
                 dict(precision="bf16", shape=(160, 96)))


SPEC = register(OpSpec(
    name="newton_schulz", backends=BACKENDS, selftest=_selftest_case, test_file="tests/test_newton_schulz.py",
    launch_survey=_launch_survey, launch_configs=_GPU_LAUNCHES, bench="benches/bench_newton_schulz.py", bench_cap_s=15,
    key_ratios=(KeyRatio("newton_schulz: ours vs torch.optim.Muon's NS", "newton_schulz", ("triton", "cuda"),
                         "torch_muon"),),
    interpreter_no_bf16_dot=True,
))
