"""rope_attention_varlen, backend="cuda" (csrc/attention.cu): forward, lse and dq/dk/dv against the
fp64 oracle of tests/test_attention.py, at ~2x the precision floor.

Without a GPU the kernels run on CPU tensors under the SIMT emulation (sigvlp._cuda_emu, turned on
for this module only): every path on small shapes (edge lengths 0, 1, 63, 65, 127, 129; GQA/MQA;
causal; grid_thw, positions or no rotation; interleaved; lse and its gradient; the cross form;
NaN-poisoned outputs by the conftest hook; grid chunking past a lowered gridDim.y limit). With a GPU
the `gpu` tests run the same checks at large sizes. tests/attention_emu_driver.cpp runs every launcher
path under ThreadSanitizer and AddressSanitizer + UBSan builds of the emulation. The ptxas survey (registers, spills, shared
memory per kernel for sm_80 and sm_90a) compiles csrc/attention.cu with nvcc when it is present, and
a slow test holds every kernel to no spills except the few measured and justified in the source:

    python tests/test_attention_cuda.py      # prints the survey table
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from sigvlp.ops import cuda_module as _cuda, rope3d, rope_attention_varlen
from sigvlp.ops.backends import BackendError

from test_attention import _inputs, _run_and_check

EDGE = [0, 1, 63, 65, 127, 129]
ROOT = Path(__file__).resolve().parents[1]


def _clear_caches():
    for fn in (_cuda.emulated, _cuda._load, _cuda._device_reason):
        fn.cache_clear()


@pytest.fixture(scope="module")
def emu():
    """The "cuda" backend served by sigvlp._cuda_emu on CPU tensors, for this module's tests."""
    old = os.environ.get(_cuda.EMULATE_ENV_VAR)
    os.environ[_cuda.EMULATE_ENV_VAR] = "1"
    _clear_caches()
    try:
        mod = _cuda.module()
        if mod is None:
            pytest.skip(f"CUDA emulation unavailable: {_cuda.module_unavailable_reason()}")
        if not hasattr(mod, "attention_forward"):  # a stale build: fail loudly, never read as green
            pytest.fail(f"{mod.__file__} was built before csrc/attention.cu (it has no attention_forward): "
                        "rebuild the emulated CUDA module (pip install -e . in a fresh checkout, or cmake into a "
                        "build folder and copy _cuda_emu*.so into sigvlp/), then rerun", pytrace=False)
        yield mod
    finally:
        if old is None:
            os.environ.pop(_cuda.EMULATE_ENV_VAR, None)
        else:
            os.environ[_cuda.EMULATE_ENV_VAR] = old
        _clear_caches()


# ----------------------------------------------------------------------------- emulated (CPU)

MATRIX = [
    # lengths, nheads, nheads_kv, head_dim, dtype, mode, causal, interleaved, lse grad, strided
    (EDGE, 4, 2, 64, torch.float16, "grid", True, False, True, False),
    (EDGE, 2, 2, 32, torch.float16, "positions", False, True, False, False),
    ([65, 0, 1, 129], 3, 1, 96, torch.bfloat16, "none", True, False, True, False),
    ([1, 63, 0, 127], 2, 1, 128, torch.bfloat16, "grid", False, True, True, False),
    ([129, 1, 0, 64], 2, 2, 128, torch.float16, "positions", True, False, False, True),
]


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: f"d{c[3]}-{str(c[4])[6:]}-{c[5]}-{'causal' if c[6] else 'full'}"
                         f"-h{c[1]}/{c[2]}{'-il' if c[7] else ''}{'-lse' if c[8] else ''}{'-strided' if c[9] else ''}")
def test_emulated_matrix(emu, case):
    lengths, nh, nkv, d, dtype, mode, causal, interleaved, lse_grad, strided = case
    _run_and_check(lengths, backend="cuda", nheads=nh, nheads_kv=nkv, head_dim=d, dtype=dtype, mode=mode,
                   causal=causal, interleaved=interleaved, use_lse_grad=lse_grad, make_strided=strided)


