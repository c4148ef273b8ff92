"""Newton-Schulz and Muon: time per backend against torch.optim.Muon's NS (addmm-based, bf16)
and torch.optim.Muon's whole step.

- NS (5 steps) on 768^2, 768x3072, 1024x4096, 4096^2 and a batch of 24 x 1024^2 (GPU, bf16);
  torch.optim.Muon's NS runs the batch as a loop of 24 calls, as its optimizer does.
- Batched vs looped NS over matrix sizes (the launch-bound regime of small matrices).
- The optimizer step on a ViT-L's matrix shapes (24 blocks, width 1024, MLP 4096: q, k, v, o,
  fc1, fc2 per block) against torch.optim.Muon.
Quick CPU mode (no GPU or SIGVLP_BENCH_QUICK=1): small sizes, torch (reference) backend, fp32.
TFLOP/s use the plain count 5 * (4 m^2 n + 2 m^3) for m <= n, whatever a kernel skips.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from sigvlp.ops import OPS, newton_schulz
from sigvlp.optim import KELLER_COEFFICIENTS, Muon

from _bench import timed

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

FULL_SHAPES = [(768, 768), (768, 3072), (1024, 4096), (4096, 4096), (24, 1024, 1024)]
QUICK_SHAPES = [(96, 96), (96, 384), (128, 512), (384, 384), (8, 128, 128)]


def _flops(shape, steps=5):
    batch = shape[0] if len(shape) == 3 else 1
    m, n = sorted(shape[-2:])
    return batch * steps * (4 * m * m * n + 2 * m**3)


def _providers(full):
    return ["torch_muon", "torch", "triton", "cuda"] if full else ["torch_muon", "torch"]


def _shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("provider", _providers(HAS_CUDA))
@pytest.mark.parametrize("index", range(5))
def test_newton_schulz_time(bench, benchmark, bench_report, full_mode, index, provider):
    shape = (FULL_SHAPES if full_mode else QUICK_SHAPES)[index]
    dtype = torch.bfloat16 if full_mode else torch.float32
    G = torch.randn(shape, device=DEVICE)
    benchmark.group = f"newton_schulz {_shape_id(shape)}"
    if provider == "torch_muon":
        mats = list(G) if G.dim() == 3 else [G]
        fn = lambda: [_zeropower_via_newtonschulz(g, KELLER_COEFFICIENTS, 5, 1e-7) for g in mats]  # noqa: E731
    else:
        Gd = G.to(dtype)
        reason = OPS["newton_schulz"].backends[provider].refusal(Gd.device, Gd.dtype)
        if reason:
            pytest.skip(reason)
        fn = lambda: newton_schulz(Gd, backend=provider)  # noqa: E731
    seconds = timed(benchmark, fn, rounds=10 if full_mode else 3, iterations=3 if full_mode else 1)
    key = ("ns", _shape_id(shape))
    if provider == "torch_muon":
        bench_report.baselines[key] = 1 / seconds
    speedup = bench_report.ratio(1 / seconds, key)
    # dtype: the iteration's operands (torch.optim.Muon's NS is bf16); x_vs_torch_muon = its time / ours
    bench.record(op="newton_schulz 5 steps", provider=provider, shape=_shape_id(shape),
                 dtype=torch.bfloat16 if provider == "torch_muon" else dtype, flops=_flops(shape),
                 baseline=None if provider == "torch_muon" else "torch_muon", x_vs_torch_muon=speedup)


@pytest.mark.parametrize("n", [32, 64, 128, 256])
def test_batched_vs_looped(bench, benchmark, bench_report, full_mode, n):
    """One batched call vs a loop of single calls on 24 n x n matrices (same backend)."""
    if full_mode:
        n *= 4  # 128 .. 1024 on a GPU
    dtype = torch.bfloat16 if full_mode else torch.float32
    G = torch.randn(24, n, n, device=DEVICE, dtype=dtype)
    mats = list(G)
    benchmark.group = f"ns batched vs loop {n}"
    timed(benchmark, lambda: newton_schulz(G), rounds=10 if full_mode else 3, iterations=3 if full_mode else 1)
    loop = _timed_loop(lambda: [newton_schulz(g) for g in mats], full_mode)
    op, shape = "newton_schulz 24 matrices, batched vs loop (auto backend)", f"24x{n}x{n}"
    bench.record(op=op, provider="loop", shape=shape, dtype=dtype, seconds=loop)
    bench.record(op=op, provider="batched", shape=shape, dtype=dtype, baseline="loop")


def _timed_loop(fn, full):
    import time

    fn()
    times = []
    for _ in range(5 if full else 3):
        if HAS_CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _vit_params(full):
    blocks, width, mlp = (24, 1024, 4096) if full else (4, 128, 512)
    g = torch.Generator().manual_seed(0)
    shapes = []
    for _ in range(blocks):
        shapes += [(width, width)] * 4 + [(mlp, width), (width, mlp)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, (blocks, width, mlp)


@pytest.mark.parametrize("provider", ["torch.optim.Muon", "sigvlp"] + (["sigvlp-triton", "sigvlp-cuda"] if HAS_CUDA else []))
def test_muon_step_vit_l(bench, benchmark, bench_report, full_mode, provider):
    params, (blocks, width, mlp) = _vit_params(full_mode)
    benchmark.group = "muon step"
    if provider == "torch.optim.Muon":
        opt = torch.optim.Muon(params, lr=0.02)
    else:
        backend = {"sigvlp": None, "sigvlp-triton": "triton", "sigvlp-cuda": "cuda"}[provider]
        if backend is not None:
            reason = OPS["newton_schulz"].backends[backend].refusal(params[0].device, torch.bfloat16)
            if reason:
                pytest.skip(reason)
        opt = Muon(params, lr=0.02, backend=backend)
    seconds = timed(benchmark, opt.step, rounds=10 if full_mode else 3, iterations=3 if full_mode else 1)
    key = ("muon_step",)
    if provider == "torch.optim.Muon":
        bench_report.baselines[key] = 1 / seconds
    # dtype: the NS operands; x_vs_torch = torch.optim.Muon's step time / ours
    bench.record(op="Muon optimizer step, ViT matrix shapes", provider=provider,
                 shape=f"{blocks} blocks w{width} mlp{mlp} ({len(params)} params)",
                 dtype=torch.bfloat16 if (HAS_CUDA or provider == "torch.optim.Muon") else torch.float32,
                 baseline=None if provider == "torch.optim.Muon" else "torch.optim.Muon",
                 x_vs_torch=bench_report.ratio(1 / seconds, key))
