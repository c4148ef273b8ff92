"""The `sigvlp` command. Each subcommand lives in its own module and is imported on use."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int. This command line
# shell is the one core module that names the demo application (sigvlp.demo), and it imports a module only
# when the parser is built, never on `import sigvlp.cli` (tests/test_demo_boundary.py checks the boundary).
SUBCOMMANDS = {
    "demo": ("sigvlp.demo.run", "the main job: phantoms, train the tiny model on the CPU, zero-shot on "
                                "held-out phantoms (no network, no GPU)"),
    "train": ("sigvlp.train.cli", "train SigVLP on a CT-RATE-layout folder (torchrun for several processes)"),
    "embed": ("sigvlp.embed", "pooled and token embeddings of NIfTI files or DICOM series"),
    "eval": ("sigvlp.eval", "evaluate a checkpoint: zero-shot (CT-CLIP protocol), organs, retrieval, probes, "
                            "depth sweep; JSON report and plots"),
    "masks": ("sigvlp.data.segment", "organ masks with TotalSegmentator for every volume without one (needs the "
                                     "[seg] extra)"),
    "synth": ("sigvlp.demo.synth.cli", "write a synthetic chest-CT phantom dataset in the CT-RATE layout"),
    "findings": ("sigvlp.data.findings_cli", "build a split's organ-wise findings bank (rule splitter, LLM, or "
                                             "the fVLM / RadGenome organ-wise reports)"),
    "info": ("sigvlp.info", "versions, CUDA build and backend availability"),
}
SUBCOMMANDS["preprocess"] = ("sigvlp.data.preprocess_cli", "build the preprocessing cache before training: N "
                             "processes, --shard I/N per machine, resumable")
# Subcommands whose module may not exist yet: the parser says where they come from.
PLACEHOLDERS = {
    "eval": "evaluation arrives with the evaluation issue (sigvlp.eval is not installed)",
    "embed": "embedding arrives with the model issue (sigvlp.embed is not installed)",
}


def _available(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The `sigvlp` parser. commands: the subcommands whose options are added (their modules
    imported); None: all of them. Every subcommand is listed either way, so `sigvlp --help`
    and `sigvlp --version` import no subcommand module (and no torch)."""
    from sigvlp import __version__
    from sigvlp.cliargs import ArgumentParser, HelpFormatter

    parser = ArgumentParser(prog="sigvlp", description="SigVLP: CT volume-language pretraining")
    parser.add_argument("--version", action="version", version=f"sigvlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=help_text, add_help=False)  # listed only: never parsed in this call
            continue
        if not _available(module_name):
            sp = sub.add_parser(name, help=f"(not available) {PLACEHOLDERS.get(name, help_text)}")
            sp.set_defaults(_module=None, _placeholder=PLACEHOLDERS.get(name, f"{module_name} is not installed"))
            continue
        sp = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        sp.set_defaults(_module=module_name)
        module = importlib.import_module(module_name)
        if hasattr(module, "add_arguments"):
            module.add_arguments(sp)
    return parser


def _command(argv) -> str | None:
    """The subcommand named in argv (the first argument that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser([_command(argv)])
    args = parser.parse_args(argv)
    if args._module is None:
        print(f"sigvlp {args.command}: {args._placeholder}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    if hasattr(module, "run"):
        return int(module.run(args) or 0)
    return int(module.main([]) or 0)


if __name__ == "__main__":
    sys.exit(main())
