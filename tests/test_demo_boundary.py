"""The demo is an application of the library: the core package (``sigvlp`` minus ``sigvlp/demo/``)
imports nothing from ``sigvlp.demo``.

The one core module allowed to name the demo is the command line shell, ``sigvlp/cli.py``: the CLI
entry point is the application shell, which dispatches ``sigvlp demo`` and ``sigvlp synth`` to
their modules by name and imports them only when it builds its parser, never on ``import sigvlp.cli``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import sigvlp

PKG = Path(sigvlp.__file__).resolve().parent
DEMO = "sigvlp.demo"
#: the application shell: may name the demo's modules (as strings it imports on use)
SHELL = {"sigvlp.cli"}
#: functions that import a module given by name
_IMPORTERS = {"import_module", "__import__", "find_spec", "run_module", "import_string"}


def _core_modules() -> dict[str, Path]:
    """module name -> source file of every core module (sigvlp/kernels is a symlink in a worktree;
    a package's module is its __init__.py)."""
    out = {}
    for root, dirs, files in os.walk(PKG, followlinks=True):
        rel = Path(root).relative_to(PKG)
        if rel.parts[:1] == ("demo",) or "__pycache__" in rel.parts:
            dirs[:] = []
            continue
        for f in files:
            if f.endswith(".py"):
                parts = ("sigvlp", *rel.parts, *([] if f == "__init__.py" else [f[:-3]]))
                out[".".join(parts)] = Path(root) / f
    return out


def _is_demo(name: str) -> bool:
    return name == DEMO or name.startswith(DEMO + ".")


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            ids.add(id(body[0].value))
    return ids


def demo_references(source: str, module: str, is_package: bool = False) -> list[str]:
    """Where `source` (the code of `module`) imports from sigvlp.demo: import statements anywhere
    (function-local ones included, relative ones resolved), calls of an importer with a literal
    module name, and any other string literal naming a sigvlp.demo module (docstrings excepted)."""
    tree = ast.parse(source)
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        where = f"{module}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if _is_demo(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
            if any(_is_demo(n) for n in names):
                found.append(f"{where} from {base} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                and _is_demo(node.value.split(":")[0]):
            found.append(f"{where} names {node.value!r}")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in _IMPORTERS and isinstance(node.args[0].value, str) and _is_demo(node.args[0].value):
                found.append(f"{where} {func}({node.args[0].value!r})")
    return found


def test_the_checker_finds_every_form_of_import():
    """demo_references must be able to fail: each form below is one finding."""
    src = '''"""Docstrings may mention sigvlp.demo.synth."""
import sigvlp.demo
from sigvlp.demo.synth import make_phantom
from sigvlp import demo
from ..demo import run


def f():
    from sigvlp.demo.recipe import DEMO_MODEL  # function-local
    import importlib
    return importlib.import_module("sigvlp.demo.run")


TARGET = "sigvlp.demo.synth.cli"
'''
    found = demo_references(src, "sigvlp.eval.suite")
    assert len(found) == 8, found  # import_module("...") is both a call and a string literal
    assert demo_references("from ..demos import x\nimport sigvlp.demonstration\n", "sigvlp.eval.suite") == []
    assert demo_references("from .demo import run\n", "sigvlp", is_package=True)  # relative to a package
    assert not demo_references("from .demo import run\n", "sigvlp.eval", is_package=True)


def test_core_source_imports_nothing_from_the_demo():
    modules = _core_modules()
    assert {"sigvlp", "sigvlp.cli", "sigvlp.data.ctrate", "sigvlp.train.trainer", "sigvlp.eval.suite",
            "sigvlp.model.config", "sigvlp.ops.attention"} <= set(modules)
    assert not [m for m in modules if _is_demo(m)]
    found = {m: demo_references(p.read_text(), m, p.name == "__init__.py") for m, p in modules.items()}
    assert {m: f for m, f in found.items() if f and m not in SHELL} == {}
    # the shell names exactly the two commands' modules, as strings (no import statement)
    assert all("names" in f for f in found["sigvlp.cli"]) and len(found["sigvlp.cli"]) == 2, found["sigvlp.cli"]


def test_importing_every_core_module_loads_no_demo_module():
    """Each core module imported in a fresh interpreter leaves sys.modules free of sigvlp.demo; then
    the shell's parser (which imports the subcommands' modules) does load it, so the check can see it."""
    names = sorted(m for m in _core_modules() if m != "sigvlp.__main__")
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    loaded = [m for m in sys.modules if m == 'sigvlp.demo' or m.startswith('sigvlp.demo.')]\n"
        "    assert not loaded, f'importing {name} loaded {loaded}'\n"
        "import sigvlp.cli\n"
        "sigvlp.cli.build_parser()\n"
        "assert 'sigvlp.demo.run' in sys.modules and 'sigvlp.demo.synth.cli' in sys.modules\n"
        "print(len(" + repr(names) + "))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == len(names) > 30
