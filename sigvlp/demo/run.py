"""``sigvlp demo``: the main job on one CPU, no network, no GPU.

1. Phantom data (sigvlp.demo.synth.ensure_default_dataset, generated once and reused): a
   training set and a held-out set drawn with its own seed (never seen in training).
2. Trains the "tiny" preset (with the demo's overrides, ``DEMO_MODEL``) for ``DEMO_TRAIN.steps``
   steps with the demo recipe (``DEMO_TRAIN``; both in sigvlp.demo.recipe).
3. Zero-shot on the held-out volumes: CT-CLIP's prompts "{label} is present." / "{label} is not
   present.", two-way softmax per volume, AUROC per abnormality; organ presence on held-out
   chunks with "The {organ} is visible." / "The {organ} is not visible.". Only labels (organs)
   with at least MIN_COUNT positives and MIN_COUNT negatives are scored.
4. Prints a table and writes OUT/demo_metrics.json.

The scoring lives in one function, ``score_zero_shot``, which runs the evaluation suite
(sigvlp.eval); its full report and plots go to OUT/eval/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from sigvlp.cliargs import check_writable, int_at_least
from sigvlp.demo.recipe import DEMO_DATA, DEMO_MODEL, DEMO_TRAIN, MIN_COUNT
from sigvlp.demo.synth import default_dataset_dir, ensure_default_dataset

__all__ = ["DEMO_DATA", "DEMO_MODEL", "DEMO_OUTPUTS", "DEMO_TRAIN", "MIN_COUNT", "check_demo_out", "format_table",
           "prepare_demo", "run_demo", "score_zero_shot"]


def _dataset_dirs(data_dir: Optional[str]) -> tuple[Path, Path]:
    """(training set, held-out set) folders of the demo under `data_dir` (default: beside the default
    phantom dataset)."""
    base = Path(data_dir) if data_dir else default_dataset_dir().parent
    return base / "phantoms-demo-train", base / "phantoms-demo-heldout"


def score_zero_shot(checkpoint, heldout_root, *, cache_root=None, chunks_per_volume: int = 3, seed: int = 0,
                    min_count: int = MIN_COUNT, out=None) -> dict:
    """Zero-shot scores of a checkpoint on a held-out CT-RATE-layout folder (split "valid"), by the
    evaluation suite (sigvlp.eval: CT-CLIP's protocol, bootstrap CIs, organ presence per chunk,
    retrieval, embedding map; report.json and plots written to `out` when given).

    Returns {"zero_shot": {label: {"auroc", "positives", "negatives"}}, "organ_presence": {...},
    "zero_shot_mean_auroc", "organ_presence_mean_auroc", "volumes", "chunks", "skipped": {...},
    "report": the suite's report}. Labels / organs with fewer than min_count positives or
    negatives are listed under skipped.
    """
    from sigvlp.eval.suite import EvalConfig, evaluate  # import cost (torch): `sigvlp --help` imports this module

    config = EvalConfig(split="valid", train_split=None, min_positives=min_count, min_negatives=min_count,
                        chunks_per_volume=chunks_per_volume, seed=seed, cache=cache_root, progress=False,
                        sections=("zero_shot", "organs", "retrieval", "embedding_map"))
    report = evaluate(checkpoint, heldout_root, config, out=out)
    zs, org = report["zero_shot"], report["organs"]
    out_dict = {"zero_shot": {}, "organ_presence": {}, "skipped": {"zero_shot": {}, "organ_presence": {}}}
    for key, per, skipped in (("zero_shot", zs.get("per_label", {}), zs.get("labels_skipped", {})),
                              ("organ_presence", org.get("zero_shot", {}).get("per_organ", {}),
                               org.get("organs_skipped", {}))):
        out_dict[key] = {k: {"auroc": v["auroc"], "positives": v["n_pos"], "negatives": v["n_neg"]}
                         for k, v in per.items()}
        out_dict["skipped"][key] = {k: {"positives": v["positives"], "negatives": v["negatives"]}
                                    for k, v in skipped.items()}
        vals = [v["auroc"] for v in out_dict[key].values()]
        out_dict[f"{key}_mean_auroc"] = float(np.mean(vals)) if vals else float("nan")
    out_dict["volumes"] = report["dataset"]["n_volumes"]
    out_dict["chunks"] = org.get("n_chunks", 0)
    out_dict["report"] = report
    return out_dict


def format_table(result: dict) -> str:
    """The per-label and per-organ AUROC tables of a score_zero_shot result, as printed by the demo."""
    lines = []
    for key, title in (("zero_shot", "zero-shot abnormality (held-out volumes)"),
                       ("organ_presence", "organ presence (held-out chunks)")):
        rows = result[key]
        width = max([len(k) for k in rows] + [10])
        lines.append(f"\n{title}")
        lines.append(f"  {'label'.ljust(width)}  AUROC   pos   neg")
        for k, v in rows.items():
            lines.append(f"  {k.ljust(width)}  {v['auroc']:.3f}  {v['positives']:4d}  {v['negatives']:4d}")
        lines.append(f"  {'mean'.ljust(width)}  {result[f'{key}_mean_auroc']:.3f}")
        skipped = result["skipped"][key]
        if skipped:
            lines.append(f"  not scored (< {MIN_COUNT} positives or negatives): "
                         + ", ".join(f"{k} ({v['positives']}/{v['negatives']})" for k, v in skipped.items()))
    return "\n".join(lines)


#: what a demo writes under --out; a folder already holding any of them is refused (never replaced)
DEMO_OUTPUTS = ("run", "eval", "demo_metrics.json")


def check_demo_out(out: Path) -> None:
    """ValueError (one line) unless `out` can take a demo: a folder (absent, or one where none of
    DEMO_OUTPUTS exists non-empty) that can be written. Touches nothing but a probe file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a folder")
    taken = [n for n in DEMO_OUTPUTS if (out / n).is_file() or ((out / n).is_dir() and any((out / n).iterdir()))]
    if taken:
        raise ValueError(f"--out: {out} already holds {', '.join(taken)} (an earlier demo's or your own files; the "
                         "demo never replaces them): pass another --out, or move them away")
    check_writable(out)


def prepare_demo(out, *, data_dir=None, steps: Optional[int] = None, threads: Optional[int] = None,
                 progress: bool = True):
    """The demo's TrainConfig, after checking every option and the output folder (check_demo_out);
    writes nothing. ValueError (one line) naming the option otherwise."""
    from sigvlp.train.config import TrainConfig  # import cost: `sigvlp --help` imports this module

    out = Path(out)
    train_dir, heldout_dir = _dataset_dirs(data_dir)
    for name, folder in (("--data-dir", train_dir.parent), ("--data-dir", train_dir), ("--data-dir", heldout_dir)):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{name}: {folder} is a file, not a folder")
    run_dir = out / "run"
    values = dict(DEMO_TRAIN, data=str(train_dir), out=str(run_dir), model_overrides=dict(DEMO_MODEL),
                  progress=progress, threads=threads)  # None: one thread per free core (sigvlp.threads)
    if steps is not None:
        values["steps"] = int(steps)
        values["warmup_steps"] = min(values["warmup_steps"], max(int(steps) // 10, 1))
    config = TrainConfig(**values)  # validates every training option before disk is touched
    check_demo_out(out)
    return config


def run_demo(out="sigvlp-demo", *, data_dir=None, steps: Optional[int] = None, threads: Optional[int] = None,
             progress: bool = True) -> dict:
    """The whole demo; returns the dict written to OUT/demo_metrics.json. Every option and the
    output folder are checked before anything is written (ValueError, one line); OUT/run,
    OUT/eval and OUT/demo_metrics.json must not exist yet (check_demo_out)."""
    import torch  # import cost, as for the imports below: `sigvlp --help` imports this module

    from sigvlp.train.trainer import train

    t0 = time.perf_counter()
    out = Path(out)
    config = prepare_demo(out, data_dir=data_dir, steps=steps, threads=threads, progress=progress)
    train_dir, heldout_dir = _dataset_dirs(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"phantoms: {train_dir} (training), {heldout_dir} (held out)", flush=True)
    d = DEMO_DATA
    ensure_default_dataset(train_dir, **d["train"])
    ensure_default_dataset(heldout_dir, **d["heldout"])
    t_data = time.perf_counter() - t0
    summary = train(config)
    t_train = time.perf_counter() - t0 - t_data
    ckpt = summary["checkpoint"]
    result = score_zero_shot(ckpt, heldout_dir, chunks_per_volume=d["heldout_chunks_per_volume"], out=out / "eval")
    seconds = time.perf_counter() - t0
    metrics = {
        "zero_shot_mean_auroc": result["zero_shot_mean_auroc"],
        "organ_presence_mean_auroc": result["organ_presence_mean_auroc"],
        "per_label": {k: v["auroc"] for k, v in result["zero_shot"].items()},
        "per_organ": {k: v["auroc"] for k, v in result["organ_presence"].items()},
        "counts": {k: {"positives": v["positives"], "negatives": v["negatives"]}
                   for k, v in {**result["zero_shot"], **result["organ_presence"]}.items()},
        "skipped": result["skipped"],
        "heldout_volumes": result["volumes"], "heldout_chunks": result["chunks"],
        "seconds": seconds, "seconds_data": t_data, "seconds_train": t_train,
        "checkpoint": ckpt, "train_data": str(train_dir), "heldout_data": str(heldout_dir),
        "final_loss": summary.get("loss"), "steps": summary.get("step"),
        "config": config.to_dict(), "torch_threads": torch.get_num_threads(),
    }
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(format_table(result))
    print(f"\nzero-shot mean AUROC {metrics['zero_shot_mean_auroc']:.3f} over {len(metrics['per_label'])} abnormalities, "
          f"organ presence mean AUROC {metrics['organ_presence_mean_auroc']:.3f} over {len(metrics['per_organ'])} organs")
    print(f"{seconds:.0f} s (data {t_data:.0f} s, training {t_train:.0f} s); checkpoint {ckpt}; "
          f"metrics {out / 'demo_metrics.json'}")
    return metrics


def add_arguments(parser) -> None:
    """The `sigvlp demo` options on an argparse parser (sigvlp.cli calls it)."""
    parser.add_argument("--out", default="sigvlp-demo", help="output folder (default ./sigvlp-demo)")
    parser.add_argument("--data-dir", default=None,
                        help="where the phantom sets live (default: next to sigvlp.demo.synth's default dataset, "
                             "~/.cache/sigvlp or $SIGVLP_CACHE)")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help=f"training steps (default {DEMO_TRAIN['steps']})")
    parser.add_argument("--threads", type=int_at_least(0), default=None,
                        help="torch CPU threads for training (default: one per core free at the start, at "
                             "most 8; 0: torch's default); the data loader then runs in another process only "
                             "on a core left free, else in the training process")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    """`sigvlp demo`: run_demo with the parsed options; 0, or 2 with one line for a bad option or
    an --out folder that already holds a demo's outputs."""
    options = dict(data_dir=args.data_dir, steps=args.steps, threads=args.threads, progress=args.progress)
    try:
        prepare_demo(args.out, **options)
    except ValueError as e:
        print(f"sigvlp demo: error: {e}", file=sys.stderr)
        return 2
    run_demo(args.out, **options)
    return 0
