"""``sigvlp findings DATA``: build the organ-wise findings bank of a CT-RATE split.

From the split's reports CSV by the rule splitter (default), by an OpenAI-compatible LLM
(``--llm-url``), or from the public organ-wise splits of fVLM (``--fvlm``) or RadGenome-ChestCT
(``--radgenome``); for the volumes found under DATA. Output: DATA/findings/<split>_findings.jsonl
(where ``sigvlp train`` looks), never replaced without ``--overwrite``, written atomically.
See sigvlp.data.findings and sigvlp.data.findings_llm.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sigvlp.cliargs import check_writable
from sigvlp.data.ctrate import CTRateDataset, add_layout_argument
from sigvlp.data.findings import fvlm_entries, radgenome_entries, split_report, write_bank
from sigvlp.data.organs import ORGANS

PROG = "sigvlp findings"


_KIND_NAMES = {int: "an integer", float: "a number"}


def _number(kind, strict: bool):
    """argparse type: a `kind` number > 0 (strict) or >= 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND_NAMES.get(kind, kind.__name__)}, got {text!r}") from None
        if not (value > 0 if strict else value >= 0):
            raise argparse.ArgumentTypeError(f"expected a value {'>' if strict else '>='} 0, got {text!r}")
        return value
    return parse


def add_arguments(parser):
    parser.add_argument("data", metavar="DATA", help="CT-RATE-layout dataset folder (as downloaded, or `sigvlp synth`)")
    parser.add_argument("--split", default="train", choices=("train", "valid"), help="split (default: train)")
    parser.add_argument("--out", metavar="BANK.jsonl", default=None,
                        help="output bank (default: DATA/findings/<split>_findings.jsonl, which `sigvlp train` finds)")
    add_layout_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bank (default: refuse)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--fvlm", metavar="DESC.json", default=None,
                     help="build from fVLM's desc_info.json (organ-wise findings) (default: the reports CSV)")
    src.add_argument("--radgenome", metavar="REGION_REPORT.csv", default=None,
                     help="build from RadGenome-ChestCT's <split>_region_report.csv (default: the reports CSV)")
    src.add_argument("--llm-url", metavar="URL", default=None,
                     help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; probed once first (unreachable "
                          "or refusing the key: exit 2); a report whose requests fail is split by the rules "
                          "(counted); when every request fails, no bank is written (exit 1) (default: none, rule "
                          "splitter)")
    parser.add_argument("--fvlm-impressions", metavar="CONC.json", default=None,
                        help="fVLM's conc_info.json (organ-wise impressions), with --fvlm (default: none; general "
                             "then takes the reports CSV's impression)")
    parser.add_argument("--llm-model", metavar="NAME", default=None,
                        help="model name, required with --llm-url (default: none)")
    parser.add_argument("--llm-key-env", metavar="VAR", default=None,
                        help="environment variable holding the API key (default: none, no Authorization header)")
    parser.add_argument("--llm-concurrency", metavar="N", type=_number(int, True), default=4,
                        help="requests in flight (default: 4)")
    parser.add_argument("--llm-rate", metavar="R", type=_number(float, False), default=0.0,
                        help="requests per second at most (default: 0, no limit)")
    parser.add_argument("--llm-timeout", metavar="S", type=_number(float, True), default=120.0,
                        help="seconds per request (default: 120)")
    parser.add_argument("--llm-retries", metavar="N", type=_number(int, False), default=4,
                        help="retries of a request after 429, 5xx, timeouts (default: 4, exponential backoff)")


class LLMFailed(RuntimeError):
    """Every report sent to --llm-url failed: no bank is written (exit status 1)."""


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _check_args(args) -> str:
    """'' when the flags fit together, else what is wrong."""
    if args.fvlm_impressions and not args.fvlm:
        return "argument --fvlm-impressions: only with --fvlm DESC.json"
    if args.llm_url and not args.llm_model:
        return "argument --llm-model: required with --llm-url"
    llm_only = [f"--{n.replace('_', '-')}" for n in ("llm_model", "llm_key_env") if getattr(args, n)]
    if llm_only and not args.llm_url:
        return f"argument {llm_only[0]}: only with --llm-url URL"
    if args.llm_key_env and not os.environ.get(args.llm_key_env):
        return f"argument --llm-key-env: environment variable {args.llm_key_env} is not set or empty"
    for flag, value in (("--fvlm", args.fvlm), ("--fvlm-impressions", args.fvlm_impressions),
                        ("--radgenome", args.radgenome)):
        if value is not None and not Path(value).is_file():
            return f"argument {flag}: no such file {value}"
    return ""


def _dataset(args) -> CTRateDataset:
    require = () if (args.fvlm or args.radgenome) else ("reports",)
    return CTRateDataset(args.data, args.split, masks_dir=None, findings=None, require=require,
                         check_headers=False, layout=args.layout)


def _build(args, ds, reports) -> tuple[dict, list[str]]:
    """(entries, summary lines) by the chosen source."""
    impressions = {name: imp for name, (_, imp) in reports.items()}
    names = [rec.name for rec in ds]
    if args.llm_url:
        from sigvlp.data.findings_llm import EndpointUnreachable, LLMConfig, llm_entries  # urllib: this mode only

        config = LLMConfig(url=args.llm_url, model=args.llm_model,
                           api_key=os.environ.get(args.llm_key_env) if args.llm_key_env else None,
                           concurrency=args.llm_concurrency, rate=args.llm_rate, timeout=args.llm_timeout,
                           max_retries=args.llm_retries)
        cache = Path(args.data) / "findings" / ".llm-cache" / f"{args.split}.jsonl"
        try:
            entries, stats = llm_entries(reports, config, cache, progress=True)
        except EndpointUnreachable as e:  # probed once before the first request
            raise ValueError(f"argument --llm-url: {e}") from None
        if stats.asked and not stats.answered:
            why = stats.fallback[0][1] if stats.fallback else "no answer"
            raise LLMFailed(f"all {stats.asked} reports sent to {config.endpoint} failed (first: {why[:160]}); "
                            "no bank written")
        return entries, [stats.summary(), f"llm cache: {cache}"]
    if args.fvlm:
        entries, stats = fvlm_entries(names, args.fvlm, args.fvlm_impressions, impressions)
        source = f"fVLM {args.fvlm}"
    elif args.radgenome:
        entries, stats = radgenome_entries(names, args.radgenome, impressions)
        source = f"RadGenome {args.radgenome}"
    else:
        return {n: split_report(f, i) for n, (f, i) in reports.items()}, []
    lines = [f"{stats.entries} volumes from {source}"]
    fallback = [n for n in stats.missing if n in reports]
    for name in fallback:
        entries[name] = split_report(*reports[name])
    if stats.missing:
        lines.append(f"{len(stats.missing)} volumes have no entry there: {len(fallback)} split from their report "
                     f"by the rules, {len(stats.missing) - len(fallback)} without a report left out "
                     f"(e.g. {stats.missing[0]})")
    if stats.unknown:
        names_ = ", ".join(f"{k} ({v})" for k, v in sorted(stats.unknown.items()))
        lines.append(f"names outside the region table, sent to general: {names_}")
    return entries, lines


def run(args) -> int:
    problem = _check_args(args)
    if problem:
        return _error(problem)
    out = Path(args.out) if args.out else Path(args.data) / "findings" / f"{args.split}_findings.jsonl"
    if out.exists() and not args.overwrite:
        return _error(f"argument --out: {out} exists; pass --overwrite to replace it")
    if out.suffix not in (".jsonl", ".json") or out.is_dir():
        return _error(f"argument --out: expected a .jsonl file path, got {out}")
    try:
        check_writable(out, kind="file")
    except ValueError as e:
        return _error(f"argument --out: {e}")
    try:
        ds = _dataset(args)
    except (FileNotFoundError, ValueError) as e:
        return _error(f"argument DATA: {e}")
    if not len(ds):
        return _error(f"argument DATA: no {args.split} volumes found under {args.data}\n{ds.scan.summary()}")
    reports = {rec.name: ((rec.report or {}).get("Findings_EN") or "", (rec.report or {}).get("Impressions_EN") or "")
               for rec in ds if rec.report}
    try:
        entries, lines = _build(args, ds, reports)
    except (FileNotFoundError, ValueError) as e:
        return _error(str(e))
    except LLMFailed as e:  # every LLM request failed: not the bank the user asked for
        print(f"{PROG}: error: argument --llm-url: {e}", file=sys.stderr)
        return 1
    write_bank(entries, out, overwrite=True)
    with_organs = {o: sum(1 for e in entries.values() if o in e["organs"]) for o in ORGANS}
    cover = ", ".join(f"{o} {n}" for o, n in with_organs.items() if n)
    print(f"wrote {len(entries)} {args.split} entries to {out} (volumes with text per organ: {cover or 'none'})")
    for line in lines:
        print(line)
    if ds.scan.skipped:
        print(ds.scan.summary())
    return 0
