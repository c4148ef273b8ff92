"""``sigvlp synth``: write a synthetic chest-CT phantom dataset in the CT-RATE layout."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from sigvlp.cliargs import HelpFormatter, check_writable, int_at_least
from sigvlp.demo.synth.config import SYNTH_PRESETS
from sigvlp.demo.synth.writing import check_overwritable, write_dataset

__all__ = ["add_arguments", "run"]


def _out_folder(text: str) -> str:
    """argparse type: a path that is a folder or does not exist yet."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def _range_action(low: int):
    """argparse action for MIN MAX pairs: low <= MIN <= MAX, else a one-line usage error."""

    class Range(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            lo, hi = values
            if lo < low or hi < lo:
                parser.error(f"argument {option_string}: expected MIN MAX with {low} <= MIN <= MAX, got {lo} {hi}")
            setattr(namespace, self.dest, (lo, hi))

    return Range


def add_arguments(parser):
    """The `sigvlp synth` options on an argparse parser (sigvlp.cli calls it)."""
    parser.formatter_class = HelpFormatter
    parser.add_argument("--out", required=True, type=_out_folder, default=argparse.SUPPRESS,
                        help="output folder (must be empty or absent, unless --overwrite)")
    parser.add_argument("--n-train", type=int_at_least(0), default=200, help="training volumes")
    parser.add_argument("--n-valid", type=int_at_least(0), default=50,
                        help="validation volumes (either count may be 0, not both)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="dataset seed")
    parser.add_argument("--preset", default="small", choices=sorted(SYNTH_PRESETS),
                        help="size preset (small: 64-96 px in-plane, 60-400 slices; tiny: 40-48 px, 24-64 slices of "
                             "5-8 mm; demo: 64 px, 3-5 mm slices, lesions drawn twice their size and at least 9 mm "
                             "in radius, as `sigvlp demo` uses)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("MIN", "MAX"), action=_range_action(16),
                        default=argparse.SUPPRESS, help="in-plane matrix range (default: the preset's)")
    parser.add_argument("--slices", type=int, nargs=2, metavar=("MIN", "MAX"), action=_range_action(1),
                        default=argparse.SUPPRESS, help="slice-count range (default: the preset's)")
    parser.add_argument("--workers", type=int_at_least(0), default=0, help="processes (0: one per core)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a previous synth output (a folder with synth.json), first removing only the files "
                             "that run wrote; other folders are refused")


def run(args) -> int:
    """`sigvlp synth`: write the dataset the parsed options describe; 2 (an error line on stderr) for
    --n-train and --n-valid both 0, an --out folder that is not a previous synth output, or not empty
    without --overwrite."""
    if args.n_train == 0 and args.n_valid == 0:
        print("sigvlp synth: error: argument --n-train/--n-valid: both are 0, nothing to write (give at least one "
              "volume)", file=sys.stderr)
        return 2
    config = SYNTH_PRESETS[args.preset]
    if getattr(args, "size", None):
        config = dataclasses.replace(config, size=tuple(args.size))
    if getattr(args, "slices", None):
        config = dataclasses.replace(config, slices=tuple(args.slices))
    out = Path(args.out)
    try:
        check_overwritable(out)
        check_writable(out)  # before any work: e.g. a folder under a regular file, or a read-only one
    except ValueError as e:
        print(f"sigvlp synth: error: argument --out: {e}", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"sigvlp synth: error: argument --out: {out} is not empty; pass --overwrite to replace what a "
              f"previous run wrote there", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = write_dataset(out, args.n_train, args.n_valid, args.seed, config, workers=args.workers, progress=True,
                        overwrite=args.overwrite)
    print(f"wrote {args.n_train} + {args.n_valid} phantoms to {out} in {time.perf_counter() - t0:.1f} s")
    return 0
