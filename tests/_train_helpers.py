"""Shared helpers of the trainer tests: synthetic collate batches and a small model config."""

from __future__ import annotations

import numpy as np

#: the "tiny" preset as the tests train it (TrainConfig.model_overrides)
TEST_MODEL = {"width": 64, "layers": 1, "heads": 2, "mlp_dim": 128, "text_width": 64, "text_layers": 1,
              "text_heads": 2, "text_mlp_dim": 128, "embed_dim": 32, "max_text_tokens": 48}

TEXTS = ["Lung nodule.", "Cardiomegaly.", "Pleural effusion.", "No abnormality.", "Emphysema.", "Hiatal hernia."]


def samples(seed: int, n: int, patch=(4, 16, 16)) -> list[dict]:
    """n chunks of different depths (multiples of pt) with texts from a small pool (some repeat)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        depth = patch[0] * int(rng.integers(1, 4))
        out.append({"image": rng.uniform(-1, 1, size=(depth, 32, 32)).astype(np.float32),
                    "text": TEXTS[int(rng.integers(len(TEXTS)))], "name": f"vol{seed}_{i}", "organs": [],
                    "z0": 0, "uid": i})
    return out


def collate(samples_, patch=(4, 16, 16)) -> dict:
    from sigvlp.data.collate import collate_chunks

    return collate_chunks(samples_, patch=patch, max_text_tokens=TEST_MODEL["max_text_tokens"])


def global_batches(n_steps: int, per_rank: int, world: int, seed: int = 0) -> list[list[dict]]:
    """n_steps global batches, each a list of per_rank * world samples."""
    return [samples(seed * 1000 + s, per_rank * world) for s in range(n_steps)]


def rank_source(batches: list[list[dict]], per_rank: int):
    """batch_source for Trainer: rank r trains on its slice of each global batch."""
    def source(rank: int, world: int):
        for b in batches:
            yield collate(b[rank * per_rank:(rank + 1) * per_rank] if world > 1 else b)
    return source
