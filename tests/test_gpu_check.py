"""`benches/gpu_check.sh --dry-run` plans every stage within the issue-23 budget of 6 minutes on a
16-core GPU host, with the precompile stage's seconds computed from the variant counts.

The dry run prints per stage its cap in seconds and `total: N s`. Checked here: every stage of the
run is listed (build+precompile, selftest, gpu_tests, each bench of `benches/_bench.py plan` in
that order, summary); the total is the sum of the stages and at most 360 s with no stage cut
short; the precompile estimate is sigvlp.precompile.estimate_seconds of the counts the dry run
printed (the variant counts per kernel family of `python -m sigvlp.precompile --count --gpu-check`,
not a typed-in number) at a host factor of at least 1.0 (no assumed speed-up).
The summary's per-op table (`benches/_bench.py table`) is checked on hand-written inputs.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from sigvlp import precompile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
import _bench  # noqa: E402
BUDGET_S = 360
CORES = 16


def _dry_run(out: pathlib.Path) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GPU_CHECK_CORES=str(CORES), PYTHON=sys.executable)
    result = subprocess.run(["bash", "benches/gpu_check.sh", str(out), "--dry-run"], capture_output=True, text=True,
                            env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, (out / "gpu_check.log").read_text()


def test_dry_run_lists_every_stage_and_fits_the_budget(tmp_path):
    pytest.importorskip("triton")
    stdout, log = _dry_run(tmp_path)
    plan = subprocess.run([sys.executable, "benches/_bench.py", "plan"], capture_output=True, text=True, cwd=ROOT,
                          check=True).stdout.split()
    benches = [name for name in plan[::2] if (ROOT / "benches" / f"{name}.py").exists()]
    stages = re.findall(r"^\[gpu_check \d+s\]   (\S+) +(\d+) s$", stdout, re.M)
    assert [name for name, _ in stages] == ["build+precompile", "selftest", "gpu_tests", *benches, "summary"]
    total = re.search(r"^\[gpu_check \d+s\] total: (\d+) s$", stdout, re.M)
    assert total, stdout[-3000:]
    assert int(total.group(1)) == sum(int(s) for _, s in stages)
    assert int(total.group(1)) <= BUDGET_S, stdout[-3000:]
    assert {f: int(s) for f, s in stages if f in benches} == {n: int(c) for n, c in zip(plan[::2], plan[1::2])
                                                             if n in benches}

    counts = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
    assert set(counts) >= {"rope_attention_varlen/_fwd_kernel/16bit", "sigmoid_loss/sigmoid_loss_pass_kernel/fp32"}
    jobs = CORES - 4  # the CUDA build's 4 cores run beside the precompile
    printed = re.search(r"estimate: (\d+) s with (\d+) jobs \((\d+) variants", stdout)
    assert printed and int(printed.group(2)) == jobs and int(printed.group(3)) == sum(counts.values())
    assert int(printed.group(1)) == round(precompile.estimate_seconds(counts, jobs))
    # no stage cut short to fit: precompile gets its whole estimate (+10 s, at least the build's 100 s)
    assert dict(stages)["build+precompile"] == str(max(int(printed.group(1)) + 10, 100))
    assert "OVER" not in stdout and f"HOST_FACTOR {precompile.HOST_FACTOR}" in stdout
    assert precompile.HOST_FACTOR >= 1.0  # conservative until the GPU host's speed is measured


def _row(provider, ms, dtype="bfloat16", tflops=""):
    return dict(op="attention fwd", provider=provider, shape="1024", dtype=dtype, mode="full", median_ms=ms,
                tflops=tflops, device="NVIDIA H200")


def test_summary_table_per_op_and_dtype(tmp_path):
    checks = [dict(op="rope3d", backend="triton", dtype="bfloat16", status="PASS"),
              dict(op="rope3d", backend="cuda", dtype="bfloat16", status="FAIL"),
              dict(op="sigmoid_loss", backend="cuda", dtype="float32", status="SKIP")]
    (tmp_path / "selftest.json").write_text(json.dumps(checks))
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="4">'
        '<testcase classname="tests.test_rope" name="test_a[bfloat16-triton]"/>'
        '<testcase classname="tests.test_attention_cuda" name="test_b[fp16]"><failure/></testcase>'
        '<testcase classname="tests.test_attention" name="test_c[float16]"><skipped/></testcase>'
        '<testcase classname="tests.test_muon" name="test_d"/></testsuite></testsuites>')
    rows = [_row("sigvlp", "1.0", tflops="100"), _row("rope3d+varlen_attn", "3.0", tflops="33"),
            _row("hf_rotary+varlen_attn", "5.0", tflops="20"), _row("sigvlp", "2.0", dtype="float16", tflops="50")]
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_bench.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = _bench.op_table(tmp_path / "results.csv", tmp_path / "selftest.json", tmp_path / "tests.xml")
    table: dict = {}
    for line in lines[2:]:
        if not line.startswith("  other"):
            table.setdefault(tuple(line.split()[:2]), []).append(line.split()[2:])
    table = {key: cells[0] if len(cells) == 1 else cells for key, cells in table.items()}
    assert lines[0] == "device: NVIDIA H200"
    assert table[("rope3d", "bfloat16")] == ["FAIL", "1", "of", "2", "1/0"]
    assert table[("rope_attention_varlen", "float16")] == ["0/1", "50"]  # no fp16 baseline: no ratio
    # one line per named baseline: the optimized unfused one, the common (HF Qwen-VL rotary) ones
    assert table[("rope_attention_varlen", "bfloat16")] == [["100", "3.00x", "vs", "rope3d+varlen_attn"],
                                                            ["5.00x", "vs", "hf_rotary+varlen_attn"]]
    assert table[("sigmoid_loss", "float32")] == ["SKIP"]
    assert lines[-1] == "  other GPU tests: 1 passed, 0 failed"
    missing = _bench.op_table(tmp_path / "none.csv", tmp_path / "none.json", tmp_path / "none.xml")
    assert missing[0] == "device: no bench rows" and len(missing) == 2
