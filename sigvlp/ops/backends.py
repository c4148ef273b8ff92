"""Backends of sigvlp ops and how one is chosen.

Every op has a pure-torch reference backend ("torch") and, where written, "triton" and
"cuda" backends, and a "cpu" backend (batched torch for CPU tensors only, e.g. varlen attention
without a Python loop per sequence). Each backend declares what it supports; `BackendSet.select` picks one:

- ``backend=`` given to the op forces that backend (error if it cannot serve the input);
- otherwise the environment variable SIGVLP_BACKEND, when it names a backend the op has,
  forces it the same way;
- otherwise ("auto") the first backend in the op's priority order that can serve the input.
  On CPU tensors auto is "cpu" where the op has one, else "torch": Triton on CPU
  (TRITON_INTERPRET=1) and the CUDA emulation are test modes, never picked automatically.

Every non-torch backend runs under the device of its tensors (`device_guard`): Triton launches on
the current device and CUDA launches use its context, so tensors on cuda:1 while cuda:0 is
current would otherwise meet "invalid resource handle" or a kernel on the wrong GPU.

Value checks that read tensor data (cu_seqlens monotonic, grid products) copy device values to
the host; `validation_enabled` says when an op runs them: always for CPU tensors (free), for
other devices only with the op's ``validate=True`` or SIGVLP_VALIDATE=1 (debugging). Kernels stay
memory-safe for any values, so unchecked bad values give wrong numbers, never a bad access.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Callable

import torch

from sigvlp.kernels import interpreter as _kernels_interpreter
from sigvlp.ops import cuda_module

BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "SIGVLP_BACKEND"
VALIDATE_ENV_VAR = "SIGVLP_VALIDATE"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendError(RuntimeError):
    """The requested backend cannot serve this input; the message says why."""


def triton_interpreter() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1; read in sigvlp.kernels only)."""
    return _kernels_interpreter()


def validation_enabled(validate, device: torch.device, name: str = "validate") -> bool:
    """Whether an op runs its value checks (host reads of index tensors) on inputs on `device`.

    CPU tensors: always (no device-to-host copy involved). Other devices: only when the op was
    called with validate=True or the environment sets SIGVLP_VALIDATE=1, since each check is a
    blocking device-to-host copy (a sync per call, and no CUDA-graph capture). `validate` must be
    a bool; TypeError naming `name` otherwise.
    """
    if not isinstance(validate, bool):
        raise TypeError(f"{name}: expected a bool, got {type(validate).__name__}")
    if device.type == "cpu" or validate:
        return True
    return os.environ.get(VALIDATE_ENV_VAR, "0").strip() not in ("", "0")


