"""`sigvlp eval --ckpt DIR --data DIR [--split valid] [--out DIR] ...`: the evaluation suite on a
dataset in the CT-RATE layout; prints the table, writes DIR/report.json and the plots."""

from __future__ import annotations

import sys


def add_arguments(parser):
    from sigvlp.cliargs import int_at_least
    from sigvlp.data.ctrate import add_layout_argument
    from sigvlp.eval.report import SECTIONS

    positive = int_at_least(1)
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint folder (SigVLP.save_pretrained output, or a training run: latest step)")
    parser.add_argument("--data", required=True, help="dataset root in the CT-RATE layout (real or `sigvlp synth`)")
    parser.add_argument("--split", default="valid", choices=("train", "valid"), help="split to evaluate")
    parser.add_argument("--train-split", default="train",
                        help="split the linear and segmentation probes are fitted on ('none' to skip)")
    parser.add_argument("--train-data", default=None, help="dataset root of the probe split (default: --data)")
    parser.add_argument("--out", default=None,
                        help="output folder for report.json and plots, absent or empty (default: a new "
                             "RUN/eval-SPLIT-step_N-TIME for a training run or a checkpoint inside one, else "
                             "eval-SPLIT-NAME-TIME next to the checkpoint folder)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="abnormality columns of the labels CSV to score (default: the 18 CT-RATE labels)")
    parser.add_argument("--prompt", nargs=2, default=None, metavar=("POS", "NEG"),
                        help="zero-shot prompt templates with {label} (default: CT-CLIP's)")
    parser.add_argument("--organ-prompt", nargs=2, default=None, metavar=("POS", "NEG"),
                        help="organ prompt templates with {organ} (default: 'The {organ} is visible.' / "
                             "'... is not visible.')")
    parser.add_argument("--min-count", type=positive, default=5,
                        help="score a label/organ only with at least this many positives and negatives")
    parser.add_argument("--bootstrap", type=positive, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the bootstrap and the probes")
    parser.add_argument("--chunks-per-volume", type=positive, default=4, help="chunks per volume for the organ tasks")
    parser.add_argument("--depths", type=positive, nargs="+", default=None,
                        help="slice counts of the depth sweep (default: powers of two from the chunk preset's "
                             "min_slices up to the longest volume)")
    parser.add_argument("--seg-volumes", type=positive, default=32, help="volumes per split for the segmentation probe")
    parser.add_argument("--max-volumes", type=positive, default=None,
                        help="evaluate at most this many volumes (default: all)")
    parser.add_argument("--max-train-volumes", type=positive, default=None,
                        help="fit probes on at most this many volumes (default: all)")
    parser.add_argument("--token-budget", type=positive, default=16384, help="image tokens per encoder batch")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="sections to run")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast on CUDA")
    parser.add_argument("--cache", default=None,
                        help="cache root for preprocessing and embeddings (default: $SIGVLP_CACHE, else "
                             "DATA/.sigvlp_cache when writable, else ~/.cache/sigvlp)")
    parser.add_argument("--masks", default=None, help="organ masks folder (default: DATA/masks, "
                        "DATA/dataset/ts_seg/ts_total, ... when present; see sigvlp.data.ctrate)")
    add_layout_argument(parser)
    parser.add_argument("--preset", default=None,
                        help="fail unless the checkpoint has this SigVLPConfig preset (default: any)")
    parser.add_argument("--threads", type=int_at_least(0), default=None,
                        help="torch CPU threads on the CPU (default: one per core free at the start, at most 8; "
                             "0: torch's default)")
    parser.add_argument("--no-plots", action="store_true", help="write report.json only, no plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


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


def output_folder(args):
    """The folder this evaluation writes, checked before any work: --out when it is absent or an
    empty folder (ValueError naming what is there otherwise), else a new folder default_out(...)
    + "-YYYYmmdd-HHMMSS" (a "-2", "-3", ... suffix if that exists), never a folder that holds an
    earlier run's files. ValueError (one line) when the location cannot be written."""
    import time
    from pathlib import Path

    from sigvlp.cliargs import check_writable

    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} exists and is not a folder (expected an output folder)")
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if held:
            shown = ", ".join(held[:5]) + (f", ... ({len(held)} entries)" if len(held) > 5 else "")
            raise ValueError(f"--out: {out} is not empty ({shown}); give a new or empty folder, or leave --out "
                             f"out for a new timestamped folder (an evaluation never writes beside an earlier "
                             f"one's files)")
    else:
        base = default_out(args.ckpt, args.split)
        out = base.with_name(f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 2
        while out.exists():
            out = base.with_name(f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
    try:
        check_writable(out)
    except ValueError as e:
        if args.out is None:  # the default sits beside the checkpoint: say how to write elsewhere
            raise ValueError(f"{e}; this is the default output folder, beside the checkpoint: give --out DIR "
                             f"to write the evaluation elsewhere") from None
        raise ValueError(f"--out: {e}") from None
    return out


def run(args) -> int:
    import torch  # here, not at import: `sigvlp eval --help` stays fast and torch-free

    from sigvlp.eval.report import format_table
    from sigvlp.eval.suite import evaluate
    from sigvlp.threads import apply_threads

    try:
        if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
            apply_threads(getattr(args, "threads", None))
        config = config_from_args(args)
        out = output_folder(args)
        report = evaluate(args.ckpt, args.data, config, out=out)
    except (ValueError, FileNotFoundError) as e:
        print(f"sigvlp eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"\nreport: {out / 'report.json'} ({report['seconds']:.1f} s)")
    return 0
