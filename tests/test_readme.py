"""The README stays honest (issue 25, item 8).

(a) Every line of a fenced bash block that runs `python -m nearl.…`, `python -m bench.…` (also
    behind `torchrun`, `nsys`, `ncu` or leading `VAR=value` assignments) or a `nearl-*` console
    script names a real module or entry point, and its arguments parse: the module's own argparse
    parser reads them (nothing runs). Placeholders such as `<DIR>` become a temporary path; `...`
    is left out.
(b) The commands of a bash block that an HTML comment line `<!-- ci: run -->` immediately precedes
    run for real, in order, from the repository's root (relative paths that are not in the checkout
    go to a temporary folder, and so does the demo set: `NEARL_DEMO_DIR`).
(c) Every relative link in README.md, kernels/README.md, bench/README.md and docs/*.md names an
    existing file, and a `#fragment` one of its headings.
(d) README.md is under 300 lines, and holds the two set-up commands `.ci/run` runs.

The README read is the repository's README.md, or the file `NEARL_README` names (a path relative to
the repository's root or absolute): a README staged elsewhere is checked as if it stood at the root,
so its links resolve from there.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / os.environ.get("NEARL_README", "README.md")  # an absolute path replaces ROOT
MAX_README_LINES = 300
RUN_MARKER = "<!-- ci: run -->"
SHELL_LANGS = ("bash", "sh", "shell")
PACKAGES = ("nearl", "bench", "nearl_bench")
# Modules whose parser is not their own `build_parser` (the command line imports it from elsewhere).
PARSERS = {"nearl.train": "nearl.training.options", "nearl_bench.run": "nearl_bench.cli"}
SETUP_COMMANDS = ('pip install -e ".[dev]"', "python -m pytest")


def documents() -> List[Tuple[Path, Path]]:
    """(file, the folder its relative links resolve from): the README as if it stood at the root."""
    docs = [(README, ROOT)]
    for path in [ROOT / "kernels" / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.is_file():
            docs.append((path, path.parent))
    return docs


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ------------------------------------------------------------------------------------------ blocks
@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    run: bool
    lines: List[Tuple[int, str]] = field(default_factory=list)


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def blocks(path: Path) -> List[Block]:
    found: List[Block] = []
    current: Optional[Block] = None
    fence = ""
    previous = ""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(text)
        if current is None and match:
            fence = match.group(1)
            current = Block(path, number, match.group(2).lower(), previous.strip() == RUN_MARKER)
        elif current is not None and text.strip().startswith(fence) and text.strip().strip(fence[0]) == "":
            found.append(current)
            current = None
        elif current is not None:
            current.lines.append((number, text))
        if text.strip():
            previous = text
    assert current is None, f"{shown(path)}:{current.line}: a fenced block is never closed"
    return found


def commands(block: Block) -> List[Tuple[int, str]]:
    """The block's command lines, backslash continuations joined, with the line each starts on."""
    out: List[Tuple[int, str]] = []
    pending, start = "", 0
    for number, text in block.lines:
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        line = (pending + text).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append((start, line))
    return out


# ---------------------------------------------------------------------------------------- commands
def console_scripts() -> Dict[str, str]:
    """setup.py's console scripts: name -> module."""
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    return {name: module for name, module in re.findall(r"['\"](nearl-[\w-]+)\s*=\s*([\w.]+):\w+['\"]", text)}


@dataclass
class Command:
    where: str
    module: str  # as written (nearl.train, bench.run, nearl_bench.run)
    args: List[str]
    env: Dict[str, str]


PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")


def parse_command(line: str, where: str, placeholder: str) -> Optional[Command]:
    """The nearl / bench command a shell line runs, or None when it runs none; AssertionError when it
    names a console script that setup.py does not declare."""
    line = PLACEHOLDER.sub(placeholder, line)
    tokens = [t for t in shlex.split(line, comments=True) if t not in ("...", "…")]
    env: Dict[str, str] = {}
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if not tokens:
        return None
    if tokens[0].startswith("nearl-"):
        scripts = console_scripts()
        assert tokens[0] in scripts, f"{where}: {tokens[0]} is no console script of setup.py ({', '.join(scripts)})"
        return Command(where, scripts[tokens[0]], tokens[1:], env)
    for i in range(1, len(tokens) - 1):
        python = tokens[i - 1] in ("python", "python3") or (tokens[0] == "torchrun" and i > 0)
        if tokens[i] == "-m" and python:
            module = tokens[i + 1]
            if module.split(".")[0] in PACKAGES:
                return Command(where, module, tokens[i + 2:], env)
            return None
    return None


def documented_commands() -> List[Tuple[Block, int, str]]:
    return [(block, number, line) for doc, _ in documents() for block in blocks(doc)
            if block.lang in SHELL_LANGS for number, line in commands(block)]


def installed_name(module: str) -> str:
    """bench.* is the folder the checkout runs; the tests import it by its installed name."""
    return "nearl_bench" + module[len("bench"):] if module.split(".")[0] == "bench" else module


