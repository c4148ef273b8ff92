"""argparse helpers shared by the ``sigvlp`` subcommands.

- Range-checked number types (``int_at_least``, ``number_in``): a bad value is argparse's one-line
  error and exit status 2 at parse time, before any work or any write.
- ``HelpFormatter``: every option's help ends with " (required)" or its default (unless the help
  text already says so, or it is a plain on/off switch).
- ``ArgumentParser``: a usage error is one line on stderr (``PROG: error: MESSAGE (see PROG --help)``)
  and exit status 2, never the whole usage block; subparsers inherit it.
- ``check_writable``: an output location can be written (before the work starts).

Imports nothing beyond the standard library: ``sigvlp CMD --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

__all__ = ["ArgumentParser", "HelpFormatter", "check_writable", "int_at_least", "number_in", "positive_int"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line on stderr, exit status 2:
    ``PROG: error: MESSAGE (see PROG --help)``. ``add_subparsers`` makes its subparsers of this
    class too, so every ``sigvlp`` subcommand answers the same way."""

    def error(self, message):
        message = " ".join(str(message).split())  # one line, whatever the message held
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus " (required)" after the help of a required option and
    " (default: X)" after the help of every other option that has a default worth stating (not
    SUPPRESS/None, not a 0-argument switch) and whose help does not already mention its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required and action.option_strings:
            return text if "required" in text.lower() else text + " (required)"
        if ("default" in text.lower() or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def int_at_least(low: int):
    """An argparse ``type``: text -> int >= low, else ArgumentTypeError (argparse's one-line error)."""

    def parse(text):
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def positive_int(text) -> int:
    """An argparse ``type``: an integer >= 1."""
    return int_at_least(1)(text)


def number_in(low: float = -math.inf, high: float = math.inf, *, high_open: bool = False):
    """An argparse ``type``: text -> finite float with low <= value <= high (< high when
    high_open), else ArgumentTypeError."""
    bound = f"in [{low}, {high}{')' if high_open else ']'}" if math.isfinite(high) else f">= {low}"

    def parse(text):
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = f"number {bound}"
    return parse


def check_writable(path, *, kind: str = "folder") -> None:
    """Raise ValueError (one line) unless ``path`` can be written: for kind "folder" the folder
    itself, else (kind "file") the file's folder. An absent folder is judged by its nearest
    existing ancestor (where it would be created). Writes and removes one temporary file;
    creates nothing else."""
    path = Path(path)
    target = path if kind == "folder" else path.parent
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{path}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".sigvlp-write-check-", dir=probe)
    except OSError as e:
        where = "" if probe == target else f" (it would be created in {probe})"
        raise ValueError(f"{path}: cannot write there{where}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(name)
