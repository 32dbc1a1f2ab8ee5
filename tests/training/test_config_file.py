"""A run's config.yaml (nearl/training/config_file.py): every run writes one, `--config` runs it again bit
for bit, flags given win, `--print-config` shows it; and `--resume auto` starts, then continues."""
from __future__ import annotations

import pytest
import torch
import yaml

from nearl import train as TR
from nearl.errors import run_cli
from nearl.store import checkpoint as C
from nearl.training import config_file
from train_helpers import _one_thread, FAST, make_manifest, run, train_losses  # noqa: F401  (_one_thread: autouse)

TINY = ["--model", "NEARL-Tiny", "--batch-size", 2, "--max-steps", 2, "--warmup", 1, *FAST]


def weights(folder):
    return C.load_checkpoint(folder)["model"]


def test_a_run_writes_its_config_and_the_file_runs_it_again_bit_for_bit(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=2)
    run(["--data", manifest, "--lr", 3e-3, "--seed", 3, "--num-queries", 4, "--out", tmp_path / "a", *TINY])
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert written["lr"] == 3e-3 and written["seed"] == 3 and written["num_queries"] == 4
    assert written["method"] == "nearl" and written["model"] == "NEARL-Tiny"  # as the run resolved them
    assert not set(written) & set(config_file.ONE_SHOT)

    run(["--config", tmp_path / "a" / "config.yaml", "--out", tmp_path / "b"])
    assert train_losses(tmp_path / "b")[0] == train_losses(tmp_path / "a")[0]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flags_given_win_over_the_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.01\nbatch-size: 4\nnum_queries: 8\nreport_to: [tensorboard]\n")
    assert run_cli(TR.main, ["--config", str(path), "--lr", "0.02", "--print-config", "--out", str(tmp_path / "x")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["lr"], shown["batch_size"], shown["num_queries"], shown["report_to"]) == (0.02, 4, 8, ["tensorboard"])
    assert not (tmp_path / "x").exists()  # --print-config trains nothing


@pytest.mark.parametrize("text, message", [
    ("lr: 0.01\nlearning_rate: 3\n", "no such setting: learning_rate"),
    ("resume: runs/a\n", "no such setting: resume (one-shot actions go on the command line)"),
    ("lr: -1\n", "lr (--lr): "),
    ("precision: fp8\n", "precision: 'fp8' is not one of"),
    ("- lr\n- 0.1\n", "holds a list, not a mapping of settings to values"),
    ("lr: [0.1\n", "not YAML"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert run_cli(TR.main, ["--config", str(path), "--out", str(tmp_path / "x")], prog="nearl.train") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nearl.train: error: --config {path}: ") and message in err and "\n" not in err, err


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert run_cli(TR.main, ["--config", str(tmp_path / "none.yaml")], prog="nearl.train") == 2
    assert capsys.readouterr().err.strip() == f"nearl.train: error: --config {tmp_path / 'none.yaml'}: no such file"


def test_resume_auto_starts_a_run_then_continues_it(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=2)
    argv = ["--data", manifest, "--resume", "auto", "--out", tmp_path / "run", *TINY]
    assert run(argv)["step"] == 2  # nothing there: a new run
    argv[argv.index("--max-steps") + 1] = 4  # the requeued job, given more steps
    assert run(argv)["step"] == 4
    assert len(train_losses(tmp_path / "run")[0]) == 4
