"""README.md and every docs/*.md page: their examples run, their commands exist, their links resolve.

Info strings (docs/contributing.md, "Documentation and its tests", is the user-facing version):
- ```python runs everywhere (CPU tensors take the torch backends); ```python gpu needs a CUDA device
  (skipped without one). Each block runs in a fresh namespace, in a temporary working directory; a
  block must be complete (imports and inputs included).
- ```bash with no tag runs: all such blocks of one page, in page order, in one temporary directory.
  `sigvlp ...` / `python -m sigvlp ...` run in this process (no interpreter start-up per command);
  any other command runs through bash. Keep them tiny.
- ```bash TAG..., TAG in network / gpu / full / slow (downloads, a CUDA device, full-scale data,
  minutes): not run. Each command is checked instead: a sigvlp subcommand exists and every flag it
  uses is in its `--help`; `python -m sigvlp.MODULE` likewise; `pip install -e ".[x]"` names
  existing extras; `pytest PATH` an existing path; other programs must be known tools.
- Any other fence (```text for signatures and output) is neither run nor checked.
Blocks are found at collection time, so sections added by anyone are covered without touching this file.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PYTHON_FLAGS = {"gpu"}
SHELL_TAGS = {"network", "gpu", "full", "slow"}  # not run: checked through --help
SHELLS = {"bash", "sh", "shell"}
# Programs a tagged block may name without a check of their own (the sigvlp parts of torchrun are checked).
KNOWN_TOOLS = {"hf", "git", "cat", "cd", "ls", "rm", "mkdir", "time", "nvidia-smi", "torchrun"}
README_MAX_LINES = 260


def _rel(page):
    return page.relative_to(ROOT).as_posix()


def _blocks(page):
    """(info words, code, line, section id) of every fenced block of `page`."""
    text = page.read_text()
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        headings = re.findall(r"^#+ (.+)$", FENCE.sub("", text[: match.start()]), re.MULTILINE)
        section = re.sub(r"\W+", "-", headings[-1].strip("` ")).strip("-").lower() if headings else "top"
        yield match.group(1).split(), match.group(2), line, section


def _python_params():
    params = []
    for page in PAGES:
        for info, code, line, section in _blocks(page):
            if info and info[0] == "python":
                where = f"{_rel(page)}:{line}"
                params.append(pytest.param(code, set(info[1:]), where, id=f"{page.stem}-{section}-L{line}"))
    return params


def _shell_blocks(page):
    return [(set(info[1:]), code, line) for info, code, line, _ in _blocks(page) if info and info[0] in SHELLS]


PYTHON_BLOCKS = _python_params()


def test_docs_have_python_blocks():
    readme = [p for p in PYTHON_BLOCKS if p.values[2].startswith("README.md:")]
    assert len(readme) >= 2 and len(PYTHON_BLOCKS) >= 10, "the examples were lost (or the fence parser broke)"


@pytest.mark.parametrize("code, flags, where", PYTHON_BLOCKS)
def test_python_block_runs(code, flags, where, tmp_path, monkeypatch):
    unknown = flags - PYTHON_FLAGS
    assert not unknown, f"{where}: unknown flags {sorted(unknown)} after ```python"
    tree = ast.parse(code, filename=where)  # signatures belong in ```text blocks
    if "gpu" in flags and not torch.cuda.is_available():
        pytest.skip("block marked gpu: needs a CUDA device")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(tree, where, "exec"), namespace)  # noqa: S102


# ---------------------------------------------------------------------------------------------- shell


def _commands(code):
    """The commands of a shell block: continuations joined, comments dropped, split at && ; |."""
    joined = re.sub(r"\\\n", " ", code)
    commands = []
    for raw in joined.splitlines():
        lexer = shlex.shlex(raw, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = []
        for token in lexer:
            if token in {"&&", "||", ";", "|", "&"}:
                commands.append(words)
                words = []
            else:
                words.append(token)
        commands.append(words)
    return [c for c in commands if c]


def _strip_env(words):
    """(environment assignments, the command) of `A=1 B=2 cmd ...`."""
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, value = words[0].split("=", 1)
        env[key] = value
        words = words[1:]
    return env, words


def _sigvlp_argv(words):
    """The argv after `sigvlp` / `python -m sigvlp` (None when `words` is not one of those)."""
    if words[:1] == ["sigvlp"]:
        return words[1:]
    if words[:3] == ["python", "-m", "sigvlp"]:
        return words[3:]
    return None


def _capture(fn):
    """stdout of fn() and the exit status (argparse's --help exits 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = fn()
        except SystemExit as stop:
            status = stop.code
    return out.getvalue(), status or 0


@functools.lru_cache(maxsize=None)
def _sigvlp_help(command):
    from sigvlp.cli import main

    text, status = _capture(lambda: main([command, "--help"]))
    assert status == 0, f"`sigvlp {command} --help` exited {status}"
    return text


@functools.lru_cache(maxsize=None)
def _module_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, f"`python -m {module} --help` exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def _check_flags(words, help_text, what, where):
    for word in words:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                f"{where}: `{what}` has no flag {flag} (not in its --help)")


def _check_sigvlp(argv, where):
    from sigvlp.cli import SUBCOMMANDS

    assert argv, f"{where}: `sigvlp` without a subcommand"
    if argv[0] in {"--help", "-h", "--version"}:
        return
    assert argv[0] in SUBCOMMANDS, f"{where}: `sigvlp {argv[0]}` is not a subcommand ({sorted(SUBCOMMANDS)})"
    _check_flags(argv[1:], _sigvlp_help(argv[0]), f"sigvlp {argv[0]}", where)


