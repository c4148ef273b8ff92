"""rope3d throughput: effective GB/s (bytes read + written) per backend, against the torch
reference, a plain device copy (the bandwidth ceiling) and flash-attn's apply_rotary_emb
(1-D positions, cos/sin tables) when installed. Full sizes on a GPU, small ones on CPU."""

from __future__ import annotations

import pytest
import torch

from sigvlp.ops import OPS, cu_seqlens_from_lengths, rope3d

from _bench import timed

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _case(full: bool, dtype: torch.dtype):
    # A packed batch of CT chunks: grids of T x 16 x 16 patch tokens (256-voxel slices, 16^3 patches).
    ts = [4, 7, 12, 24, 40] * (24 if full else 1)
    heads, head_dim = (16, 64) if full else (4, 64)
    hw = 16 if full else 8
    grid = torch.tensor([[t, hw, hw] for t in ts], dtype=torch.int32, device=DEVICE)
    lengths = [t * hw * hw for t in ts]
    x = torch.randn(sum(lengths), heads, head_dim, device=DEVICE, dtype=dtype)
    return x, cu_seqlens_from_lengths(lengths, DEVICE), grid


def _dtypes(full):
    return [torch.bfloat16, torch.float16, torch.float32] if full else [torch.float32]


def _providers(full):
    names = ["torch"]
    if HAS_CUDA:
        names = ["copy", "torch", "cuda", "triton", "flash_attn_1d"]  # baselines first
    return names


@pytest.mark.parametrize("provider", _providers(HAS_CUDA))
@pytest.mark.parametrize("dtype", _dtypes(HAS_CUDA), ids=str)
def test_rope3d_bandwidth(bench, benchmark, bench_report, full_mode, provider, dtype):
    x, cu, grid = _case(full_mode, dtype)
    nbytes = 2 * x.numel() * x.element_size()  # read x, write the result
    benchmark.group = f"rope3d {str(dtype).removeprefix('torch.')}"
    if provider == "copy":
        out = torch.empty_like(x)
        fn = lambda: out.copy_(x)  # noqa: E731
    elif provider == "flash_attn_1d":
        flash_rotary = pytest.importorskip("flash_attn.layers.rotary")
        half = x.shape[-1] // 2
        pos = torch.arange(x.shape[0], device=DEVICE, dtype=torch.float32)
        freqs = torch.outer(pos, 10000.0 ** (-torch.arange(half, device=DEVICE) / half))
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        xb = x[None]
        fn = lambda: flash_rotary.apply_rotary_emb(xb, cos, sin)  # noqa: E731
        nbytes += 2 * cos.numel() * cos.element_size()
    else:
        reason = OPS["rope3d"].backends[provider].refusal(x.device, x.dtype, head_dim=x.shape[-1])
        if reason:
            pytest.skip(reason)
        fn = lambda: rope3d(x, cu, grid, backend=provider)  # noqa: E731
    seconds = timed(benchmark, fn, rounds=10 if HAS_CUDA else 3, iterations=5 if HAS_CUDA else 1)
    gbps = nbytes / seconds / 1e9
    dname = str(dtype).removeprefix("torch.")
    if provider in ("copy", "torch"):
        bench_report.baselines[("rope3d", dname, provider)] = gbps
    vs_copy = bench_report.ratio(gbps, ("rope3d", dname, "copy"))
    bench.record(op="rope3d", provider=provider, shape="x".join(map(str, x.shape)), dtype=dtype, bytes=nbytes,
                 baseline=None if provider in ("copy", "torch") else "torch",
                 pct_of_copy=None if vs_copy is None else 100 * vs_copy)
