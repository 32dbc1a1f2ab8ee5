"""The command lines parse before they import the heavy stack (issue 25, item 9).

`--help` of nearl.train / evaluate / predict / export / compare, and `import nearl`, import none of
torch, open_clip, transformers, triton: those cost seconds, and a mistyped flag should not wait for
them. The guard is which modules a fresh interpreter has loaded (wall-clock times are too noisy to
assert). The names the parsers offer without importing their registries (nearl/methods/options.py,
argtypes.CLASS_SUBSETS, protocols.PROTOCOLS) are checked against the registries here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "transformers", "triton")

# A few flags per command line, from each of its parts (its own, the shared model source, the methods').
FLAGS = {
    "train": ["--method", "--max-steps", "--resume", "--report-to", "--num-queries", "--multiview", "--probe-wd",
              "--n-ctx", "--reduction", "--alpha", "--classes"],
    "evaluate": ["--checkpoint", "--adapter", "--method", "--data", "--allow-train-data", "--out"],
    "predict": ["--adapter", "--images", "--classes", "--texts-file", "--top-k"],
    "export": ["--checkpoint", "--out", "--pretrained", "--overwrite"],
    "compare": ["--methods", "--seeds", "--protocol", "--shots", "--method-args", "--bench-iters"],
}

RUN = """
import contextlib, io, json, runpy, sys
sys.argv = [{module!r}, *{args!r}]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        {call}
    except SystemExit as e:
        code = e.code
    else:
        code = None
print(json.dumps({{"code": code, "out": out.getvalue(), "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def run_python(module: str, args, call: str) -> dict:
    code = RUN.format(module=module, args=list(args), call=call, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cli", sorted(FLAGS))
def test_help_imports_no_heavy_module(cli):
    got = run_python(f"nearl.{cli}", ["--help"], f"runpy.run_module('nearl.{cli}', run_name='__main__')")
    assert got["code"] == 0, got
    assert got["heavy"] == [], f"python -m nearl.{cli} --help imported {got['heavy']}"
    assert f"python -m nearl.{cli}" in got["out"]
    missing = [flag for flag in FLAGS[cli] if flag not in got["out"]]
    assert not missing, f"--help of nearl.{cli} lacks {missing}"


@pytest.mark.parametrize("cli", sorted(FLAGS))
def test_a_bad_flag_is_refused_before_the_heavy_imports(cli):
    got = run_python(f"nearl.{cli}", ["--no-such-flag"], f"runpy.run_module('nearl.{cli}', run_name='__main__')")
    assert got["code"] == 2 and got["heavy"] == [], got


def test_train_help_lists_every_method_and_its_options():
    got = run_python("nearl.train", ["--help"], "runpy.run_module('nearl.train', run_name='__main__')")
    for method in ("nearl", "alta", "clip-adapter", "coop", "linear-probe", "zeroshot"):
        assert method in got["out"]
    assert "NEARL-CLIP options" in got["out"] and "alta options" in got["out"]


def test_import_nearl_is_light_and_its_names_still_load():
    got = run_python("nearl", [], "import nearl")
    assert got["heavy"] == [], got
    code = ("import nearl\n"
            "from nearl import build, load, ops, reference, NEARLCLIP, NEARLConfig, NEARLLoss, NEARLOutput\n"
            "assert nearl.ops is ops and callable(nearl.build) and callable(nearl.load) and nearl.reference is reference\n"
            "assert all(hasattr(nearl, name) for name in nearl.__all__) and set(nearl.__all__) <= set(dir(nearl))\n"
            "print(sorted(nearl.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_light_method_names_are_the_registry():
    from nearl.methods import options as MO
    from nearl import methods as MT
    from nearl.methods import registry

    assert MO.METHODS == MT.METHODS == registry.names()
    for name in MT.METHODS:
        assert MT.spec(name).options == MO.DECLARED[name].options
        assert MT.spec(name).aliases == MO.DECLARED[name].aliases
        for alias in MO.DECLARED[name].aliases:
            assert MT.canonical(alias) == name
    assert MO.fixed_on_resume() == MT.fixed_on_resume()


def test_the_light_choices_are_their_modules():
    from nearl import argtypes
    from nearl.comparison import protocols
    from nearl.data import labelled

    assert argtypes.CLASS_SUBSETS == labelled.CLASS_SUBSETS == ("all", "base", "novel")
    assert protocols.PROTOCOLS == ("standard", "base2novel", "few-shot")