@pytest.mark.parametrize("mode,mode_k,causal,head_dim,dtype", [
    ("grid", "positions", True, 64, torch.float16),
    ("none", "none", False, 32, torch.bfloat16),
])
def test_emulated_cross_form(emu, mode, mode_k, causal, head_dim, dtype):
    """Key lengths differ from query lengths (more, fewer, none): bottom-right causal, rows with no key."""
    _run_and_check([0, 1, 63, 65], lengths_k=[65, 0, 1, 129], backend="cuda", nheads=4, nheads_kv=2,
                   head_dim=head_dim, dtype=dtype, mode=mode, mode_k=mode_k, causal=causal, use_lse_grad=True)


def test_emulated_map_pooling_one_query_per_sequence(emu):
    _run_and_check([1, 1, 1, 1], lengths_k=[0, 1, 70, 129], backend="cuda", nheads=2, nheads_kv=2, head_dim=64,
                   dtype=torch.float16, mode="none", max_seqlen=1)


@pytest.mark.parametrize("mode", ["grid", "positions"])
def test_emulated_tables_equal_rope3d_angles_bit_for_bit(emu, mode):
    """The attention's cos/sin tables give exactly rope3d's CUDA rotation (fp32, unit pairs: rope3d's
    output of (1, 0) is (cos, sin) of its angle, rounding-free)."""
    lengths = [5, 0, 24, 7]
    head_dim, half = 32, 16
    q, _, _, cu, grid, positions = _inputs(lengths, nheads=1, head_dim=head_dim)
    total = q.shape[0]
    unit = torch.zeros(total, 1, head_dim)
    unit[..., :half] = 1.0
    rot = dict(grid_thw=grid) if mode == "grid" else dict(positions=positions)
    ref = rope3d(unit, cu, **rot, backend="cuda")[:, 0]
    rows = max(lengths) if mode == "grid" else total
    cos = torch.empty(rows, half)
    sin = torch.empty(rows, half)
    emu.attention_rotary_tables(cos=cos.data_ptr(), sin=sin.data_ptr(), rows=rows, head_dim=head_dim,
                                positions=positions.data_ptr() if mode == "positions" else 0,
                                log2_theta=math.log2(10000.0), n_t=4, n_h=6, n_w=6, stream=0)
    if mode == "positions":
        idx = torch.arange(total)[:, None].expand(total, half)
    else:  # each pair's axis coordinate of each token
        local = torch.cat([torch.arange(n) for n in lengths])
        hw = torch.repeat_interleave(grid[:, 1] * grid[:, 2], torch.tensor(lengths))
        w = torch.repeat_interleave(grid[:, 2], torch.tensor(lengths))
        t, h, ww = local // hw, (local // w) % (hw // w), local % w
        axis = torch.tensor([0] * 4 + [1] * 6 + [2] * 6)
        idx = torch.stack([t, h, ww], 1)[:, axis]
    assert torch.equal(cos.gather(0, idx), ref[:, :half]), "cos differs from rope3d's angle"
    assert torch.equal(sin.gather(0, idx), ref[:, half:]), "sin differs from rope3d's angle"


