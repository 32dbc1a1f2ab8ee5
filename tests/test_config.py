"""Config objects instead of argv (issue 25, item 1): `fit` takes a TrainConfig, built in Python
without argparse or by the command line from the same fields; checkpoints record it flat, as they
recorded the Namespace, and old records load; no library module reads an argparse Namespace."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import warnings
from pathlib import Path

import pytest

from nearl.store import checkpoint as C
from nearl import training as T
from nearl.methods.options import options as method_options
from nearl.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
# The command lines and their parsers may hold Namespaces; the library below them may not.
FRONT_ENDS = {"nearl/train.py", "nearl/evaluate.py", "nearl/predict.py", "nearl/export.py", "nearl/compare.py",
              "nearl/training/options.py", "nearl/comparison/options.py", "nearl/argtypes.py",
              "nearl/cli_args.py", "nearl/methods/options.py"}


def test_fit_runs_from_a_notebook_without_argparse(tmp_path, monkeypatch):
    """`fit(TrainConfig(...))` for 2 steps on the demo set, with argparse unable to parse anything."""
    from nearl.training import TrainConfig as Exported, fit

    def no_parsing(*a, **k):
        raise AssertionError("fit parsed a command line")

    monkeypatch.setenv("NEARL_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", no_parsing)
    config = Exported(out=str(tmp_path / "run"), max_steps=2, model="NEARL-Tiny", batch_size=4, workers=0,
                      no_progress=True, device="cpu", method_options={"num_queries": 4})
    summary = fit(config)
    assert summary["step"] == 2 and (tmp_path / "run" / "last.pt").is_file()
    ckpt = C.load_checkpoint(tmp_path / "run")
    assert ckpt["config"]["num_queries"] == 4 and ckpt["args"]["num_queries"] == 4
    assert ckpt["args"] == config.to_dict()  # flat, every flag and method option, as the Namespace was
    assert TrainConfig.from_dict(ckpt["args"]).to_dict() == config.to_dict()
    assert config.model == "NEARL-Tiny" and config.resume_notes == []  # the caller's config is not touched
    with pytest.raises(TypeError, match="fit takes a TrainConfig"):
        fit(argparse.Namespace(**ckpt["args"]))
    from nearl.evaluation.run import evaluate
    from nearl.evaluation.config import EvalConfig

    report = evaluate(EvalConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "eval"), workers=0,
                                 no_progress=True, device="cpu"))
    assert report["task"] == "retrieval" and report["split"] == "test" and "i2t_R@1" in report["metrics"]
    assert (tmp_path / "eval" / "results.json").is_file()


def test_evaluate_and_compare_configs_are_their_command_lines():
    from nearl.comparison import options as comparison_options
    from nearl import evaluate
    from nearl.comparison.config import CompareConfig
    from nearl.evaluation.config import EvalConfig

    assert evaluate.parse_config([]) == EvalConfig() and comparison_options.parse_config([]) == CompareConfig()
    given = evaluate.parse_config(["--checkpoint", "r", "--batch-size", "3", "--classes", "base"])
    assert (given.checkpoint, given.batch_size, given.classes) == ("r", 3, "base")
    given = comparison_options.parse_config(["--method-args", "a=b", "--method-args", "c=d", "--lr", "0.5"])
    assert (given.method_args, given.lr) == (["a=b", "c=d"], 0.5) and CompareConfig().method_args == []


def test_the_command_line_and_the_dataclass_agree():
    """Every flag is a field with the parser's default; the methods' options fill method_options. Only
    --config and --print-config, which say what to do with the settings, are no setting."""
    flags = {a.dest for a in T.build_parser()._actions if a.option_strings and a.dest != "help"}
    flags -= {"config", "print_config"}
    own = {f.name for f in dataclasses.fields(TrainConfig)} - {"method_options", "resume_notes"}
    assert flags == own | set(method_options())
    parsed = T.parse_config([])
    assert parsed.to_dict() == TrainConfig().to_dict()
    assert set(parsed.method_options) == set(method_options())
    given = T.parse_config(["--lr", "0.01", "--num-queries", "8", "--report-to", "none", "--templates", "a {}"])
    assert (given.lr, given.option("num_queries"), given.report_to, given.templates) == (0.01, 8, [], ["a {}"])
    with pytest.raises(ValueError, match="no method declares"):
        TrainConfig(method_options={"num_querys": 8})


def test_an_old_checkpoints_args_load_with_unknown_keys_warned():
    old = dict(vars(T.parse_args(["--lr", "0.02", "--heads", "2", "--method", "coop"])))
    old.pop("resume_notes")
    old["retired_flag"] = 3  # a setting a later version dropped
    del old["grad_checkpointing"]  # one an earlier version did not have: its default
    with pytest.warns(UserWarning, match="ignoring unknown setting.* retired_flag"):
        config = TrainConfig.from_dict(old)
    assert (config.lr, config.method, config.option("heads"), config.grad_checkpointing) == (0.02, "coop", 2, False)
    expected = {k: v for k, v in old.items() if k != "retired_flag"} | {"grad_checkpointing": False}
    assert config.to_dict() == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainConfig.from_dict(config.to_dict()) == config


def _namespace_uses(source: str) -> list:
    """'line: what' for each argparse.Namespace named and each getattr(args, ...) call."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append(f"{node.lineno}: Namespace")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "Namespace" for a in node.names):
            found.append(f"{node.lineno}: import Namespace")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "args"):
            found.append(f"{node.lineno}: {node.func.id}(args, ...)")
    return found


