"""The shape the code keeps (README, "Code map"): the library imports none of the command lines,
and no function of it (Triton kernels included: their parts are @triton.jit helpers, inlined)
grows past about 80 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND_LINES = {"train", "evaluate", "compare", "export", "predict"}  # nearl/<name>.py: thin modules over the library


def library_files():
    return [p for p in sorted((ROOT / "nearl").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
            if not (p.parent == ROOT / "nearl" and p.stem in COMMAND_LINES)]


def test_the_library_imports_no_command_line():
    bad = []
    for path in library_files():
        package = path.relative_to(ROOT).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(package[:len(package) - node.level + 1]) if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names
                    if any(n == f"nearl.{c}" or n.startswith(f"nearl.{c}.") for c in COMMAND_LINES)]
    assert not bad, bad


def test_no_library_function_is_longer_than_80_lines():
    long = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 85:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
