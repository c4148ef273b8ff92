"""Builds of csrc/ against the CPU emulation (csrc/emu) for the tests: sanitizer drivers and the
deliberately broken kernel variants of tests/emu_variants. Outputs are cached under
build/emu-tests/<kind>-<hash of every input and the compiler> so reruns cost nothing.

kinds: "tsan" (-fsanitize=thread), "asan" (-fsanitize=address,undefined, static __shared__
objects with redzones, one worker), "plain" (-O1, no sanitizer).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "emu-tests"
KERNEL_SOURCES = tuple(sorted(p.name for p in CSRC.glob("*.cu")))  # every op family (+ runtime.cu)

SANITIZE = {
    "tsan": ["-fsanitize=thread"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "plain": [],
}
# The runtime (scheduler bookkeeping shared by fibers on purpose) is not instrumented; it only
# annotates fiber switches and barrier edges for the sanitizer runtime.
RUNTIME_FLAGS = {"tsan": ["-DSIGVLP_EMU_ANNOTATE_TSAN"], "asan": ["-DSIGVLP_EMU_ANNOTATE_ASAN"], "plain": []}
EXTRA = {"tsan": [], "asan": ["-DSIGVLP_EMU_SHARED_STATIC"], "plain": []}

# Run-time options: fail loudly on the first report.
ENV = {
    "tsan": {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"},
    "asan": {"ASAN_OPTIONS": "detect_leaks=0 halt_on_error=1 exitcode=67",
             "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1 exitcode=68"},
    "plain": {},
}


@functools.lru_cache(maxsize=None)
def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no host C++ compiler (g++/clang++ or $CXX) for the CUDA emulation builds")
    return cxx


@functools.lru_cache(maxsize=None)
def _compiler_id() -> str:
    out = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0] if out else compiler()


def _digest(kind: str, extra_files=()) -> str:
    h = hashlib.sha256()
    h.update(_compiler_id().encode())
    h.update(repr((SANITIZE[kind], RUNTIME_FLAGS[kind], EXTRA[kind], KERNEL_SOURCES)).encode())
    files = sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    for p in [*files, *map(pathlib.Path, extra_files)]:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _flags(kind: str) -> list[str]:
    return ["-std=c++17", "-O1", "-g", "-DSIGVLP_EMU=1", *EXTRA[kind], f"-I{CSRC / 'emu' / 'include'}",
            f"-I{CSRC}", "-Wno-unknown-pragmas", "-pthread"]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed: {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}")


def _compile_all(jobs):
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for f in [pool.submit(_run, cmd) for cmd in jobs]:
            f.result()


def _build_dir(out: pathlib.Path, jobs_for) -> None:
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    _compile_all(jobs_for(tmp))
    if out.exists():  # an incomplete or concurrent build: replace it
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its identical build in first
        shutil.rmtree(tmp, ignore_errors=True)


def runtime_object(kind: str) -> pathlib.Path:
    """csrc/emu/emu_runtime.cpp compiled for `kind` (cached)."""
    out = CACHE / f"{kind}-runtime-{_digest(kind)}"
    if not (out / "emu_runtime.o").exists():
        _build_dir(out, lambda d: [[compiler(), *_flags(kind), *RUNTIME_FLAGS[kind], "-c",
                                    str(CSRC / "emu" / "emu_runtime.cpp"), "-o", str(d / "emu_runtime.o")]])
    return out / "emu_runtime.o"


def kernel_objects(kind: str) -> list[pathlib.Path]:
    """The csrc kernels (and runtime queries) compiled for `kind` (cached)."""
    out = CACHE / f"{kind}-kernels-{_digest(kind)}"
    objs = [out / (pathlib.Path(s).stem + ".o") for s in KERNEL_SOURCES]
    if not all(o.exists() for o in objs):
        _build_dir(out, lambda d: [[compiler(), *_flags(kind), *SANITIZE[kind], "-x", "c++", "-c", str(CSRC / s),
                                    "-o", str(d / (pathlib.Path(s).stem + ".o"))] for s in KERNEL_SOURCES])
    return objs


def executable(kind: str, main_source: pathlib.Path, with_kernels: bool, defines=()) -> pathlib.Path:
    """An executable from `main_source` (+ the csrc kernels when with_kernels) and the runtime."""
    main_source = pathlib.Path(main_source)
    tag = hashlib.sha256(repr(sorted(defines)).encode()).hexdigest()[:8]
    exe = CACHE / f"{kind}-{main_source.stem}-{tag}-{_digest(kind, [main_source])}"
    if exe.exists():
        return exe
    link = [runtime_object(kind), *(kernel_objects(kind) if with_kernels else [])]
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
    lang = ["-x", "c++"] if main_source.suffix == ".cu" else []
    _run([compiler(), *_flags(kind), *SANITIZE[kind], *[f"-D{d}" for d in defines], *lang, str(main_source),
          "-x", "none", *map(str, link), "-o", str(tmp)])
    tmp.replace(exe)
    return exe


def run(kind: str, exe: pathlib.Path, *args, timeout: float = 600, workers: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV[kind], "SIGVLP_EMU_WORKERS": str(workers)}
    cmd = [str(exe), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if kind == "tsan" and "unexpected memory mapping" in proc.stderr and shutil.which("setarch"):
        # Older TSan runtimes cannot map their shadow under the newest kernels' address-space
        # randomisation: rerun without it (setarch -R), as the TSan documentation advises.
        proc = subprocess.run(["setarch", os.uname().machine, "-R", *cmd], capture_output=True, text=True,
                              timeout=timeout, env=env)
    return proc
