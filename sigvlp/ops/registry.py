"""The op registry: one `OpSpec` per op, declared next to the op (sigvlp/ops/<op>.py), from which
every list of op names in the project derives.

Readers of the registry (each takes its op list from `SPECS`, none keeps its own):
- sigvlp.ops.OPS (name -> BackendSet), sigvlp.info, `python -m sigvlp.selftest` (spec.selftest,
  spec.selftest_facts, spec.interpreter_no_bf16_dot);
- tests/test_cuda_emu.py and tests/emu/cuda_emu_plugin.py: the op test files that run again on
  the CUDA emulation (spec.test_file where spec.emulated);
- tests/_launch_survey.py and tests/test_launch_limits.py: the Triton launches compiled for every
  GPU target (spec.launch_survey, spec.triton_autotuned);
- sigvlp.precompile (--gpu-check) and benches/gpu_check.sh: the Triton launches of gpu_check's stages,
  compiled before anything is timed (the self-test's, captured from spec.selftest, and
  spec.launch_configs);
- benches/_bench.py and benches/gpu_check.sh: each op's bench file, its time cap and key ratios
  (spec.bench, spec.bench_cap_s, spec.key_ratios).

Adding an op: docs/contributing.md has the checklist of files.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from sigvlp.ops.backends import BackendSet

__all__ = ["KeyRatio", "OpSpec", "SPECS", "register", "SURVEY_VARIANTS", "rand64", "leaf", "as64", "weighted_grads"]


@dataclasses.dataclass(frozen=True)
class KeyRatio:
    """A ratio gpu_check.sh reports: rows whose op contains `op` (case-insensitive), each provider
    in `providers` (None: any but the baseline) against the `baseline` provider (substring match)
    of the same op, shape and mode; ratio = baseline time / time."""

    title: str
    op: str
    providers: Optional[tuple[str, ...]]
    baseline: str


#: A self-test case: case(dtype, device, generator) builds its inputs once and returns
#: (run, oracle); run(backend) -> (outputs, grads) with the op on `device`, oracle() -> (outputs,
#: grads) in float64 on the CPU. Gradients are of sum(output * w) for fixed random w.
SelftestCase = Callable[[torch.dtype, torch.device, torch.Generator], tuple[Callable, Callable]]
#: A launch-survey case: calls the op with backend="triton" on CPU tensors (launches are
#: intercepted and compiled for GPU targets by tests/_launch_survey.py) at the given packed
#: sequence lengths and (N, M) row counts (see SURVEY_VARIANTS).
SurveyCase = Callable[[Sequence[int], tuple[int, int]], None]

#: Input sizes of the launch survey: per variant, packed sequence lengths (a total that is not a
#: multiple of 16, one that is, a single token; batch sizes 2, 16 and 1) and (N, M) row counts.
SURVEY_VARIANTS = (
    dict(lengths=[1000, 3 * 16 * 16], rows=(300, 257)),
    dict(lengths=[64] * 16, rows=(320, 256)),
    dict(lengths=[1], rows=(1, 1)),
)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything the project keeps per op.

    name: the op's name: torch op ``sigvlp::<name>``, public function ``sigvlp.ops.<name>``.
    backends: its BackendSet (priority order for automatic choice).
    selftest: its `SelftestCase`; selftest_facts: the refusal facts of that case's inputs
        (e.g. head_dim), passed to each backend's limits before running it.
    test_file: its test file (repository-relative); emulated: whether that file runs again with
        the "cuda" backend on the CPU emulation of csrc/ (tests/test_cuda_emu.py).
    launch_survey: its `SurveyCase` (None: no Triton kernel); triton_autotuned: its Triton
        kernels are autotuned (every surviving candidate must fit; surveyed in a slow test).
    launch_configs: the Triton configurations that gpu_check.sh's GPU tests and benches launch
        (the self-test's are captured from `selftest`), each the keyword arguments of the op's case
        builder in sigvlp.precompile (CASE_BUILDERS[name]); `python -m sigvlp.precompile --gpu-check`
        compiles exactly these, so a configuration a GPU test or bench starts to use belongs here.
    bench: its bench file (repository-relative); bench_cap_s: its time cap in gpu_check.sh.
    key_ratios: the ratios gpu_check.sh summarises from its bench.
    interpreter_no_bf16_dot: its Triton kernels use tl.dot, which Triton's CPU interpreter does
        not compute in bfloat16 (the self-test skips triton/bfloat16 on the CPU; GPUs check it).
    """

    name: str
    backends: BackendSet
    selftest: SelftestCase
    test_file: str
    bench: str
    selftest_facts: dict = dataclasses.field(default_factory=dict)
    emulated: bool = True
    launch_survey: Optional[SurveyCase] = None
    triton_autotuned: bool = False
    launch_configs: tuple[dict, ...] = ()
    bench_cap_s: int = 40
    key_ratios: tuple[KeyRatio, ...] = ()
    interpreter_no_bf16_dot: bool = False


#: name -> OpSpec of every op, in registration (import) order; filled by `register`.
SPECS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add `spec` to SPECS (called once per op, by its module); returns it. A second spec under the
    same name, or a BackendSet named differently from the spec, is a ValueError."""
    if not isinstance(spec, OpSpec):
        raise TypeError(f"spec: expected an OpSpec, got {type(spec).__name__}")
    if spec.name in SPECS and SPECS[spec.name] is not spec:
        raise ValueError(f"spec: an op named {spec.name!r} is already registered")
    if spec.backends.op != spec.name:
        raise ValueError(f"spec: backends belong to {spec.backends.op!r}, not {spec.name!r}")
    SPECS[spec.name] = spec
    return spec


# ----------------------------------------------------------------------------- self-test case helpers


def rand64(gen: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    """Standard normal float64 CPU tensor from `gen`, times scale."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def leaf(t64: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """t64 rounded to `dtype` on `device`, as a leaf that requires grad (an op input)."""
    return t64.to(dtype).to(device).requires_grad_(True)


def as64(t: torch.Tensor) -> torch.Tensor:
    """The (rounded) input t as a float64 CPU leaf: the oracle sees exactly what the op saw."""
    return t.detach().to(torch.float64).cpu().requires_grad_(True)


def weighted_grads(outputs, leaves, weights) -> list[torch.Tensor]:
    """Gradients of sum over outputs of (output * w) with respect to `leaves`."""
    total = sum((o.to(torch.float64) * w.to(o.device)).sum() for o, w in zip(outputs, weights))
    return list(torch.autograd.grad(total, leaves))
