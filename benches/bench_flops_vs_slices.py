"""Encoder cost against the number of slices: SigVLP reads every slice of a CT volume (tokens grow
with depth), a fixed-size encoder in CT-CLIP's style resizes every volume to 240 slices (constant
cost). Forward FLOPs (torch.utils.flop_counter for everything it sees, plus the analytic count
4 * sum(n_q * n_k) * heads * head_dim for each call of the attention op, which the counter cannot
see inside a custom op) and measured forward time, for one volume of 256 x 256 in-plane voxels
and 16 to 512 slices, "base" and "large" presets (full mode); "tiny" at 64 x 64 and a few depths
(quick CPU mode).

Providers, the same volume encoder (sigvlp.model.VolumeEncoder) in each:
- sigvlp: every slice, fused 3D-RoPE varlen attention (sigvlp.ops.rope_attention_varlen);
- rope3d+varlen_attn: every slice, plain rope3d on q and k then unfused varlen attention
  (torch.nn.attention.varlen.varlen_attn (FA2) on a GPU; per-sequence softmax(q k^T) v otherwise):
  the baseline of the sigvlp rows;
- ctclip_fixed240: the volume trilinearly resized to 240 slices (time includes the resize), then
  the fused encoder: constant cost whatever the depth.
Writes flops_vs_slices.csv and flops_vs_slices.png (FLOPs and time against slices, log axes,
point area proportional to FLOPs) into the run's results folder, and one results row per point.
"""

from __future__ import annotations

import contextlib
import csv

import pytest
import torch
import torch.nn.functional as F

import _bench

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
FIXED_SLICES = 240
PROVIDERS = ("rope3d+varlen_attn", "sigvlp", "ctclip_fixed240")  # baseline first
FULL = {"presets": ("base", "large"), "inplane": 256, "slices": (16, 32, 64, 128, 256, 512)}
QUICK = {"presets": ("tiny",), "inplane": 32, "slices": (16, 64)}


def _setup():
    return FULL if _bench.full() else dict(QUICK, slices=(16,)) if _bench.smoke() else QUICK


# ----------------------------------------------------------------------------- attention variants


def attention_flops(cu_q, cu_k, heads: int, head_dim: int) -> int:
    """Forward FLOPs of non-causal varlen attention (FlashAttention convention: q k^T and p v, 2 FLOPs
    per multiply-add): 4 * sum_i(n_q,i * n_k,i) * heads * head_dim."""
    lq = [b - a for a, b in zip(cu_q[:-1], cu_q[1:])]
    lk = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
    return 4 * sum(a * b for a, b in zip(lq, lk)) * heads * head_dim


def math_varlen_attention(q, k, v, cu_q, cu_k, scale):
    """softmax(q k^T * scale) v per sequence, plain matmuls (what the FLOP counter can see)."""
    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    group = q.shape[1] // k.shape[1]
    for i in range(len(cq) - 1):
        qs = q[cq[i]:cq[i + 1]].transpose(0, 1)
        ks = k[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(group, 0)
        p = torch.softmax((qs @ ks.transpose(1, 2)).float() * scale, dim=-1)
        out[cq[i]:cq[i + 1]] = (p.to(vs.dtype) @ vs).transpose(0, 1)
    return out


def _varlen_attn():
    if not HAS_CUDA:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def unfused_attention(q, k, v, cu_seqlens, max_seqlen, grid_thw=None, *, cu_seqlens_k=None, max_seqlen_k=None,
                      positions=None, grid_thw_k=None, positions_k=None, theta=10000.0, sections=None,
                      interleaved=False, softmax_scale=None, causal=False, return_lse=False, backend=None, **_):
    """rope_attention_varlen's signature computed the unfused way: rope3d on q and k, then varlen
    attention (FA2 through torch's varlen_attn on a GPU, plain matmuls otherwise)."""
    from sigvlp.ops import rope3d

    if causal or return_lse:
        raise NotImplementedError("the unfused comparator covers the encoder's use (non-causal, no lse)")
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    if grid_thw is not None or positions is not None:
        rot = dict(theta=theta, sections=sections, interleaved=interleaved)
        cross = cu_seqlens_k is not None
        q = rope3d(q, cu_seqlens, grid_thw, positions=positions, **rot)
        k = rope3d(k, cu_k, grid_thw_k if cross else grid_thw, positions=positions_k if cross else positions, **rot)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    varlen = _varlen_attn()
    if varlen is not None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[1] == k.shape[1]:
        try:
            return varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, scale=scale)
        except TypeError:
            return varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k)
    return math_varlen_attention(q, k, v, cu_seqlens, cu_k, scale)


