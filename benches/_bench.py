"""The benchmark harness shared by benches/bench_*.py: mode, timing and one results format.

A bench asks for the ``bench`` fixture (benches/conftest.py) and, per measurement::

    t = bench.time(fn)                          # Timing: median and IQR in seconds
    bench.record(op="rope3d", provider="triton", shape="tokens=4096 heads=16 d=64",
                 dtype=torch.bfloat16, timing=t, bytes=nbytes, baseline="torch")

- Mode: "quick" (CPU-sized inputs, reference backends) or "full" (GPU sizes). Auto: full when a
  CUDA device is present, quick otherwise; ``--bench-mode=quick|full`` or SIGVLP_BENCH_QUICK=1
  override. ``full()`` / ``mode()`` are valid from collection on (for parametrisation).
- Timing (`measure`): on a GPU, CUDA events around each call, the L2 cache flushed before each
  one, after one untimed call (compilation, autotuning) and ~25 ms of warm-up, repeated for
  ~100 ms (5 to 200 calls); on the CPU, perf_counter over `rounds` calls after one warm-up call.
  Median and inter-quartile range of the per-call times. The samples are also handed to
  pytest-benchmark, so its JSON holds exactly what the CSV summarises.
- Ratios: ``baseline`` names the provider a row is compared with; after the run each row is
  paired with the row of that provider with the same op, shape, dtype and mode *of the same
  run*: ratio_to_baseline = baseline median / this median (> 1: faster than the baseline).
- Results: every run writes into benches/results/<UTC timestamp>/ (or ``--bench-out DIR``):
  results.csv (COLUMNS below), results.json (the same rows), pytest-benchmark.json, one PNG per
  op (plot_<op>.png) plus whatever a bench adds there (``results_dir()``), and prints one
  compact summary table at the end of the session.

Numbers are reported, never asserted.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import os
import pathlib
import platform
import re
import statistics
import time
from typing import Callable

import torch

from sigvlp.ops.registry import SPECS, KeyRatio

HAS_CUDA = torch.cuda.is_available()

#: the columns of results.csv, in order (documented in docs/benchmarks.md)
COLUMNS = (
    "timestamp", "mode", "op", "provider", "shape", "dtype", "device", "torch", "triton",
    "median_ms", "iqr_ms", "rounds", "tflops", "gbps", "peak_mib", "baseline", "ratio_to_baseline",
    "test", "extra",
)

RESULTS_ROOT = pathlib.Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------- mode


def mode_from_env(option: str | None = None) -> str:
    """'quick' or 'full' from --bench-mode (auto|quick|full), SIGVLP_BENCH_QUICK and the device."""
    if option in ("quick", "full"):
        return option
    if option not in (None, "", "auto"):
        raise ValueError(f"--bench-mode: expected auto, quick or full, got {option!r}")
    if os.environ.get("SIGVLP_BENCH_QUICK", "0") not in ("", "0"):
        return "quick"
    return "full" if HAS_CUDA else "quick"


_MODE = mode_from_env(None)


def set_mode(value: str) -> None:
    global _MODE
    _MODE = mode_from_env(value)


def mode() -> str:
    """This session's bench mode, 'quick' or 'full'."""
    return _MODE


def full() -> bool:
    return _MODE == "full"


