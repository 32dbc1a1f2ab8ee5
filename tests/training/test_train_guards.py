"""What a demanding user tried (issue 10): NaN training, resume with new settings, arguments that
used to mean something else. Tiny runs on NEARL-Tiny, a few steps each."""
from __future__ import annotations

import json

import pytest

from nearl.store import checkpoint as C
from nearl import methods as MT
from nearl.model import losses
from nearl import training as T
from nearl.errors import UserError
from nearl.store.nonfinite import NonFiniteError, nonfinite_tensors
from nearl.training.resume import load_adapters
from nearl.training.schedule import WarmupCosine
from train_helpers import (_one_thread, _StopAt, _Interrupt, FAST, make_image_folder, make_manifest, run,
                        train_losses)

TINY = ["--model", "NEARL-Tiny", "--batch-size", 4, *FAST]


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({2, 3}): the training loss of those optimizer steps (1-based, one micro-batch each) is NaN."""
    def arm(steps):
        real, calls = losses.NEARLLoss.forward, []

        def forward(self, out):
            terms = real(self, out)
            calls.append(1)
            if len(calls) in steps:
                terms = {**terms, "loss": terms["loss"] * float("nan")}
            return terms
        monkeypatch.setattr(losses.NEARLLoss, "forward", forward)
    return arm


def _finite(path):
    return not nonfinite_tensors(C.load_checkpoint(path)["model"])


# ----------------------------------------------------------------------------- item 1: NaN
def test_nan_loss_stops_and_saves_nothing_broken(tmp_path, nan_at):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    nan_at({3})
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan; training stopped without applying it\. "
                                             r"Nothing after step 2 was saved.*--skip-nonfinite"):
        run(["--data", manifest, "--max-steps", 4, "--save-every", 1, "--out", out, *TINY])
    ckpt = C.load_checkpoint(out)
    assert ckpt["step"] == 2 and _finite(out / "last.pt") and _finite(out / "last.prev.pt")
    recs = train_losses(out)[1]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[-1]["loss"] is None and recs[-1]["nonfinite_skipped"] == 1  # the log says what happened
    assert not (out / "train.lock").exists()


def test_skip_nonfinite_skips_and_counts(tmp_path, nan_at):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    common = ["--data", manifest, "--max-steps", 4, "--lr", 1e-2, *TINY]
    nan_at({2, 3})
    summary = run([*common, "--skip-nonfinite", 2, "--out", tmp_path / "skip"])
    assert summary["step"] == 4 and summary["nonfinite_skipped"] == 2
    recs = train_losses(tmp_path / "skip")[1]
    assert [r.get("nonfinite_skipped") for r in recs if r["kind"] == "train"] == [None, 1, 2, None]
    ckpt = C.load_checkpoint(tmp_path / "skip")
    assert ckpt["nonfinite_skipped"] == 2 and _finite(tmp_path / "skip" / "last.pt")
    # A skipped step leaves the parameters and Adam's moments alone: 2 updates happened, not 4.
    assert all(s["step"] == 2 for s in ckpt["optimizer"]["state"].values())
    nan_at({2, 3})
    with pytest.raises(NonFiniteError, match="step 3: .*after 1 such step\\(s\\) skipped \\(--skip-nonfinite 1\\)"):
        run([*common, "--skip-nonfinite", 1, "--out", tmp_path / "one"])


def test_huge_lr_is_not_reported_as_perfect(tmp_path):
    """The issue's run: --lr 1e6 on retrieval used to print 'new best 100.00', replace a good best.pt
    with a NaN model and exit 0. Resumed from a good run with --lr 1e6 (given again, so applied):
    it stops with an error, and best.pt / last.pt stay byte for byte."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=4)
    out = tmp_path / "run"
    run(["--data", manifest, "--max-steps", 1, "--out", out, *TINY])
    before = {n: (out / n).read_bytes() for n in ("best.pt", "last.pt")}
    with pytest.raises(NonFiniteError, match="diverged|not finite|is nan|is inf"):
        run(["--resume", out, "--lr", 1e6, "--max-steps", 3, "--eval-every", 1])
    assert {n: (out / n).read_bytes() for n in before} == before
    assert all(r["score"] < 100 for r in train_losses(out)[1] if r["kind"] == "val")


