"""`python -m sigvlp.selftest` (also `sigvlp info --selftest`): check this installation on this
machine's device.

Every available backend of every op (torch, triton, cuda) runs at small shapes in each dtype it
supports (float32, float16, bfloat16), forward and backward (newton_schulz has no backward), and is
compared with an fp64 oracle computed from the same (rounded) inputs: the readable reference
functions of sigvlp.ops evaluated in float64, differentiated by autograd. One line per
(op, backend, dtype) with PASS / FAIL / SKIP (with the reason) and the error; the exit status is 1
when anything fails.

Error = max |got - oracle| / max |oracle| over each output and gradient (the worst is shown).
Bounds: the per-op, per-dtype table of sigvlp.ops.tolerances (a multiple of the dtype's unit
roundoff: e.g. rope3d 3 x 2^-8 = 1.2e-2 in bfloat16, newton_schulz, whose five iterations amplify
rounding, 12 x 2^-8), shared with the test suite.

On a CPU-only machine the torch backends are checked; the Triton backends too when
TRITON_INTERPRET=1 is set before Python starts (slow: seconds per check); the CUDA backends
when SIGVLP_CUDA_EMULATE=1 provides the emulated CUDA module. Under a minute on one GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable

import torch

import sigvlp
from sigvlp.ops import OPS, BackendError
from sigvlp.ops.backends import triton_interpreter
from sigvlp.ops.registry import SPECS
from sigvlp.ops.tolerances import rel_err, tolerance  # noqa: F401 (rel_err: public here too)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class Check:
    op: str
    backend: str
    dtype: str
    status: str  # "PASS", "FAIL" or "SKIP"
    fwd_err: float | None = None
    bwd_err: float | None = None
    tol: float | None = None
    seconds: float = 0.0
    note: str = ""

    def line(self) -> str:
        def err(v):
            return "       -" if v is None else f"{v:8.1e}"

        if self.status == "SKIP":
            return f"{self.op:22s} {self.backend:6s} {self.dtype:8s}  SKIP  {self.note}"
        text = (f"{self.op:22s} {self.backend:6s} {self.dtype:8s}  {self.status}  fwd {err(self.fwd_err)}  "
                f"bwd {err(self.bwd_err)}  (bound {self.tol:.0e})  {self.seconds:6.2f} s")
        return text + (f"  {self.note}" if self.note else "")


# The cases: each op's OpSpec.selftest (sigvlp.ops.registry), declared next to the op.


# ----------------------------------------------------------------------------- running


def _refusal(backend, device, dtype, facts) -> str | None:
    try:
        return backend.refusal(device, dtype, **facts)
    except TypeError:
        return backend.refusal(device, dtype)


def run_checks(device: str | torch.device | None = None, ops=None, backends=None, dtypes=None,
               seed: int = 0, progress: Callable[[Check], None] | None = None) -> list[Check]:
    """Run the checks (all ops / backends / dtypes unless narrowed); returns one Check each."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = set(ops or ()) - set(OPS)
    if unknown:
        raise ValueError(f"ops: expected names from {sorted(OPS)}, got {sorted(unknown)}")
    unknown = set(dtypes or ()) - set(DTYPES)
    if unknown:
        raise ValueError(f"dtypes: expected names from {sorted(DTYPES)}, got {sorted(unknown)}")
    known = sorted({name for bset in OPS.values() for name in bset.backends})
    unknown = set(backends or ()) - set(known)
    if unknown:
        raise ValueError(f"backends: expected names from {known}, got {sorted(unknown)}")
    checks = []
    for op, spec in SPECS.items():
        if ops and op not in ops:
            continue
        for name, backend in spec.backends.backends.items():
            if backends and name not in backends:
                continue
            for dname, dtype in DTYPES.items():
                if dtypes and dname not in dtypes:
                    continue
                check = _one(spec, name, backend, dname, dtype, device, seed)
                checks.append(check)
                if progress is not None:
                    progress(check)
    return checks


def _one(spec, name, backend, dname, dtype, device, seed) -> Check:
    op = spec.name
    reason = _refusal(backend, device, dtype, spec.selftest_facts)
    if (not reason and name == "triton" and device.type == "cpu" and dtype == torch.bfloat16
            and spec.interpreter_no_bf16_dot):
        reason = "Triton's CPU interpreter has no bfloat16 tl.dot (checked on a GPU)"
    if reason:
        return Check(op, name, dname, "SKIP", note=reason)
    tol = tolerance(op, name, dtype)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    try:
        run, oracle = spec.selftest(dtype, device, gen)
        outs, grads = run(name)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        want_outs, want_grads = oracle()
    except BackendError as exc:  # refused for an input fact the pre-check above did not pass
        return Check(op, name, dname, "SKIP", note=str(exc).split(": ", 1)[-1][:200])
    except Exception as exc:  # a crash is a failure, reported with its message
        return Check(op, name, dname, "FAIL", tol=tol, seconds=time.perf_counter() - t0,
                     note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
    fwd = max(rel_err(g, w) for g, w in zip(outs, want_outs))
    bwd = max((rel_err(g, w) for g, w in zip(grads, want_grads)), default=None)
    ok = fwd <= tol and (bwd is None or bwd <= tol)
    return Check(op, name, dname, "PASS" if ok else "FAIL", fwd, bwd, tol, time.perf_counter() - t0)


def header(device) -> str:
    try:
        import triton  # noqa: PLC0415 (optional dependency)

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    interp = " (Triton interpreter)" if triton_interpreter() else ""
    return (f"sigvlp {sigvlp.__version__} self-test on {device} [{dev}]: torch {torch.__version__}, "
            f"triton {tv}{interp}; error = max|got - fp64 oracle| / max|oracle|")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--backends", default=None, help="comma-separated backends (default: all)")
    parser.add_argument("--dtypes", default=None, help="comma-separated of float32,float16,bfloat16")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def _split(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(header(device), flush=True)
    t0 = time.perf_counter()
    checks = run_checks(device, _split(args.ops), _split(args.backends), _split(args.dtypes),
                        progress=lambda c: print(c.line(), flush=True))
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    print(f"self-test: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dataclasses.asdict(c) for c in checks], fh, indent=1)
    if counts["FAIL"]:
        return 1
    if not counts["PASS"]:
        print("self-test: nothing ran (every backend skipped)")
        return 1
    return 0


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Unknown --ops / --backends / --dtypes names: parser.error (exit 2) listing the valid ones."""
    valid = {"ops": sorted(OPS), "backends": sorted({n for b in OPS.values() for n in b.backends}),
             "dtypes": list(DTYPES)}
    for flag, names in valid.items():
        given = _split(getattr(args, flag, None))
        if getattr(args, flag, None) is not None and not given:
            parser.error(f"--{flag}: empty list; valid: {','.join(names)}")
        bad = [g for g in given or () if g not in names]
        if bad:
            parser.error(f"--{flag}: unknown {','.join(bad)}; valid: {','.join(names)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigvlp.selftest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
