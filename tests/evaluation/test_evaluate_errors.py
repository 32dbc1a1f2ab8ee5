"""nearl.evaluate given the wrong thing: split folders are never taken for classes, bad sizes and
devices are refused, and a user's mistake is one line on stderr with exit status 2."""
import logging

import pytest

from nearl import evaluate as E
from nearl.evaluation import run as EV
from nearl.errors import UserError
from train_helpers import make_image_folder


def test_image_folder_without_test_uses_val_not_the_split_names_as_classes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nearl.evaluate")
    root = make_image_folder(tmp_path / "folder", per_class=(2, 1))  # train/ and val/, no test/
    records, classnames, split, src = EV.load_eval_data("classification", str(root), split="test")
    assert classnames == ["blue", "green", "red"] and split == "val" and src == str(root / "val")
    assert len(records) == 3
    assert any("no test/ folder" in r.getMessage() and "using val/" in r.getMessage() for r in caplog.records)


def test_image_folder_with_only_train_refuses_naming_the_folders(tmp_path):
    root = make_image_folder(tmp_path / "folder", per_class=(2, 0))
    (root / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"folder: no test/ \(nor val/\) folder to evaluate on; split folders "
                                        r"found: train/\. Pass --split train"):
        EV.load_eval_data("classification", str(root), split="test")
    records, classnames, split, _ = EV.load_eval_data("classification", str(root), split="train")
    assert split == "train" and classnames == ["blue", "green", "red"]


def test_flat_image_folder_is_still_all_records(tmp_path):
    root = make_image_folder(tmp_path / "folder", per_class=(2, 0)) / "train"
    records, classnames, split, _ = EV.load_eval_data("classification", str(root), split="test")
    assert split == "all" and classnames == ["blue", "green", "red"] and len(records) == 6


# ----------------------------------------------------------------------------- command lines
import os
import subprocess
import sys
from pathlib import Path

import torch

from nearl.cli_args import resolve_device
from nearl.errors import run_cli

ROOT = Path(__file__).resolve().parents[2]


def cli(module, *argv, timeout=240):
    """Run `python -m module argv` as a user would; (exit status, stderr lines)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l]
    return proc.returncode, lines


def test_evaluate_bad_checkpoint_is_one_line_and_status_2(tmp_path):
    (tmp_path / "notes.pt").write_text("hello world\n")
    code, err = cli("nearl.evaluate", "--checkpoint", tmp_path / "notes.pt", "--device", "cpu")
    assert code == 2, err
    assert err == [f"nearl.evaluate: error: {tmp_path / 'notes.pt'} is not a NEARL-CLIP checkpoint "
                   "(not a file written by torch.save)"]


def test_compare_bad_sizes_and_seeds_are_refused(tmp_path, capsys):
    from nearl.comparison import run as C
    for flag in ("--eval-batch-size=0", "--batch-size=-1", "--max-steps=0", "--k-shot=0", "--workers=-2"):
        with pytest.raises(SystemExit) as e:  # used to run a whole comparison, or fail deep inside it
            C.build_parser().parse_args([flag])
        assert e.value.code == 2 and f"argument {flag.split('=')[0]}: must be" in capsys.readouterr().err
    code, err = cli("nearl.compare", "--seeds", "0,one", "--device", "cpu", "--out", tmp_path)
    assert code == 2 and err == ["nearl.compare: error: --seeds takes comma-separated integers, got '0,one'"], err
    assert not any("Traceback" in l for l in err)


@pytest.mark.parametrize("flag", ["--batch-size=0", "--batch-size=-3", "--workers=-1"])
def test_evaluate_sizes_are_checked_by_argparse(flag, capsys):
    with pytest.raises(SystemExit) as e:
        E.build_parser().parse_args([flag])
    assert e.value.code == 2 and f"argument {flag.split('=')[0]}: must be" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match=r"--device cuda: torch sees no CUDA GPU on this machine; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(UserError, match=r"--device 'gpu' is not a device"):
        resolve_device("gpu")
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert run_cli(E.main, ["--device", "cuda"], prog="nearl.evaluate") == 2


def test_unknown_model_method_and_templates(tmp_path, capsys):
    for argv, message in [
        (["--model", "ViT-B-61"], "--model 'ViT-B-61' is not an open_clip architecture; did you mean"),
        (["--model", "NEARL-Tiny", "--pretrained", "nope.pt"], "--pretrained 'nope.pt' is neither a file nor a tag"),
        (["--method", "maple"], "--method: unknown method 'maple'"),
        (["--templates", "a photo"], "--templates: each template needs exactly one '{}'"),
        (["--out", __file__], f"--out {__file__} is a file, not a folder"),
    ]:
        assert run_cli(E.main, [*argv, "--device", "cpu"], prog="nearl.evaluate") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"nearl.evaluate: error: {message}"), err


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise RuntimeError("a bug")

    def mistake(argv):
        raise UserError("a mistake")

    with pytest.raises(RuntimeError, match="a bug"):  # not swallowed: Python prints the traceback
        run_cli(buggy, [])
    assert run_cli(mistake, []) == 2


def test_run_cli_passes_on_an_integer_exit_status():
    assert run_cli(lambda argv: 1, []) == 1
    assert run_cli(lambda argv: {"metrics": {}}, []) == 0  # library mains return their results