def _check_pip(words, where):
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for word in words:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", word)
        if match and match.group(1):
            missing = set(match.group(1).split(",")) - extras
            assert not missing, f"{where}: no extra {sorted(missing)} in pyproject.toml ({sorted(extras)})"


def _check_command(words, where):
    """The checks of a command that is not run (see the module docstring)."""
    _, words = _strip_env(words)
    if words[:1] == ["torchrun"]:
        words = words[words.index("-m") + 1:] if "-m" in words else []
        words = ["python", "-m", *words]
    argv = _sigvlp_argv(words)
    if argv is not None:
        return _check_sigvlp(argv, where)
    if words[:2] == ["python", "-m"] and words[2].startswith("sigvlp."):
        return _check_flags(words[3:], _module_help(words[2]), f"python -m {words[2]}", where)
    if words[:1] == ["pip"] or words[:3] == ["python", "-m", "pip"]:
        return _check_pip(words, where)
    if words[:1] == ["pytest"] or words[:3] == ["python", "-m", "pytest"]:
        for word in words[1:]:
            path = word.split("::")[0]
            if "/" in path and not word.startswith("-"):
                assert (ROOT / path).exists(), f"{where}: pytest path {path} does not exist"
        return None
    if words[0].startswith(("benches/", "tests/", "./")):
        assert (ROOT / words[0]).exists(), f"{where}: {words[0]} does not exist"
        return None
    assert words[0] in KNOWN_TOOLS, (
        f"{where}: `{words[0]}` is neither a sigvlp command nor a known tool; tag the block or add the tool")
    return None


def _run_command(words, where, env):
    """Run one command of an untagged block in the current directory."""
    assign, words = _strip_env(words)
    argv = _sigvlp_argv(words)
    if argv is not None and not assign:
        from sigvlp.cli import main

        threads = torch.get_num_threads()
        try:
            text, status = _capture(lambda: main(argv))
        finally:
            torch.set_num_threads(threads)
        assert status == 0, f"{where}: `{shlex.join(words)}` exited {status}:\n{text[-3000:]}"
        return
    proc = subprocess.run(["bash", "-c", shlex.join(words)], capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **assign})
    assert proc.returncode == 0, (
        f"{where}: `{shlex.join(words)}` exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _shell_pages():
    return [pytest.param(page, id=page.stem) for page in PAGES if _shell_blocks(page)]


@pytest.mark.parametrize("page", _shell_pages())
def test_shell_commands(page, tmp_path, monkeypatch):
    """Untagged blocks run in order; tagged ones are checked against --help and the repository."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    monkeypatch.chdir(tmp_path)
    for tags, code, line in _shell_blocks(page):
        where = f"{_rel(page)}:{line}"
        unknown = tags - SHELL_TAGS
        assert not unknown, f"{where}: unknown tags {sorted(unknown)} (known: {sorted(SHELL_TAGS)})"
        for words in _commands(code):
            if tags:
                _check_command(words, where)
            else:
                _run_command(words, where, env)


def test_command_parser():
    code = 'A=1 sigvlp x --y "a b" \\\n  --z 1  # note\npip install -e ".[seg]" && sigvlp masks D\n'
    assert _commands(code) == [["A=1", "sigvlp", "x", "--y", "a b", "--z", "1"],
                               ["pip", "install", "-e", ".[seg]"], ["sigvlp", "masks", "D"]]
    with pytest.raises(AssertionError, match="no flag --nope"):
        _check_command(["sigvlp", "info", "--nope"], "here")
    with pytest.raises(AssertionError, match="not a subcommand"):
        _check_command(["sigvlp", "nope"], "here")
    with pytest.raises(AssertionError, match="no extra"):
        _check_command(["pip", "install", "-e", ".[nope]"], "here")
    with pytest.raises(AssertionError, match="known tool"):
        _check_command(["huggingface-cli", "download"], "here")


# ----------------------------------------------------------------------------------- links and names


def _slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page):
    text = FENCE.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move details into a docs/ page")


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    if page == README:
        assert sum(link.startswith("docs/") for link in links) >= 9, "README.md lost its table of contents"
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.is_file(), f"{_rel(page)}: link {link} points to no file"
        if anchor:
            assert anchor in _anchors(path), f"{_rel(page)}: link {link}: no heading with anchor #{anchor}"


def _resolves(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_named_modules_and_paths_exist(page):
    """`sigvlp.x.y` names and repository paths in backquotes exist (nothing stale survives a move)."""
    text = page.read_text()
    assert "huggingface-cli" not in text, f"{_rel(page)}: the Hub's CLI is `hf` now"
    for token in set(re.findall(r"`([^`\s]+)`", text)):
        if re.fullmatch(r"sigvlp(\.\w+)+", token) and not token.startswith("sigvlp._"):
            assert _resolves(token), f"{_rel(page)}: `{token}` does not exist"
        elif re.fullmatch(r"(tests|benches|sigvlp|csrc|kernels|docs)/[\w./-]+", token) and "foo" not in token and "..." not in token:
            assert (ROOT / token).exists(), f"{_rel(page)}: `{token}` does not exist"