def smoke() -> bool:
    """Quick mode at its smallest (SIGVLP_BENCH_SMOKE=1, set by gpu_check.sh's CPU walk, which tests
    the script, not the numbers): one CPU timing round, and the benches' smallest quick shapes."""
    return not full() and os.environ.get("SIGVLP_BENCH_SMOKE", "0") not in ("", "0")


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    """Per-call times of one measurement, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def rounds(self) -> int:
        return len(self.samples)


_L2_FLUSH: dict[int, torch.Tensor] = {}


def _flush_l2(device: int) -> None:
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=f"cuda:{device}")
    buf.zero_()


def _measure_cuda(fn: Callable, warmup_ms: float, rep_ms: float, min_rounds: int, max_rounds: int) -> list[float]:
    device = torch.cuda.current_device()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(min(100, max(1, int(warmup_ms / estimate_ms)))):
        fn()
    n = min(max_rounds, max(min_rounds, int(rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        _flush_l2(device)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def _measure_cpu(fn: Callable, rounds: int, iterations: int) -> list[float]:
    fn()  # warm-up: first-call costs (imports, allocations, compilation)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - t0) / iterations)
    return samples


def measure(fn: Callable, *, rounds: int = 3, iterations: int = 1, warmup_ms: float = 25.0,
            rep_ms: float = 100.0, min_rounds: int = 5, max_rounds: int = 200, cuda: bool | None = None) -> Timing:
    """Time fn() (seconds per call). GPU (cuda=None: when a CUDA device is present): CUDA events,
    L2 flushed before each call, after one untimed call and ~warmup_ms of warm-up, repeated for
    ~rep_ms (min_rounds..max_rounds calls). CPU: `rounds` samples of `iterations` calls each,
    after one untimed call."""
    if cuda is None:
        cuda = HAS_CUDA
    if cuda:
        return Timing(_measure_cuda(fn, warmup_ms, rep_ms, min_rounds, max_rounds))
    if smoke():
        rounds = iterations = 1
    return Timing(_measure_cpu(fn, max(1, rounds), max(1, iterations)))


def feed_benchmark(benchmark, timing: Timing) -> None:
    """Hand the samples to pytest-benchmark's fixture (for its JSON), without timing again."""
    if benchmark is None or not getattr(benchmark, "enabled", True):
        return
    try:
        if benchmark._mode:  # already used by the bench itself
            return
        benchmark._mode = "sigvlp _bench.measure"
        stats = benchmark._make_stats(1)
        for s in timing.samples:
            stats.update(s)
    except AttributeError:  # another pytest-benchmark layout: its JSON lacks this one (our CSV has it)
        return


_LAST_TIMING: list[Timing | None] = [None]


def timed(benchmark, fn: Callable, *, rounds: int, iterations: int = 1) -> float:
    """Median seconds of fn() (see `measure`; CUDA events on a GPU), also given to pytest-benchmark.
    The older helper's signature, kept for the bench files that use it."""
    timing = measure(fn, rounds=rounds, iterations=iterations)
    feed_benchmark(benchmark, timing)
    _LAST_TIMING[0] = timing
    return timing.median


def last_timing() -> Timing | None:
    """The Timing of the last `timed` call in the current test (None if none)."""
    return _LAST_TIMING[0]


def peak_memory(fn: Callable) -> int | None:
    """Peak bytes allocated on the GPU by fn() beyond what was allocated before (None on CPU)."""
    if not HAS_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


# ----------------------------------------------------------------------------- results


def _dtype_name(dtype) -> str:
    if dtype is None:
        return ""
    return str(dtype).removeprefix("torch.")


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415

        return triton.__version__
    except ImportError:
        return ""


