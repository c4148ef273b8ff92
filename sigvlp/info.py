"""`python -m sigvlp.info`: versions, the CUDA build, and each backend's availability."""

from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    import sigvlp
    from sigvlp.ops import OPS, backends, cuda_module

    info = {
        "sigvlp": sigvlp.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpreter"] = backends.triton_interpreter()
    build = cuda_module.build_info()
    info["cuda_module"] = {
        "built": bool(build.get("cuda_built")),
        "reason": build.get("reason"),
        "nvcc": build.get("nvcc"),
        "archs": build.get("archs", []),
    }
    info["cuda_module"]["emu_built"] = bool(build.get("emu_built"))
    info["cuda_emulation"] = None
    mod = cuda_module.module()
    if cuda_module.emulated():
        info["cuda_emulation"] = {
            "module": getattr(mod, "__name__", None),
            "schedule": mod.schedule() if mod is not None else None,
            "workers": mod.workers() if mod is not None else None,
            "reason": cuda_module.module_unavailable_reason(),
        }
    elif mod is not None:
        info["cuda_module"]["compiled_arch_list"] = mod.compiled_arch_list()
        info["cuda_module"]["cuda_runtime"] = mod.runtime_version()
    info["backends"] = {name: backends.unavailable_reason(name) for name in backends.BACKEND_NAMES}
    info["ops"] = {op: list(bset.names) for op, bset in OPS.items()}
    return info


def report(info: dict) -> str:
    lines = [
        f"sigvlp {info['sigvlp']}  (python {info['python']}, torch {info['torch']}, "
        f"triton {info['triton'] or 'not installed'})",
        f"torch CUDA: {info['torch_cuda'] or 'none (CPU build)'}; "
        f"devices: {', '.join(info['cuda_devices']) or 'none'}",
    ]
    cm = info["cuda_module"]
    if cm["built"]:
        archs = ", ".join(f"sm_{a}" for a in cm["archs"])
        lines.append(f"CUDA module: built with nvcc {cm['nvcc']} for {archs}"
                     + (f" (__CUDA_ARCH_LIST__ {cm.get('compiled_arch_list')})" if cm.get("compiled_arch_list") else ""))
    else:
        lines.append(f"CUDA module: not built ({cm['reason']})")
    emu = info.get("cuda_emulation")
    if emu is not None:
        if emu["reason"]:
            lines.append(f"CUDA emulation: on (SIGVLP_CUDA_EMULATE=1) but unavailable: {emu['reason']}")
        else:
            lines.append(f"CUDA emulation: on (SIGVLP_CUDA_EMULATE=1): 'cuda' runs csrc/ on CPU tensors through "
                         f"{emu['module']} (schedule {emu['schedule']}, {emu['workers']} worker(s))")
    else:
        lines.append("CUDA emulation: off (SIGVLP_CUDA_EMULATE=1 runs csrc/ on the CPU; module "
                     f"{'built' if cm.get('emu_built') else 'not built'})")
    lines.append("backends:")
    for name, reason in info["backends"].items():
        note = " (Triton interpreter on CPU)" if name == "triton" and info["triton_interpreter"] else ""
        if name == "cuda" and info.get("cuda_emulation"):
            note = " (emulated on the CPU, CPU tensors only)"
        lines.append(f"  {name:7s} {'available' + note if reason is None else 'unavailable: ' + reason}")
    lines.append("ops:")
    for op, names in info["ops"].items():
        lines.append(f"  {op}: {', '.join(names)}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--selftest", action="store_true",
                        help="then check every backend of every op against fp64 oracles (python -m sigvlp.selftest)")


def run(args) -> int:
    print(report(collect()))
    if getattr(args, "selftest", False):
        from sigvlp import selftest

        print(flush=True)
        return selftest.main([])
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sigvlp.info")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
