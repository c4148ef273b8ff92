"""Compile the Triton launches of sigvlp's ops for GPU targets, without a GPU (a script).

Each op is called through its public API on CPU tensors with backend="triton"; Triton's kernel
launch (JITFunction.run, and Autotuner.run for autotuned kernels: every config that survives the
kernel's own pruning) is intercepted, and each launch is compiled with the launch's own
specialisation (Triton's binder, as at run time) for a GPUTarget with Triton's ASTSource. The
launchers see the target's shared-memory limit through sigvlp.kernels._device.shared_memory_limit,
so what is compiled is what they would choose on that GPU.

    python tests/_launch_survey.py [--targets 80,86,89,90] [--ops rope3d,sigmoid_loss,...]

prints one JSON object per line: op, kernel, target (sm), config, shared (bytes), limit (bytes),
n_specialised (the integer arguments Triton specialised on for this launch, by name).

    python tests/_launch_survey.py --keys [--ops ...]

compiles nothing: runs each op at several batch sizes / total lengths (multiples of 16 or not,
and 1) and prints, per kernel and configuration, the distinct specialisation keys Triton's binder
computes for sm_90 (one key: a new length never compiles a new variant).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions (nothing runs: launches are intercepted)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import sigvlp.kernels._device as device_info  # noqa: E402
from sigvlp.ops import backends  # noqa: E402
from sigvlp.ops.registry import SPECS, SURVEY_VARIANTS  # noqa: E402

WARP = 32
_captured: list = []


def _capture_jit(self, *args, grid, warmup, **kwargs):
    _JIT_BY_NAME[self.__name__] = self
    _captured.append((self, args, kwargs, None))


def _capture_autotune(self, *args, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    self.nargs = dict(zip(self.arg_names, args))
    fn = self.fn
    _JIT_BY_NAME[fn.__name__] = fn
    for cfg in self.prune_configs(kwargs):
        _captured.append((fn, args, {**kwargs, **cfg.all_kwargs()}, cfg))
    self.nargs = None


def _describe(kwargs, params):
    names = {p.name for p in params if p.is_constexpr}
    meta = {k: v for k, v in kwargs.items() if k in names and isinstance(v, (int, bool, str)) and
            k.isupper()}
    for opt in ("num_warps", "num_stages"):
        if opt in kwargs:
            meta[opt] = kwargs[opt]
    return meta


def compile_launch(fn: JITFunction, args, kwargs, target: GPUTarget):
    """(compiled kernel, names of the int arguments Triton specialised on) for one launch."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    specialised = []
    for p, (ty, spec) in zip(fn.params, specialization):
        if isinstance(ty, str) and ty[0] in "iu" and spec not in (None, ""):
            specialised.append(p.name)
    return compiled, specialised


# ----------------------------------------------------------------------------- the cases
# Each op's launch survey is declared in its OpSpec (sigvlp.ops.registry); the sizes per variant are
# registry.SURVEY_VARIANTS.

VARIANTS = dict(enumerate(SURVEY_VARIANTS))
CASES = {name: spec.launch_survey for name, spec in SPECS.items() if spec.launch_survey is not None}


def _run_case(op, variant=0):
    CASES[op](VARIANTS[variant]["lengths"], VARIANTS[variant]["rows"])


_JIT_BY_NAME: dict = {}


def _jit_of(name):
    return _JIT_BY_NAME[name]


def _install():
    JITFunction.run = _capture_jit
    Autotuner.run = _capture_autotune
    backends.triton_unavailable_reason = lambda device=None: None  # let "triton" serve CPU tensors


def specialisation_keys(ops, sm=90):
    """Per op, kernel and configuration: the distinct binder specialisations over VARIANTS."""
    _install()
    limit = device_info.SHARED_MEMORY_LIMITS[sm]
    device_info.shared_memory_limit = lambda device: limit
    device_info.arch = lambda device: sm
    backend = make_backend(GPUTarget("cuda", sm, WARP))
    for op in ops:
        keys: dict = {}
        for variant in VARIANTS:
            _captured.clear()
            _run_case(op, variant)
            for fn, args, kwargs, _cfg in list(_captured):
                kwargs = dict(kwargs)
                kwargs.setdefault("debug", False)
                meta = json.dumps(_describe(kwargs, fn.params), sort_keys=True)
                # The control: the same launches if no argument were exempt from specialisation.
                params_all = [copy.copy(p) for p in fn.params]
                for p in params_all:
                    p.do_not_specialize = False
                for kind, params in (("keys", fn.params), ("control", params_all)):
                    binder = create_function_from_signature(fn.signature, params, backend)
                    _, specialization, _ = binder(*args, **kwargs)
                    keys.setdefault((fn.__name__, meta), {"keys": set(), "control": set()})[kind].add(
                        str(specialization))
        for (kernel, meta), found in keys.items():
            print(json.dumps(dict(op=op, kernel=kernel, config=json.loads(meta), n_keys=len(found["keys"]),
                                  n_keys_without_exemptions=len(found["control"]),
                                  exempt=[p.name for p in _jit_of(kernel).params if p.do_not_specialize])),
                  flush=True)


def survey(targets, ops):
    _install()
    done = {}
    for sm in targets:
        limit = device_info.SHARED_MEMORY_LIMITS[sm]
        device_info.shared_memory_limit = lambda device, _limit=limit: _limit
        device_info.arch = lambda device, _sm=sm: _sm
        target = GPUTarget("cuda", sm, WARP)
        for op in ops:
            _captured.clear()
            _run_case(op)
            for fn, args, kwargs, cfg in list(_captured):
                meta = _describe(kwargs, fn.params)
                key = (sm, fn.__name__, json.dumps(meta, sort_keys=True),
                       tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
                if key in done:
                    continue
                compiled, specialised = compile_launch(fn, args, kwargs, target)
                row = dict(op=op, kernel=fn.__name__, target=f"sm_{sm}", config=meta,
                           dtypes=sorted({str(a.dtype).removeprefix("torch.") for a in args
                                          if isinstance(a, torch.Tensor) and a.is_floating_point()}),
                           shared=int(compiled.metadata.shared), limit=limit, n_specialised=specialised,
                           autotuned=cfg is not None)
                done[key] = row
                print(json.dumps(row), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="80,86,89,90")
    parser.add_argument("--ops", default=",".join(CASES))
    parser.add_argument("--keys", action="store_true", help="specialisation keys over lengths, no compiles")
    ns = parser.parse_args(argv)
    if ns.keys:
        specialisation_keys(ns.ops.split(","))
    else:
        survey([int(t) for t in ns.targets.split(",")], ns.ops.split(","))


if __name__ == "__main__":
    sys.exit(main())
