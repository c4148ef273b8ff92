"""The bench suite's harness: collection, one quick run end to end (CSV columns, pytest-benchmark
JSON, summary, plots), ratio pairing, mode selection, and the FLOP counts of bench_flops_vs_slices.
(CI runs the whole quick suite, `pytest benches/`, separately.)"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHES = ROOT / "benches"
sys.path.insert(0, str(BENCHES))

import _bench  # noqa: E402

BENCH_FILES = sorted(p.name for p in BENCHES.glob("bench_*.py"))


def _pytest(*args, timeout=600):
    env = {**os.environ, "SIGVLP_BENCH_QUICK": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _result_dirs():
    return set((BENCHES / "results").glob("*"))


def test_every_bench_file_collects():
    before = _result_dirs()
    res = _pytest("benches/", "--collect-only", "-q")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in BENCH_FILES:
        assert f"benches/{name}::" in res.stdout, f"{name} collected no benchmark"
    assert _result_dirs() == before, "collecting must not write a results folder"


def test_quick_run_writes_one_results_format(tmp_path):
    out = tmp_path / "run"
    flops = "benches/bench_flops_vs_slices.py::test_encoder_flops_and_time"
    res = _pytest("benches/bench_rope.py", f"{flops}[tiny-16-rope3d+varlen_attn]", f"{flops}[tiny-16-sigvlp]",
                  f"--bench-out={out}")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    # the compact summary, not pytest-benchmark's wide tables
    assert "sigvlp benchmarks (quick mode" in res.stdout
    assert "Name (time in" not in res.stdout
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == _bench.COLUMNS
        rows = list(reader)
    assert {r["op"] for r in rows} >= {"encoder forward tiny"}
    assert any(r["op"].startswith("rope3d") for r in rows)
    for r in rows:
        assert r["mode"] == "quick" and r["device"] and r["torch"] == torch.__version__
        assert float(r["median_ms"]) > 0 and float(r["iqr_ms"]) >= 0 and int(r["rounds"]) >= 1
    enc = {r["provider"]: r for r in rows if r["op"] == "encoder forward tiny"}
    assert float(enc["sigvlp"]["tflops"]) > 0
    want = float(enc["rope3d+varlen_attn"]["median_ms"]) / float(enc["sigvlp"]["median_ms"])
    assert float(enc["sigvlp"]["ratio_to_baseline"]) == pytest.approx(want, rel=1e-4)
    assert enc["sigvlp"]["baseline"] == "rope3d+varlen_attn" and enc["rope3d+varlen_attn"]["ratio_to_baseline"] == ""
    assert json.loads((out / "results.json").read_text())[0]["op"] == rows[0]["op"]
    pb = json.loads((out / "pytest-benchmark.json").read_text())
    assert len(pb["benchmarks"]) == len(rows)
    assert (out / "flops_vs_slices.csv").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "flops_vs_slices.png").stat().st_size > 0
    assert list(out.glob("plot_*.png"))


# ----------------------------------------------------------------------------- harness units


def test_timing_median_iqr():
    t = _bench.Timing([4.0, 1.0, 3.0, 2.0, 5.0])
    assert t.median == 3.0 and t.iqr == 2.0 and t.rounds == 5
    cpu = _bench.measure(lambda: sum(range(100)), rounds=4, cuda=False)
    assert cpu.rounds == 4 and cpu.median > 0


def test_ratios_pair_within_op_shape_dtype(tmp_path):
    res = _bench.Results()
    res.out_dir = tmp_path
    res.add(op="op", provider="base", shape="s1", dtype=torch.float32, seconds=2.0)
    res.add(op="op", provider="fast", shape="s1", dtype=torch.float32, seconds=0.5, baseline="base")
    res.add(op="op", provider="fast", shape="s2", dtype=torch.float32, seconds=0.5, baseline="base")  # no pair
    res.add(op="op", provider="fast", shape="s1", dtype=torch.bfloat16, seconds=0.5, baseline="base")  # no pair
    res.add(op="op", provider="x", shape="s1", dtype=torch.float32, seconds=1.0, flops=4e12, bytes=2e9)
    res.write()
    rows = {(r["provider"], r["shape"], r["dtype"]): r for r in res.rows}
    assert rows[("fast", "s1", "float32")]["ratio_to_baseline"] == pytest.approx(4.0)
    assert rows[("fast", "s2", "float32")]["ratio_to_baseline"] is None
    assert rows[("fast", "s1", "bfloat16")]["ratio_to_baseline"] is None
    assert rows[("x", "s1", "float32")]["tflops"] == pytest.approx(4.0)
    assert rows[("x", "s1", "float32")]["gbps"] == pytest.approx(2.0)
    with open(tmp_path / "results.csv", newline="") as fh:
        assert tuple(csv.DictReader(fh).fieldnames) == _bench.COLUMNS
    assert "4 vs base" in res.summary()


def test_mode_selection(monkeypatch):
    monkeypatch.setenv("SIGVLP_BENCH_QUICK", "1")
    assert _bench.mode_from_env("auto") == "quick"
    assert _bench.mode_from_env("full") == "full"
    monkeypatch.setenv("SIGVLP_BENCH_QUICK", "0")
    assert _bench.mode_from_env(None) == ("full" if torch.cuda.is_available() else "quick")
    assert _bench.mode_from_env("quick") == "quick"
    with pytest.raises(ValueError, match="bench-mode"):
        _bench.mode_from_env("fast")


# ----------------------------------------------------------------------------- FLOP counts


def test_counter_attention_flops_match_the_analytic_formula():
    from torch.utils.flop_counter import FlopCounterMode

    import bench_flops_vs_slices as fvs

    lengths, heads, head_dim = [5, 17, 0, 30], 3, 32
    cu = torch.tensor([0, 5, 22, 22, 52], dtype=torch.int32)
    q, k, v = (torch.randn(52, heads, head_dim) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        fvs.math_varlen_attention(q, k, v, cu, cu, head_dim ** -0.5)
    analytic = fvs.attention_flops(cu.tolist(), cu.tolist(), heads, head_dim)
    assert analytic == 4 * sum(n * n for n in lengths) * heads * head_dim
    assert counter.get_total_flops() == analytic


def test_encoder_flops_counted_plus_analytic_equal_fully_counted(monkeypatch):
    """The fused model (attention invisible to the counter, added analytically) counts exactly what
    the counter sees when every attention is computed with plain matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    import bench_flops_vs_slices as fvs

    monkeypatch.setattr(fvs, "DEVICE", "cpu")
    cfg, encoder = fvs.make_encoder("tiny")
    encoder = encoder.cpu()
    volume = torch.rand(12, 64, 64) * 2 - 1
    inputs = fvs._inputs(volume, cfg.patch_size)
    flops = fvs.encoder_flops(encoder, inputs)
    tokens = inputs[2]
    assert flops["attention"] >= 4 * tokens * tokens * cfg.width * cfg.layers
    with fvs.attention_as(fvs.unfused_attention), torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(*inputs)
    assert counter.get_total_flops() == flops["total"]