def device_guard(device: torch.device):
    """Context manager making `device` current for CUDA tensors (a no-op for other devices)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _tensor_device(args, kwargs) -> torch.device | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _guarded(fn: Callable) -> Callable:
    """fn run under the device of its first tensor argument (see device_guard)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = _tensor_device(args, kwargs)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    run.unguarded = fn
    return run


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> str | None:
    try:
        import triton  # noqa: F401, PLC0415 (optional dependency, and slow to import)
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_unavailable_reason(device: torch.device | None = None) -> str | None:
    reason = _triton_import_reason()
    if reason:
        return reason
    if device is None:
        if torch.cuda.is_available() or triton_interpreter():
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 is not set for CPU execution"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter():
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {device.type} tensor"


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """None if backend `name` can run on `device` (on this machine at all, if None), else why not."""
    if name == "torch":
        return None
    if name == "cpu":
        if device is not None and device.type != "cpu":
            return f"runs on CPU tensors only (reads sequence lengths on the host), got a {device.type} tensor"
        return None
    if name == "triton":
        return triton_unavailable_reason(device)
    if name == "cuda":
        return cuda_module.unavailable_reason(device)
    raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {name!r}")


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    run: the implementation, called with the op's (validated) arguments. For every backend but
        "torch" and "cpu" it is wrapped so that it runs under the device of its first tensor argument
        (the op's main input): every Triton and CUDA launch of every op is device-guarded here.
    dtypes: the element types it accepts.
    limits: optional op-specific check, called with the facts passed to `select`; returns why
        this input is refused (head_dim unsupported, ...) or None.
    """

    name: str
    run: Callable
    dtypes: tuple = FLOAT_DTYPES
    limits: Callable[..., str | None] | None = None

    def __post_init__(self):
        if self.name not in ("torch", "cpu") and not hasattr(self.run, "unguarded"):
            object.__setattr__(self, "run", _guarded(self.run))

    def refusal(self, device: torch.device, dtype: torch.dtype, **facts) -> str | None:
        reason = unavailable_reason(self.name, device)
        if reason:
            return reason
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"dtype {str(dtype).removeprefix('torch.')} not supported (supports {names})"
        if self.limits is not None:
            return self.limits(**facts)
        return None


#: The open `dispatch_log` lists: every backend `BackendSet.select` returns is appended to each.
_dispatch_logs: list[list[tuple[str, str]]] = []


@contextlib.contextmanager
def dispatch_log():
    """Record which backend each op call runs: yields a list that receives (op, backend name) for
    every choice made inside the block (forward and backward passes alike), e.g. to check that
    backend=None picked "torch" on CPU tensors."""
    log: list[tuple[str, str]] = []
    _dispatch_logs.append(log)
    try:
        yield log
    finally:
        _dispatch_logs.remove(log)


class BackendSet:
    """The backends of one op, in priority order for automatic choice."""

    def __init__(self, op: str, backends: list[Backend]):
        self.op = op
        self.backends = {b.name: b for b in backends}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.backends)

    def select(self, requested: str | None, *, device: torch.device, dtype: torch.dtype, **facts) -> Backend:
        backend = self._choose(requested, device, dtype, facts)
        for log in _dispatch_logs:
            log.append((self.op, backend.name))
        return backend

    def _choose(self, requested, device, dtype, facts) -> Backend:
        name = resolve_request(requested, self.names)
        if name != "auto":
            backend = self.backends[name]
            reason = backend.refusal(device, dtype, **facts)
            if reason:
                raise BackendError(f"sigvlp.ops.{self.op}: backend {name!r} cannot serve this input: {reason}")
            return backend
        refusals = []
        for backend in self.backends.values():
            if backend.name in ("triton", "cuda") and device.type == "cpu":
                continue  # the interpreter / CUDA emulation are for tests, never an automatic choice
            reason = backend.refusal(device, dtype, **facts)
            if reason is None:
                return backend
            refusals.append(f"{backend.name}: {reason}")
        raise BackendError(f"sigvlp.ops.{self.op}: no backend can serve this input ({'; '.join(refusals)})")


def resolve_request(requested: str | None, names: tuple[str, ...]) -> str:
    """'auto' or the name of a backend in `names`, from the backend= argument or SIGVLP_BACKEND."""
    if requested is None or requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env in ("", "auto") or env not in names:
            if env and env not in BACKEND_NAMES + ("auto",):
                raise ValueError(f"{ENV_VAR}: expected one of {('auto',) + BACKEND_NAMES}, got {env!r}")
            return "auto"
        return env
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a str or None, got {type(requested).__name__}")
    if requested not in names:
        raise ValueError(f"backend: expected one of {('auto',) + names} for this op, got {requested!r}")
    return requested


#: Test-only hook: when set (tests/conftest.py sets one), called with every op output right after
#: allocation; the test suite fills it with NaN so elements a kernel fails to write fail comparisons.
_output_hook: Callable[[torch.Tensor], None] | None = None


def set_output_hook(hook: Callable[[torch.Tensor], None] | None):
    """Install (or with None remove) the test-only output hook; returns the previous one."""
    global _output_hook
    previous, _output_hook = _output_hook, hook
    return previous


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an op output (uninitialised; see set_output_hook for the tests' NaN poisoning)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _output_hook is not None:
        _output_hook(out)
    return out
