"""Benchmark session set-up: mode, results folder, pytest-benchmark settings, the end-of-run
summary. The common set-up (Triton interpreter without a GPU) lives in the repository's top-level
conftest.py; the harness itself (timing, rows, CSV, plots) in benches/_bench.py.

Options (valid when benches/ is on the command line, e.g. ``pytest benches/``):
  --bench-mode=auto|quick|full   auto: full with a CUDA device, quick otherwise (SIGVLP_BENCH_QUICK=1
                                 forces quick, as before)
  --bench-out=DIR                results folder (default benches/results/<UTC timestamp>/)
  --bench-tables                 also print pytest-benchmark's own (wide) tables
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

import _bench

HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    group = parser.getgroup("sigvlp benches")
    group.addoption("--bench-mode", default="auto", choices=("auto", "quick", "full"),
                    help="quick: CPU-sized inputs; full: GPU sizes; auto: full when a CUDA device is present")
    group.addoption("--bench-out", default=None, metavar="DIR",
                    help="results folder (default benches/results/<UTC timestamp>/)")
    group.addoption("--bench-tables", action="store_true", default=False,
                    help="also print pytest-benchmark's own tables")


def pytest_configure(config):
    _bench.set_mode(config.getoption("--bench-mode", default="auto"))
    out = config.getoption("--bench-out", default=None)
    _bench.RESULTS.out_dir = pathlib.Path(out).resolve() if out else _bench.new_results_dir()
    if config.option.collectonly or getattr(config, "workerinput", None) is not None:
        return
    if hasattr(config.option, "benchmark_quiet") and not config.getoption("--bench-tables", default=False):
        if not getattr(config.option, "benchmark_verbose", False):
            config.option.benchmark_quiet = True
    if hasattr(config.option, "benchmark_json") and config.option.benchmark_json is None:
        directory = _bench.RESULTS.directory()
        path = directory / "pytest-benchmark.json"
        # pytest-benchmark < 5.3 writes into an open file, 5.3 and later opens the path itself
        from importlib.metadata import version

        major, minor = (int(v) for v in version("pytest-benchmark").split(".")[:2])
        config.option.benchmark_json = path if (major, minor) >= (5, 3) else open(path, "wb")  # noqa: SIM115


# ----------------------------------------------------------------------------- older report API
# Benchmarks written before _bench.Results add rows with `bench_report.add(table, **columns)`;
# each call also becomes a row of the results CSV (see _bench.legacy_row).


class BenchReport:
    def __init__(self):
        self.tables: dict[str, list[dict]] = {}
        # Measurements later rows are compared with, e.g. baselines[("rope3d", "bf16", "copy")] = GB/s.
        self.baselines: dict[tuple, float] = {}

    def ratio(self, value: float, key: tuple):
        base = self.baselines.get(key)
        return value / base if base else None

    def add(self, table: str, **columns):
        self.tables.setdefault(table, []).append(columns)
        _bench.legacy_row(table, columns)


_REPORT = BenchReport()


@pytest.fixture(scope="session")
def bench_report() -> BenchReport:
    return _REPORT


@pytest.fixture(scope="session")
def full_mode() -> bool:
    return _bench.full()


@pytest.fixture
def bench(request) -> _bench.Bench:
    """Time and record rows: bench.time(fn) -> Timing, bench.record(op=..., provider=..., ...)."""
    return _bench.Bench(request)


@pytest.fixture(autouse=True)
def _fresh_timing():
    _bench._LAST_TIMING[0] = None
    yield


def pytest_terminal_summary(terminalreporter, config):
    results = _bench.RESULTS
    if not results.rows:
        return
    out = results.write()
    terminalreporter.section(f"sigvlp benchmarks ({_bench.mode()} mode, {results.env()['device']})")
    terminalreporter.write_line(results.summary())
    import importlib.util

    plots = "plot_*.png" if importlib.util.find_spec("matplotlib") else "no plots: matplotlib is not installed"
    terminalreporter.write_line(f"results: {out}/results.csv (+ results.json, pytest-benchmark.json, {plots})")


def _has_benchmarks(path: pathlib.Path) -> bool:
    """Whether pytest-benchmark's JSON file holds any benchmark (empty, unreadable or none: no)."""
    try:
        return bool(json.loads(path.read_text() or "{}").get("benchmarks"))
    except (OSError, ValueError, AttributeError):
        return False


def pytest_unconfigure(config):
    # A session that recorded nothing leaves no empty results folder behind.
    out = _bench.RESULTS.out_dir
    if _bench.RESULTS.rows or out is None or not out.exists():
        return
    json_file = getattr(config.option, "benchmark_json", None)
    # pytest-benchmark < 5.3: an open file of ours; >= 5.3: a path it writes itself (or not at all)
    if json_file is not None and not isinstance(json_file, (str, os.PathLike)) and not json_file.closed:
        json_file.close()
    files = list(out.iterdir())
    if all(f.name == "pytest-benchmark.json" and not _has_benchmarks(f) for f in files):
        for f in files:
            f.unlink()
        try:
            out.rmdir()
        except OSError:
            pass
