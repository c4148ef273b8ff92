"""The loader of the compiled CUDA extension ``sigvlp._cuda`` (built from csrc/ when nvcc was found).

(This Python module, ``sigvlp.ops.cuda_module``, finds and checks the extension; the extension
itself is ``sigvlp._cuda``, or ``sigvlp._cuda_emu`` under emulation.)

The module has no torch dependency: tensors are passed as data pointers plus shapes and
strides. Nothing here touches a GPU at import time.

With ``SIGVLP_CUDA_EMULATE=1`` in the environment (read once, at the first use of the CUDA
backend; set it before importing sigvlp, like TRITON_INTERPRET=1), the "cuda" backend is served
by ``sigvlp._cuda_emu`` instead: the same csrc/ kernels and launchers compiled for the CPU against
a SIMT emulation (csrc/emu). It runs on CPU tensors only (and refuses CUDA tensors); it is a test
mode, slow, and never chosen by backend="auto" on CPU tensors.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources

import torch

EMULATE_ENV_VAR = "SIGVLP_CUDA_EMULATE"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the build recorded: whether CUDA was compiled, for which archs, and why not."""
    try:
        text = resources.files("sigvlp").joinpath("_build_info.json").read_text()
    except (FileNotFoundError, OSError):
        return {"cuda_built": False, "reason": "no build record (package not installed with pip install -e .)",
                "archs": [], "nvcc": None}
    return json.loads(text)


@functools.lru_cache(maxsize=None)
def emulated() -> bool:
    """True when SIGVLP_CUDA_EMULATE=1: the "cuda" backend runs csrc/ on the CPU emulation."""
    return os.environ.get(EMULATE_ENV_VAR, "0").strip() not in ("", "0")


@functools.lru_cache(maxsize=None)
def _load():
    if emulated():
        try:
            from sigvlp import _cuda_emu  # noqa: PLC0415 (optional: built only with a host compiler)
        except ImportError as exc:
            built = build_info().get("emu_built")
            why = f"import failed: {exc}" if built else "the package was built without it (no host C++ compiler?)"
            return None, f"{EMULATE_ENV_VAR}=1 but the CUDA emulation module sigvlp._cuda_emu is missing: {why}"
        return _cuda_emu, None
    try:
        from sigvlp import _cuda  # noqa: PLC0415 (optional: built only where nvcc was found)
    except ImportError as exc:
        info = build_info()
        reason = info.get("reason") if not info.get("cuda_built") else f"import failed: {exc}"
        return None, f"CUDA module not built: {reason}"
    return _cuda, None


def module():
    """The compiled module, or None (see module_unavailable_reason)."""
    return _load()[0]


def module_unavailable_reason() -> str | None:
    return _load()[1]


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> str | None:
    mod = module()
    if mod.device_count() <= index:
        return f"CUDA device {index} not visible to the sigvlp CUDA module"
    problem = mod.check_kernel_image(index)
    if problem:
        cap = torch.cuda.get_device_capability(index)
        return (f"no kernel image for sm_{cap[0]}{cap[1]} (compiled for {mod.compiled_arch_list()}; "
                f"rebuild with SIGVLP_CUDA_ARCHS): {problem}")
    return None


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """None when the CUDA backend can run on `device` (any visible GPU if None), else why not."""
    reason = module_unavailable_reason()
    if reason:
        return reason
    if emulated():
        if device is not None and device.type != "cpu":
            return f"{EMULATE_ENV_VAR}=1: the emulated CUDA backend runs on CPU tensors, got a {device.type} tensor"
        return None
    if device is not None and device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors, got a {device.type} tensor"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    index = 0 if device is None or device.index is None else device.index
    return _device_reason(index)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def stream_ptr(device: torch.device) -> int:
    if device.type == "cpu":
        return 0  # the emulation runs synchronously on the calling thread
    return torch.cuda.current_stream(device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
