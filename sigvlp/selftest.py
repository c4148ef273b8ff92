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


# ----------------------------------------------------------------------------- cases
# A case builds its inputs once per (dtype, device) and returns:
#   run(backend) -> (outputs, grads) with the op on `device`; oracle() -> (outputs, grads) in fp64.
# Gradients are those of sum(output * w) for fixed random w (so every element matters).


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _grads(outputs, leaves, weights):
    total = sum((o.to(torch.float64) * w.to(o.device)).sum() for o, w in zip(outputs, weights))
    return list(torch.autograd.grad(total, leaves))


def _leaf(t64, dtype, device):
    return t64.to(dtype).to(device).requires_grad_(True)


def _as64(t):
    return t.detach().to(torch.float64).cpu().requires_grad_(True)


def case_rope3d(dtype, device, gen):
    from sigvlp.ops import rope3d, rope3d_reference

    grid = torch.tensor([[2, 3, 4], [3, 1, 5], [1, 1, 1]], dtype=torch.int32)
    cu = torch.tensor([0, 24, 39, 40], dtype=torch.int32)
    x = _leaf(_rand(gen, 40, 3, 64), dtype, device)
    w = _rand(gen, 40, 3, 64)

    def run(backend):
        out = rope3d(x, cu.to(device), grid.to(device), backend=backend)
        return [out], _grads([out], [x], [w])

    def oracle():
        x64 = _as64(x)
        out = rope3d_reference(x64, cu, grid, compute_dtype=torch.float64)
        return [out], _grads([out], [x64], [w])

    return run, oracle


def case_rope_attention_varlen(dtype, device, gen):
    from sigvlp.ops import rope_attention_varlen, rope_attention_varlen_reference

    grid = torch.tensor([[1, 1, 17], [2, 4, 5], [1, 1, 1]], dtype=torch.int32)
    lengths = [17, 40, 1]
    cu = torch.tensor([0, 17, 57, 58], dtype=torch.int32)
    q = _leaf(_rand(gen, 58, 4, 64), dtype, device)
    k = _leaf(_rand(gen, 58, 2, 64), dtype, device)  # GQA: 2 query heads per k/v head
    v = _leaf(_rand(gen, 58, 2, 64), dtype, device)
    w = _rand(gen, 58, 4, 64)

    def run(backend):
        out = rope_attention_varlen(q, k, v, cu.to(device), max(lengths), grid.to(device), backend=backend)
        return [out], _grads([out], [q, k, v], [w])

    def oracle():
        leaves = [_as64(t) for t in (q, k, v)]
        out, _ = rope_attention_varlen_reference(*leaves, cu, grid, compute_dtype=torch.float64)
        return [out], _grads([out], leaves, [w])

    return run, oracle


def case_sigmoid_loss(dtype, device, gen):
    import torch.nn.functional as F

    from sigvlp.ops import sigmoid_loss
    from sigvlp.ops.sigmoid_loss import sigmoid_loss_dense

    x = _leaf(F.normalize(_rand(gen, 24, 64), dim=1), dtype, device)
    y = _leaf(F.normalize(_rand(gen, 30, 64), dim=1), dtype, device)
    t = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    image_ids = torch.arange(24)
    text_ids = torch.cat([torch.arange(24), torch.tensor([0, 3, 3, 7, 20, 23])])  # repeated texts
    w = [torch.tensor(1.0, dtype=torch.float64)]

    def run(backend):
        loss = sigmoid_loss(x, y, t, b, image_ids=image_ids.to(device), text_ids=text_ids.to(device),
                            backend=backend)
        return [loss], _grads([loss], [x, y, t, b], w)

    def oracle():
        leaves = [_as64(v) for v in (x, y, t, b)]
        loss = sigmoid_loss_dense(*leaves, image_ids=image_ids, text_ids=text_ids)
        return [loss], _grads([loss], leaves, w)

    return run, oracle


def case_newton_schulz(dtype, device, gen):
    from sigvlp.ops import newton_schulz, newton_schulz_reference

    G = _rand(gen, 3, 40, 72).to(dtype)
    T = _rand(gen, 56, 24).to(dtype)  # tall: handled as its transpose

    def run(backend):
        outs = [newton_schulz(g.to(device), backend=backend, precision="input") for g in (G, T)]
        return outs, []

    def oracle():
        return [newton_schulz_reference(g.double()) for g in (G, T)], []

    return run, oracle


CASES: dict[str, Callable] = {
    "rope3d": case_rope3d,
    "rope_attention_varlen": case_rope_attention_varlen,
    "sigmoid_loss": case_sigmoid_loss,
    "newton_schulz": case_newton_schulz,
}
_FACTS = {"rope3d": {"head_dim": 64}, "rope_attention_varlen": {"head_dim": 64, "cross": False}}


# ----------------------------------------------------------------------------- running


def _refusal(backend, device, dtype, facts) -> str | None:
    try:
        return backend.refusal(device, dtype, **facts)
    except TypeError:
        return backend.refusal(device, dtype)


def run_checks(device: str | torch.device | None = None, ops=None, backends=None, dtypes=None,
               seed: int = 0, progress: Callable[[Check], None] | None = None) -> list[Check]:
    """Run the checks (all ops / backends / dtypes unless narrowed); returns one Check each."""
    from sigvlp.ops import OPS

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
    for op, bset in OPS.items():
        if ops and op not in ops:
            continue
        for name, backend in bset.backends.items():
            if backends and name not in backends:
                continue
            for dname, dtype in DTYPES.items():
                if dtypes and dname not in dtypes:
                    continue
                check = _one(op, name, backend, dname, dtype, device, seed)
                checks.append(check)
                if progress is not None:
                    progress(check)
    return checks


#: ops whose Triton kernels use tl.dot, which Triton's CPU interpreter does not compute in bfloat16
_INTERPRETER_NO_BF16_DOT = {"rope_attention_varlen", "sigmoid_loss", "newton_schulz"}


def _one(op, name, backend, dname, dtype, device, seed) -> Check:
    from sigvlp.ops import BackendError

    reason = _refusal(backend, device, dtype, _FACTS.get(op, {}))
    if (not reason and name == "triton" and device.type == "cpu" and dtype == torch.bfloat16
            and op in _INTERPRETER_NO_BF16_DOT):
        reason = "Triton's CPU interpreter has no bfloat16 tl.dot (checked on a GPU)"
    if reason:
        return Check(op, name, dname, "SKIP", note=reason)
    tol = tolerance(op, name, dtype)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    try:
        run, oracle = CASES[op](dtype, device, gen)
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
    import sigvlp
    from sigvlp.ops import backends

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    interp = " (Triton interpreter)" if backends.triton_interpreter() else ""
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
    from sigvlp.ops import OPS

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
