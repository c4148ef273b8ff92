"""Compile every Triton variant of sigvlp's ops ahead of time, in parallel, into Triton's cache.

    python -m sigvlp.precompile [--arch 90] [--jobs N] [--ops rope3d,...] [--quick] [--match RE]
                                [--kernels RE] [--report]

Run it on the machine that will launch the kernels, before the first training step or benchmark:
Triton's on-disk cache is keyed by Triton's version, the ptxas version and the target, so the
cache does not travel between machines. It prints the cache folder, the number of variants and
the seconds taken; afterwards the ops' first launches find every kernel in the cache and compile
nothing (tests/test_precompile.py checks that the entries written are those Triton's JIT looks
up). Needs no GPU: `--arch` names the target (default: the current GPU's, else 90).

A variant is one compile: kernel x constexpr values x dtypes x Triton's integer/alignment
specialisations x launch options. They are found by calling each op through its public API on
small CPU tensors over `launch_matrix()` (every dtype, head_dim / embedding-dim class and flag the op
accepts; `--quick`: the representative subset, launch_matrix(quick=True)) with Triton's JIT running for a
compile-only driver of the target: the JIT binds and specialises every launch exactly as it would
on that GPU, and this module takes the source and options it would compile instead of compiling
them. For an autotuned kernel every candidate left after the kernel's own pruning is a variant
(the autotuner compiles them all to time them).

Also the library behind the compile tests (tests/test_spills.py): `variants(...)` and
`compile_variant(...)`, which returns the kernel's resource use read from its cubin (registers,
stack frame = local memory per thread, shared memory).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

import torch

__all__ = ["Variant", "launch_matrix", "compile_only", "capture", "variants", "compile_variant", "compile_all",
           "precompile", "cache_dir", "main"]

WARP = 32


@dataclasses.dataclass
class Variant:
    """One compile: what Triton's JIT would pass to triton.compile for one launch."""

    op: str
    case: str
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's options (a frozen dataclass)
    autotuned: bool = False  # one candidate of an autotuned kernel

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def config(self) -> dict:
        """The kernel's upper-case constexprs and its launch options (num_warps, num_stages)."""
        names = {p.num: p.name for p in self.fn.params}
        meta = {names[path[0]]: v for path, v in self.constexprs.items()
                if len(path) == 1 and names[path[0]].isupper() and isinstance(v, (int, bool, str))}
        meta.update(num_warps=self.options.num_warps, num_stages=self.options.num_stages)
        return meta

    def dtypes(self) -> list[str]:
        return sorted({t.lstrip("*") for t in self.signature.values()
                       if isinstance(t, str) and t.startswith("*") and t[1:3] in ("fp", "bf")})

    def family(self) -> str:
        """The kernel family, "op/kernel/fp32" or "op/kernel/16bit": the key of COMPILE_CPU_SECONDS."""
        return f"{self.op}/{self.kernel}/{'fp32' if self.dtypes() == ['fp32'] else '16bit'}"

    def identity(self) -> tuple:
        return (self.kernel, repr(sorted(self.signature.items())), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), self.options.hash())


# ----------------------------------------------------------------------------- the launch matrix

_LENGTHS = (100, 37)  # two packed sequences, total not a multiple of 16 (as real batches)


def _packed(lengths=_LENGTHS):
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    grid = torch.tensor([[1, 1, n] for n in lengths], dtype=torch.int32)
    return cu, grid, sum(lengths), max(lengths)


def _rope_case(dtype, head_dim, positions, interleaved):
    def run():
        from sigvlp.ops import rope3d  # noqa: PLC0415  (ops import Triton: loaded once patched)

        cu, grid, total, _ = _packed()
        x = torch.randn(total, 2, head_dim, dtype=dtype, requires_grad=True)
        pos = torch.zeros(total, 3) if positions else None
        out = rope3d(x, cu, None if positions else grid, positions=pos, interleaved=interleaved, backend="triton")
        out.float().sum().backward()
    return run


