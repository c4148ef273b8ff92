"""Package-level contracts: the CUDA module's linkage, the sigvlp.kernels location, the
info report, backend availability reasons, no GPU work at import, and the no-CUDA build."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_python(code: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cuda_module_links_no_libtorch():
    from sigvlp.ops import cuda_module

    if not cuda_module.build_info().get("cuda_built"):
        pytest.skip(f"CUDA module not built: {cuda_module.build_info().get('reason')}")
    mod = cuda_module.module()
    assert mod is not None, cuda_module.module_unavailable_reason()
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd not available")
    deps = subprocess.run([ldd, mod.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in deps and "libc10" not in deps, deps
    assert "libcudart.so" not in deps, "cudart is linked statically so no CUDA toolkit is needed at run time"
    archs = mod.compiled_arch_list().split(",")
    assert archs and all(a.isdigit() for a in archs)


def test_kernels_only_as_sigvlp_kernels():
    import sigvlp.kernels

    assert pathlib.Path(sigvlp.kernels.__file__).parent.name == "kernels"
    # Even with the repository root on sys.path, a top-level `import kernels` must not pass
    # for the PyPI package of that name: without it (no site-packages: -S) it is an ImportError ...
    result = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, '.'); import kernels"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "sigvlp.kernels" in result.stderr, result.stderr
    # ... and where it is installed, that package (Hugging Face's, which transformers imports) is what
    # `import kernels` gives, never this folder
    code = ("import sys, importlib.util; sys.path.insert(0, '.'); import kernels\n"
            "print(importlib.util.find_spec('kernels') is not None, kernels.__name__, kernels.__file__)")
    result = _run_python(code)
    if result.returncode == 0:
        assert str(ROOT) not in result.stdout and "kernels" in result.stdout, result.stdout
    else:
        assert "sigvlp.kernels" in result.stderr, result.stderr


def test_info_reports_every_backend():
    from sigvlp import info

    data = info.collect()
    assert set(data["backends"]) == {"torch", "cpu", "triton", "cuda"}
    assert data["backends"]["torch"] is None and data["backends"]["cpu"] is None
    assert "cpu" in data["ops"]["rope_attention_varlen"]
    for name, reason in data["backends"].items():
        assert reason is None or (isinstance(reason, str) and reason), name
    if not torch.cuda.is_available():
        assert data["backends"]["cuda"]  # a reason, not a silent absence
    assert "rope3d" in data["ops"]
    result = subprocess.run([sys.executable, "-m", "sigvlp.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("torch", "cpu", "triton", "cuda"):
        assert f"  {name}" in result.stdout
    assert "CUDA module:" in result.stdout


def test_import_makes_no_gpu_calls():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('GPU touched at import')\n"
        "torch.cuda.is_available = boom; torch.cuda.init = boom; torch.cuda._lazy_init = boom\n"
        "torch.cuda.device_count = boom; torch.cuda.current_device = boom\n"
        "import sigvlp, sigvlp.ops, sigvlp.kernels\n"
        "print('ok')\n"
    )
    result = _run_python(code, cwd="/")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_poisoned_outputs_under_tests(monkeypatch):
    """Poisoning is a test fixture (conftest.py), not library behaviour: the library allocates
    with torch.empty, the fixture's hook fills outputs with NaN, and without the hook no
    environment variable makes the library touch the allocation."""
    import types

    from sigvlp.ops import backends

    assert torch.isnan(backends.empty_output((3, 2), torch.float16, torch.device("cpu"))).all()
    previous = backends.set_output_hook(None)
    try:
        out = backends.empty_output((3, 2), torch.int32, torch.device("cpu"))
        assert out.dtype == torch.int32
        # torch.empty's memory handed back as it is: a recognisable "uninitialised" value survives.
        for name in ("SIGVLP_POISON", "SIGVLP_POISON_OUTPUTS", "SIGVLP_NAN_OUTPUTS", "SIGVLP_DEBUG",
                     "SIGVLP_VALIDATE", "SIGVLP_TEST", "PYTEST_CURRENT_TEST"):
            monkeypatch.setenv(name, "1")
        fake_torch = types.SimpleNamespace(empty=lambda shape, **kw: torch.full(shape, 7.0, **kw))
        monkeypatch.setattr(backends, "torch", fake_torch)
        out = backends.empty_output((3, 2), torch.float32, torch.device("cpu"))
        assert torch.equal(out, torch.full((3, 2), 7.0))
    finally:
        backends.set_output_hook(previous)


def test_every_kernel_backend_is_device_guarded():
    """Every kernel backend of every op runs under its tensors' device (sigvlp.ops.backends); the
    torch reference and the CPU-only "cpu" backend have no device to enter."""
    import sigvlp.ops as ops

    for op, backends in ops.OPS.items():
        for name, backend in backends.backends.items():
            if name not in ("torch", "cpu"):
                assert hasattr(backend.run, "unguarded"), (op, name)


def test_validation_policy(monkeypatch):
    from sigvlp.ops.backends import validation_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("SIGVLP_VALIDATE", raising=False)
    assert validation_enabled(False, cpu) and validation_enabled(True, cpu)  # CPU: always (free)
    assert not validation_enabled(False, cuda) and validation_enabled(True, cuda)
    monkeypatch.setenv("SIGVLP_VALIDATE", "1")
    assert validation_enabled(False, cuda)
    with pytest.raises(TypeError, match="^validate:"):
        validation_enabled(1, cpu)


def test_cmake_configures_without_cuda_compiler(tmp_path):
    """Without nvcc the build still configures, says CUDA kernels were skipped, and records why."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not available")
    pytest.importorskip("nanobind", reason="nanobind (a build requirement, not a test one) is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (pathlib.Path(p) / "nvcc").exists())
    result = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path / "build")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "CUDA kernels skipped" in result.stderr + result.stdout
    info = json.loads((tmp_path / "build" / "_build_info.json").read_text())
    assert info["cuda_built"] is False and "no CUDA compiler" in info["reason"]
