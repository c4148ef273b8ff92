"""newton_schulz: backends against an fp64 SVD oracle, the spectrum band of the quintic,
Polar Express, zero input, op registration, and input validation.

The oracle is independent of the iteration: NS acts on each singular value separately, so
NS(G) = U p(S / ||G||_F) V^T with p the composed per-step polynomials, computed here from an
fp64 SVD.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from sigvlp.ops import BackendError, dispatch_log, newton_schulz, newton_schulz_reference
from sigvlp.optim import KELLER_COEFFICIENTS as KELLER
from sigvlp.optim import POLAR_EXPRESS_COEFFICIENTS as POLAR_EXPRESS
from sigvlp.optim import POLAR_EXPRESS_NORM
from sigvlp.optim import POLAR_EXPRESS_PUBLISHED_COEFFICIENTS as POLAR_EXPRESS_RAW

from sigvlp.ops.tolerances import max_err, newton_schulz_low_precision, rel_err, tolerance

from _no_sync import HostReadError, forbid_host_reads, no_cuda_sync, two_gpus

ns_module = importlib.import_module("sigvlp.ops.newton_schulz")
HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = ["torch", "triton"]  # triton runs in the interpreter without a GPU


def _poly(s, triples):
    for a, b, c in triples:
        s = a * s + b * s**3 + c * s**5
    return s


def _exact(G: torch.Tensor, steps=5, coefficients=KELLER, eps=1e-7) -> torch.Tensor:
    """fp64 NS via the SVD: U p(S / max(||G||_F, eps)) V^T, per matrix of the batch."""
    triples = ns_module.resolve_coefficients(coefficients, steps)
    G64 = G.detach().double().cpu()
    U, S, Vh = torch.linalg.svd(G64, full_matrices=False)
    norm = torch.linalg.vector_norm(G64, dim=(-2, -1), keepdim=True).squeeze(-1).clamp(min=eps)
    return (U * _poly(S / norm, triples).unsqueeze(-2)) @ Vh


def _random(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _with_spectrum(m, n, svals, seed=0):
    """An (m, n) fp64 matrix with the given singular values and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(svals, dtype=torch.float64)) @ V.T


def _floor_run(G, dtype=torch.float32, steps=5, coefficients=KELLER):
    """NS(G) by the spec's plain iteration at `dtype` (tolerances.newton_schulz_low_precision):
    the precision floor, independent of every backend's code."""
    return newton_schulz_low_precision(G, ns_module.resolve_coefficients(coefficients, steps), dtype)


SHAPES = {
    "square": (48, 48),
    "wide": (40, 72),
    "tall": (72, 40),
    "batched": (3, 16, 40),
    "batched-tall-ragged": (2, 2, 37, 21),
    "many-tiles": (100, 120),
}


# ----------------------------------------------------------------------------- the spec itself


def test_fp64_reference_matches_svd_oracle():
    for name, shape in SHAPES.items():
        G = _random(shape, seed=1, dtype=torch.float64)
        err = max_err(newton_schulz_reference(G), _exact(G))
        assert err < 1e-10, (name, err)


def test_quintic_band_is_what_we_assert():
    """The band used below, from the scalar map itself: s >= 0.003 ends within [0.68, 1.21]."""
    s = np.linspace(0.003, 1.0, 200001)
    out = _poly(s, [KELLER] * 5)
    assert 0.68 < out.min() < 0.69 and 1.20 < out.max() < 1.21
    out_pe = _poly(s / POLAR_EXPRESS_NORM, POLAR_EXPRESS_RAW)
    assert 0.85 < out_pe.min() and out_pe.max() < 1.15


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(48, 48), (32, 80), (80, 32)], ids=["square", "wide", "tall"])
def test_singular_values_land_in_the_band(backend, shape):
    m, n = shape
    k = min(m, n)
    # Singular values spread over two decades, the smallest ~0.004 ||G||_F.
    svals = torch.logspace(0, -2, k, dtype=torch.float64)
    G = _with_spectrum(m, n, svals, seed=2)
    G = G / torch.linalg.vector_norm(G) * 7.0  # the scale does not matter (normalised)
    rel = svals / torch.linalg.vector_norm(svals)
    assert rel.min() >= 0.003
    out = newton_schulz(G.float(), backend=backend)
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.68 - 1e-3 and sv.max() < 1.21 + 1e-3, (sv.min().item(), sv.max().item())
    # ... and each one is where the scalar polynomial sends it (fp32 precision).
    expected = torch.sort(_poly(rel, [KELLER] * 5), descending=True).values
    assert torch.allclose(sv, expected, atol=2e-4), max_err(sv, expected)


