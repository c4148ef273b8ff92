"""rope_attention_varlen throughput: TFLOP/s (FlashAttention convention), ratios to baselines and
peak memory, for forward, backward and forward+backward.

Providers (baselines first):
- sdpa_padded: SDPA on the sequences padded to one length, no rope: dense speed-of-light reference
  (its TFLOP/s counts its own padded FLOPs);
- rope3d+varlen_attn: sigvlp rope3d on q and k, then torch.nn.attention.varlen.varlen_attn (FA2);
- rope3d+flash_attn / rope3d+xformers: the same pipeline with flash_attn_varlen_func or xformers'
  BlockDiagonalMask, when installed;
- rope3d+flex: rope3d, then FlexAttention with a document mask (RoPE is not a score_mod);
- hf_rotary+varlen_attn / hf_rotary+flash_attn: the common unfused pipeline of vision encoders
  (as Hugging Face's Qwen2-VL / Qwen3-VL vision code does it): cos/sin of shape (tokens, head_dim)
  built once per forward (untimed, as a model builds them once for all layers), q and k rotated in
  PyTorch in fp32 (x * cos + rotate_half(x) * sin, cast back), then torch's varlen attention or
  flash_attn_varlen_func. Public fused-RoPE attention kernels for vision encoders quote their
  speedups against this pipeline;
- sigvlp: the fused Triton kernel (rotation inside, nothing rotated stored);
- sigvlp_cuda: the fused CUDA C++ kernel (csrc/attention.cu), also compared with sigvlp (Triton).
On CPU (quick mode) only the torch reference backend runs, on tiny sizes, so the file stays exercised.
Numbers are reported, never asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sigvlp.ops import cu_seqlens_from_lengths, rope3d, rope_attention_varlen
from sigvlp.ops.rope import default_sections, grid_positions, rotary_angles

from _bench import peak_memory, timed

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
FULL_CASES = {
    "16k=1x16k": [16384],
    "16k=mixed": [1024, 2048, 4096, 8192, 1024],
    "64k=mixed": [32768, 16384, 8192, 4096, 2048, 1024, 1024],
}
QUICK_CASES = {"tiny=mixed": [64, 200, 17, 0, 1]}
#: Qwen3-VL-like vision-encoder images (one sequence of 32^2, 48^2, 64^2, 96^2 patches), head_dim 64
#: and 128 (Qwen3-VL's 72 is not supported), against the optimized and the common unfused pipeline.
VISION_CASES = {f"vision-{n}": [n] for n in (1024, 2304, 4096, 9216)}
VISION_PROVIDERS = ("rope3d+varlen_attn", "hf_rotary+varlen_attn", "hf_rotary+flash_attn", "sigvlp", "sigvlp_cuda")
MODES = ("fwd", "bwd", "fwd+bwd")
BASELINES = ("sdpa_padded", "rope3d+varlen_attn", "rope3d+flash_attn", "rope3d+xformers", "rope3d+flex",
             "hf_rotary+varlen_attn", "hf_rotary+flash_attn")


def _providers():
    return list(BASELINES[:5]) + ["sigvlp", "sigvlp_cuda"] if HAS_CUDA else ["torch"]


def _case(lengths, head_dim, dtype):
    nheads = (2048 if HAS_CUDA else 128) // head_dim  # hidden 2048 (FA benchmarks); tiny on CPU
    total = sum(lengths)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=g)

    q, k, v = rnd(total, nheads, head_dim), rnd(total, nheads, head_dim), rnd(total, nheads, head_dim)
    cu = cu_seqlens_from_lengths(lengths)
    # CT chunks: T slices of 16 x 16 patches when the length allows it, else a T x 1 x 1 line.
    grid = torch.tensor([[n // 256, 16, 16] if n % 256 == 0 else [n, 1, 1] for n in lengths], dtype=torch.int32)
    return q, k, v, cu.to(DEVICE), grid.to(DEVICE)


def _varlen_attn(q, k, v, cu, max_len):
    from torch.nn.attention.varlen import varlen_attn

    try:
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, -1))
    except TypeError:  # older signature
        return varlen_attn(q, k, v, cu, cu, max_len, max_len)


def _hf_rotary(q, cu, grid):
    """The common unfused rotation (a function of q, k): cos/sin (tokens, 1, head_dim) computed here,
    once; rotate(x) = x * cos + rotate_half(x) * sin in fp32, cast back (halves layout, as rope3d)."""
    head_dim = q.shape[-1]
    angles = rotary_angles(grid_positions(cu, grid, q.shape[0]), default_sections(head_dim), head_dim, 10000.0)
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    cos, sin = angles.cos(), angles.sin()

    def rotate(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    return rotate


def _attention_fn(provider, q, k, v, cu, grid, lengths):
    """A callable computing the attention output from leaf tensors q, k, v (None: unavailable)."""
    max_len = max(lengths)
    if provider.startswith("hf_rotary+"):
        attend = _unfused_attention(provider.removeprefix("hf_rotary+"))
        if attend is None:
            return None
        rotate = _hf_rotary(q, cu, grid)
        return lambda: attend(rotate(q), rotate(k), v, cu, max_len)
    if provider in ("sigvlp", "sigvlp_cuda", "torch"):
        backend = {"sigvlp": "triton", "sigvlp_cuda": "cuda", "torch": "torch"}[provider]
        return lambda: rope_attention_varlen(q, k, v, cu, max_len, grid, backend=backend)

    def rotated():
        return rope3d(q, cu, grid), rope3d(k, cu, grid)

    if provider == "rope3d+varlen_attn":
        try:
            import torch.nn.attention.varlen  # noqa: F401
        except ImportError:
            return None

        def run():
            qr, kr = rotated()
            return _varlen_attn(qr, kr, v, cu, max_len)
        return run
    if provider == "rope3d+flash_attn":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return None

        def run():
            qr, kr = rotated()
            return flash_attn_varlen_func(qr, kr, v, cu, cu, max_len, max_len)
        return run
    if provider == "rope3d+xformers":
        try:
            from xformers.ops import fmha
        except ImportError:
            return None
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([n for n in lengths if n > 0])

        def run():
            qr, kr = rotated()
            return fmha.memory_efficient_attention(qr[None], kr[None], v[None], attn_bias=bias)[0]
        return run
    if provider == "rope3d+flex":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            return None
        total = q.shape[0]
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device), output_size=total)

        def document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        block_mask = create_block_mask(document, None, None, total, total, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)

        def run():
            qr, kr = rotated()
            out = flex(qr.transpose(0, 1)[None], kr.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask)
            return out[0].transpose(0, 1)
        return run
    raise ValueError(provider)


def _unfused_attention(name):
    """attend(q, k, v, cu, max_len) of torch's varlen attention or flash-attn (None: not installed)."""
    if name == "varlen_attn":
        try:
            import torch.nn.attention.varlen  # noqa: F401  (torch >= 2.9 only)
        except ImportError:
            return None
        return _varlen_attn
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: PLC0415  (optional package)
    except ImportError:
        return None
    return lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)