class Results:
    """All rows of one session, written out at its end."""

    def __init__(self):
        self.rows: list[dict] = []
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.out_dir: pathlib.Path | None = None  # fixed by conftest (or created on first use)
        self._env = None

    def env(self) -> dict:
        if self._env is None:
            self._env = {"device": device_name(), "torch": torch.__version__, "triton": _triton_version()}
        return self._env

    def directory(self) -> pathlib.Path:
        if self.out_dir is None:
            self.out_dir = new_results_dir()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir

    def add(self, *, op: str, provider: str, shape="", dtype=None, timing: Timing | None = None,
            seconds: float | None = None, flops: float | None = None, bytes: float | None = None,
            peak_bytes: float | None = None, baseline: str | None = None, test: str = "", **extra) -> dict:
        median = timing.median if timing is not None else seconds
        row = {
            "timestamp": self.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "mode": mode(),
            "op": op,
            "provider": provider,
            "shape": shape if isinstance(shape, str) else "x".join(map(str, shape)),
            "dtype": _dtype_name(dtype),
            **self.env(),
            "median_ms": None if median is None else median * 1e3,
            "iqr_ms": None if timing is None else timing.iqr * 1e3,
            "rounds": None if timing is None else timing.rounds,
            "tflops": flops / median / 1e12 if flops and median else None,
            "gbps": bytes / median / 1e9 if bytes and median else None,
            "peak_mib": None if peak_bytes is None else peak_bytes / 2**20,
            "baseline": baseline or "",
            "ratio_to_baseline": None,
            "test": test,
            "extra": {k: v for k, v in extra.items() if v is not None},
        }
        self.rows.append(row)
        self._append(row)
        return row

    def _append(self, row: dict) -> None:
        """Each row reaches results.csv at once (without its ratio, filled in by `write` at the end),
        so a run killed half way still leaves what it measured."""
        path = self.directory() / "results.csv"
        new = not path.exists() or len(self.rows) == 1
        with open(path, "w" if new else "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: _csv_cell(row[k]) for k in COLUMNS})

    def pair_ratios(self) -> None:
        """ratio_to_baseline = baseline median / row median, for the baseline row of the same
        op, shape, dtype and mode in this run."""
        index = {(r["op"], r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in self.rows}
        for r in self.rows:
            if not r["baseline"] or not r["median_ms"]:
                continue
            base = index.get((r["op"], r["shape"], r["dtype"], r["mode"], r["baseline"]))
            if base is not None and base["median_ms"]:
                r["ratio_to_baseline"] = base["median_ms"] / r["median_ms"]

    def write(self) -> pathlib.Path | None:
        if not self.rows:
            return None
        self.pair_ratios()
        out = self.directory()
        with open(out / "results.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: _csv_cell(r[k]) for k in COLUMNS})
        (out / "results.json").write_text(json.dumps(self.rows, indent=1, default=str))
        plot_rows(self.rows, out)
        return out

    def summary(self) -> str:
        """The compact end-of-run table (one line per row, grouped by op)."""
        self.pair_ratios()
        head = ("provider", "shape", "dtype", "ms", "IQR", "TFLOP/s", "GB/s", "peak MiB", "x baseline")
        lines = []
        for op in dict.fromkeys(r["op"] for r in self.rows):
            rows = [r for r in self.rows if r["op"] == op]
            cells = [(r["provider"], r["shape"], r["dtype"], _fmt(r["median_ms"]), _fmt(r["iqr_ms"]),
                      _fmt(r["tflops"]), _fmt(r["gbps"]), _fmt(r["peak_mib"]),
                      "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.3g} vs {r['baseline']}")
                     for r in rows]
            keep = [i for i in range(len(head)) if i < 4 or any(c[i] for c in cells)]
            widths = [max(len(head[i]), *(len(c[i]) for c in cells)) for i in keep]
            lines.append(f"-- {op} --")
            lines.append("  ".join(head[i].ljust(w) for i, w in zip(keep, widths)).rstrip())
            lines += ["  ".join(c[i].ljust(w) for i, w in zip(keep, widths)).rstrip() for c in cells]
        return "\n".join(lines)


def _csv_cell(value):
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True) if value else ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def new_results_dir(root: pathlib.Path | None = None) -> pathlib.Path:
    root = RESULTS_ROOT if root is None else pathlib.Path(root)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


RESULTS = Results()


def results_dir() -> pathlib.Path:
    """This session's results folder (created on first use): benches may write their own files."""
    return RESULTS.directory()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "op"


def plot_rows(rows: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    """One PNG per op: per shape, one bar per provider (throughput when counted, else time)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    written = []
    for op in dict.fromkeys(r["op"] for r in rows):
        group = [r for r in rows if r["op"] == op and r["median_ms"]]
        if not group:
            continue
        metric, label = "median_ms", "median time per call (ms, lower is better)"
        if all(r["tflops"] for r in group):
            metric, label = "tflops", "TFLOP/s (higher is better)"
        elif all(r["gbps"] for r in group):
            metric, label = "gbps", "GB/s (higher is better)"
        shapes = list(dict.fromkeys(r["shape"] or "-" for r in group))
        providers = list(dict.fromkeys(r["provider"] for r in group))
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(shapes) + 2), 3.6))
        for j, p in enumerate(providers):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                vals = [r[metric] for r in group if r["provider"] == p and (r["shape"] or "-") == s]
                if vals:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(vals[0])
            ax.bar(xs, ys, width=width, label=p or "-")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([textwrap(s) for s in shapes], fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{op} ({group[0]['device']}, {group[0]['mode']})", fontsize=9)
        if max(r[metric] for r in group) / max(min(r[metric] for r in group), 1e-30) > 100:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"plot_{_slug(op)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def textwrap(s: str, width: int = 18) -> str:
    words, lines, cur = s.split(" "), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- per-test helper


class Bench:
    """The ``bench`` fixture: time, record and query the mode inside one bench test."""

    def __init__(self, request, results: Results = RESULTS):
        self._request = request
        self._results = results
        self.mode = mode()
        self.full = self.mode == "full"
        self.cuda = HAS_CUDA
        self.device = "cuda" if HAS_CUDA else "cpu"
        self.last: Timing | None = None

    def _benchmark(self):
        if "benchmark" not in self._request.fixturenames:
            try:
                return self._request.getfixturevalue("benchmark")
            except Exception:  # pytest-benchmark not installed
                return None
        return self._request.getfixturevalue("benchmark")

    def time(self, fn: Callable, *, rounds: int | None = None, iterations: int = 1, **kw) -> Timing:
        """Timing of fn() (see `measure`); rounds defaults to 3 (CPU only; GPU rounds adapt)."""
        timing = measure(fn, rounds=rounds or 3, iterations=iterations, **kw)
        feed_benchmark(self._benchmark(), timing)
        self.last = timing
        return timing

    def peak_memory(self, fn: Callable) -> int | None:
        return peak_memory(fn)

    def record(self, *, op: str, provider: str, shape="", dtype=None, timing: Timing | None = None,
               seconds: float | None = None, flops: float | None = None, bytes: float | None = None,
               peak_bytes: float | None = None, baseline: str | None = None, **extra) -> dict:
        """Add one row. timing defaults to this test's last `time` (or `timed`) result, or give seconds=.
        flops / bytes: work of one call (-> TFLOP/s, GB/s); baseline: the provider this row is
        compared with (same op, shape, dtype, mode); extra: anything else (goes to the CSV's
        `extra` column as JSON)."""
        if timing is None and seconds is None:
            timing = self.last or _LAST_TIMING[0]  # this test's bench.time(...) or timed(...)
        return self._results.add(op=op, provider=provider, shape=shape, dtype=dtype, timing=timing,
                                 seconds=seconds, flops=flops, bytes=bytes, peak_bytes=peak_bytes,
                                 baseline=baseline, test=self._request.node.nodeid, **extra)


# ----------------------------------------------------------------------------- older report API


_METRIC_KEYS = {"ms", "TFLOPs", "GBps", "peak_MiB", "provider", "dtype"}


def legacy_row(table: str, columns: dict, test: str = "") -> dict:
    """A tidy row from an older `bench_report.add(table, **columns)` call (until each bench file
    records its rows itself): the test's last timing (else its `ms` column), TFLOPs / GBps /
    peak_MiB columns, the other columns as the shape."""
    timing = _LAST_TIMING[0]
    seconds = None
    if timing is None and isinstance(columns.get("ms"), (int, float)):
        seconds = columns["ms"] / 1e3
    median = timing.median if timing is not None else seconds
    tf, gb = columns.get("TFLOPs"), columns.get("GBps")
    shape = " ".join(f"{k}={v}" for k, v in columns.items()
                     if k not in _METRIC_KEYS and not isinstance(v, float) and v is not None)
    extra = {k: v for k, v in columns.items() if k not in _METRIC_KEYS and isinstance(v, float)}
    row = RESULTS.add(op=table.split(" (")[0], provider=str(columns.get("provider", "")), shape=shape,
                      dtype=columns.get("dtype"), timing=timing, seconds=seconds,
                      flops=tf * 1e12 * median if tf and median else None,
                      bytes=gb * 1e9 * median if gb and median else None,
                      peak_bytes=None if columns.get("peak_MiB") is None else columns["peak_MiB"] * 2**20,
                      test=test, **extra)
    _LAST_TIMING[0] = None
    return row


# ----------------------------------------------------------------------------- gpu_check helpers
# `python benches/_bench.py junit FILE.xml | merge OUT.csv IN.csv... | ratios RESULTS.csv | plan`

#: Ratios of benches that are not one op's (each op's own are in its OpSpec, sigvlp.ops.registry):
#: (title, op substring, providers (None: any but the baseline), baseline provider (substring match)).
OTHER_KEY_RATIOS = (
    KeyRatio("encoder forward: sigvlp vs rope3d + varlen attention", "encoder forward", ("sigvlp",),
             "rope3d+varlen_attn"),
    KeyRatio("Muon step: ours vs torch.optim.Muon", "Muon", ("sigvlp", "sigvlp-triton", "sigvlp-cuda"),
             "torch.optim.Muon"),
    KeyRatio("model training step: ours vs unfused (rope3d + varlen attention, dense loss, torch Muon)",
             "train step", None, "unfused"),
)
#: Every key ratio gpu_check.sh summarises: the ops' (registry order), then the others.
KEY_RATIOS = tuple(r for spec in SPECS.values() for r in spec.key_ratios) + OTHER_KEY_RATIOS

#: gpu_check.sh's time cap (seconds) of each bench file that is not one op's (an op's bench and cap
#: are in its OpSpec); a file in neither gets DEFAULT_BENCH_CAP_S.
OTHER_BENCH_CAPS = {"bench_model": 20, "bench_flops_vs_slices": 20, "bench_eval": 10, "bench_data": 10}
DEFAULT_BENCH_CAP_S = 40


def bench_plan() -> list[tuple[str, int]]:
    """(bench file stem, cap in seconds) in gpu_check.sh's order: the benches of the key ratios first
    (ops with key ratios, then bench_model), then the FLOP-vs-slices figure, then the rest (ops,
    then the others, then any bench_*.py file not named anywhere)."""
    ops = [(pathlib.Path(s.bench).stem, s.bench_cap_s) for s in SPECS.values()]
    keyed = [ops[i] for i, s in enumerate(SPECS.values()) if s.key_ratios]
    order = keyed + [("bench_model", OTHER_BENCH_CAPS["bench_model"]),
                     ("bench_flops_vs_slices", OTHER_BENCH_CAPS["bench_flops_vs_slices"])]
    order += ops + list(OTHER_BENCH_CAPS.items())
    order += [(p.stem, DEFAULT_BENCH_CAP_S) for p in sorted(pathlib.Path(__file__).parent.glob("bench_*.py"))]
    seen: set[str] = set()
    return [(name, cap) for name, cap in order if not (name in seen or seen.add(name))]


def read_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        with open(p, newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _ours(row: dict, ratio: KeyRatio) -> bool:
    """Whether `row` is one of `ratio`'s measured providers (not its baseline) with a time."""
    if ratio.baseline in row["provider"] or not _num(row["median_ms"]):
        return False
    return ratio.providers is None or row["provider"] in ratio.providers


def _ratio_pairs(rows: list[dict], ratio: KeyRatio) -> dict[str, list[float]]:
    """provider -> [baseline time / time] over the rows of `ratio`'s op paired with a baseline row
    of the same op, shape and mode (and dtype when the baseline has one of it)."""
    mine = [r for r in rows if ratio.op.lower() in r["op"].lower()]
    bases = [r for r in mine if ratio.baseline in r["provider"] and _num(r["median_ms"])]
    found: dict[str, list[float]] = {}
    for r in (r for r in mine if _ours(r, ratio)):
        same = [b for b in bases if (b["op"], b["shape"], b["mode"]) == (r["op"], r["shape"], r["mode"])]
        exact = [b for b in same if b["dtype"] == r["dtype"]] or same
        if exact:
            found.setdefault(r["provider"], []).append(_num(exact[0]["median_ms"]) / _num(r["median_ms"]))
    return found


def key_ratios(rows: list[dict]) -> list[str]:
    """Lines 'title: provider median Nx (min, max) over k pairs', a ratio being baseline time / time
    for rows of the same op, shape and mode (and dtype when the baseline has one of it)."""
    lines = []
    for ratio in KEY_RATIOS:
        title, found = ratio.title, _ratio_pairs(rows, ratio)
        if not found:
            lines.append(f"{title}: no pairs measured")
            continue
        devices = sorted({r["device"] for r in rows if ratio.op.lower() in r["op"].lower() and r.get("device")})
        for provider, ratios in found.items():
            ratios.sort()
            lines.append(f"{title}: {provider} {statistics.median(ratios):.2f}x median "
                         f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x) over {len(ratios)} cases"
                         f" on {', '.join(devices) or 'an unnamed device'}")
    return lines


#: The dtypes of the per-op table, each with the spellings found in test ids and dtype cells.
TABLE_DTYPES = {"float32": ("float32", "fp32"), "float16": ("float16", "fp16"), "bfloat16": ("bfloat16", "bf16")}


def dtype_in(text: str) -> str:
    """The first dtype of TABLE_DTYPES that `text` (a test id, a dtype cell) names as a word, else ""."""
    for name, spellings in TABLE_DTYPES.items():
        if any(re.search(rf"(?<![a-z0-9]){s}(?![a-z0-9])", text.lower()) for s in spellings):
            return name
    return ""


def _test_op(classname: str) -> str:
    """The op whose test file (OpSpec.test_file; stems that extend it too, e.g. test_attention_cuda)
    holds the JUnit test class `classname` ("tests.test_rope"), else "other"."""
    stem = next((part for part in classname.split(".") if part.startswith("test_")), "")
    for name, spec in SPECS.items():
        if stem.startswith(pathlib.Path(spec.test_file).stem):
            return name
    return "other"


def junit_by_op(path) -> dict[tuple[str, str], list[int]]:
    """(op, dtype named in the test id or "") -> [passed, failed] (errors count as failed; skipped
    tests are not counted) from a JUnit XML file; empty when the file is missing or unreadable."""
    import xml.etree.ElementTree as ET  # noqa: PLC0415  (only the summary reads XML)

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    counts: dict[tuple[str, str], list[int]] = {}
    for case in root.iter("testcase"):
        outcome = {child.tag for child in case}
        if "skipped" in outcome:
            continue
        cell = counts.setdefault((_test_op(case.get("classname", "")), dtype_in(case.get("name", ""))), [0, 0])
        cell[bool(outcome & {"failure", "error"})] += 1
    return counts


def _selftest_cells(path) -> dict[tuple[str, str], str]:
    """(op, dtype) -> "PASS n/m" / "FAIL k of m" / "SKIP" over the backends of `python -m
    sigvlp.selftest --json` output; empty when the file is missing."""
    try:
        checks = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return {}
    cells: dict[tuple[str, str], list[str]] = {}
    for c in checks:
        cells.setdefault((c["op"], c["dtype"]), []).append(c["status"])
    out = {}
    for key, statuses in cells.items():
        ran = [s for s in statuses if s != "SKIP"]
        failed = ran.count("FAIL")
        out[key] = "SKIP" if not ran else f"FAIL {failed} of {len(ran)}" if failed else f"PASS {len(ran)}/{len(ran)}"
    return out


def _bench_cells(rows: list[dict], ratio: KeyRatio | None, dtype: str) -> tuple[str, str]:
    """(median TFLOP/s of `ratio`'s providers, median ratio to its baseline) over the rows in `dtype`."""
    if ratio is None:
        return "", ""
    rows = [r for r in rows if dtype_in(r["dtype"]) == dtype]
    tflops = [_num(r["tflops"]) for r in rows if ratio.op.lower() in r["op"].lower() and _ours(r, ratio)
              and _num(r.get("tflops"))]
    ratios = [x for found in _ratio_pairs(rows, ratio).values() for x in found]
    return (f"{statistics.median(tflops):.3g}" if tflops else "",
            f"{statistics.median(ratios):.2f}x vs {ratio.baseline}" if ratios else "")


def op_table(results_csv, selftest_json, junit_xml) -> list[str]:
    """gpu_check's per-op table: per op (SPECS, then the other key ratios) and dtype, the
    self-test result, the GPU tests passed/failed, the median TFLOP/s of our providers and the
    median ratio to the named baseline (baseline time / ours), under the device's name."""
    rows = read_rows([results_csv]) if pathlib.Path(results_csv).exists() else []
    selftest, tests = _selftest_cells(selftest_json), junit_by_op(junit_xml)
    devices = sorted({r["device"] for r in rows if r.get("device")})
    lines = [f"device: {', '.join(devices) or 'no bench rows'}",
             f"  {'op':22} {'dtype':9} {'selftest':12} {'tests p/f':10} {'TFLOP/s':8} x baseline"]
    entries = [(name, spec.key_ratios or (None,)) for name, spec in SPECS.items()]
    entries += [(r.title.split(":")[0], (r,)) for r in OTHER_KEY_RATIOS]
    for name, ratios in entries:
        for dtype in (*TABLE_DTYPES, ""):
            passed, failed = tests.get((name, dtype), (0, 0))
            first = (selftest.get((name, dtype), ""), f"{passed}/{failed}" if passed or failed else "")
            for i, ratio in enumerate(ratios):  # an op with several baselines: a line for each measured
                tflops, x = _bench_cells(rows, ratio, dtype)
                cells = (*first, tflops, x) if i == 0 else ("", "", "", x)
                if any(cells):
                    lines.append(f"  {name:22} {dtype or 'any':9} {cells[0]:12} {cells[1]:10} {cells[2]:8} "
                                 f"{cells[3]}".rstrip())
    other = [cell for (name, _), cell in tests.items() if name == "other"]
    if other:
        lines.append(f"  other GPU tests: {sum(c[0] for c in other)} passed, {sum(c[1] for c in other)} failed")
    return lines


def junit_counts(path) -> str:
    """'passed N, skipped S' or 'FAIL: F failed, E errors, ...' from a JUnit XML file."""
    import xml.etree.ElementTree as ET  # noqa: PLC0415

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "FAIL: no results (timed out or crashed before the end)"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    text = f"{passed} passed, {total['skipped']} skipped"
    if total["failures"] or total["errors"]:
        return f"FAIL: {total['failures']} failed, {total['errors']} errors, {text}"
    return f"passed {passed}, skipped {total['skipped']}"


def _main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "junit":
        print(junit_counts(argv[1]))
        return 0
    if len(argv) >= 2 and argv[0] == "merge":
        paths = [p for p in argv[2:] if pathlib.Path(p).exists()]
        rows = read_rows(paths)
        with open(argv[1], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        print(f"merged {len(rows)} rows from {len(paths)} files into {argv[1]}")
        return 0
    if len(argv) == 2 and argv[0] == "ratios":
        rows = read_rows([argv[1]]) if pathlib.Path(argv[1]).exists() else []
        print("key ratios (baseline time / our time; > 1: faster than the baseline):")
        for line in key_ratios(rows):
            print("  " + line)
        return 0
    if len(argv) == 4 and argv[0] == "table":
        print("\n".join(op_table(*argv[1:])))
        return 0
    if argv == ["plan"]:
        for name, cap in bench_plan():
            print(name, cap)
        return 0
    print("usage: python benches/_bench.py junit FILE.xml | merge OUT.csv IN.csv... | ratios RESULTS.csv | plan"
          " | table RESULTS.csv SELFTEST.json JUNIT.xml")
    return 2


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
