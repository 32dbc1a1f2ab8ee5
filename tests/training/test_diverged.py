"""A diverged model: a run at --lr 1e6 keeps a step-1 checkpoint whose weights are finite but whose
outputs are NaN. It is not exported, and nearl.predict gives its images no label, says so in one
line and exits with status 2, writing JSON that a strict parser reads (null, never a bare NaN)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from nearl.store import adapter_files as AF
from nearl.store import checkpoint as C
from nearl import export as X
from nearl import predict as P
from nearl.errors import run_cli
from nearl.store.nonfinite import NonFiniteError, nonfinite_tensors
from train_helpers import FAST, _one_thread, make_image_folder, one_intra_op_thread, run  # noqa: F401  (_one_thread: autouse)

PREDICT = ["--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """The issue's run: classification at --lr 1e6, a checkpoint every step; step 2's loss is NaN."""
    root = tmp_path_factory.mktemp("diverged")
    data = make_image_folder(root / "folder", per_class=(4, 2))
    with one_intra_op_thread(), pytest.raises(NonFiniteError, match="step 2: the loss is nan"):
        run(["--task", "classification", "--model", "NEARL-Tiny", "--data", data, "--batch-size", 4, "--lr", 1e6,
             "--eval-every", 0, "--save-every", 1, "--max-steps", 3, "--out", root / "run", *FAST])
    ckpt = C.load_checkpoint(root / "run")
    assert ckpt["step"] == 1 and not nonfinite_tensors(ckpt["model"])  # finite weights: the old checks pass
    return root / "run", data


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_export_checks_the_outputs_not_only_the_weights(diverged, tmp_path, capsys):
    run_dir, _ = diverged
    with pytest.raises(NonFiniteError, match=r"checkpoint .*last.pt: its image features, text features, class logits "
                                             r"on a probe batch hold NaN or inf although its weights are finite"):
        AF.export_checkpoint(run_dir, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert run_cli(X.main, ["--checkpoint", str(run_dir), "--out", str(tmp_path / "adapter")], prog="nearl.export") == 2
    err = capsys.readouterr().err
    assert err.startswith("nearl.export: error: checkpoint ") and err.count("\n") == 1


@pytest.mark.parametrize("task", ["classification", "retrieval"])
def test_predict_gives_no_label_and_fails(diverged, tmp_path, capsys, task):
    run_dir, data = diverged
    images = sorted((data / "val" / "red").iterdir())
    what = ["--texts", "a red image", "a blue image"] if task == "retrieval" else []
    argv = ["--checkpoint", str(run_dir), "--images", *map(str, images), *what, "--out", str(tmp_path), *PREDICT]
    assert run_cli(P.main, argv, prog="nearl.predict") == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith(
        "nearl.predict: error: 2 of 2 images got no prediction: the model's outputs hold NaN or inf")
    assert "nan" not in out.lower().replace("nan or inf", "") and out.count("no prediction: the model's outputs") == 2
    saved = strict_json(tmp_path / "predictions.json")  # valid JSON: null where there is no number
    assert saved["n_nonfinite"] == 2
    key = "prediction" if task == "classification" else "ranking"
    assert [e[key] for e in saved["predictions"]] == [None, None]
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [r["image"] for r in rows] == list(map(str, images))
    assert all(v == "" for r in rows for k, v in r.items() if k != "image")
