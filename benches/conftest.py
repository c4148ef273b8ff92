"""Benchmark reporting (the common setup, Triton interpreter and output poisoning, lives in
the repository's top-level conftest.py)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# ----------------------------------------------------------------------------- reporting
# Benchmarks add rows with `bench_report.add(table, **columns)`; each table is printed at the
# end of the run (and written to .benchmarks/sigvlp-report.json), so ratios against the named
# baselines of one run are read off together. Numbers are reported, never asserted.

import json  # noqa: E402
import pathlib  # noqa: E402

FULL = HAS_CUDA and os.environ.get("SIGVLP_BENCH_QUICK", "0") in ("", "0")
"""Full sizes on a GPU; quick CPU mode otherwise (or with SIGVLP_BENCH_QUICK=1)."""


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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

    def render(self) -> str:
        out = []
        for name, rows in self.tables.items():
            keys = list(dict.fromkeys(k for row in rows for k in row))
            cells = [[_fmt(row.get(k)) for k in keys] for row in rows]
            widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
            out.append(f"\n== {name} ==")
            out.append("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
            out.extend("  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells)
        return "\n".join(out)


_REPORT = BenchReport()


@pytest.fixture(scope="session")
def bench_report() -> BenchReport:
    return _REPORT


@pytest.fixture(scope="session")
def full_mode() -> bool:
    return FULL


def pytest_terminal_summary(terminalreporter):
    if not _REPORT.tables:
        return
    terminalreporter.write_line(_REPORT.render())
    path = pathlib.Path(".benchmarks")
    path.mkdir(exist_ok=True)
    (path / "sigvlp-report.json").write_text(json.dumps(_REPORT.tables, indent=1, default=str))