def check_arguments(module: str, args: List[str]) -> None:
    """The module's own parser reads `args` (and bench.run's checks of their combinations run)."""
    import nearl  # noqa: F401  (maps nearl_bench onto bench/ in an uninstalled checkout)

    name = installed_name(module)
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise AssertionError(f"there is no module {module}: {err}") from None
    owner = importlib.import_module(PARSERS.get(name, name))
    assert hasattr(owner, "build_parser"), f"{module}: no build_parser() in {owner.__name__} (add it to PARSERS)"
    parser = owner.build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            parsed = parser.parse_args(args)
    except SystemExit as stop:
        assert stop.code in (0, None), f"python -m {module} {shlex.join(args)}: {stderr.getvalue().strip()}"
        return  # --help
    if name == "nearl_bench.run":
        import torch

        from nearl_bench.cli import finish_args

        try:
            finish_args(parsed, torch.device("cpu"))
        except ValueError as err:
            raise AssertionError(f"python -m {module} {shlex.join(args)}: {err}") from None


ALL_COMMANDS = documented_commands()


@pytest.mark.parametrize("block,number,line", ALL_COMMANDS,
                         ids=[f"{shown(b.doc)}:{n}" for b, n, _ in ALL_COMMANDS])
def test_documented_commands_parse(block, number, line, tmp_path):
    command = parse_command(line, f"{shown(block.doc)}:{number}", str(tmp_path / "placeholder"))
    if command is not None:
        check_arguments(command.module, command.args)


def test_the_readme_documents_commands():
    """The parse test above has something to parse: the README's own commands are found."""
    ours = []
    for block, number, line in ALL_COMMANDS:
        if block.doc == README:
            with contextlib.suppress(AssertionError):  # an unknown console script fails the test above
                ours.append(parse_command(line, "", "/tmp/x"))
    assert {"nearl.train", "nearl.evaluate", "nearl.export", "nearl.predict"} <= {c.module for c in ours if c}


# ------------------------------------------------------------------------------------------ ci: run
def outside_the_checkout(arg: str, scratch: Path) -> str:
    """A relative path whose first part is not in the checkout goes under `scratch`, so a run writes
    nothing into the repository and never meets an earlier run's folder (--out takes one run)."""
    if "=" in arg and arg.startswith("--"):
        flag, value = arg.split("=", 1)
        return f"{flag}={outside_the_checkout(value, scratch)}"
    if arg.startswith(("-", "/", "~")) or "/" not in arg or "://" in arg or ":" in arg.split("/")[0]:
        return arg
    first = arg.split("/")[0]
    return arg if first in (".", "..") or (ROOT / first).exists() else str(scratch / arg)


RUN_BLOCKS = [b for doc, _ in documents() for b in blocks(doc) if b.run]


def test_run_marker_precedes_a_bash_block():
    for block in RUN_BLOCKS:
        assert block.lang in SHELL_LANGS, f"{shown(block.doc)}:{block.line}: {RUN_MARKER} before a ```{block.lang} block"


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[f"{shown(b.doc)}:{b.line}" for b in RUN_BLOCKS])
def test_run_marked_commands(block, tmp_path):
    env = {**os.environ, "NEARL_DEMO_DIR": str(tmp_path / "demo"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONSTARTUP", None)
    for number, line in commands(block):
        where = f"{shown(block.doc)}:{number}"
        command = parse_command(line, where, str(tmp_path / "placeholder"))
        assert command is not None and command.module.split(".")[0] in PACKAGES, (
            f"{where}: a {RUN_MARKER} block holds only python -m nearl.… / bench.… commands, got {line!r}")
        args = [outside_the_checkout(a, tmp_path) for a in command.args]
        proc = subprocess.run([sys.executable, "-m", command.module, *args], cwd=ROOT, env={**env, **command.env},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{where}: {line}\nexit status {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}"


# ---------------------------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")


def prose(path: Path) -> List[Tuple[int, str]]:
    """The lines outside fenced blocks, inline code removed."""
    inside = {number for block in blocks(path) for number in range(block.line, block.line + len(block.lines) + 2)}
    return [(n, INLINE_CODE.sub("", text)) for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if n not in inside]


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    seen: Dict[str, int] = {}
    for _, text in ((n, t) for n, t in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                    if n not in {m for b in blocks(path) for m in range(b.line, b.line + len(b.lines) + 2)}):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", text)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
    return {base if i == 0 else f"{base}-{i}" for base, n in seen.items() for i in range(n)}


DOCS = documents()


@pytest.mark.parametrize("doc,base", DOCS, ids=[shown(d) for d, _ in DOCS])
def test_relative_links_name_existing_files(doc, base):
    broken = []
    for number, text in prose(doc):
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            path = (base / file_part).resolve() if file_part else doc
            if not path.exists():
                broken.append(f"{shown(doc)}:{number}: {target} (no {path})")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{shown(doc)}:{number}: {target} (no heading #{fragment} in {shown(path)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ------------------------------------------------------------------------------------------- shape
def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"{shown(README)} has {len(lines)} lines; keep it under {MAX_README_LINES}"


def test_readme_gives_the_two_setup_commands_ci_runs():
    given = [[line for _, line in commands(b)] for b in blocks(README) if b.lang in SHELL_LANGS]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in SETUP_COMMANDS:
        assert [command] in given, f"{shown(README)} has no bash block holding just `{command}`"
        assert command in (line.strip() for line in ci), f".ci/run does not run `{command}`"
