"""``sigvlp preprocess DATA [--split S] [--workers N] [--shard I/N] [--cache DIR] [--preset P]``:
build the preprocessing cache that ``sigvlp train`` / ``sigvlp eval`` read, before training.

N processes on this machine; ``--shard I/N`` (I from 0) takes a disjoint, deterministic share
(sigvlp.data.shards), so N machines or array jobs build one cache folder together (shared
filesystem) or each its own part. Resumable: entries already built are skipped (found through
the cache manifest, one stat per file). A progress bar with volumes/s and the ETA; at the end a
summary of the volumes skipped, with reasons. Exit status 0 when every volume of the share is
cached, 1 when some were skipped, 2 for bad arguments or an unreadable dataset.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sigvlp.cliargs import ArgumentParser, int_at_least

SPLITS = ("train", "valid", "all")


def add_arguments(parser) -> None:
    from sigvlp.data.ctrate import add_layout_argument
    from sigvlp.data.preprocess import PRESETS

    parser.add_argument("data", metavar="DATA", help="dataset folder in the CT-RATE layout")
    parser.add_argument("--split", default="all", choices=SPLITS, help="split(s) to preprocess (default: all)")
    parser.add_argument("--workers", type=int_at_least(1), default=1, metavar="N",
                        help="processes on this machine (default: 1); about one per core, memory permitting")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="take share I of N (I from 0: 0/4 ... 3/4), one per machine or array job (default: 0/1)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="cache folder (default as sigvlp train: $SIGVLP_CACHE/preprocess, else DATA/.sigvlp_cache)")
    parser.add_argument("--preset", default="sigvlp", choices=sorted(PRESETS),
                        help="preprocessing preset: the model config's `preprocess` (default: sigvlp)")
    parser.add_argument("--masks", default="auto", metavar="DIR",
                        help="organ-mask folder as sigvlp train is given it (default: auto, found under DATA)")
    add_layout_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check(args):
    """(shard, workers, cache root) or ValueError naming the flag."""
    from sigvlp.cliargs import check_writable
    from sigvlp.data.preprocess import default_cache_root
    from sigvlp.data.shards import parse_shard

    shard = parse_shard(args.shard)
    root = Path(args.data)
    if not root.is_dir():
        raise ValueError(f"DATA: no such dataset folder {root}")
    cache_root = Path(args.cache) if args.cache else default_cache_root(root)
    try:
        check_writable(cache_root)
    except ValueError as e:
        raise ValueError(f"--cache: {e}") from None
    return shard, cache_root


def run(args) -> int:
    from sigvlp.data.ctrate import CTRateDataset
    from sigvlp.data.preprocess import PreprocessCache, preset
    from sigvlp.data.shards import preprocess_records, shard_records

    try:
        (index, count), cache_root = _check(args)
        splits = ("train", "valid") if args.split == "all" else (args.split,)
        masks = None if args.masks in ("none", "") else args.masks
        datasets = [CTRateDataset(args.data, s, masks_dir=masks, layout=args.layout) for s in splits]
    except (ValueError, FileNotFoundError) as e:
        print(f"sigvlp preprocess: error: {e}", file=sys.stderr)
        return 2
    cache = PreprocessCache(cache_root, preset(args.preset))
    print(f"sigvlp preprocess: cache {cache.dir}; share {index}/{count}; {args.workers} process(es)", flush=True)
    skipped, total, t0 = [], 0, time.monotonic()
    for split, ds in zip(splits, datasets):
        mine = shard_records(ds.records, index, count)
        total += len(mine)
        if ds.scan.skipped and index == 0:  # not in any share: reported once, by share 0
            print(f"{split}: {ds.scan.summary()}")
        _, bad = preprocess_records(ds, cache, mine, workers=args.workers, progress=not args.quiet, desc=split)
        skipped += bad
    took = time.monotonic() - t0
    print(f"sigvlp preprocess: {total - len(skipped)} of {total} volume(s) cached in {took:.1f} s"
          + (f"; {len(skipped)} skipped:" if skipped else ""))
    for path, why in skipped:
        print(f"  {path}: {why}")
    return 1 if skipped else 0


def main(argv=None) -> int:
    parser = ArgumentParser(prog="sigvlp preprocess", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
