"""Every CUDA kernel in csrc/ runs on the CPU, under a SIMT emulation (csrc/emu), in CI.

- The op tests (every op whose sigvlp.ops.registry spec is marked emulated) run again in a subprocess with
  SIGVLP_CUDA_EMULATE=1, where their backend parametrizations gain "cuda" (served on CPU tensors
  by sigvlp._cuda_emu) and only those cases are kept, plus tests/emu/emu_cases.py (dtypes, every
  launcher branch, batch chunking past a lowered grid limit, schedule independence, memory
  safety for any cu_seqlens / grid values).
- The kernels are built again under ThreadSanitizer and AddressSanitizer + UBSan and driven
  through every launcher path (tests/emu/driver.cpp), with the threads of a block in forward,
  reversed and shuffled orders: no race, no out-of-bounds access, no undefined behaviour.
- The harness catches what it is for: deliberately broken kernels in tests/emu_variants (a
  removed __syncthreads, blocks writing the same rows, a store one row past the end of global or
  shared memory, a fragment layout assumption, an int32 offset overflow, a full-mask shuffle in a
  divergent branch), each next to its fixed twin that passes.
- Static + dynamic shared memory of every kernel fits every target's limits (issue 14 #5).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from sigvlp.ops.registry import SPECS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "emu"))
import emu_build  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ROOT / "tests" / "emu_variants"
OP_TESTS = [spec.test_file for spec in SPECS.values() if spec.emulated]


def _emulated_env() -> dict:
    env = {**os.environ, "SIGVLP_CUDA_EMULATE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "emu"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("SIGVLP_BACKEND", None)
    return env


# ----------------------------------------------------------------------------- the op tests on the emulation


def test_op_tests_pass_on_the_emulated_cuda_backend():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "cuda_emu_plugin", *OP_TESTS, "tests/emu/emu_cases.py",
         "-q", "-p", "no:cacheprovider", "-rA", "--durations=5"],
        cwd=ROOT, env=_emulated_env(), capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    assert proc.returncode == 0, tail
    assert "PASSED tests/emu/emu_cases.py::test_the_cuda_backend_is_the_emulation" in out, tail
    assert not re.search(r"^(SKIPPED|FAILED|ERROR|XFAIL)", out, re.M), tail
    passed = re.findall(r"^PASSED (tests/[\w/]+\.py)::(\S+)", out, re.M)
    per_file = {name: [t for f, t in passed if f == name] for name in [*OP_TESTS, "tests/emu/emu_cases.py"]}
    for name, tests in per_file.items():
        assert tests, f"no emulated case ran from {name}"
        if name in OP_TESTS:  # only the "cuda" cases of the op files run here
            assert all("cuda" in t for t in tests), (name, [t for t in tests if "cuda" not in t])
    assert sum(map(len, per_file.values())) >= 100, {k: len(v) for k, v in per_file.items()}


def test_without_the_switch_cpu_tensors_get_no_cuda_backend():
    import torch

    from sigvlp.ops import cuda_module

    if cuda_module.emulated():
        pytest.skip("this process runs with SIGVLP_CUDA_EMULATE=1")
    assert cuda_module.unavailable_reason(torch.device("cpu")) is not None


def test_info_reports_the_emulation():
    proc = subprocess.run([sys.executable, "-m", "sigvlp.info"], cwd=ROOT, env=_emulated_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA emulation: on" in proc.stdout, proc.stdout
    assert re.search(r"cuda\s+available \(emulated on the CPU", proc.stdout), proc.stdout


# ----------------------------------------------------------------------------- sanitizer builds


@pytest.mark.parametrize("kind, schedule, workers", [("tsan", "forward", 1), ("tsan", "shuffle:5", 2),
                                                     ("asan", "reversed", 1)])
def test_every_kernel_is_clean_under_the_sanitizers(kind, schedule, workers):
    """Two workers: blocks on different OS threads never synchronise, so blocks that write the
    same memory (overlapping tiles, a mirrored store) would race under TSan too."""
    exe = emu_build.executable(kind, ROOT / "tests" / "emu" / "driver.cpp", with_kernels=True)
    proc = emu_build.run(kind, exe, schedule, workers=workers)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    sanitizer = {"tsan": "thread", "asan": "address"}[kind]
    assert re.search(rf"driver: (\d+) launcher calls, 0 failures, schedule {re.escape(schedule)}, "
                     rf"sanitizer '{sanitizer}'", out), out[-2000:]
    assert int(re.search(r"driver: (\d+) launcher calls", out).group(1)) >= 50


# ----------------------------------------------------------------------------- the harness catches bugs

CASES = [
    # variant, build kind, args, what the broken build must show
    ("missing_syncthreads.cu", "tsan", [], r"WARNING: ThreadSanitizer: data race"),
    ("blocks_overlap.cu", "tsan", [], r"WARNING: ThreadSanitizer: data race"),
    ("store_past_end.cu", "asan", ["global"], r"ERROR: AddressSanitizer: heap-buffer-overflow"),
    # (UBSan's bounds check sees this one first; ASan reports it as a global-buffer-overflow)
    ("store_past_end.cu", "asan", ["shared"],
     r"ERROR: AddressSanitizer: global-buffer-overflow|runtime error: index 256 out of bounds for type 'float \[256\]'"),
    ("fragment_order.cu", "tsan", [], r"mismatches: [1-9]"),
    ("int32_offset_overflow.cu", "asan", [], r"runtime error: signed integer overflow"),
    ("warp_divergence.cu", "tsan", [], r"launch failed: .*(exited while its warp waits in __shfl_xor_sync|deadlock)"),
]


@pytest.mark.parametrize("variant, kind, args, caught", CASES,
                         ids=["no-syncthreads", "blocks-overlap", "store-past-end-global", "store-past-end-shared",
                              "fragment-order", "int32-overflow", "warp-divergence"])
def test_the_harness_catches_a_broken_kernel(variant, kind, args, caught):
    fixed = emu_build.executable(kind, VARIANTS / variant, with_kernels=False, defines=["SIGVLP_VARIANT_FIXED"])
    proc = emu_build.run(kind, fixed, *args, workers=2 if kind == "tsan" else 1)
    assert proc.returncode == 0 and "mismatches: 0" in proc.stdout, proc.stdout + proc.stderr[-4000:]
    broken = emu_build.executable(kind, VARIANTS / variant, with_kernels=False)
    proc = emu_build.run(kind, broken, *args, workers=2 if kind == "tsan" else 1)
    assert proc.returncode != 0, proc.stdout + proc.stderr[-4000:]
    assert re.search(caught, proc.stdout + proc.stderr), proc.stdout + proc.stderr[-4000:]


# ----------------------------------------------------------------------------- shared memory limits

# Per-block shared memory: static allocations are capped at 48 KiB on every target; static +
# dynamic at the opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin).
STATIC_LIMIT = 48 * 1024
OPTIN_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}


def shared_memory_table() -> dict[str, int]:
    """Static shared memory per kernel instantiation, in bytes: the emulation compiles each
    `__shared__` array as a block-scope thread_local object, whose symbol and size name it (the
    same total nvcc reports, e.g. 27,136 B for gemm_kernel<bf16> at sm_80)."""
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to read the emulation's symbol table"
    table: dict[str, int] = {}
    for obj in emu_build.kernel_objects("tsan"):
        out = subprocess.run([nm, "-S", "-C", "--defined-only", str(obj)], capture_output=True, text=True,
                             check=True).stdout
        for line in out.splitlines():
            parts = line.split(maxsplit=3)
            if len(parts) != 4 or parts[2].lower() not in ("b", "d"):
                continue
            m = re.match(r"(.*\))::(\w+)$", parts[3])
            if m and "_kernel" in m.group(1):
                kernel = re.sub(r"\(.*\)$", "", m.group(1).replace("sigvlp::(anonymous namespace)::", ""))
                table[kernel] = table.get(kernel, 0) + int(parts[1], 16)
    return table


def _launch_arguments(text: str):
    """The top-level comma-separated arguments of every SIGVLP_LAUNCH(...) in `text`."""
    for m in re.finditer(r"SIGVLP_LAUNCH\(", text):
        depth, args, cur = 1, [], ""
        for ch in text[m.end():]:
            if ch in "(<[{":
                depth += 1 if ch != "<" else 0
            if ch in ")]}":
                depth -= 1
                if depth == 0:
                    args.append(cur.strip())
                    break
            if ch == "," and depth == 1:
                args.append(cur.strip())
                cur = ""
            else:
                cur += ch
        yield args


def _dynamic_shared_bytes() -> int:
    """The dynamic shared memory the launchers request: every SIGVLP_LAUNCH passes a constant 0."""
    sizes = {args[2] for src in (ROOT / "csrc").glob("*.cu") for args in _launch_arguments(src.read_text())}
    assert sizes, "no SIGVLP_LAUNCH found in csrc/"
    assert sizes <= {"0"}, f"launches with dynamic shared memory {sizes}: extend this test with their sizes"
    return 0


def test_shared_memory_fits_every_target():
    table = shared_memory_table()
    for dtype in ("float", "__half", "__nv_bfloat16"):
        for kernel in ("syrk_kernel", "gemm_kernel", "sigmoid_loss_pass_kernel"):
            assert f"{kernel}<{dtype}>" in table, (kernel, dtype, sorted(table))
    dynamic = _dynamic_shared_bytes()
    lines = []
    for kernel, static in sorted(table.items()):
        assert static <= STATIC_LIMIT, f"{kernel}: {static} B of static shared memory > 48 KiB"
        for arch, limit in OPTIN_LIMIT.items():
            assert static + dynamic <= limit, f"{kernel}: {static + dynamic} B > {arch}'s {limit} B"
        lines.append(f"{kernel}: {static} B static + {dynamic} B dynamic")
    print("\n".join(lines))
