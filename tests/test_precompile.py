"""`python -m sigvlp.precompile` writes into Triton's cache exactly the entries Triton's JIT looks up
for the ops' launches on an sm_90 GPU, so that on the GPU the ops compile nothing.

Checked without a GPU: precompile compiles some cases into an empty cache folder; then
`--verify` runs the same launches through Triton's own JIT (its binder, specialisation, options
and cache-key code, for a compile-only sm_90 driver; nothing launched) with a compilation listener
that reports, per compile, whether Triton's cache had it. Every precompiled case must hit; a case
left out of the precompile must miss (the control: the check can fail).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parent.parent
DONE = "rope3d/(float32|bfloat16)"  # two of the three rope3d cases of the quick matrix


def _precompile(cache, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "sigvlp.precompile", *args], capture_output=True, text=True,
                          env=env, timeout=1800, cwd=ROOT)


def test_precompiled_cache_entries_are_the_ones_the_jit_looks_up(tmp_path):
    cache = tmp_path / "triton-cache"
    done = _precompile(cache, "--arch", "90", "--jobs", "2", "--ops", "rope3d", "--quick", "--match", DONE)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"cache: {cache}" in done.stdout
    assert any(cache.iterdir()), "nothing written to the cache folder"

    check = _precompile(cache, "--arch", "90", "--ops", "rope3d", "--quick", "--verify")
    rows = [json.loads(line) for line in check.stdout.splitlines() if line.startswith("{")]
    assert check.returncode == 1, check.stderr[-4000:]  # the control case misses
    precompiled = [r for r in rows if r["case"].startswith(("float32", "bfloat16"))]
    control = [r for r in rows if r["case"].startswith("float16")]
    assert precompiled and control
    assert all(r["cache_hit"] for r in precompiled), precompiled
    assert not any(r["cache_hit"] for r in control), control


def test_bad_arguments_are_clear_errors(capsys):
    """In this process (the arguments are checked before anything is captured or compiled)."""
    from sigvlp import precompile

    for args, words in ((["--jobs", "0"], "--jobs"), (["--ops", "nope"], "--ops: unknown ['nope']"),
                        (["--arch", "75"], "--arch: expected one of")):
        with pytest.raises(SystemExit) as exit_info:
            precompile.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err, (args, err[-2000:])


def test_the_launch_matrix_covers_every_op_with_triton_kernels():
    """Each op with Triton kernels (a launch survey in its OpSpec) has precompile cases, and the
    quick matrix has every op of the full one."""
    from sigvlp import precompile
    from sigvlp.ops.registry import SPECS

    triton_ops = {name for name, spec in SPECS.items() if spec.launch_survey is not None}
    assert triton_ops and set(precompile.launch_matrix()) == triton_ops
    assert all(precompile.launch_matrix(quick=True)[op] for op in triton_ops)


def _capture_in_subprocess(code: str) -> dict:
    """Run `code` (which prints one JSON object last) without the interpreter: real JIT functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


COVERAGE = r'''
import json
import torch
from sigvlp import precompile, selftest
from sigvlp.ops.registry import SPECS, SURVEY_VARIANTS

def ids(cases):
    return {repr(v.identity()): f"{v.op}/{v.case}/{v.kernel}" for v in precompile.capture(90, cases)}

planned = {repr(v.identity()) for v in precompile.variants(90, gpu_check=True)}
triton_ops = [op for op, spec in SPECS.items() if spec.launch_survey is not None]
# the self-test stage as gpu_check runs it (its CPU run skips Triton bf16 where tl.dot needs a GPU)
stage = ids([("selftest", "run_checks", lambda: selftest.run_checks("cpu", ops=triton_ops, backends=["triton"]))])
# each op's launch survey at GPU-like sizes: 1,768 tokens, 16 x 64, a single token; 300 x 257 rows, 1 x 1
survey = ids([(op, f"survey{i}", lambda s=SPECS[op], z=z: s.launch_survey(z["lengths"], z["rows"]))
              for op in triton_ops for i, z in enumerate(SURVEY_VARIANTS)])
# the control: fp32 attention at head_dim 128 with positions is launched by no gpu_check stage
control = ids([(n, c, f) for n, c, f in precompile._cases(["rope_attention_varlen"], False,
                                                           "float32/128/positions/True/True")])
print(json.dumps({name: {"n": len(found), "missing": sorted(v for k, v in found.items() if k not in planned)}
                  for name, found in (("stage", stage), ("survey", survey), ("control", control))}))
'''


def test_gpu_check_precompiles_every_launch_of_its_stages():
    """`--gpu-check` (the ops' self-test cases and OpSpec.launch_configs, at small sizes) holds every
    compile of the self-test stage's launches and of each op's launch survey at GPU-like sizes
    (other lengths, a single token, 1 x 1 rows: sizes add no variant). The control: a configuration
    no stage launches (fp32 attention, head_dim 128, positions, causal, interleaved) is missing."""
    found = _capture_in_subprocess(COVERAGE)
    assert found["stage"]["n"] > 10 and found["survey"]["n"] > 10, found
    assert found["stage"]["missing"] == [] and found["survey"]["missing"] == [], found
    assert found["control"]["missing"], found