def test_scale_invariance_and_transpose():
    G = _random((24, 56), seed=3)
    out = newton_schulz(G, backend="torch")
    assert max_err(newton_schulz(G * 1000.0, backend="torch"), out) < 1e-5
    assert max_err(newton_schulz(G.T.contiguous(), backend="torch"), out.T) < 1e-6


# ----------------------------------------------------------------------------- backends vs fp64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_matches_fp64_oracle(backend, name):
    G = _random(SHAPES[name], seed=4)
    out = newton_schulz(G, backend=backend)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) elements"
    exact = _exact(G)
    # fp32 floor: the error of the spec's iteration run in fp32 by tests' own code (not a backend's);
    # every backend may be at most 2x it (+ tiny slack).
    floor = max_err(_floor_run(G), exact)
    err = max_err(out, exact)
    assert floor < 1e-4
    assert err <= 2 * floor + 1e-6, (err, floor)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    base = _random((2, 40, 64), seed=5)
    views = [base[:, ::2, :48], base.transpose(-1, -2)[:, :, :30], base[1]]
    for G in views:
        assert not G.is_contiguous() or G.dim() == 2
        out = newton_schulz(G, backend=backend)
        assert max_err(out, _exact(G)) < 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_matrix_gives_zeros(backend):
    G = _random((3, 16, 24), seed=6)
    G[1] = 0.0
    out = newton_schulz(G, backend=backend)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1], torch.zeros(16, 24))
    assert max_err(out[0], _exact(G[0])) < 1e-4 and max_err(out[2], _exact(G[2])) < 1e-4
    assert torch.equal(newton_schulz(torch.zeros(20, 12), backend=backend), torch.zeros(20, 12))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_schedules_and_step_counts(backend):
    G = _random((20, 36), seed=7)
    # A per-step schedule equals running its steps one by one.
    sched = [(3.0, -3.2, 1.2), KELLER, (2.0, -1.5, 0.5)]
    out = newton_schulz(G, steps=3, coefficients=sched, backend=backend)
    assert max_err(out, _exact(G, 3, sched)) < 1e-4
    # steps=0: the normalised input; steps=1; a repeated single triple.
    assert max_err(newton_schulz(G, steps=0, backend=backend), G / torch.linalg.vector_norm(G)) < 1e-6
    assert max_err(newton_schulz(G, steps=1, backend=backend), _exact(G, 1)) < 1e-5
    assert max_err(newton_schulz(G, steps=2, coefficients=[KELLER, KELLER], backend=backend),
                    newton_schulz(G, steps=2, backend=backend)) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_polar_express(backend):
    m, n = 32, 48
    svals = torch.logspace(0, -2.5, m, dtype=torch.float64)
    G = _with_spectrum(m, n, svals, seed=8)
    out = newton_schulz(G.float(), steps=5, coefficients=POLAR_EXPRESS, backend=backend)
    # The published form: X / (||X|| * 1.02 + 1e-6) and the raw coefficients, in fp64.
    X = G / (torch.linalg.vector_norm(G) * POLAR_EXPRESS_NORM + 1e-6)
    for a, b, c in POLAR_EXPRESS_RAW:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    assert max_err(out, X) < 1e-4
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.84 and sv.max() < 1.15, (sv.min().item(), sv.max().item())
    # Polar Express is much closer to orthogonal than the fixed quintic on the same input.
    sv_k = torch.linalg.svdvals(newton_schulz(G.float(), backend=backend).double())
    assert (sv - 1).abs().max() < 0.5 * (sv_k - 1).abs().max()