def _attention_case(dtype, head_dim, rotation, causal, interleaved, cross=None, lse=False):
    """cross: the cross form, keys packed by their own lengths and rotated by `cross` ("grid",
    "positions" or "none"); lse: the log-sum-exp is returned and has a gradient."""
    def run():
        from sigvlp.ops import rope_attention_varlen  # noqa: PLC0415  (as above)

        cu, grid, total, longest = _packed()
        q, k, v = (torch.randn(total, 2, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
        kw = dict(interleaved=interleaved, causal=causal, return_lse=lse, backend="triton")
        if cross is not None:
            cu_k, grid_k, total_k, longest_k = _packed(_LENGTHS[::-1] if causal else (7, 60))
            k, v = (torch.randn(total_k, 2, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
            kw.update(cu_seqlens_k=cu_k, max_seqlen_k=longest_k, grid_thw_k=grid_k if cross == "grid" else None,
                      positions_k=torch.zeros(total_k, 3) if cross == "positions" else None)
        out = rope_attention_varlen(q, k, v, cu, longest, grid if rotation == "grid" else None,
                                    positions=torch.zeros(total, 3) if rotation == "positions" else None, **kw)
        out = sum(t.float().sum() for t in out) if lse else out.float().sum()
        out.backward()
    return run


def _sigmoid_loss_case(dtype, dim, ids, grad):
    def run():
        from sigvlp.ops import sigmoid_loss  # noqa: PLC0415  (as above)

        m = 33 if ids else 40  # without ids the pairs are the diagonal: as many texts as images
        x = torch.randn(40, dim, dtype=dtype, requires_grad=grad)
        y = torch.randn(m, dim, dtype=dtype, requires_grad=grad)
        t, b = torch.tensor(10.0), torch.tensor(-10.0)
        kw = dict(image_ids=torch.arange(40), text_ids=torch.arange(m)) if ids else {}
        loss = sigmoid_loss(x, y, t, b, backend="triton", **kw)
        if grad:
            loss.backward()
    return run


def _newton_schulz_case(precision, shape):
    def run():
        from sigvlp.ops import newton_schulz  # noqa: PLC0415  (as above)

        newton_schulz(torch.randn(*shape), steps=1, backend="triton", precision=precision)
    return run


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (32, 64, 96, 128)
#: Embedding dims covering every sigmoid-loss tiling class: resident A at BLOCK_K 16..256, chunked.
_EMBED_DIMS = (16, 32, 64, 128, 256, 768)


def _name(*parts) -> str:
    return "/".join(str(p).removeprefix("torch.") for p in parts)


def launch_matrix(quick: bool = False) -> dict[str, list[tuple[str, Callable]]]:
    """op -> [(case name, case)]: every combination (quick: each value of every axis once)."""
    if quick:  # each dtype and shape class once; the flags at their common values
        rope = [(d, hd, False, False) for d, hd in zip(_FLOATS, (64, 128, 96))]
        att = [(d, hd, "grid", False, False) for d in _FLOATS for hd in (64, 128)]
        att += [(torch.bfloat16, 32, "positions", True, True), (torch.float16, 96, "none", True, False)]
        # every dim class once, each dtype twice, fp32 at D 256 (the largest resident-A tiling)
        sig = [(d, dim, True, True) for d, dim in zip(_FLOATS + _FLOATS[1::-1] + _FLOATS[2:], _EMBED_DIMS)]
        ns = [("bf16", (2, 96, 160)), ("fp32", (96, 160))]
    else:
        rope = list(itertools.product(_FLOATS, _HEAD_DIMS, (False, True), (False, True)))
        att = list(itertools.product(_FLOATS, _HEAD_DIMS, ("grid", "positions", "none"), (False, True),
                                     (False, True)))
        sig = list(itertools.product(_FLOATS, _EMBED_DIMS, (False, True), (False, True)))
        ns = list(itertools.product(("bf16", "fp32"), ((2, 96, 160), (96, 160))))
    combos = {"rope3d": rope, "rope_attention_varlen": att, "sigmoid_loss": sig, "newton_schulz": ns}
    return {op: [(_name(*c), CASE_BUILDERS[op](*c)) for c in cs] for op, cs in combos.items()}


#: op -> its case builder: builder(**config) is a callable that runs the op with backend="triton"
#: on small CPU tensors in that configuration (OpSpec.launch_configs are such configs).
CASE_BUILDERS = {"rope3d": _rope_case, "rope_attention_varlen": _attention_case,
                 "sigmoid_loss": _sigmoid_loss_case, "newton_schulz": _newton_schulz_case}


def _selftest_case(spec, dtype):
    def run():
        check, _ = spec.selftest(dtype, torch.device("cpu"), torch.Generator().manual_seed(0))
        check("triton")
    return run


def gpu_check_matrix() -> dict[str, list[tuple[str, Callable]]]:
    """op -> [(case name, case)]: the Triton launches of benches/gpu_check.sh's stages, from the op
    registry: the self-test's case in every dtype (OpSpec.selftest, as `python -m sigvlp.selftest`
    runs it) and the configurations of OpSpec.launch_configs (its GPU tests and benches)."""
    from sigvlp.ops.registry import SPECS  # noqa: PLC0415  (imports the ops: loaded once patched)

    matrix = {}
    for op, spec in SPECS.items():
        if spec.launch_survey is None:  # no Triton kernel
            continue
        cases = [(f"selftest/{_name(d)}", _selftest_case(spec, d)) for d in _FLOATS]
        cases += [(_name(*(f"{k}={_name(v)}" for k, v in c.items())), CASE_BUILDERS[op](**c))
                  for c in spec.launch_configs]
        matrix[op] = cases
    return matrix


# ----------------------------------------------------------------------------- capture


def _compile_only_driver(target):
    """A Triton driver for `target` that owns no device: the JIT binds and specialises for it."""
    from triton.backends.driver import DriverBase  # noqa: PLC0415  (Triton: optional dependency)

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("compile-only driver: nothing runs")

    return CompileOnlyDriver()


@contextlib.contextmanager
def compile_only(arch: int, on_compile: Optional[Callable] = None, on_launch: Optional[Callable] = None):
    """Within: Triton's JIT binds every launch for sm_`arch` (a compile-only driver: no GPU needed)
    and launches nothing. With on_compile, the JIT calls on_compile(fn, signature, constexprs,
    options, attrs, autotuned=bool) where it would compile and compiles nothing; without, it
    compiles through its own code (Triton's cache first), as on that GPU. With on_launch, every
    launch first calls on_launch(fn, args, kwargs) (the JITFunction and its launch arguments, for
    callers that bind them themselves). Autotuned kernels launch every candidate left by their
    pruning (the autotuner compiles them all to time them); the launchers see sm_`arch`'s
    shared-memory limit; ops accept CPU tensors for backend="triton"."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415  (Triton: optional dependency)
    from triton.runtime import driver  # noqa: PLC0415
    from triton.runtime.autotuner import Autotuner  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    import sigvlp.kernels.device_info as device_info  # noqa: PLC0415  (imports Triton)
    from sigvlp.ops import backends  # noqa: PLC0415

    jit_run = JITFunction.run
    state = {"autotuned": False}

    def run_no_launch(self, *args, grid, warmup, **kwargs):
        if on_launch is not None:
            on_launch(self, args, kwargs)
        return jit_run(self, *args, grid=grid, warmup=True, **kwargs)  # warmup: compile, never launch

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        on_compile(self, signature, constexprs, options, attrs, autotuned=state["autotuned"])
        return None  # the JIT returns without launching

    def autotune_all(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        state["autotuned"] = True
        try:
            for cfg in self.prune_configs(kwargs):
                self.fn.run(*args, grid=None, warmup=True, **kwargs, **cfg.all_kwargs())
        finally:
            state["autotuned"] = False
            self.nargs = None

    patches = {(JITFunction, "run"): run_no_launch, (Autotuner, "run"): autotune_all,
               (device_info, "shared_memory_limit"): lambda device: device_info.SHARED_MEMORY_LIMITS[arch],
               (device_info, "arch"): lambda device: arch,
               (backends, "triton_unavailable_reason"): lambda device=None: None}
    if on_compile is not None:
        patches[(JITFunction, "_do_compile")] = do_compile
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    for (obj, name), value in patches.items():
        setattr(obj, name, value)
    previous = driver._active
    driver.set_active(_compile_only_driver(GPUTarget("cuda", arch, WARP)))
    try:
        yield
    finally:
        driver._active = previous
        for obj, name, value in saved:
            setattr(obj, name, value)


def _has_real_driver() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001  (any driver failure: no GPU)
        return False


def _cases(ops, quick, match, gpu_check=False) -> Iterator[tuple[str, str, Callable]]:
    """(op, case name, case) of the launch matrix (gpu_check: `gpu_check_matrix()`), for `ops`
    (None: all), whose "op/case" name contains the regular expression `match` (None: all)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("sigvlp.precompile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    matrix = gpu_check_matrix() if gpu_check else launch_matrix(quick)
    unknown = set(ops or ()) - set(matrix)
    if unknown:
        raise ValueError(f"ops: unknown {sorted(unknown)}; expected some of {sorted(matrix)}")
    # the representative (quick) cases first: a precompile stopped at a time cap has compiled them
    first = {(op, name) for op, cases in launch_matrix(True).items() for name, _ in cases}
    chosen = [(op, name, case) for op in ops or list(matrix) for name, case in matrix[op]
              if match is None or re.search(match, f"{op}/{name}")]
    yield from sorted(chosen, key=lambda c: (c[0], c[1]) not in first)


def capture(arch: int, cases) -> list[Variant]:
    """The distinct compiles for sm_`arch` of running `cases`, an iterable of (op, case name,
    callable that calls the op with backend="triton" on CPU tensors), nothing compiled."""
    found: dict = {}
    current = {}

    def record(fn, signature, constexprs, options, attrs, autotuned):
        v = Variant(current["op"], current["case"], fn, dict(signature), dict(constexprs), dict(attrs), options,
                    autotuned)
        found.setdefault(v.identity(), v)

    with compile_only(arch, record):
        for op, name, case in cases:
            current.update(op=op, case=name)
            case()
    return list(found.values())


def variants(arch: int = 90, ops: Optional[list[str]] = None, quick: bool = False,
             match: Optional[str] = None, gpu_check: bool = False) -> list[Variant]:
    """The distinct compiles of the launch matrix (quick: the representative subset; gpu_check: the
    launches of gpu_check.sh's stages, `gpu_check_matrix()`; match: only the cases whose "op/case"
    name contains this regular expression) for sm_`arch`."""
    return capture(arch, _cases(ops, quick, match, gpu_check))


def verify(arch: int = 90, ops: Optional[list[str]] = None, quick: bool = False,
           match: Optional[str] = None, gpu_check: bool = False) -> list[dict]:
    """Run the cases through Triton's own JIT for sm_`arch` (compiling, not launching) and report,
    per compile the JIT makes, whether Triton's cache had it: rows of op, case, kernel, cache_hit.
    After `precompile` with the same arguments every row is a hit. A miss compiles (and fills
    the cache) as the JIT would."""
    from triton import knobs  # noqa: PLC0415  (Triton: optional dependency)

    rows, current = [], {}

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        rows.append(dict(current, kernel=metadata["name"], cache_hit=bool(cache_hit)))

    previous = knobs.compilation.listener
    knobs.compilation.listener = listener
    try:
        with compile_only(arch):
            for op, name, case in _cases(ops, quick, match, gpu_check):
                current.update(op=op, case=name)
                case()
    finally:
        knobs.compilation.listener = previous
    return rows


# ----------------------------------------------------------------------------- compile


def cache_dir() -> str:
    """Triton's on-disk cache folder (TRITON_CACHE_DIR, else ~/.triton/cache)."""
    from triton import knobs  # noqa: PLC0415  (Triton: optional dependency)

    return knobs.cache.dir


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resources(cubin: bytes) -> dict:
    """regs, stack (bytes of local memory per thread: spills and local arrays; Triton's n_spills
    is this / 4), static shared and local of a cubin, read with Triton's cuobjdump."""
    from triton import knobs  # noqa: PLC0415  (Triton: optional dependency)

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    match = _RES.search(text)
    if match is None:
        raise RuntimeError(f"cuobjdump: no resource line in {text[-500:]!r}")
    regs, stack, _static, local = (int(g) for g in match.groups())
    return dict(regs=regs, stack=stack, local=local)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (ptxas): a compile's cost
    that does not depend on how loaded the machine is."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_variant(v: Variant, arch: int, measure: bool = False) -> dict:
    """Compile `v` for sm_`arch` into Triton's cache (as the JIT would: same source, target and
    options); a row: op, case, kernel, config, dtypes, seconds, shared (bytes), and with
    measure=True regs / stack / local from the cubin; seconds: wall, cpu_seconds: CPU (with ptxas)."""
    import triton  # noqa: PLC0415  (Triton: optional dependency)
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    start, cpu = time.perf_counter(), _cpu_seconds()
    src = triton.compiler.ASTSource(v.fn, v.signature, v.constexprs, v.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, WARP), options=v.options.__dict__)
    row = dict(op=v.op, case=v.case, kernel=v.kernel, family=v.family(), target=f"sm_{arch}", config=v.config(),
               dtypes=v.dtypes(), seconds=round(time.perf_counter() - start, 3),
               cpu_seconds=round(_cpu_seconds() - cpu, 3), shared=int(compiled.metadata.shared))
    if measure:
        row.update(resources(compiled.asm["cubin"]))
    return row


#: CPU seconds (Triton's passes + ptxas) of one compile per kernel family ("op/kernel/16bit|fp32",
#: Variant.family), measured with `python -m sigvlp.precompile --arch 90 --jobs 1 --report --quick
#: --match ...` (rows' cpu_seconds; the mean over 1-3 variants each, 24 in all: attention bf16 and
#: fp32 at head_dim 128 with every autotune candidate, the sigmoid loss fp32 D 256 / bf16 D 768 /
#: fp16 D 32, rope3d, Newton-Schulz) for sm_90 under triton 3.8.0 with an empty cache, on this
#: project's build machine: 2 vCPUs "AMD EPYC" shared with other jobs (load average about 10).
COMPILE_CPU_SECONDS = {
    "rope_attention_varlen/_fwd_kernel/16bit": 6.14, "rope_attention_varlen/_fwd_kernel/fp32": 1.52,
    "rope_attention_varlen/_bwd_dkdv_kernel/16bit": 4.37, "rope_attention_varlen/_bwd_dkdv_kernel/fp32": 4.07,
    "rope_attention_varlen/_bwd_dq_kernel/16bit": 3.47, "rope_attention_varlen/_bwd_dq_kernel/fp32": 3.58,
    "rope_attention_varlen/_bwd_preprocess_kernel/16bit": 0.35,
    "rope_attention_varlen/_bwd_preprocess_kernel/fp32": 0.33,
    "rope_attention_varlen/rotary_table_kernel/fp32": 3.31,
    "rope3d/rope3d_kernel/16bit": 3.74, "rope3d/rope3d_kernel/fp32": 3.72,
    "sigmoid_loss/sigmoid_loss_pass_kernel/16bit": 1.94, "sigmoid_loss/sigmoid_loss_pass_kernel/fp32": 2.01,
    "newton_schulz/gemm_kernel/16bit": 0.96, "newton_schulz/gemm_kernel/fp32": 1.04,
    "newton_schulz/syrk_kernel/16bit": 1.11, "newton_schulz/syrk_kernel/fp32": 1.29,
    "default": 6.14,  # a family not measured: the slowest measured
}
#: One core of the GPU host against the measuring vCPU above, as a time factor. 1.0: conservative,
#: a GPU-host core assumed no faster than that loaded shared vCPU (a server core of an idle 16-core
#: host is most likely faster, but that has not been measured here); the GPU run prints the real
#: precompile seconds beside the plan, which is how to correct it.
HOST_FACTOR = 1.0


def estimate_seconds(counts: dict, jobs: int) -> float:
    """Wall seconds to compile `counts` (family -> variants, as --count prints) with `jobs`
    processes on the GPU host: sum of counts x COMPILE_CPU_SECONDS x HOST_FACTOR / jobs."""
    table = COMPILE_CPU_SECONDS
    total = sum(n * table.get(family, table["default"]) for family, n in counts.items())
    return total * HOST_FACTOR / max(1, jobs)


_POOL_VARIANTS: list = []


def _compile_index(args):
    i, arch, measure = args
    return compile_variant(_POOL_VARIANTS[i], arch, measure)


def compile_all(found: list, arch: int, jobs: int, measure: bool = False, on_row=None) -> list[dict]:
    """Compile the variants `found` for sm_`arch` with `jobs` processes into Triton's cache; one
    row per variant (`compile_variant`), in the order of `found`, calling on_row(row) as each is done."""
    global _POOL_VARIANTS
    _POOL_VARIANTS = list(found)
    tasks = [(i, arch, measure) for i in range(len(_POOL_VARIANTS))]
    rows = []
    if jobs <= 1:
        results = map(_compile_index, tasks)
        for row in results:
            rows.append(row)
            on_row and on_row(row)
        return rows
    # fork: the workers inherit the captured variants (JIT functions do not pickle)
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for row in pool.map(_compile_index, tasks, chunksize=1):
            rows.append(row)
            on_row and on_row(row)
    return rows


def precompile(arch: int, jobs: int, ops=None, quick=False, match=None, measure=False, on_row=None,
               gpu_check=False, kernels: Optional[str] = None) -> list[dict]:
    """Compile every variant (see `variants`; kernels: only those of kernels whose name contains
    this regular expression) with `jobs` processes into Triton's cache; returns one row per
    variant (`compile_variant`), calling on_row(row) as each is done."""
    found = [v for v in variants(arch, ops, quick, match, gpu_check)
             if kernels is None or re.search(kernels, v.kernel)]
    return compile_all(found, arch, jobs, measure, on_row)


def _default_arch() -> int:
    if _has_real_driver():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def _known_arches():
    from sigvlp.kernels.device_info import SHARED_MEMORY_LIMITS  # noqa: PLC0415  (imports Triton)

    return set(SHARED_MEMORY_LIMITS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigvlp.precompile", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=None, help="compute capability, e.g. 90 (default: this GPU's, else 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--quick", action="store_true", help="the representative subset only")
    parser.add_argument("--gpu-check", action="store_true",
                        help="only what benches/gpu_check.sh's stages launch (the ops' self-test and launch_configs)")
    parser.add_argument("--match", default=None, help="only cases whose op/case name matches this regex")
    parser.add_argument("--kernels", default=None, help="only kernels whose name matches this regex")
    parser.add_argument("--report", action="store_true", help="print one JSON row per variant (with registers/spills)")
    parser.add_argument("--count", action="store_true",
                        help="compile nothing: print the number of variants per kernel as JSON")
    parser.add_argument("--verify", action="store_true",
                        help="compile nothing new: say whether Triton's JIT finds each launch in the cache")
    ns = parser.parse_args(argv)
    if ns.jobs < 1:
        parser.error(f"--jobs: expected a positive number of processes, got {ns.jobs}")
    arch = ns.arch or _default_arch()
    if arch not in _known_arches():
        parser.error(f"--arch: expected one of {sorted(_known_arches())}, got {arch}")
    ops = ns.ops.split(",") if ns.ops else None
    unknown = set(ops or ()) - set(launch_matrix(True))
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; expected some of {sorted(launch_matrix(True))}")
    start = time.perf_counter()
    if ns.count:
        counts: dict = {}
        for v in variants(arch, ops, ns.quick, ns.match, ns.gpu_check):
            counts[v.family()] = counts.get(v.family(), 0) + 1
        print(json.dumps(counts, sort_keys=True))
        print(f"estimate: {estimate_seconds(counts, ns.jobs):.0f} s with {ns.jobs} jobs "
              f"({sum(counts.values())} variants; sigvlp.precompile.COMPILE_CPU_SECONDS x HOST_FACTOR {HOST_FACTOR})")
        return 0
    if ns.verify:
        rows = verify(arch, ops, ns.quick, ns.match, ns.gpu_check)
        for row in rows:
            print(json.dumps(row))
        misses = sum(not r["cache_hit"] for r in rows)
        print(f"verified {len(rows)} JIT compiles for sm_{arch}: {len(rows) - misses} cache hits, {misses} misses")
        print(f"cache: {cache_dir()}")
        return 1 if misses else 0
    on_row = (lambda row: print(json.dumps(row), flush=True)) if ns.report else None
    rows = precompile(arch, ns.jobs, ops, ns.quick, ns.match, ns.report, on_row, ns.gpu_check, ns.kernels)
    print(f"precompiled {len(rows)} variants for sm_{arch} with {ns.jobs} jobs in {time.perf_counter() - start:.1f} s "
          f"(compile seconds summed: {sum(r['seconds'] for r in rows):.1f})")
    print(f"cache: {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