def test_huge_lr_classification_stops_cleanly(tmp_path):
    """On classification the same run crashed at validation with a ValueError and no checkpoint."""
    root = make_image_folder(tmp_path / "folder", per_class=(2, 1), classes=("red", "green"))
    out = tmp_path / "cls"
    with pytest.raises(NonFiniteError):
        run(["--task", "classification", "--data", root, "--max-steps", 3, "--lr", 1e6, "--out", out, *TINY])
    assert not (out / "best.pt").exists() or _finite(out / "best.pt")
    assert not (out / "last.pt").exists() or _finite(out / "last.pt")


# ----------------------------------------------------------------------------- item 5: resume
def test_resume_applies_optimiser_settings_given_again(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    with pytest.raises(_Interrupt):  # killed during step 3: last.pt holds step 2
        run(["--data", manifest, "--max-steps", 4, "--warmup", 1, "--out", out, *TINY], hooks=_StopAt(3))
    capsys.readouterr()
    run(["--resume", out, "--lr", 5e-4, "--weight-decay", 0.2, "--no-progress"])
    text = capsys.readouterr().out
    assert "--lr 0.001 -> 0.0005" in text and "--weight-decay 0.05 -> 0.2" in text
    lrs = [r["lr"] for r in train_losses(out)[1] if r["kind"] == "train"]
    schedule = WarmupCosine(1, 4)
    assert lrs == pytest.approx([1e-3 * schedule(0), 1e-3 * schedule(1), 5e-4 * schedule(2), 5e-4 * schedule(3)])
    groups = C.load_checkpoint(out)["optimizer"]["param_groups"]
    assert {g["initial_lr"] for g in groups} == {5e-4} and max(g["weight_decay"] for g in groups) == 0.2


def test_resume_with_more_steps_continues_smoothly(tmp_path, capsys):
    """A finished run given a larger --max-steps: the first resumed step used to run at the exhausted
    rate 0.0; now the lr ramps from there onto the longer cosine, never above --lr."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    run(["--data", manifest, "--max-steps", 2, "--warmup", 1, "--min-lr-ratio", 0, "--out", out, *TINY])
    capsys.readouterr()
    run(["--resume", out, "--max-steps", 6, "--warmup", 2, "--no-progress"])
    assert "schedule changed" in capsys.readouterr().out
    lrs = [r["lr"] for r in train_losses(out)[1] if r["kind"] == "train"]
    expected = WarmupCosine(1, 2).changed_at(2, 2, 6, 0.0)
    assert lrs[2:] == pytest.approx([1e-3 * expected(s) for s in range(2, 6)])
    assert 0 < lrs[2] < lrs[3] and max(lrs[2:]) <= 1e-3 and lrs[3] == pytest.approx(1e-3 * expected.curve(3))
    # The ramp is part of the checkpoint, so a resume in the middle of it continues it (no jump).
    assert C.load_checkpoint(out)["scheduler"]["lr_lambdas"][0]["ramp_steps"] == 2


def test_ramp_never_jumps():
    old = WarmupCosine(10, 100)
    for new_total in (50, 100, 200, 1000):
        for at in (0, 5, 60, 100, 150):
            new = old.changed_at(at, 10, new_total, 0.0)
            assert abs(new(at) - old(at)) <= 1.0 / 10 + 1e-12  # one warmup step's worth at most
            assert all(0.0 <= new(s) <= 1.0 for s in range(at, at + 300))
    assert WarmupCosine(10, 100).changed_at(100, 10, 200, 0.0)(100) > 0  # exhausted: warms up again


def test_resume_keeps_the_model_shape_and_says_so(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    run(["--data", manifest, "--max-steps", 1, "--out", out, *TINY])
    capsys.readouterr()
    summary = run(["--resume", out, "--num-queries", 8, "--vision-layers", "1", "--max-steps", 2, "--no-progress"])
    text = capsys.readouterr().out
    assert summary["step"] == 2
    assert "--num-queries 8 (checkpoint: 16)" in text and "--vision-layers 1 (checkpoint: all)" in text
    assert C.load_checkpoint(out)["config"]["num_queries"] == 16


def test_mismatched_checkpoint_names_the_setting():
    small = MT.build_method("nearl", "NEARL-Tiny", None, num_queries=8)
    ckpt = {"model": MT.build_method("nearl", "NEARL-Tiny", None).trainable_state_dict(), "model_name": "NEARL-Tiny",
            "config": MT.build_method("nearl", "NEARL-Tiny", None).config.to_dict(), "path": "x/last.pt"}
    with pytest.raises(UserError, match="x/last.pt does not fit the model of this run: num_queries 16 in the "
                                        "checkpoint, 8 here"):
        load_adapters(small, ckpt, "cpu")


# ----------------------------------------------------------------------------- item 9: arguments
@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer (>= 1), got 0"),
    (["--max-steps", "0"], "argument --max-steps: must be a positive integer (>= 1), got 0"),
    (["--max-steps", "-1"], "argument --max-steps: must be a positive integer (>= 1), got -1"),
    (["--k-shot", "0"], "argument --k-shot: must be a positive integer"),
    (["--eval-batch-size", "0"], "argument --eval-batch-size: must be a positive integer"),
    (["--lr", "-1e-3"], "argument --lr: must be > 0, got -0.001"),
    (["--lr", "nan"], "argument --lr: must be a finite number"),
    (["--beta2", "1"], "argument --beta2: must be in [0, 1), got 1"),
    (["--vision-layers", "3-1"], "argument --vision-layers: the range '3-1' is empty (3 > 1)"),
    (["--text-layers", "0,1"], "argument --text-layers: block numbers are 1-based"),
    (["--device", "gpu"], "argument --device: must be cpu, cuda, cuda:N or auto"),
    (["--method", "maple"], "argument --method: unknown method 'maple'"),
])
def test_arguments_that_meant_something_else(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1  # one line, not the 40-option usage


def test_arguments_that_stay_valid():
    args = T.parse_args(["--lr", "1e-3", "--warmup", "0", "--lambda-q", "0", "--vision-layers", "1,3-4",
                         "--min-lr-ratio", "0", "--seed", "7"])
    assert args.lr == 1e-3 and args.warmup == 0 and args.lambda_q == 0 and args.vision_layers == [1, 3, 4]


def test_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--model 'NEARL-Tinyy' is not an open_clip architecture; did you mean NEARL-Tiny"):
        run(["--model", "NEARL-Tinyy", "--out", tmp_path / "x", *FAST])
    with pytest.raises(UserError, match="model settings: heads=3 must divide query_dim=128"):
        run(["--model", "NEARL-Tiny", "--heads", 3, "--out", tmp_path / "y", *FAST])


# ----------------------------------------------------------------------------- item 4: no image loads
def test_a_data_set_with_no_decodable_image_stops_before_training(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    for png in (tmp_path / "data").glob("*.png"):
        png.write_text("not an image")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"manifest\.csv: none of the 4 training images could be loaded"):
        run(["--data", manifest, "--max-steps", 2, "--out", out, *TINY])
    assert not (out / "last.pt").exists() and not (out / "train.lock").exists()


def test_skipped_images_are_counted_once_in_metrics(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=8, n_val=0)
    (tmp_path / "data" / "img1.png").write_text("not an image")
    out = tmp_path / "run"
    run(["--data", manifest, "--epochs", 3, "--out", out, *TINY])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("kind") == "skipped_images"]
    assert len(skipped) == 1 and skipped[0]["skipped"] == 1, skipped  # once, not once per epoch
    assert skipped[0]["reasons"] == {"not an image": 1}


# ----------------------------------------------------------------------------- issue 24: degenerate tasks
def test_one_class_is_refused_not_scored_100(tmp_path, capsys):
    """A one-class split trained to 'accuracy 100 ... new best 100': any model gets every image right
    when there is one class. Training and evaluation refuse it in one line, naming the class found;
    so does a split file whose training images are all of one class."""
    from nearl import evaluate as E
    from nearl import train as TR
    from nearl.errors import run_cli

    root = make_image_folder(tmp_path / "folder", per_class=(3, 2), classes=("red",))
    argv = ["--task", "classification", "--data", root, "--max-steps", 1, "--out", tmp_path / "run", *TINY]
    assert run_cli(TR.main, [str(a) for a in argv], prog="nearl.train") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nearl.train: error: ") and "needs at least two classes" in err[-1]
    assert "['red']" in err[-1] and not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(UserError, match=r"at least two classes.*\['red'\]"):
        E.main(["--model", "NEARL-Tiny", "--task", "classification", "--data", str(root), "--split", "val",
                "--workers", "0", "--no-progress"])
    split = tmp_path / "split.json"
    two = make_image_folder(tmp_path / "two", per_class=(2, 1), classes=("red", "green"))
    items = {s: [[f"{s}/{c}/{i}.png", int(c == "red"), c] for c in ("green", "red") for i in range(n)
                 if s == "val" or c == "green"] for s, n in (("train", 2), ("val", 1))}
    split.write_text(json.dumps(items))
    with pytest.raises(UserError, match=r"training images of 1 class \(\['green'\]\).*at least two"):
        run(["--task", "classification", "--data", split, "--root", two, "--max-steps", 1,
             "--out", tmp_path / "run2", *TINY])