@contextlib.contextmanager
def attention_as(fn):
    """Route the model's attention calls (sigvlp.model.layers.rope_attention_varlen) through fn."""
    from sigvlp.model import layers

    original = layers.rope_attention_varlen
    layers.rope_attention_varlen = fn
    try:
        yield
    finally:
        layers.rope_attention_varlen = original


def encoder_flops(encoder, inputs) -> dict:
    """Forward FLOPs of `encoder(*inputs)`: counted (torch.utils.flop_counter) + analytic attention for
    every call of the attention op (invisible to the counter inside the custom op)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sigvlp.model import layers

    op = layers.rope_attention_varlen
    analytic = [0]

    def counting(q, k, v, cu_seqlens, max_seqlen, *args, **kw):
        cu_k = kw.get("cu_seqlens_k")
        analytic[0] += attention_flops(cu_seqlens.tolist(), (cu_seqlens if cu_k is None else cu_k).tolist(),
                                       q.shape[1], q.shape[2])
        return op(q, k, v, cu_seqlens, max_seqlen, *args, **kw)

    with attention_as(counting), torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(*inputs)
    counted = counter.get_total_flops()
    return {"counted": counted, "attention": analytic[0], "total": counted + analytic[0]}


# ----------------------------------------------------------------------------- the model


def make_encoder(preset: str):
    from sigvlp.model import SigVLPConfig, VolumeEncoder

    cfg = SigVLPConfig.preset(preset)
    return cfg, VolumeEncoder(cfg).to(DEVICE).eval()


def _volume(slices: int, inplane: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(slices)
    return torch.rand(slices, inplane, inplane, device=DEVICE, generator=g) * 2 - 1


def _inputs(volume: torch.Tensor, patch):
    from sigvlp.data.collate import patchify

    tokens, grid = patchify(volume, patch)
    n = tokens.shape[0]
    cu = torch.tensor([0, n], dtype=torch.int32, device=volume.device)
    return tokens, cu, n, torch.tensor([grid], dtype=torch.int32, device=volume.device)


def _resize_depth(volume: torch.Tensor, slices: int) -> torch.Tensor:
    return F.interpolate(volume[None, None], size=(slices, *volume.shape[1:]), mode="trilinear",
                         align_corners=False)[0, 0]


_ENCODERS: dict[str, tuple] = {}
_POINTS: list[dict] = []


def _encoder(preset):
    if preset not in _ENCODERS:
        _ENCODERS.clear()  # one preset's weights on the device at a time
        if HAS_CUDA:
            torch.cuda.empty_cache()
        _ENCODERS[preset] = make_encoder(preset)
    return _ENCODERS[preset]


@pytest.fixture(scope="module", autouse=True)
def _write_curves():
    yield
    _ENCODERS.clear()
    if _POINTS:
        write_curves(_POINTS, _bench.results_dir())


def _cases():
    return [(p, s) for p in _setup()["presets"] for s in _setup()["slices"]]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("preset, slices", _cases(), ids=lambda v: str(v))
def test_encoder_flops_and_time(bench, preset, slices, provider):
    cfg, encoder = _encoder(preset)
    inplane = _setup()["inplane"]
    volume = _volume(slices, inplane)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA else contextlib.nullcontext()
    if provider == "ctclip_fixed240":
        fixed = _inputs(_resize_depth(volume, FIXED_SLICES), cfg.patch_size)
        flop_inputs = fixed

        def run():
            return encoder(*_inputs(_resize_depth(volume, FIXED_SLICES), cfg.patch_size))
        attention = contextlib.nullcontext()
    else:
        flop_inputs = _inputs(volume, cfg.patch_size)

        def run():
            return encoder(*flop_inputs)
        attention = attention_as(unfused_attention) if provider == "rope3d+varlen_attn" else contextlib.nullcontext()

    with autocast:
        flops = encoder_flops(encoder, flop_inputs)
        with attention, torch.no_grad():
            try:
                peak = bench.peak_memory(run)
                timing = bench.time(run, rounds=3)
            except torch.OutOfMemoryError:
                pytest.skip("out of memory")
    tokens = flop_inputs[2]
    row = bench.record(op=f"encoder forward {preset}", provider=provider,
                       shape=f"{slices}x{inplane}x{inplane}", dtype=torch.bfloat16 if HAS_CUDA else torch.float32,
                       timing=timing, flops=flops["total"], peak_bytes=peak,
                       baseline="rope3d+varlen_attn" if provider == "sigvlp" else None,
                       tokens=tokens, attention_flops=flops["attention"], counted_flops=flops["counted"])
    _POINTS.append({"preset": preset, "provider": provider, "slices": slices, "inplane": inplane, "tokens": tokens,
                    "flops_counted": flops["counted"], "flops_attention": flops["attention"],
                    "flops_total": flops["total"], "median_ms": row["median_ms"], "iqr_ms": row["iqr_ms"],
                    "peak_mib": row["peak_mib"], "device": row["device"], "mode": row["mode"]})


# ----------------------------------------------------------------------------- curves

CURVE_COLUMNS = ("preset", "provider", "slices", "inplane", "tokens", "flops_counted", "flops_attention",
                 "flops_total", "median_ms", "iqr_ms", "peak_mib", "device", "mode")


def write_curves(points: list[dict], out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "flops_vs_slices.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS)
        w.writeheader()
        for p in points:
            w.writerow({k: ("" if p.get(k) is None else p[k]) for k in CURVE_COLUMNS})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    biggest = max(p["flops_total"] for p in points) or 1
    styles = {"sigvlp": "-", "rope3d+varlen_attn": ":", "ctclip_fixed240": "--"}
    for (preset, provider) in dict.fromkeys((p["preset"], p["provider"]) for p in points):
        pts = sorted((p for p in points if p["preset"] == preset and p["provider"] == provider),
                     key=lambda p: p["slices"])
        xs = [p["slices"] for p in pts]
        sizes = [12 + 400 * p["flops_total"] / biggest for p in pts]
        for ax, key, scale in ((axes[0], "flops_total", 1e-9), (axes[1], "median_ms", 1.0)):
            ys = [p[key] * scale if p[key] else None for p in pts]
            keep = [(x, y, s) for x, y, s in zip(xs, ys, sizes) if y]
            if not keep:
                continue
            line, = ax.plot([k[0] for k in keep], [k[1] for k in keep], styles.get(provider, "-"),
                            label=f"{preset} {provider}")
            ax.scatter([k[0] for k in keep], [k[1] for k in keep], s=[k[2] for k in keep],
                       color=line.get_color(), alpha=0.45)
    axes[0].set_ylabel("encoder forward GFLOPs")
    axes[1].set_ylabel("encoder forward time (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p["slices"] for p in points}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yscale("log")
        ax.set_xlabel(f"slices ({points[0]['inplane']} x {points[0]['inplane']} in-plane)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"SigVLP encoder vs a fixed {FIXED_SLICES}-slice encoder ({points[0]['device']}, "
                 f"{points[0]['mode']} mode; point area ~ FLOPs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "flops_vs_slices.png", dpi=120)
    plt.close(fig)
