"""Triton launches within every target's limits, and no recompilation for new lengths: checked on
the CPU by compiling, without a GPU, what each op's launcher chooses (tests/_launch_survey.py).

- Shared memory: each op is run through its public API with backend="triton"; every kernel launch
  (for autotuned kernels: every config left after the kernel's own pruning, since the autotuner may
  pick any of them) is compiled for sm_80, sm_86, sm_89 and sm_90 with the launcher seeing that
  target's opt-in shared-memory limit, and the compiled size must fit the limit. A config over
  the limit fails at launch with out-of-resources on that GPU. The autotuned attention's
  candidates: by default for sm_86 (the tightest limit) and its three main kernels, with
  SIGVLP_LAUNCH_TEST=full for sm_86 and sm_90 and every kernel (a slow test either way).
- Specialisation: each op runs at several batch sizes and total lengths (multiples of 16 or not,
  and 1); per kernel and configuration, Triton's binder must give one specialisation key, so the
  first batch of a new size never compiles a new variant. The control (the same launches with no
  argument exempt from specialisation) gives several keys, so the check can fail.

The survey runs in a subprocess (it needs Triton's JIT, not the interpreter the tests use) and
compiles with Triton's on-disk cache, so reruns are fast.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SURVEY = HERE / "_launch_survey.py"
TARGETS = (80, 86, 89, 90)
pytest.importorskip("triton")
from sigvlp.kernels.device_info import SHARED_MEMORY_LIMITS  # noqa: E402
from sigvlp.ops.registry import SPECS  # noqa: E402

#: ops with Triton kernels (a launch survey in their spec): one chosen config per launch, or autotuned
ALL_OPS = tuple(name for name, spec in SPECS.items() if spec.launch_survey is not None)
OWN_OPS = tuple(name for name in ALL_OPS if not SPECS[name].triton_autotuned)
AUTOTUNED_OPS = tuple(name for name in ALL_OPS if SPECS[name].triton_autotuned)


def _survey(*args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SURVEY), *args], capture_output=True, text=True, env=env,
                            timeout=timeout, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _table(rows):
    return "\n".join(f"{r['target']} {r['kernel']:28} {json.dumps(r['config'])} {r['dtypes']}: "
                     f"{r['shared']} / {r['limit']} B" for r in rows)


@pytest.mark.parametrize("op", OWN_OPS)
def test_launch_configs_fit_shared_memory_of_every_target(op):
    rows = _survey("--targets", ",".join(map(str, TARGETS)), "--ops", op)
    print(_table(rows))
    assert {r["target"] for r in rows} == {f"sm_{t}" for t in TARGETS}, "a target compiled nothing"
    assert not any(r["autotuned"] for r in rows)  # one chosen config per launch: it must fit
    over = [r for r in rows if r["shared"] > r["limit"]]
    assert not over, "over the shared-memory limit:\n" + _table(over)


#: The default autotune-candidate check: sm_86 (the smallest opt-in shared memory, 99 KiB) and the
#: three attention kernels; SIGVLP_LAUNCH_TEST=full: sm_86 and sm_90, every kernel.
DEFAULT_TARGETS, DEFAULT_KERNELS = "86", r"_fwd_kernel|_bwd_dkdv_kernel|_bwd_dq_kernel"


@pytest.mark.slow
@pytest.mark.parametrize("op", AUTOTUNED_OPS)
def test_autotune_candidates_fit_every_target(op):
    """Autotuned ops (rope_attention_varlen): the pruner keeps only candidates within the device's
    shared-memory limit (sigvlp.kernels.device_info), so every candidate left must fit, and there must be
    one per kernel and head_dim. sm_80 and sm_89 compile like sm_86 (the same mma.sync code path and
    the same candidate classes: equal sizes for equal configs, as the other ops' rows show), and
    their limits are >= sm_86's, so sm_86's compile stands for all three (the attention kernels are
    the slowest to compile).

    By default sm_86 only and the three attention kernels (about 10 compiles, 2 processes: sm_90's
    and sm_80's candidates at head_dim 128 are compiled against their limits by
    tests/test_spills.py); SIGVLP_LAUNCH_TEST=full: sm_86 and sm_90, every kernel (about 30
    compiles, 87 s in CI)."""
    full = os.environ.get("SIGVLP_LAUNCH_TEST", "") == "full"
    targets = ("sm_86", "sm_90") if full else ("sm_86",)
    args = ("--targets", "86,90") if full else ("--targets", DEFAULT_TARGETS, "--kernels", DEFAULT_KERNELS)
    rows = _survey(*args, "--ops", op, "--jobs", str(max(1, min(4, os.cpu_count() or 1))))
    print(_table(rows))
    assert {r["target"] for r in rows} == set(targets)
    assert min(SHARED_MEMORY_LIMITS[80], SHARED_MEMORY_LIMITS[89]) >= SHARED_MEMORY_LIMITS[86]
    over = [r for r in rows if r["shared"] > r["limit"]]
    assert not over, "over the shared-memory limit:\n" + _table(over)
    for target in targets if op == "rope_attention_varlen" else ():
        kernels = {(r["kernel"], r["config"].get("HEAD_DIM")) for r in rows if r["target"] == target}
        assert kernels >= {(k, hd) for k in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
                           for hd in (64, 128)}, target


def test_no_specialisation_on_lengths():
    rows = _survey("--keys", "--ops", ",".join(ALL_OPS))
    assert {r["op"] for r in rows} == set(ALL_OPS)
    for r in rows:
        assert r["n_keys"] == 1, f"{r['op']} {r['kernel']} {r['config']}: {r['n_keys']} variants over lengths"
    # The control: without the do_not_specialize exemptions these launches do compile new variants.
    for op in ("rope3d", "sigmoid_loss"):
        assert any(r["n_keys_without_exemptions"] > 1 for r in rows if r["op"] == op), op
