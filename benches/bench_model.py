"""SigVLP training-step throughput (tokens/s, slices/s) and peak memory at several chunk depths.

One step = forward of both towers on a packed varlen batch of chunks (about TOKEN_BUDGET image
tokens), sigmoid loss with pair ids, backward, optimizer step. Providers:
- unfused (the baseline): rope3d on q and k + varlen attention (FA2 through torch's varlen_attn on
  a GPU, per-sequence matmuls otherwise; bench_flops_vs_slices.unfused_attention), the dense
  sigmoid loss (N x M logits materialised), torch.optim.Muon for the hidden 2-D weights + AdamW;
- sigvlp: our ops on their default backends (fused 3D-RoPE varlen attention, blockwise sigmoid
  loss, sigvlp.optim.MuonWithAdamW with batched Newton-Schulz);
- sigvlp-torch: the same model with every sigvlp op on its torch backend (the CPU path).
Full mode (GPU): the "base" preset, 256 x 256 in-plane (16 x 16 patches), chunks of 32..256
slices, bf16 autocast; and the "siglip2-large" geometry (what SigVLP.from_siglip builds from
google/siglip2-large-patch16-256, here with random weights: no download), chunks of 64 slices,
8192 image tokens, unfused vs sigvlp only (an 880M-parameter step, kept short for the GPU check's
time plan). Quick mode (CPU): "tiny", 64 x 64, chunks of 16 slices; and the demo's step on the CPU
(`test_cpu_attention_training_step`: the "tiny" preset with the demo's model overrides, a byte
tokenizer, ~4096 image tokens in chunks of 8..128 slices at 64 x 64 px) with the attention on
its "cpu" backend (torch's fused CPU attention per group of sequences, auto's choice) against the per-sequence
reference ("torch" backend, SIGVLP_BACKEND=torch), the two timed alternately in one run, the
load average and torch's thread count recorded beside them.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

import _bench
from bench_flops_vs_slices import attention_as, unfused_attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# baseline first; on the CPU every sigvlp op already runs its torch backend: no separate row
PROVIDERS = ("unfused", "sigvlp", "sigvlp-torch") if HAS_CUDA else ("unfused", "sigvlp")
FULL = {"preset": "base", "inplane": 256, "depths": (32, 64, 128, 256), "token_budget": 32768}
SIGLIP2 = {"preset": "siglip2-large", "inplane": 256, "depths": (64,), "token_budget": 8192,
           "providers": ("unfused", "sigvlp")}
QUICK = {"preset": "tiny", "inplane": 64, "depths": (16,), "token_budget": 512}
TEXTS = ["Lung nodule in the right upper lobe.", "Cardiomegaly. Pericardial effusion.", "No abnormality.",
         "Bilateral pleural effusion with atelectasis.", "Emphysema in both upper lobes."]


def _cases():
    smallest = dict(QUICK, depths=(8,), token_budget=256)  # the smoke scale (_bench.smoke)
    setups = (FULL, SIGLIP2) if _bench.full() else (smallest if _bench.smoke() else QUICK,)
    return [pytest.param(s, d, p, id=f"{s['preset']}-{d}-{p}") for s in setups for d in s["depths"]
            for p in s.get("providers", PROVIDERS)]


@contextlib.contextmanager
def _env(values: dict):
    """os.environ updated with `values` inside the block, restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _batch(depth: int, cfg, setup) -> dict:
    from sigvlp.data.collate import collate_chunks

    pt, ph, pw = cfg.patch_size
    n_plane = (setup["inplane"] // ph) * (setup["inplane"] // pw)
    per_chunk = (depth // pt) * n_plane
    n = max(2, setup["token_budget"] // per_chunk)
    g = torch.Generator().manual_seed(depth)
    samples = [{"image": (torch.rand(depth, setup["inplane"], setup["inplane"], generator=g) * 2 - 1).numpy(),
                "text": TEXTS[i % len(TEXTS)], "uid": i} for i in range(n)]
    b = collate_chunks(samples, patch=cfg.patch_size, max_text_tokens=cfg.max_text_tokens)
    for k in ("patches", "cu_seqlens", "grid_thw", "text_ids", "text_cu_seqlens", "image_pair_ids", "text_pair_ids"):
        b[k] = b[k].to(DEVICE)
    return b


def _optimizer(model, provider):
    from sigvlp.optim import MuonWithAdamW, split_params

    groups = split_params(model)
    if provider != "unfused":
        return MuonWithAdamW(groups, lr=0.02, adamw_lr=1e-3, backend="torch" if provider == "sigvlp-torch" else None)
    muon = [p for g in groups if g["use_muon"] for _, p in g["params"]]
    rest = [p for g in groups if not g["use_muon"] for _, p in g["params"]]
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None or any(p.dim() != 2 for p in muon):
        pytest.skip("torch.optim.Muon is unavailable (torch < 2.9) or a Muon weight is not 2-D")
    opts = [muon_cls(muon, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)]

    class Both:
        def step(self):
            for o in opts:
                o.step()

        def zero_grad(self, set_to_none=True):
            for o in opts:
                o.zero_grad(set_to_none=set_to_none)
    return Both()


_MODELS: dict = {}


def _model(preset):
    from sigvlp.model import SigVLP, SigVLPConfig

    if preset not in _MODELS:
        _MODELS.clear()
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised on the GPU: seconds less for siglip2-large's 880M weights
            _MODELS[preset] = SigVLP(SigVLPConfig.preset(preset)).to(DEVICE)
    return _MODELS[preset]


@pytest.fixture(scope="module", autouse=True)
def _free():
    yield
    _MODELS.clear()


@pytest.mark.parametrize("setup,depth,provider", _cases())
def test_training_step(bench, setup, depth, provider):
    from sigvlp.ops import sigmoid_loss
    from sigvlp.ops.sigmoid_loss import sigmoid_loss_dense

    model = _model(setup["preset"])
    cfg = model.config
    batch = _batch(depth, cfg, setup)
    opt = _optimizer(model, provider)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA else contextlib.nullcontext()
    attention = attention_as(unfused_attention) if provider == "unfused" else contextlib.nullcontext()
    backend_env = {"SIGVLP_BACKEND": "torch"} if provider == "sigvlp-torch" else {}

    def step():
        with autocast:
            out = model(batch)
        args = (out.image_emb.float(), out.text_emb.float(), out.logit_scale, out.logit_bias)
        ids = dict(image_ids=batch["image_pair_ids"], text_ids=batch["text_pair_ids"])
        loss = sigmoid_loss_dense(*args, **ids) if provider == "unfused" else sigmoid_loss(
            *args, **ids, backend="torch" if provider == "sigvlp-torch" else None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    with _env(backend_env), attention:
        try:
            peak = bench.peak_memory(step)
            timing = bench.time(step, rounds=3 if HAS_CUDA else 2)
        except torch.OutOfMemoryError:
            pytest.skip("out of memory")
    tokens = int(batch["patches"].shape[0])
    chunks = int(batch["cu_seqlens"].numel()) - 1
    slices = chunks * depth
    bench.record(op=f"train step {setup['preset']}", provider=provider,
                 shape=f"{chunks}x{depth}x{setup['inplane']}x{setup['inplane']}",
                 dtype=torch.bfloat16 if HAS_CUDA else torch.float32, timing=timing, peak_bytes=peak,
                 baseline="unfused" if provider != "unfused" else None, tokens=tokens, chunks=chunks,
                 tokens_per_s=tokens / timing.median, slices_per_s=slices / timing.median)


#: the demo's chunk depths (slices; min_slices 8 .. max_slices 128), cycled up to DEMO_STEP's budget
DEMO_DEPTHS = (16, 128, 40, 96, 64, 24, 112, 8, 80, 48, 32, 120, 56, 104, 72, 88)
DEMO_STEP = {"inplane": 64, "token_budget": 4096, "rounds": 6}


def _demo_batch(cfg) -> dict:
    from sigvlp.data.collate import collate_chunks

    pt, ph, pw = cfg.patch_size
    per_slice_group = (DEMO_STEP["inplane"] // ph) * (DEMO_STEP["inplane"] // pw)
    g = torch.Generator().manual_seed(0)
    samples, tokens = [], 0
    for i, depth in enumerate(DEMO_DEPTHS * 4):
        tokens += depth // pt * per_slice_group
        if tokens > DEMO_STEP["token_budget"] // (4 if _bench.smoke() else 1):
            break
        image = torch.rand(depth, DEMO_STEP["inplane"], DEMO_STEP["inplane"], generator=g) * 2 - 1
        samples.append({"image": image.numpy(), "text": TEXTS[i % len(TEXTS)], "uid": i})
    return collate_chunks(samples, patch=cfg.patch_size, max_text_tokens=cfg.max_text_tokens)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU attention backends are compared on a machine without a GPU")
def test_cpu_attention_training_step(bench):
    """The demo's training step with the "cpu" attention backend vs the per-sequence reference."""
    from sigvlp.demo.recipe import DEMO_MODEL
    from sigvlp.model import SigVLP, SigVLPConfig
    from sigvlp.ops import sigmoid_loss

    torch.manual_seed(0)
    overrides = {k: v for k, v in DEMO_MODEL.items() if k != "tokenizer"}  # bytes: no vocabulary to build
    model = SigVLP(SigVLPConfig.preset("tiny", **overrides))
    batch = _demo_batch(model.config)
    opt = _optimizer(model, "sigvlp")

    def step():
        out = model(batch)
        loss = sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias,
                            image_ids=batch["image_pair_ids"], text_ids=batch["text_pair_ids"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    providers = {"sigvlp-torch": "torch", "sigvlp": "auto"}  # SIGVLP_BACKEND of each
    samples = {p: [] for p in providers}
    load = os.getloadavg()[0]
    for r in range(1 + (1 if _bench.smoke() else DEMO_STEP["rounds"])):  # round 0: warm-up; then alternate, in both orders
        for provider in (list(providers) if r % 2 else list(providers)[::-1]):
            with _env({"SIGVLP_BACKEND": providers[provider]}):
                t0 = time.perf_counter()
                step()
                if r:
                    samples[provider].append(time.perf_counter() - t0)
    shape = f"{int(batch['cu_seqlens'].numel()) - 1} chunks, {int(batch['patches'].shape[0])} tokens"
    for provider, times in samples.items():
        bench.record(op="train step tiny (demo shapes, CPU attention)", provider=provider, shape=shape,
                     dtype=torch.float32, timing=_bench.Timing(times),
                     baseline="sigvlp-torch" if provider == "sigvlp" else None,
                     threads=torch.get_num_threads(), load_avg_1min=round((load + os.getloadavg()[0]) / 2, 2))
