"""A guard for the ops' fast paths: no device-to-host copies of tensor values.

`forbid_host_reads()` makes Tensor.item / tolist / cpu / numpy / nonzero / __bool__ / __int__ /
__float__ / __index__ and .to(<cpu>) raise HostReadError while it is active, except inside a
Triton interpreter launch (the interpreter runs kernels on host copies; a GPU launch passes
pointers). On a GPU, tests add torch.cuda.set_sync_debug_mode("error"), which also catches
syncs inside torch's C++ ops.

`gpu_validation_policy(monkeypatch)` makes CPU tensors follow the validation policy of CUDA
tensors (value checks only with validate=True or SIGVLP_VALIDATE=1), so the GPU fast path's
Python code runs, and is checked, on a CPU-only machine.
"""

from __future__ import annotations

import contextlib

import torch

FORBIDDEN = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


class HostReadError(AssertionError):
    pass


def _targets_cpu(args, kwargs) -> bool:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, str) and a.startswith("cpu"):
            return True
        if isinstance(a, torch.device) and a.type == "cpu":
            return True
    return False


@contextlib.contextmanager
def forbid_host_reads():
    suspended = [0]
    saved = {}

    def guard(name, orig):
        def guarded(self, *args, **kwargs):
            if suspended[0] == 0 and (name != "to" or _targets_cpu(args, kwargs)):
                raise HostReadError(f"Tensor.{name} called on the fast path (a device-to-host copy on GPU)")
            return orig(self, *args, **kwargs)
        return guarded

    for name in FORBIDDEN + ("to",):
        saved[name] = torch.Tensor.__dict__.get(name)
        setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    interp = None
    try:
        from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

        interp = InterpretedFunction
        original_run = InterpretedFunction.run

        def run(self, *args, **kwargs):
            suspended[0] += 1
            try:
                return original_run(self, *args, **kwargs)
            finally:
                suspended[0] -= 1

        InterpretedFunction.run = run
    except ImportError:
        pass
    try:
        yield
    finally:
        for name, orig in saved.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)
        if interp is not None:
            interp.run = original_run


def gpu_validation_policy(monkeypatch):
    """CPU tensors validated as CUDA tensors are: only with validate=True or SIGVLP_VALIDATE=1."""
    from sigvlp.ops import backends

    real = backends.validation_enabled

    def as_on_gpu(validate, device, name="validate"):
        return real(validate, torch.device("meta"), name)

    import importlib

    for module in ("sigvlp.ops.backends", "sigvlp.ops.rope"):
        mod = importlib.import_module(module)
        if hasattr(mod, "validation_enabled"):
            monkeypatch.setattr(mod, "validation_enabled", as_on_gpu)


@contextlib.contextmanager
def no_cuda_sync():
    """Python-level host reads forbidden and torch's CUDA sync debug mode set to error."""
    torch.cuda.synchronize()
    with forbid_host_reads():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)


def two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2