def _padded_sdpa(lengths, head_dim, dtype):
    nheads = (2048 if HAS_CUDA else 128) // head_dim
    batch, length = len([n for n in lengths if n]), max(lengths)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, nheads, length, head_dim, device=DEVICE, dtype=dtype, generator=g)
               .requires_grad_() for _ in range(3))
    return (q, k, v), (lambda: F.scaled_dot_product_attention(q, k, v)), 4.0 * batch * length ** 2 * nheads * head_dim


def _cases(full):
    return FULL_CASES if full else QUICK_CASES


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(FULL_CASES) + list(QUICK_CASES))
def test_rope_attention_varlen_throughput(bench, benchmark, bench_report, full_mode, case, head_dim, mode,
                                         provider):
    cases = _cases(full_mode)
    if case not in cases:
        pytest.skip("size not in this mode")
    _measure(bench, benchmark, bench_report, case, cases[case], head_dim, mode, provider)


VISION_QUICK = {"vision-tiny": [64]}


@pytest.mark.parametrize("provider", VISION_PROVIDERS if HAS_CUDA else ("torch",))
@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(VISION_CASES) + list(VISION_QUICK))
def test_vision_encoder_shapes(bench, benchmark, bench_report, full_mode, case, head_dim, mode, provider):
    """One image per call at Qwen3-VL-like token counts: fused vs the optimized (rope3d kernel +
    varlen attention) and the common (rotary in PyTorch + varlen attention) unfused pipelines."""
    cases = VISION_CASES if full_mode else VISION_QUICK
    if case not in cases:
        pytest.skip("size not in this mode")
    _measure(bench, benchmark, bench_report, case, cases[case], head_dim, mode, provider)