def test_reduced_precision_on_cpu_reference():
    """bf16 / fp16 inputs keep their dtype; the error vs fp64, relative to the largest value, is
    within the op's bound of sigvlp.ops.tolerances (a multiple of the dtype's unit roundoff)."""
    G = _random((32, 64), seed=9)
    exact = _exact(G)
    for dtype in (torch.bfloat16, torch.float16):
        out = newton_schulz(G.to(dtype), backend="torch", precision="input")
        assert out.dtype == dtype
        err = rel_err(out, exact)
        assert err <= tolerance("newton_schulz", "torch", dtype), (dtype, err)


def test_matches_torch_muon_bf16_iteration():
    """In bf16 the torch backend runs torch.optim.Muon's iteration (norm kept in fp32)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    G = _random((48, 96), seed=10)
    ours = newton_schulz(G.bfloat16(), backend="torch", precision="input")
    assert torch.equal(newton_schulz(G, backend="torch", precision="bf16"),
                       newton_schulz(G.bfloat16(), backend="torch", precision="input").to(G.dtype))
    theirs = _zeropower_via_newtonschulz(G, KELLER, 5, 1e-7)
    exact = _exact(G)
    assert max_err(ours, theirs) <= 0.05
    assert max_err(ours, exact) <= 1.5 * max_err(theirs, exact) + 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_single_row(backend):
    assert newton_schulz(torch.zeros(0, 8, 8), backend=backend).shape == (0, 8, 8)
    assert newton_schulz(torch.zeros(4, 0, 8), backend=backend).shape == (4, 0, 8)
    G = _random((2, 1, 20), seed=11)
    out = newton_schulz(G, backend=backend)
    assert max_err(out, _exact(G)) < 1e-5


# ----------------------------------------------------------------------------- op registration


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    op = torch.ops.sigvlp.newton_schulz.default
    coeffs = list(KELLER) * 2
    for G in (_random((20, 36), seed=12), _random((2, 24, 16), seed=13)):
        torch.library.opcheck(op, (G, 2, coeffs, 1e-7, backend))


def test_torch_compile_fullgraph():
    G = _random((2, 16, 24), seed=14)

    def f(g):
        return newton_schulz(g * 2.0, steps=3, coefficients=POLAR_EXPRESS[:3], backend="torch").sum(0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(G), f(G))


def test_backend_refusals():
    G = _random((8, 8), seed=15)
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="cuda"):
            newton_schulz(G, backend="cuda")
    with pytest.raises(BackendError, match="float64"):
        newton_schulz(G.double(), backend="triton")
    with pytest.raises(ValueError, match="^backend:"):
        newton_schulz(G, backend="cublas")


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    G = _random((8, 12), seed=16)
    with pytest.raises(ValueError, match="^G:.*shape"):
        newton_schulz(torch.ones(8))
    with pytest.raises(TypeError, match="^G:.*complex"):
        newton_schulz(torch.ones(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="^G:"):
        newton_schulz(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="^G:"):
        newton_schulz(np.ones((4, 4)))
    with pytest.raises(ValueError, match="^coefficients: empty"):
        newton_schulz(G, coefficients=[])
    with pytest.raises(ValueError, match="^coefficients:.*3 numbers"):
        newton_schulz(G, coefficients=(1.0, 2.0))
    with pytest.raises(TypeError, match=r"^coefficients\[1\]"):
        newton_schulz(G, steps=2, coefficients=[KELLER, (1.0, 2.0)])
    with pytest.raises(ValueError, match="^coefficients:.*steps=5"):
        newton_schulz(G, steps=3, coefficients=POLAR_EXPRESS)
    with pytest.raises(ValueError, match="^coefficients:.*finite"):
        newton_schulz(G, coefficients=(float("nan"), 1.0, 1.0))
    with pytest.raises(TypeError, match="^coefficients:"):
        newton_schulz(G, coefficients="abc")
    with pytest.raises(ValueError, match="^steps:"):
        newton_schulz(G, steps=-1)
    with pytest.raises(ValueError, match="^steps:"):
        newton_schulz(G, steps=100)
    with pytest.raises(TypeError, match="^steps:"):
        newton_schulz(G, steps=2.0)
    with pytest.raises(ValueError, match="^eps:"):
        newton_schulz(G, eps=0.0)


# ----------------------------------------------------------------------------- GPU logic, on CPU too
# The GPU tests' logic runs on the CPU as well (torch backend, Triton interpreter; smaller shapes),
# so precision mix-ups (fp32 bounds on bf16 results) fail here and not first on a GPU.


def _device_backends():
    """(device, backend) pairs: CPU with torch and Triton (interpreter), GPU with Triton and CUDA."""
    cpu = [pytest.param("cpu", b, id=f"cpu-{b}") for b in CPU_BACKENDS]
    gpu = [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu) for b in ("triton", "cuda")]
    return cpu + gpu


def _shapes(device, gpu_shapes, cpu_shapes):
    return gpu_shapes if device == "cuda" else cpu_shapes


def _low_dtype(device, backend):
    """bf16, except under the Triton interpreter, whose tl.dot multiplies bf16 bit patterns as
    integers (an interpreter limitation, no GPU does this): there fp16 runs the same kernel path
    (operands in the buffers' 16-bit dtype, fp32 accumulation)."""
    return torch.float16 if (device, backend) == ("cpu", "triton") else torch.bfloat16


@pytest.mark.parametrize("device, backend", _device_backends())
def test_fp32_mode_matches_fp64(device, backend):
    """precision="fp32" on every device: error at the fp32 floor (the spec's iteration in fp32)."""
    for shape in _shapes(device, [(256, 256), (192, 640), (640, 192), (5, 130, 300), (3, 1, 64)],
                         [(40, 40), (24, 72), (72, 24), (3, 20, 44), (3, 1, 16)]):
        G = _random(shape, seed=20).to(device)
        out = newton_schulz(G, backend=backend, precision="fp32")
        exact = _exact(G)
        floor = max_err(_floor_run(G), exact)
        assert out.dtype == torch.float32 and not torch.isnan(out).any()
        assert max_err(out, exact) <= 4 * floor + 1e-5, (shape, max_err(out, exact), floor)


@pytest.mark.parametrize("device, backend", _device_backends())
def test_bf16_at_torch_precision(device, backend):
    """bf16 operands, fp32 accumulation: error vs fp64 comparable to torch's own bf16 iteration
    (torch.optim.Muon's), and far above the fp32 floor (so the bound tells the modes apart).
    (fp16 under the Triton interpreter, against the spec's iteration run in fp16.)"""
    from torch.optim._muon import _zeropower_via_newtonschulz

    low = _low_dtype(device, backend)
    for shape in _shapes(device, [(768, 768), (512, 2048), (2048, 512), (24, 128, 128), (7, 200, 333)],
                         [(48, 48), (32, 96), (96, 32), (3, 32, 32)]):
        G = _random(shape, seed=21).to(device)
        exact = _exact(G)
        out = newton_schulz(G.to(low), backend=backend, precision="input")
        assert out.dtype == low and not torch.isnan(out).any()
        if low == torch.bfloat16:
            G2 = G.reshape(-1, *G.shape[-2:]).cpu()
            theirs = torch.stack([_zeropower_via_newtonschulz(g, KELLER, 5, 1e-7) for g in G2]).reshape(G.shape)
        else:
            theirs = _floor_run(G, low)
        floor = max_err(theirs, exact)
        err = max_err(out, exact)
        assert err <= 1.5 * floor + 1e-3, (shape, err, floor)
        assert floor > 10 * max_err(_floor_run(G), exact)
        sv = torch.linalg.svdvals((out if out.dim() == 2 else out[0]).double().cpu())
        assert sv.max() < 1.3


@pytest.mark.parametrize("device, backend", _device_backends())
def test_zero_matrices_in_a_batch(device, backend):
    G = torch.zeros(4, 32, 48, device=device, dtype=_low_dtype(device, backend))
    G[2] = 1.0
    out = newton_schulz(G, backend=backend, precision="input")
    assert not torch.isnan(out).any() and torch.equal(out[0], torch.zeros_like(out[0]))
    # A rank-one matrix: NS maps its one singular value s = 1 (after normalisation) to p(1).
    exact = _exact(G[2].float())
    assert max_err(out[2], exact) <= 0.02 * exact.abs().max().item()


def test_auto_picks_torch_on_cpu():
    """backend=None on a CPU tensor runs the torch backend: the dispatch log names what ran."""
    G = _random((8, 8), seed=23)
    with dispatch_log() as log:
        out = newton_schulz(G)
    assert log == [("newton_schulz", "torch")]
    assert torch.equal(out, newton_schulz(G, backend="torch"))


@pytest.mark.gpu
def test_gpu_auto_picks_a_gpu_backend(monkeypatch):
    """auto on a CUDA tensor runs a GPU kernel backend, never the torch reference."""
    G = _random((64, 96), seed=24).cuda().bfloat16()
    chosen = ns_module.BACKENDS.select(None, device=G.device, dtype=G.dtype)
    assert chosen.name in ("triton", "cuda")
    calls = []
    real = ns_module.BackendSet.select

    def spy(self, *args, **kwargs):
        backend = real(self, *args, **kwargs)
        calls.append(backend.name)
        return backend

    monkeypatch.setattr(ns_module.BackendSet, "select", spy)
    newton_schulz(G)
    assert calls == [chosen.name]


@pytest.mark.parametrize("device, backend", _device_backends())
def test_batch_beyond_grid_limit(device, backend, monkeypatch):
    """Batches larger than CUDA's grid.y limit go in chunks (the limit made small on the CPU)."""
    if device == "cuda":
        G = _random((70000, 2, 16), seed=22).cuda()
    else:
        if backend == "triton":
            monkeypatch.setattr(importlib.import_module("sigvlp.kernels.newton_schulz"), "_MAX_GRID_Y", 3)
        G = _random((8, 2, 16), seed=22)
    out = newton_schulz(G, steps=2, backend=backend, precision="fp32")
    assert max_err(out, _exact(G, 2)) < 1e-5


# ----------------------------------------------------------------------------- host syncs, devices


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fast_path_reads_nothing_back(backend):
    """The op calls no Tensor.item / tolist / cpu / __bool__ / nonzero...: nothing read back."""
    G = _random((3, 20, 36), seed=30)
    with forbid_host_reads():
        out = newton_schulz(G, backend=backend)
        zero = newton_schulz(torch.zeros(2, 8, 8), steps=0, backend=backend)
    assert max_err(out, _exact(G)) < 1e-4 and torch.equal(zero, torch.zeros(2, 8, 8))
    with forbid_host_reads(), pytest.raises(HostReadError):  # control: the guard does catch reads
        bool(newton_schulz(G, backend=backend).isfinite().all())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_no_host_sync(backend):
    G = _random((4, 200, 333), seed=31).cuda()
    newton_schulz(G, backend=backend)  # warm-up: compilation
    with no_cuda_sync():
        out = newton_schulz(G, backend=backend, precision="fp32")
    assert max_err(out, _exact(G)) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_runs_on_the_tensors_device(backend):
    """A matrix on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device guard)."""
    G = _random((4, 200, 333), seed=32)
    expected = newton_schulz(G.to("cuda:0"), backend=backend).cpu()
    with torch.cuda.device(0):
        out = newton_schulz(G.to("cuda:1"), backend=backend)
        assert torch.cuda.current_device() == 0
    assert out.device == torch.device("cuda:1") and torch.equal(out.cpu(), expected)


def test_precision_option():
    """Default: fp32 operands on CPU (more accurate than bf16); bf16 on request; bad values named."""
    G = _random((24, 40), seed=11)
    exact = _exact(G)
    default = newton_schulz(G.bfloat16(), backend="torch")
    assert default.dtype == torch.bfloat16
    fp32_err = max_err(newton_schulz(G.float(), backend="torch"), exact)
    bf16_err = max_err(newton_schulz(G.float(), backend="torch", precision="bf16"), exact)
    assert fp32_err < 1e-5 < bf16_err
    # bf16 input on CPU is computed in fp32 by default, so only the final rounding remains.
    assert max_err(default, exact) < 0.5 * max_err(newton_schulz(G.bfloat16(), backend="torch",
                                                                   precision="input"), exact)
    with pytest.raises(ValueError, match="precision"):
        newton_schulz(G, precision="tf32")
