"""Compile the Triton launches of sigvlp's ops for GPU targets, without a GPU (a script).

Each op's launch-survey case (its OpSpec's, sigvlp.ops.registry) calls the op through its public
API on CPU tensors with backend="triton"; sigvlp.precompile's compile-only mode (Triton's JIT bound
for the target, nothing launched; autotuned kernels: every config that survives the kernel's own
pruning) captures each launch's compile, which is then compiled for the target by Triton's own
compiler. The launchers see the target's shared-memory limit, so what is compiled is what they
would choose on that GPU.

    python tests/_launch_survey.py [--targets 80,86,89,90] [--ops rope3d,sigmoid_loss,...] [--jobs N]
                                   [--kernels REGEX]

prints one JSON object per line: op, kernel, target (sm), config, dtypes, shared (bytes), limit
(bytes), autotuned.

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
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions (nothing runs: launches are intercepted)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from sigvlp import precompile  # noqa: E402
from sigvlp.kernels.device_info import SHARED_MEMORY_LIMITS  # noqa: E402
from sigvlp.ops.registry import SPECS, SURVEY_VARIANTS  # noqa: E402

# Each op's launch survey is declared in its OpSpec (sigvlp.ops.registry); the sizes per variant are
# registry.SURVEY_VARIANTS.
CASES = {name: spec.launch_survey for name, spec in SPECS.items() if spec.launch_survey is not None}


def _case(op, variant=0):
    sizes = SURVEY_VARIANTS[variant]
    return op, f"survey{variant}", lambda: CASES[op](sizes["lengths"], sizes["rows"])


def _launches(op, sm):
    """(JITFunction, args, kwargs) of every launch of `op`'s survey cases, over SURVEY_VARIANTS."""
    launches = []
    with precompile.compile_only(sm, on_compile=lambda *a, **k: None,
                                 on_launch=lambda fn, args, kwargs: launches.append((fn, args, dict(kwargs)))):
        for variant in range(len(SURVEY_VARIANTS)):
            _case(op, variant)[2]()
    return launches


def specialisation_keys(ops, sm=90):
    """Per op, kernel and configuration: the distinct binder specialisations over SURVEY_VARIANTS."""
    backend = make_backend(GPUTarget("cuda", sm, precompile.WARP))
    for op in ops:
        keys: dict = {}
        for fn, args, kwargs in _launches(op, sm):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            kwargs.setdefault("debug", False)
            names = {p.name for p in fn.params if p.is_constexpr}
            meta = {k: v for k, v in kwargs.items() if k in names and isinstance(v, (int, bool, str)) and k.isupper()}
            meta.update({k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs})
            # The control: the same launches if no argument were exempt from specialisation.
            params_all = [copy.copy(p) for p in fn.params]
            for p in params_all:
                p.do_not_specialize = False
            found = keys.setdefault((fn, json.dumps(meta, sort_keys=True)), {"keys": set(), "control": set()})
            for kind, params in (("keys", fn.params), ("control", params_all)):
                _, specialization, _ = create_function_from_signature(fn.signature, params, backend)(*args, **kwargs)
                found[kind].add(str(specialization))
        for (fn, meta), found in keys.items():
            print(json.dumps(dict(op=op, kernel=fn.__name__, config=json.loads(meta), n_keys=len(found["keys"]),
                                  n_keys_without_exemptions=len(found["control"]),
                                  exempt=[p.name for p in fn.params if p.do_not_specialize])), flush=True)


def survey(targets, ops, jobs=1, kernels=None):
    """Compile every launch of `ops`' survey cases (kernels: only kernels whose name matches this
    regular expression) for each target, with `jobs` processes."""
    for sm in targets:
        found = [v for v in precompile.capture(sm, [_case(op) for op in ops])
                 if kernels is None or re.search(kernels, v.kernel)]
        for v, row in zip(found, precompile.compile_all(found, sm, jobs)):
            print(json.dumps(dict(op=v.op, kernel=v.kernel, target=row["target"], config=row["config"],
                                  dtypes=row["dtypes"], shared=row["shared"], limit=SHARED_MEMORY_LIMITS[sm],
                                  autotuned=v.autotuned)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="80,86,89,90")
    parser.add_argument("--ops", default=",".join(CASES))
    parser.add_argument("--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--kernels", default=None, help="only kernels whose name matches this regex")
    parser.add_argument("--keys", action="store_true", help="specialisation keys over lengths, no compiles")
    ns = parser.parse_args(argv)
    if ns.keys:
        specialisation_keys(ns.ops.split(","))
    else:
        survey([int(t) for t in ns.targets.split(",")], ns.ops.split(","), ns.jobs, ns.kernels)


if __name__ == "__main__":
    sys.exit(main())