def test_no_library_module_reads_a_namespace():
    bad = {}
    for path in sorted((ROOT / "nearl").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel not in FRONT_ENDS:
            uses = _namespace_uses(path.read_text())
            if uses:
                bad[rel] = uses
    assert not bad, f"library modules reading argparse Namespaces (take a config or the fields instead): {bad}"


def test_the_walk_finds_what_the_library_held_before():
    """The check above, on code as nearl/methods/alta.py and registry.py held it before the configs."""
    before = ('def _check_options(args) -> None:\n'
              '    if getattr(args, "multiview", False) and getattr(args, "task", "retrieval") != "retrieval":\n'
              '        pass\n'
              'def check_options(name: str, args: argparse.Namespace) -> None:\n    pass\n')
    assert sorted(_namespace_uses(before)) == ["2: getattr(args, ...)", "2: getattr(args, ...)", "4: Namespace"]


def _old_train_argv(args, method: str, seed: int, out: Path, model_name: str) -> list:
    """What nearl.comparison.run serialised for each run before CompareConfig (kept here as the reference)."""
    argv = ["--method", method, "--seed", seed, "--max-steps", args.max_steps, "--task", args.task,
            "--model", model_name, "--batch-size", args.batch_size, "--lr", args.lr,
            "--weight-decay", args.weight_decay, "--precision", args.precision, "--workers", args.workers,
            "--eval-every", 0, "--out", out, "--format", args.format]
    for flag, value in (("--pretrained", args.pretrained), ("--data", args.data), ("--val-data", args.val_data),
                        ("--root", args.root), ("--k-shot", args.k_shot), ("--warmup", args.warmup),
                        ("--device", args.device), ("--eval-batch-size", args.eval_batch_size)):
        if value is not None:
            argv += [flag, value]
    if args.templates:
        argv += ["--templates", *args.templates]
    for on, flag in ((args.fused, "--fused"), (args.overwrite, "--overwrite"), (args.no_progress, "--no-progress")):
        if on:
            argv.append(flag)
    argv += args.train_args.split()
    argv += [a for item in args.method_args if item.split("=", 1)[0] == method for a in item.split("=", 1)[1].split()]
    return [str(a) for a in argv]


@pytest.mark.parametrize("argv", [
    [],
    ["--protocol", "few-shot", "--shots", "1,2", "--lr", "0.02", "--templates", "a {}", "b {}", "--fused"],
    ["--protocol", "base2novel", "--k-shot", "4", "--warmup", "3", "--device", "cpu", "--eval-batch-size", "7",
     "--train-args", "--grad-clip 0.5 --lr 0.5 --report-to tensorboard", "--method-args", "coop=--n-ctx 8",
     "--method-args", "nearl=--num-queries 4 --orth soft", "--overwrite", "--no-progress", "--pretrained", "x.pt"],
    ["--task", "retrieval", "--data", "d.csv", "--val-data", "v.csv", "--root", "r", "--format", "manifest",
     "--method-args", "alta=--multiview --view-columns a,b,c,d --reduction 8"],
])
def test_compare_derives_each_runs_config_as_its_argv_did(argv, tmp_path):
    """Each run's TrainConfig, derived with replace, is what re-parsing the serialised argv gave."""
    from nearl.comparison import run as CMPL
    from nearl.comparison.protocols import plan

    config = CMPL.parse_config(argv + ["--out", str(tmp_path)])
    methods = CMPL.check_protocol(config, CMPL._methods(config), chosen_by_user=False)
    for run in plan(config, methods, [0, 3], tmp_path):
        own = [a for k, v in run.train for a in (f"--{k.replace('_', '-')}", str(v))]
        old = T.parse_config(_old_train_argv(config, run.method, run.seed, run.folder, "NEARL-Tiny") + own)
        assert CMPL.train_config(config, run, "NEARL-Tiny").to_dict() == old.to_dict(), run


def test_compare_checks_the_values_it_passes_on(capsys, tmp_path):
    """--lr 0 passes nearl.compare's parser; the run refuses it as nearl.train's --lr does."""
    from nearl.comparison import run as CMPL
    from nearl.comparison.protocols import plan

    config = CMPL.parse_config(["--lr", "0", "--out", str(tmp_path)])
    run = plan(config, ["nearl"], [0], tmp_path)[0]
    with pytest.raises(SystemExit):
        CMPL.train_config(config, run, "NEARL-Tiny")
    assert capsys.readouterr().err == "python -m nearl.train: error: argument --lr: must be > 0, got 0 (see --help)\n"