def _measure(bench, benchmark, bench_report, case, lengths, head_dim, mode, provider):
    """Time `provider` on one case and record TFLOP/s, peak memory and the ratios to the baselines."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    if provider == "sdpa_padded":
        leaves, attn, flops_fwd = _padded_sdpa(lengths, head_dim, dtype)
    else:
        q, k, v, cu, grid = _case(lengths, head_dim, dtype)
        leaves = tuple(x.requires_grad_() for x in (q, k, v))
        attn = _attention_fn(provider, *leaves, cu, grid, lengths)
        if attn is None:
            pytest.skip(f"{provider} is not installed")
        flops_fwd = 4.0 * sum(n * n for n in lengths) * q.shape[1] * head_dim
    flops = flops_fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    benchmark.group = f"attention {case} d={head_dim} {mode}"

    out = attn()
    dout = torch.randn_like(out)
    if mode == "fwd":
        fn = attn
    elif mode == "bwd":
        fn = lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(attn(), leaves, dout)  # noqa: E731
    peak_bytes = peak_memory(fn)
    peak = None if peak_bytes is None else peak_bytes / 2 ** 20
    seconds = timed(benchmark, fn, rounds=10 if HAS_CUDA else 2, iterations=3 if HAS_CUDA else 1)
    tflops = flops / seconds / 1e12
    key = ("attention", case, head_dim, mode)
    bench_report.baselines[key + (provider,)] = tflops
    ratios = {}
    if provider in ("sigvlp", "sigvlp_cuda", "torch"):
        for base in BASELINES + (("sigvlp",) if provider == "sigvlp_cuda" else ()):
            ratio = bench_report.ratio(tflops, key + (base,))
            if ratio is not None:
                ratios[f"x_vs_{base}"] = ratio
    # TFLOP/s: FA convention (bwd 2.5x, fwd+bwd 3.5x the forward); x_vs_*: TFLOP/s ratios
    bench.record(op=f"rope_attention_varlen {mode}", provider=provider, shape=f"{case} d={head_dim}", dtype=dtype,
                 flops=flops, peak_bytes=None if peak is None else peak * 2**20,
                 baseline="rope3d+varlen_attn" if provider in ("sigvlp", "sigvlp_cuda") else None, **ratios)


# ----------------------------------------------------------------------------- cross form

# (query lengths, key lengths) per sequence. "map": MAP pooling, one probe query per CT chunk,
# no rotation; "cross-1/4": q rotated by its grid against four times as many keys (positions).
CROSS_FULL = {
    "map-16x(1k..16k)": ([1] * 16, [1024, 2048, 4096, 8192, 16384, 1024, 3072, 5120] * 2),
    "cross-1/4": ([256, 512, 1024, 2048], [1024, 2048, 4096, 8192]),
}
CROSS_QUICK = {"map-tiny": ([1, 1, 1], [64, 200, 17]), "cross-tiny": ([16, 8], [64, 40])}


def _cross_case(lengths_q, lengths_k, head_dim, dtype, rotate):
    nheads = (2048 if HAS_CUDA else 128) // head_dim
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(n):
        return torch.randn(n, nheads, head_dim, device=DEVICE, dtype=dtype, generator=g).requires_grad_()

    def cu(lengths):
        return cu_seqlens_from_lengths(lengths, DEVICE)

    q, k, v = rnd(sum(lengths_q)), rnd(sum(lengths_k)), rnd(sum(lengths_k))
    kw = dict(cu_seqlens_k=cu(lengths_k), max_seqlen_k=max(lengths_k))
    if rotate:
        kw["grid_thw"] = torch.tensor([[n, 1, 1] for n in lengths_q], dtype=torch.int32, device=DEVICE)
        kw["positions_k"] = torch.rand(k.shape[0], 3, device=DEVICE, generator=g) * 64
    return (q, k, v), cu(lengths_q), kw


def _cross_fn(provider, leaves, cu_q, kw, lengths_q, lengths_k):
    """Cross attention without rotation for the baselines (rotation is sigvlp-only here: the
    "map" cases have none, so the comparison is like for like there)."""
    q, k, v = leaves
    max_q, max_k = max(lengths_q), max(lengths_k)
    cu_k = kw["cu_seqlens_k"]
    if provider in ("sigvlp", "torch"):
        backend = "triton" if provider == "sigvlp" else "torch"
        return lambda: rope_attention_varlen(q, k, v, cu_q, max_q, backend=backend, **kw)
    if provider == "varlen_attn":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        return lambda: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
    if provider == "flash_attn":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return None
        return lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
    if provider == "sdpa_padded_mask":  # what a MultiheadAttention pooling head does: pad keys, mask
        b = len(lengths_k)
        keep = torch.arange(max_k, device=q.device)[None, :] < torch.tensor(lengths_k, device=q.device)[:, None]
        index = torch.cat([torch.arange(n, device=q.device) + i * max_k for i, n in enumerate(lengths_k)])
        q_index = torch.cat([torch.arange(n, device=q.device) + i * max_q for i, n in enumerate(lengths_q)])

        def pad(x, n, idx):
            out = x.new_zeros(b * n, *x.shape[1:])
            return out.index_copy(0, idx, x).view(b, n, *x.shape[1:]).transpose(1, 2)

        def run():
            o = F.scaled_dot_product_attention(pad(q, max_q, q_index), pad(k, max_k, index), pad(v, max_k, index),
                                               attn_mask=keep[:, None, None, :])
            return o.transpose(1, 2).reshape(b * max_q, *q.shape[1:]).index_select(0, q_index)
        return run
    raise ValueError(provider)


CROSS_BASELINES = ("sdpa_padded_mask", "varlen_attn", "flash_attn")


@pytest.mark.parametrize("provider", list(CROSS_BASELINES) + ["sigvlp"] if HAS_CUDA else ["torch"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CROSS_FULL) + list(CROSS_QUICK))
def test_rope_attention_varlen_cross_throughput(bench, case, mode, provider):
    cases = CROSS_FULL if bench.full else CROSS_QUICK
    if case not in cases:
        pytest.skip("size not in this mode")
    lengths_q, lengths_k = cases[case]
    rotate = not case.startswith("map")
    if rotate and provider in CROSS_BASELINES:
        pytest.skip("baselines have no rotation: compared on the unrotated (map) cases only")
    head_dim = 64
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    leaves, cu_q, kw = _cross_case(lengths_q, lengths_k, head_dim, dtype, rotate)
    attn = _cross_fn(provider, leaves, cu_q, kw, lengths_q, lengths_k)
    if attn is None:
        pytest.skip(f"{provider} is not installed")
    out = attn()
    dout = torch.randn_like(out)
    fn = attn if mode == "fwd" else (lambda: torch.autograd.grad(attn(), leaves, dout))
    flops = 4.0 * sum(a * b for a, b in zip(lengths_q, lengths_k)) * leaves[0].shape[1] * head_dim
    flops *= {"fwd": 1.0, "fwd+bwd": 3.5}[mode]
    peak = bench.peak_memory(fn)
    bench.time(fn, rounds=2)
    bench.record(op=f"rope_attention_varlen cross {mode}", provider=provider, dtype=dtype,
                 shape=f"{case} heads={leaves[0].shape[1]} d={head_dim}", flops=flops, peak_bytes=peak,
                 baseline=None if provider in CROSS_BASELINES else ("sdpa_padded_mask" if bench.cuda else None))
