"""`sigvlp eval --ckpt DIR --data DIR [--split valid] [--out DIR] ...`: the evaluation suite on a
dataset in the CT-RATE layout; prints the table, writes DIR/report.json and the plots."""

from __future__ import annotations

import sys


def add_arguments(parser):
    from sigvlp.data.ctrate import add_layout_argument
    from sigvlp.eval.report import SECTIONS

    parser.add_argument("--ckpt", required=True,
                        help="checkpoint folder (SigVLP.save_pretrained output, or a training run: latest step)")
    parser.add_argument("--data", required=True, help="dataset root in the CT-RATE layout (real or `sigvlp synth`)")
    parser.add_argument("--split", default="valid", choices=("train", "valid"), help="split to evaluate")
    parser.add_argument("--train-split", default="train",
                        help="split the linear and segmentation probes are fitted on ('none' to skip)")
    parser.add_argument("--train-data", default=None, help="dataset root of the probe split (default: --data)")
    parser.add_argument("--out", default=None,
                        help="output folder for report.json and plots (default: RUN/eval-SPLIT-step_N for a "
                             "training run or a checkpoint inside one, else eval-SPLIT-NAME next to the "
                             "checkpoint folder; "
                             "never inside a checkpoints/step_* folder, which training rotates away)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="abnormality columns of the labels CSV to score (default: the 18 CT-RATE labels)")
    parser.add_argument("--prompt", nargs=2, default=None, metavar=("POS", "NEG"),
                        help="zero-shot prompt templates with {label} (default CT-CLIP's)")
    parser.add_argument("--organ-prompt", nargs=2, default=None, metavar=("POS", "NEG"),
                        help="organ prompt templates with {organ}")
    parser.add_argument("--min-count", type=int, default=5,
                        help="score a label/organ only with at least this many positives and negatives")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks-per-volume", type=int, default=4)
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="slice counts of the depth sweep")
    parser.add_argument("--seg-volumes", type=int, default=32, help="volumes per split for the segmentation probe")
    parser.add_argument("--max-volumes", type=int, default=None, help="evaluate at most this many volumes")
    parser.add_argument("--max-train-volumes", type=int, default=None, help="fit probes on at most this many")
    parser.add_argument("--token-budget", type=int, default=16384, help="image tokens per encoder batch")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast on CUDA")
    parser.add_argument("--cache", default=None, help="cache root (preprocessing + embeddings)")
    parser.add_argument("--masks", default=None, help="organ masks folder (default: DATA/masks, "
                        "DATA/dataset/ts_seg/ts_total, ... when present; see sigvlp.data.ctrate)")
    add_layout_argument(parser)
    parser.add_argument("--preset", default=None, help="fail unless the checkpoint has this SigVLPConfig preset")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args):
    from sigvlp.eval.suite import EvalConfig
    from sigvlp.prompts import ABNORMALITY_PROMPTS, ORGAN_PROMPTS

    train_split = None if str(args.train_split).lower() == "none" else args.train_split
    return EvalConfig(split=args.split, train_split=train_split, train_data=args.train_data, labels=args.labels,
                      prompts=tuple(args.prompt) if args.prompt else ABNORMALITY_PROMPTS,
                      organ_prompts=tuple(args.organ_prompt) if args.organ_prompt else ORGAN_PROMPTS,
                      min_positives=args.min_count, min_negatives=args.min_count, n_bootstrap=args.bootstrap,
                      seed=args.seed, chunks_per_volume=args.chunks_per_volume,
                      depths=tuple(args.depths) if args.depths else None, seg_volumes=args.seg_volumes,
                      max_volumes=args.max_volumes, max_train_volumes=args.max_train_volumes,
                      token_budget=args.token_budget, sections=tuple(args.sections), device=args.device,
                      precision=args.precision, cache=args.cache, masks=args.masks, layout=args.layout, expect_preset=args.preset,
                      progress=not args.no_progress, plots=not args.no_plots)


def default_out(ckpt, split: str):
    """Default output folder, outside the rotated checkpoints/step_* folders: RUN/eval-SPLIT-step_N
    when ckpt is a training run (or its checkpoints folder, or a step folder in it), else
    <parent of ckpt>/eval-SPLIT-<ckpt name> (a save_pretrained folder)."""
    from pathlib import Path

    from sigvlp.eval.suite import resolve_checkpoint

    resolved = Path(resolve_checkpoint(ckpt)).resolve()
    if resolved.parent.name == "checkpoints" and resolved.name.startswith("step_"):
        return resolved.parent.parent / f"eval-{split}-{resolved.name}"
    return resolved.parent / f"eval-{split}-{resolved.name}"


def _check_args(args) -> None:
    from pathlib import Path

    for flag, name in (("--max-volumes", "max_volumes"), ("--max-train-volumes", "max_train_volumes")):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"{flag}: expected a positive number of volumes (>= 1), got {v}")
    for flag, name in (("--min-count", "min_count"), ("--bootstrap", "bootstrap"),
                       ("--chunks-per-volume", "chunks_per_volume"), ("--token-budget", "token_budget")):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"{flag}: expected a positive int (>= 1), got {v}")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} exists and is not a folder (expected an output folder)")


def run(args) -> int:
    from pathlib import Path

    from sigvlp.eval.report import format_table
    from sigvlp.eval.suite import evaluate

    try:
        _check_args(args)
        config = config_from_args(args)
        out = Path(args.out) if args.out else default_out(args.ckpt, args.split)
        report = evaluate(args.ckpt, args.data, config, out=out)
    except (ValueError, FileNotFoundError) as e:
        print(f"sigvlp eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"\nreport: {out / 'report.json'} ({report['seconds']:.1f} s)")
    return 0