def test_gpu_check_helpers(tmp_path):
    rows = [dict(op="rope_attention_varlen", provider=p, shape="case=a", dtype="bfloat16", mode="full", median_ms=ms)
            for p, ms in (("rope3d+varlen_attn", "3.0"), ("sigvlp", "2.0"), ("sdpa_padded", "1.0"))]
    rows.append(dict(op="rope_attention_varlen", provider="sigvlp", shape="case=b", dtype="bfloat16", mode="full",
                     median_ms="1.0"))  # no baseline for this shape
    for r in rows:
        r["device"] = "NVIDIA H200"
    rows.append(dict(rows[0], provider="hf_rotary+varlen_attn", median_ms="4.0"))  # the common baseline
    lines = [x for x in _bench.key_ratios(rows) if x.startswith("attention")]
    assert len(lines) == 3  # vs rope3d + varlen attention, vs HF rotary + varlen attention / + flash-attn
    assert "vs rope3d + varlen attention: sigvlp 1.50x median" in lines[0] and "over 1 cases" in lines[0]
    assert "vs HF Qwen-VL rotary + varlen attention: sigvlp 2.00x median" in lines[1]
    assert lines[0].endswith("on NVIDIA H200") and lines[2].endswith("no pairs measured")
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    assert _bench.junit_counts(xml).startswith("FAIL: 1 failed")
    assert _bench.junit_counts(tmp_path / "missing.xml").startswith("FAIL: no results")


def test_gpu_check_plan_derives_from_the_op_registry():
    """gpu_check.sh runs every bench file once, each op's with the cap of its OpSpec, the key
    ratios' benches first."""
    from sigvlp.ops.registry import SPECS

    res = subprocess.run([sys.executable, str(BENCHES / "_bench.py"), "plan"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = [(line.split()[0], int(line.split()[1])) for line in res.stdout.splitlines()]
    names = [name for name, _ in plan]
    assert len(names) == len(set(names)) and set(names) == {p.removesuffix(".py") for p in BENCH_FILES}
    for spec in SPECS.values():
        assert (ROOT / spec.bench).is_file() and (pathlib.Path(spec.bench).stem, spec.bench_cap_s) in plan
    keyed = [pathlib.Path(s.bench).stem for s in SPECS.values() if s.key_ratios]
    assert names[: len(keyed)] == keyed
    op_ratios = [r.title for s in SPECS.values() for r in s.key_ratios]
    assert [r.title for r in _bench.KEY_RATIOS[: len(op_ratios)]] == op_ratios


def test_gpu_check_without_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = subprocess.run(["bash", str(BENCHES / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "NEEDS A GPU" in res.stdout and (tmp_path / "out" / "gpu_check.log").exists()


def test_data_bench_runs_without_nibabel_and_pydicom(tmp_path):
    """As on a bare GPU image (tests/without_data_packages blocks both imports): bench_data runs its
    in-memory path and skips the file paths saying why; no missing-package error. The smoke scale
    (SIGVLP_BENCH_SMOKE=1) is what gpu_check.sh's CPU walk uses."""
    blocker = str(ROOT / "tests" / "without_data_packages")
    env = {**os.environ, "SIGVLP_BENCH_QUICK": "1", "SIGVLP_BENCH_SMOKE": "1",
           "PYTHONPATH": os.pathsep.join([blocker, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                          f"--bench-out={tmp_path}", "benches/bench_data.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "1 passed" in res.stdout and "nibabel is not installed" in res.stdout, res.stdout[-3000:]
    assert (tmp_path / "results.csv").exists()
