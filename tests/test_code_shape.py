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


# Where a print may stay in the library, and why: the command lines' shared entry point (it runs only
# under a command line, and says a user's mistake on stderr as argparse does), and the line a signal
# handler says (logging is not safe in a signal handler: it takes locks the interrupted code may hold).
PRINTS_ALLOWED = {("nearl/errors.py", "run_cli"), ("nearl/training/stop.py", "_say")}


def test_the_library_logs_and_only_the_command_lines_print():
    """Library code reports through `logging` (its lines for the user through nearl.reporting's
    logger, which a caller can silence); only the command lines print (issue 25, item 1)."""
    bad = []
    for path in library_files():
        where = path.relative_to(ROOT).as_posix()

        def walk(node, function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Name) and child.id == "print":  # a call, or print passed as a value
                    if (where, function) not in PRINTS_ALLOWED:
                        bad.append(f"{where}:{child.lineno} in {function}")
                inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                walk(child, child.name if inner else function)

        walk(ast.parse(path.read_text()), "<module>")
    assert not bad, bad


# ----------------------------------------------------------------------------- the wings
WINGS = {"ops", "towers", "model", "methods", "data", "training", "evaluation", "comparison", "store"}
# beside the wings: the command lines, what they share, and what every wing imports
TOP_LEVEL = COMMAND_LINES | {"__init__", "_lazy", "_checkout", "errors", "writes", "logging_utils", "argtypes",
                             "cli_args"}
PROJECT_WIDE_TESTS = {"test_code_shape", "test_one_place", "test_config", "test_cli_light", "test_install_names",
                      "test_readme", "test_user_errors"}


def test_nearl_is_its_wings_and_the_command_lines():
    """A new module goes into the wing of its job (README, "Code map"), not into a flat root."""
    wings = {p.name for p in (ROOT / "nearl").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (ROOT / "nearl").glob("*.py")}
    assert wings == WINGS, sorted(wings ^ WINGS)
    assert modules == TOP_LEVEL, sorted(modules ^ TOP_LEVEL)


def test_the_tests_mirror_the_wings():
    """tests/<wing>/ for nearl's wings, kernels/ and bench/; at the top only the project-wide checks."""
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders == WINGS | {"kernels", "bench"}, sorted(folders ^ (WINGS | {"kernels", "bench"}))
    loose = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert loose == PROJECT_WIDE_TESTS, sorted(loose ^ PROJECT_WIDE_TESTS)
