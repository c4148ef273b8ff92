"""The `sigvlp` command. Each subcommand lives in its own module and is imported on use."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "info": ("sigvlp.info", "versions, CUDA build and backend availability"),
    "synth": ("sigvlp.data.synth", "write a synthetic chest-CT phantom dataset in the CT-RATE layout"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sigvlp", description="SigVLP: CT volume-language pretraining")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        sp.set_defaults(_module=module_name)
        module = importlib.import_module(module_name)
        if hasattr(module, "add_arguments"):
            module.add_arguments(sp)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    if hasattr(module, "run"):
        return int(module.run(args) or 0)
    return int(module.main([]) or 0)


if __name__ == "__main__":
    sys.exit(main())
