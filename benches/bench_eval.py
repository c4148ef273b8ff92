"""Evaluation embedding throughput: volumes/s and slices/s of the suite's embedding path
(sigvlp.eval.suite.Embedder: packing under a token budget, volume_batch, SigVLP.encode_volume,
host copies of the pooled embeddings) for the "tiny" and "base" presets.

Quick mode (CPU): a few short volumes; full mode (GPU): CT-RATE-like depths at the presets'
in-plane sizes, fp32 and bf16 autocast. Numbers are reported, never asserted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sigvlp.eval.suite import EvalConfig, Embedder
from sigvlp.model import SigVLP, SigVLPConfig

TABLE = "eval embedding throughput (whole volumes, encode_volume)"


@dataclass
class _Volume:
    """Stands in for a CachedVolume: read(z0, z1) of a preprocessed (z, y, x) array."""

    image: np.ndarray

    @property
    def shape(self):
        return self.image.shape

    def read(self, z0=0, z1=None):
        return self.image[z0:z1]


def _cases(full: bool):
    # preset, number of volumes, slices per volume (after preprocessing), in-plane size
    if full:
        return [("tiny", 64, 128, 64), ("base", 16, 160, 256)]
    return [("tiny", 8, 48, 64), ("base", 2, 32, 128)]


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_embedding_throughput(bench, benchmark, bench_report, full_mode, preset):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, n, depth, size = next(c for c in _cases(full_mode) if c[0] == preset)
    torch.manual_seed(0)
    model = SigVLP(SigVLPConfig.preset(preset)).eval().to(device)
    rng = np.random.default_rng(0)
    entries = [(None, _Volume(rng.uniform(-1, 1, (depth, size, size)).astype(np.float16))) for _ in range(n)]
    spans = [(i, 0, depth) for i in range(n)]
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    for precision in precisions:
        config = EvalConfig(device=str(device), precision=precision, progress=False, token_budget=16384)
        emb = Embedder(model, device, config, "bench")

        def run():
            emb.encode(spans, entries, set(), "bench")
            if device.type == "cuda":
                torch.cuda.synchronize()

        run()  # warm-up: kernels, allocator
        if precision == precisions[-1]:
            seconds = bench.time(run, rounds=3 if full_mode else 2).median
        else:
            import time

            t0 = time.perf_counter()
            run()
            seconds = time.perf_counter() - t0
        pt, ph, pw = model.config.patch_size
        tokens = n * (-(-depth // pt)) * (size // ph) * (size // pw)
        bench.record(op=f"eval embedding {preset}", provider=f"encode_volume {precision}",
                     shape=f"{n}x{depth}x{size}x{size}", timing=bench.last if precision == precisions[-1] else None,
                     seconds=seconds, tokens=tokens, volumes_s=round(n / seconds, 3),
                     slices_s=round(n * depth / seconds, 1), tokens_s=round(tokens / seconds, 1))