def _fwd_bwd(q, k, v, cu, max_len, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = rope_attention_varlen(*leaves, cu, max_len, return_lse=True, backend="cuda", **kw)
    (out.float().square().sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    return [out, lse] + [x.grad for x in leaves]


def test_emulated_grid_chunking_and_deterministic_backward(emu):
    """batch and heads past a lowered gridDim.y/z limit (the kernels loop over them), thread order
    shuffled between barriers: results identical bit for bit (no atomics, no order dependence)."""
    lengths = [3, 17, 0, 40, 9]
    q, k, v, cu, grid, _ = _inputs(lengths, nheads=3, nheads_kv=1, head_dim=32, dtype=torch.float16)
    first = _fwd_bwd(q, k, v, cu, max(lengths), grid_thw=grid, causal=True)
    limit, schedule = emu.max_grid_y(), emu.schedule()
    try:
        emu.set_max_grid_y(2)
        emu.set_schedule("shuffle:7")
        second = _fwd_bwd(q, k, v, cu, max(lengths), grid_thw=grid, causal=True)
    finally:
        emu.set_max_grid_y(limit)
        emu.set_schedule(schedule)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} changed with the grid limit / thread order"


def test_emulated_refuses_fp32_and_odd_head_dims(emu):
    q, k, v, cu, grid, _ = _inputs([4, 5], head_dim=64)
    with pytest.raises(BackendError, match="float32"):
        rope_attention_varlen(q, k, v, cu, 5, grid, backend="cuda")
    assert rope_attention_varlen(q.half(), k.half(), v.half(), cu, 5, grid, backend="cuda").dtype == torch.float16


def test_emulated_no_tokens(emu):
    q = torch.empty(0, 2, 64, dtype=torch.float16, requires_grad=True)
    k = torch.empty(0, 1, 64, dtype=torch.float16, requires_grad=True)
    v = torch.empty(0, 1, 64, dtype=torch.float16, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32)
    out = rope_attention_varlen(q, k, v, cu, 0, backend="cuda")
    out.sum().backward()
    assert out.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("mode,cross", [("grid", False), ("positions", True)])
def test_emulated_fast_path_makes_no_host_reads(emu, monkeypatch, mode, cross):
    """With the GPU's validation policy, forward + backward through the cuda backend (tables,
    launches) calls none of Tensor.item/tolist/cpu/... (each a device-to-host copy on a GPU)."""
    import sigvlp.ops.attention as attention_op  # noqa: PLC0415
    from _no_sync import forbid_host_reads  # noqa: PLC0415

    monkeypatch.setattr(attention_op, "validation_enabled", lambda validate, device: validate)  # as on a GPU
    lengths, lengths_k = [3, 0, 20], [7, 5, 0]
    q, k, v, cu, grid, positions = _inputs(lengths, nheads=2, nheads_kv=1, head_dim=32, dtype=torch.float16)
    kw = dict(grid_thw=grid) if mode == "grid" else dict(positions=positions)
    if cross:
        g = torch.Generator().manual_seed(5)
        k, v = (torch.randn(sum(lengths_k), 1, 32, generator=g).half() for _ in range(2))
        kw.update(cu_seqlens_k=torch.tensor([0, 7, 12, 12], dtype=torch.int32), max_seqlen_k=7,
                  positions_k=torch.rand(12, 3, generator=g) * 9)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with forbid_host_reads():
        out, lse = rope_attention_varlen(*leaves, cu, max(lengths), causal=True, return_lse=True, backend="cuda",
                                         **kw)
        (out.float().square().sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    assert all(x.grad is not None for x in leaves)


# ----------------------------------------------------------------------------- sanitizers


@pytest.mark.parametrize("kind,schedule,cases", [("tsan", "shuffle:5", "valid"), ("asan", "reversed", "all")])
def test_emulated_sanitizers_report_nothing(kind, schedule, cases):
    """tests/attention_emu_driver.cpp (every launcher path, exactly sized NaN-poisoned buffers) under
    ThreadSanitizer (block threads as fibers: a missing barrier is a race) and AddressSanitizer +
    UBSan, the latter also with garbage cu_seqlens / grid / max_seqlen values (memory safety)."""
    sys.path.insert(0, str(ROOT / "tests" / "emu"))
    import emu_build  # noqa: PLC0415

    try:
        emu_build.compiler()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    exe = emu_build.executable(kind, ROOT / "tests" / "attention_emu_driver.cpp", with_kernels=False)
    proc = emu_build.run(kind, exe, schedule, cases, workers=2 if kind == "tsan" else 1)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    calls = re.search(r"attention driver: (\d+) launcher calls, 0 failures", out)
    assert calls and int(calls.group(1)) >= 18, out[-2000:]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_cuda_large(dtype, head_dim, causal):
    _run_and_check([0, 1, 127, 129, 1000, 2048], backend="cuda", nheads=8, nheads_kv=2, head_dim=head_dim,
                   dtype=dtype, mode="grid", causal=causal, use_lse_grad=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,interleaved", [("positions", False), ("none", False), ("grid", True)])
def test_gpu_cuda_modes(mode, interleaved):
    _run_and_check([1, 300, 777, 64], backend="cuda", nheads=4, nheads_kv=4, head_dim=64, dtype=torch.bfloat16,
                   mode=mode, interleaved=interleaved, causal=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_cuda_cross_form(causal):
    _run_and_check([0, 1, 63, 65, 129, 700, 2000, 1], lengths_k=[65, 129, 0, 1, 63, 2048, 700, 4000],
                   backend="cuda", nheads=8, nheads_kv=2, head_dim=64, dtype=torch.bfloat16, causal=causal,
                   mode="grid", mode_k="positions", device="cuda", use_lse_grad=True)


@pytest.mark.gpu
def test_gpu_cuda_backward_is_deterministic():
    q, k, v, cu, grid, _ = _inputs([300, 1000, 5], nheads=8, nheads_kv=2, dtype=torch.bfloat16, device="cuda")
    first = _fwd_bwd(q, k, v, cu, 1000, grid_thw=grid, causal=True)
    second = _fwd_bwd(q, k, v, cu, 1000, grid_thw=grid, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- ptxas survey

ARCHS = ("80", "90a")
STATIC_SMEM_LIMIT = 48 * 1024


def ptxas_survey(archs=ARCHS) -> list[dict]:
    """Registers, spills, stack and static shared memory per kernel of csrc/attention.cu, from
    `nvcc -Xptxas -v` (one compile per architecture, run in parallel)."""
    def compile_one(arch):
        cmd = ["nvcc", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "--expt-relaxed-constexpr",
               "-Xptxas", "-v", "-c", str(ROOT / "csrc" / "attention.cu"), "-I", str(ROOT / "csrc"), "-o", os.devnull]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    with ThreadPoolExecutor(len(archs)) as pool:
        texts = list(pool.map(compile_one, archs))
    rows = []
    for text in texts:
        cur = None
        for line in text.splitlines():
            m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\w+)'", line)
            if m:
                cur = {"arch": "sm_" + m.group(2), "kernel": _kernel_name(m.group(1))}
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and cur is not None:
                cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
                continue
            m = re.search(r"Used (\d+) registers", line)
            if m and cur is not None:
                smem = re.search(r"(\d+) bytes smem", line)
                cur.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
                rows.append(cur)
                cur = None
    return rows


def _kernel_name(mangled: str) -> str:
    kind = re.search(r"(attention_(?:fwd|dkdv|dq|delta)_kernel|rotary_table_kernel)", mangled).group(1)
    dtype = "bf16" if "bfloat16" in mangled else "fp16" if "half" in mangled else ""
    dim = re.search(r"Li(\d+)E", mangled)
    args = ", ".join(x for x in (dtype, dim.group(1) if dim else "") if x)
    return f"{kind}<{args}>" if args else kind


#: Spill stores / loads (bytes per thread, ptxas -v, CUDA 13) of the kernels that keep some, each
#: measured and justified in csrc/attention.cu (the comment above Config); every other kernel of
#: every architecture must compile without spilling.
KNOWN_SPILLS = {
    ("sm_90a", "attention_dkdv_kernel<bf16, 128>"): (32, 32),
    ("sm_90a", "attention_dkdv_kernel<fp16, 128>"): (16, 32),
    ("sm_80", "attention_dkdv_kernel<fp16, 128>"): (16, 16),
    ("sm_80", "attention_dkdv_kernel<bf16, 96>"): (36, 44),
    ("sm_80", "attention_dkdv_kernel<bf16, 64>"): (16, 16),
    ("sm_80", "attention_dq_kernel<bf16, 96>"): (8, 8),
}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_ptxas_spills_only_where_justified_and_shared_memory_within_limits():
    rows = ptxas_survey()
    kinds = {(r["arch"], r["kernel"]) for r in rows}
    for arch in ARCHS:
        for dtype in ("fp16", "bf16"):
            for d in (32, 64, 96, 128):
                for kernel in ("attention_fwd_kernel", "attention_dkdv_kernel", "attention_dq_kernel"):
                    assert (f"sm_{arch}", f"{kernel}<{dtype}, {d}>") in kinds
    assert set(KNOWN_SPILLS) <= kinds
    for r in rows:
        assert r["smem"] <= STATIC_SMEM_LIMIT, r
        assert r["registers"] <= 255, r
        stores, loads = KNOWN_SPILLS.get((r["arch"], r["kernel"]), (0, 0))
        assert r["spill_stores"] <= stores and r["spill_loads"] <= loads, f"spills beyond csrc/attention.cu's: {r}"


if __name__ == "__main__":
    for r in ptxas_survey(sys.argv[1].split(",") if len(sys.argv) > 1 else ARCHS):
        print(f"{r['arch']:7} {r['kernel']:34} registers {r['registers']:3}  spill stores/loads "
              f"{r['spill_stores']}/{r['spill_loads']} B  stack {r['stack']} B  smem {r['smem']} B")
