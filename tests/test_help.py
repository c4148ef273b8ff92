"""`sigvlp --help`, `--version` and every `sigvlp CMD --help`: fast, no torch, every flag described
with its default and its choices; bad numeric values are one-line errors (exit 2) at parse time."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest

from sigvlp.cli import SUBCOMMANDS, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import json, sys
from sigvlp.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "triton", "matplotlib", "sklearn")
                                                 if m in sys.modules)}), file=sys.stderr)
"""
#: the flags that take one of a fixed set of values (each must list them: argparse choices)
ENUMERATED = {
    "train": ["--optimizer", "--precision", "--split", "--layout", "--model", "--backend"],
    "eval": ["--split", "--precision", "--layout", "--sections"],
    "embed": ["--backend", "--already-hu", "--layout"],
    "masks": ["--split", "--device", "--layout"],
    "synth": ["--preset"],
    "findings": ["--split", "--layout"],
}
#: numeric flags for which a negative value is meaningful (none so far)
NEGATIVE_OK: set = set()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _probe(args):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=_env(), timeout=120)
    wall = time.perf_counter() - t0
    return json.loads(p.stderr.strip().splitlines()[-1]), p.stdout, wall


@pytest.mark.parametrize("args", [["--help"], ["--version"]] + [[c, "--help"] for c in SUBCOMMANDS],
                         ids=lambda a: " ".join(a))
def test_help_is_fast_and_imports_no_torch(args):
    # the machine is shared: the best of three runs is the one compared with the bound
    best = None
    for _ in range(3):
        result, stdout, wall = _probe(args)
        assert result["code"] == 0, stdout
        assert result["heavy"] == [], f"`sigvlp {' '.join(args)}` imported {result['heavy']}"
        best = wall if best is None else min(best, wall)
        if best < 1.5:
            break
    assert best < 1.5, f"`sigvlp {' '.join(args)}` took {best:.2f} s (bound 1.5 s)"
    assert stdout.strip()


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _options(sp):
    return [a for a in sp._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def test_every_flag_has_a_description_default_and_choices():
    problems = []
    for name, sp in _subparsers().items():
        formatter = sp._get_formatter()
        for a in _options(sp):
            label = f"{name} {'/'.join(a.option_strings) or a.dest}"
            text = a.help or ""
            if text is argparse.SUPPRESS or not text.strip() or text.lstrip().startswith("(default"):
                problems.append(f"{label}: no description")
                continue
            if "\n" in text:
                problems.append(f"{label}: description is not one line")
            shown = formatter._get_help_string(a)
            if a.option_strings and not a.required and a.nargs != 0 and "default" not in shown.lower():
                problems.append(f"{label}: default not shown")
            if a.option_strings and a.required and "(required)" not in shown:
                problems.append(f"{label}: required, but its help does not say so")
        if name in ("eval", "embed"):  # the flags the QA run found unmarked
            assert sum("(required)" in formatter._get_help_string(a) for a in _options(sp)) == 2, name
        for flag in ENUMERATED.get(name, ()):
            action = next((a for a in sp._actions if flag in a.option_strings), None)
            if action is None or not action.choices:
                problems.append(f"{name} {flag}: no choices listed")
    assert not problems, "\n".join(problems)


def _call(argv, parse_only=False):
    """main(argv) (parse_only: the parser alone, nothing runs) -> (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = build_parser([argv[0]]).parse_args(argv) and 0 if parse_only else main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def _required(sp, tmp_path):
    args = []
    for a in sp._actions:
        if a.required:
            values = [str(tmp_path / "x")] * (a.nargs if isinstance(a.nargs, int) else 1)
            args += ([a.option_strings[0]] if a.option_strings else []) + values
    return args


def _numeric(a) -> bool:
    """The flag's type turns "1" into a number (int, float, or a range-checked number type)."""
    if a.type is None or a.type is str:
        return False
    try:
        return isinstance(a.type("1"), (int, float)) and not isinstance(a.type("1"), bool)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


@pytest.mark.parametrize("command", [c for c in SUBCOMMANDS if c != "train"])
def test_bad_numeric_values_are_one_line_errors(command, tmp_path):
    sp = _subparsers()[command]
    flags = [a for a in _options(sp) if a.option_strings and _numeric(a)]
    for a in flags:
        n = a.nargs if isinstance(a.nargs, int) else 1
        for bad in ("abc", "-1", "0") if a.option_strings[0] not in NEGATIVE_OK else ("abc",):
            if bad == "0" and not _zero_is_bad(command, a.option_strings[0]):
                continue
            argv = [command, *_required(sp, tmp_path), a.option_strings[0], *[bad] * n]
            code, err = _call(argv, parse_only=True)
            assert code == 2, (argv, err)
            lines = err.strip().splitlines()  # one line, no usage block (the one-line errors)
            assert len(lines) == 1 and lines[0].startswith(f"sigvlp {command}: error: argument "), err
            assert lines[0].endswith(f"(see sigvlp {command} --help)") and " a int" not in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def _zero_is_bad(command, flag) -> bool:
    return (command, flag) in {("demo", "--steps"), ("eval", "--seg-volumes"), ("eval", "--bootstrap"),
                               ("eval", "--min-count"), ("eval", "--chunks-per-volume"), ("eval", "--token-budget"),
                               ("eval", "--max-volumes"), ("eval", "--max-train-volumes"), ("eval", "--depths")}


def test_train_bad_values_are_one_line_errors(tmp_path):
    from sigvlp.train.config import TrainConfig, config_fields

    import typing

    hints = typing.get_type_hints(TrainConfig)
    numeric = [n for n in config_fields() if hints[n] in (int, float, typing.Optional[int], typing.Optional[float])]
    assert len(numeric) > 15
    for name in numeric:
        flag = "--" + name.replace("_", "-")
        for bad in ("abc", "-1"):
            argv = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), flag, bad]
            code, err = _call(argv)
            assert code == 2, (argv, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert name in err or flag in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["eval", "--ckpt", "c", "--data", "d", "--seg-volumes", "0"]])
def test_reported_bad_values(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _call(argv)
    assert code == 2 and "Traceback" not in err
    assert err == (f"sigvlp {argv[0]}: error: argument {argv[-2]}: expected an integer >= 1, got 0 "
                   f"(see sigvlp {argv[0]} --help)\n")
    assert not list(tmp_path.iterdir())


def test_version_and_help_text():
    code, _ = _call(["--version"])
    assert code == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    for name in SUBCOMMANDS:
        assert name in out.getvalue()
