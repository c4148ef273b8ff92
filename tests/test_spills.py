"""Every Triton variant the ops can launch compiles, ahead of time and without a GPU, for sm_80 and
sm_90 (the installed Triton) without local-memory spills beyond a small budget per kernel family,
and within the target's shared memory.

The variants are those of `python -m sigvlp.precompile` (its launch matrix, autotuned kernels with
every candidate their pruning keeps); each is compiled by Triton's own compiler for the target and
its cubin's resource use is read with Triton's cuobjdump: `stack` is the local memory per thread
(spilled registers, and local arrays), what Triton reports on a GPU as n_spills * 4.

Which variants:
- by default, for sm_80 and sm_90: the attention kernels (forward, dK/dV, dQ) in bf16 at head_dim
  128 with every autotune candidate the target keeps and in fp32 at head_dim 128, and the sigmoid
  loss in fp32 with gradients at D 256 (the variants that spilled most before; about 20 compiles,
  under a minute on 2 idle cores with an empty Triton cache, seconds with a warm one);
- SIGVLP_SPILL_TEST=quick (a slow test, skipped otherwise so that CI stays within its time): the
  representative subset of the matrix (every dtype and head_dim / embedding-dim class once, about
  100 compiles per target), for sm_80 and sm_90;
- SIGVLP_SPILL_TEST=full: the same test over the whole matrix (every flag combination, about 1,500
  compiles per target, an hour on 2 cores).

Budgets per kernel family (bytes of local memory per thread, the same on sm_80 and sm_90;
`budget`):
- attention forward, dK/dV and dQ in bf16/fp16, the backward's preprocess, Newton-Schulz's syrk
  and gemm, the sigmoid loss with D resident (D <= 256): 0;
- rope3d and the rotary-table kernel: 32 bytes, libdevice's sin/cos keep a 7-word table in local
  memory for large-argument reduction (not a spill; touched only for angles past 2^17 rad);
- fp32 attention (IEEE dots on CUDA cores, the correctness path): 128 bytes. Its dK/dV kernel
  keeps 48 B (head_dim 64) / 80 B (128) on sm_90 at 72 / 128 registers under triton 3.8 (at 128:
  24 B on sm_80; under 3.6 0 on sm_90, 64 B on sm_80), not from register pressure
  (kernels/attention.py); the point is no 32-register, tens-of-KB code as before (12 KB under
  triton 3.6 on sm_90);
- the sigmoid loss's chunked-D pass (D > 256): 32 bytes (bf16 D 768 on sm_90; 392 before its
  per-pair partial sums became per-row sums).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from sigvlp.kernels.device_info import SHARED_MEMORY_LIMITS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
ATTENTION_KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")


def budget(row) -> int:
    """Bytes of local memory per thread allowed for a compiled variant (see the module docstring)."""
    if row["kernel"] in ("rope3d_kernel", "rotary_table_kernel"):
        return 32
    if row["kernel"] in ATTENTION_KERNELS and row["dtypes"] == ["fp32"]:
        return 128
    if row["kernel"] == "sigmoid_loss_pass_kernel" and not row["config"].get("FULL_D", True):
        return 32
    return 0


#: The default (not slow) subset: "op/case" regular expressions of sigvlp.precompile's quick
#: matrix, and the kernels compiled of those cases (not the small rotary-table and preprocess ones).
REPRESENTATIVE = r"rope_attention_varlen/(bfloat16|float32)/128/grid|sigmoid_loss/float32/256"
REPRESENTATIVE_KERNELS = r"_fwd_kernel|_bwd_dkdv_kernel|_bwd_dq_kernel|sigmoid_loss_pass_kernel"


def _compile(arch, *args, timeout=3600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    result = subprocess.run([sys.executable, "-m", "sigvlp.precompile", "--arch", str(arch), "--jobs", jobs,
                             "--report", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _line(r):
    return (f"{r['target']} {r['kernel']:24} {r['case']:34} {json.dumps(r['config'])}: regs {r['regs']}, "
            f"local {r['stack']} B, shared {r['shared']} B")


def _check(rows, arch):
    print("\n".join(map(_line, rows)))
    assert rows, "nothing compiled"
    spills = [r for r in rows if r["stack"] > budget(r)]
    assert not spills, "local memory over the budget:\n" + "\n".join(map(_line, spills))
    over = [r for r in rows if r["shared"] > SHARED_MEMORY_LIMITS[arch]]
    assert not over, f"over sm_{arch}'s {SHARED_MEMORY_LIMITS[arch]} B of shared memory:\n" + "\n".join(
        map(_line, over))


@pytest.mark.parametrize("arch", (80, 90))
def test_representative_variants_do_not_spill(arch):
    rows = _compile(arch, "--quick", "--match", REPRESENTATIVE, "--kernels", REPRESENTATIVE_KERNELS)
    assert {r["op"] for r in rows} == {"rope_attention_varlen", "sigmoid_loss"}
    assert set(ATTENTION_KERNELS) <= {r["kernel"] for r in rows}
    assert {"bf16", "fp32"} <= {d for r in rows for d in r["dtypes"]}
    _check(rows, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", (80, 90))
def test_every_variant_does_not_spill(arch):
    mode = os.environ.get("SIGVLP_SPILL_TEST", "")
    if mode not in ("quick", "full"):
        pytest.skip("compiles every variant (10+ minutes per target): set SIGVLP_SPILL_TEST=quick or full")
    rows = _compile(arch, *(() if mode == "full" else ("--quick",)))
    _check(rows, arch)
