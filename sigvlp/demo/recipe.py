"""The demo's recipe: its phantom sets, the model overrides of the "tiny" preset and the training
values (the measurements behind each choice are in docs/demo.md)."""

from __future__ import annotations

__all__ = ["DEMO_DATA", "DEMO_MODEL", "DEMO_TRAIN", "MIN_COUNT"]

#: phantom sets: training, and held-out (own seed, "valid" split, never trained on), both of the synth
#: "demo" preset: 64 px, 3-5 mm slices, lesions drawn at twice their size and at least 9 mm in radius
#: so that they stay visible after the demo's preprocessing to 64 x 64 px, 3 mm (about 6 mm per pixel)
DEMO_DATA = {"train": {"n_train": 1000, "n_valid": 0, "seed": 0, "preset": "demo"},
             "heldout": {"n_train": 0, "n_valid": 200, "seed": 20261130, "preset": "demo"},
             "heldout_chunks_per_volume": 3}
#: SigVLPConfig overrides of the "tiny" preset used by the demo:
#: - pool "max": a finding seen by one or two tokens of a volume's ~400 survives pooling (MAP with
#:   one probe and mean pooling dilute it: 0.65 and below in the measurements of docs/demo.md);
#: - hu: the HU encoding of patch tokens (per sub-block of the default 1 x 4 x 4 grid, the share of
#:   voxels in each HU interval: emphysema, ground glass, soft tissue, fluid, calcium, metal become
#:   linear features);
#: - text_pool "map": the present / not-present statements of different labels get less
#:   parallel score directions than with "mean" or "last";
#: - tokenizer "word": a word-level vocabulary built from the training reports (a report is ~90
#:   tokens instead of ~460 bytes: faster steps, and every label name is its own tokens)
DEMO_MODEL: dict = {"text_pool": "map", "pool": "max", "tokenizer": "word",
                    "hu": {"thresholds": (-990, -950, -900, -800, -650, -450, -250, -100, -30, 20, 70, 150, 300,
                                          600, 900)}}
#: TrainConfig values of the demo recipe: 30% of the chunks are whole volumes (an abnormality's
#: "is present" statement is only known true for chunks covering most of the volume), prompt
#: statements weighted 24 with the topic-direction decorrelation weighted 24 (without it the
#: labels' score directions stay nearly parallel), Muon at lr 0.01, 2000 steps (the measurements
#: and the recipe search are in docs/demo.md)
DEMO_TRAIN = dict(model="tiny", steps=2000, warmup_steps=30, lr=0.01, adamw_lr=2e-3, token_budget=4096,
                  chunks_per_volume=2, min_slices=8, max_slices=128, whole_fraction=0.3, num_workers=1,
                  prompt_weight=24.0, prompt_decorrelation=24.0, ckpt_every=100, keep_last=1, log_every=5, seed=0)
#: a label (organ) is scored only with at least this many positive and negative held-out volumes (chunks)
MIN_COUNT = 5
