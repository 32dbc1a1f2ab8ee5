"""Issue 24, items 10-12 and 14-16: what a run checks before its first step (a bad --val-data, a class
with no training image, missing and empty images named and recorded), what --resume refuses (a
checkpoint holding NaN) or has nothing to do for, and SIGTERM stopping a run cleanly."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nearl.store import checkpoint as C
from nearl import train as TR
from nearl.errors import UserError, run_cli
from train_helpers import _one_thread, FAST, make_image_folder, make_manifest, run, train_losses  # noqa: F401

TINY = ["--model", "NEARL-Tiny", "--batch-size", 4, *FAST]
ROOT = Path(__file__).resolve().parents[2]


def _snapshot(directory: Path):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _cli(argv, capsys):
    """nearl.train's command line in this process: (exit status, stdout, stderr)."""
    status = run_cli(TR.main, [str(a) for a in argv], prog="nearl.train")
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ----------------------------------------------------------------------------- 10: --val-data
def test_a_val_data_with_no_decodable_image_stops_before_the_first_step(tmp_path):
    """It used to be found after the first epoch, at the first validation."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    val = make_manifest(tmp_path / "val", n_train=0, n_val=4)
    for png in (tmp_path / "val").glob("*.png"):
        png.write_text("not an image")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"val/manifest\.csv: none of the 4 validation images could be loaded "
                                        r"\(not an image: 4\); e\.g\. .*img0\.png"):
        run(["--data", manifest, "--val-data", val, "--epochs", 2, "--out", out, *TINY])
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()
    assert not (out / "train.lock").exists()


# ----------------------------------------------------------------------------- 11: NaN checkpoint
def _poison(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["queries.q0"][0, 0] = float("nan")
    torch.save(ckpt, path)  # past save_checkpoint, which would refuse it


def test_resume_refuses_a_checkpoint_holding_nan(tmp_path, capsys):
    """It loaded the NaN weights, trained a step and blamed --lr."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    run(["--data", manifest, "--max-steps", 2, "--out", out, *TINY])  # one step an epoch: last.prev.pt holds step 1
    _poison(out / "last.pt")
    before = _snapshot(out)
    status, _, err = _cli(["--resume", out, "--max-steps", 4], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"nearl.train: error: {out / 'last.pt'}: 1 of " in err and "hold NaN or inf (queries.q0)" in err, err
    assert f"--resume {out / 'last.prev.pt'}" in err and "step 1" in err and "--lr" not in err, err
    assert _snapshot(out) == before  # nothing written, the log not truncated
    _poison(out / "last.prev.pt")
    with pytest.raises(UserError, match=r"last\.pt: 1 of \d+ learnable tensors hold NaN or inf") as e:
        run(["--resume", out, "--max-steps", 4])
    assert "last.prev.pt" not in str(e.value)  # not offered when it is no better
    assert _snapshot(out) == {**before, "last.prev.pt": (out / "last.prev.pt").read_bytes()}


# ----------------------------------------------------------------------------- 12: missing images
def test_missing_images_are_named_with_the_folder_searched(tmp_path, capsys):
    """--root /typo gave 'missing image: 6' and neither a path nor the folder it looked in."""
    data = make_image_folder(tmp_path / "images", per_class=(2, 1), classes=("red", "green"))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({s: [[f"{s}/{c}/{i}.png", k, c] for k, c in enumerate(("red", "green"))
                                     for i in range(n)] for s, n in (("train", 2), ("val", 1))}))
    run(["--task", "classification", "--data", split, "--root", data, "--max-steps", 1, "--eval-every", 0,
         "--out", tmp_path / "ok", *TINY])  # the right --root trains
    typo = tmp_path / "typo"
    status, _, err = _cli(["--task", "classification", "--data", split, "--root", typo, "--max-steps", 1,
                           "--out", tmp_path / "run", *TINY], capsys)
    line = err.strip().splitlines()[-1]
    assert status == 2 and line.startswith("nearl.train: error: "), err
    assert "missing image: 6" in line and f"looked for under {typo}" in line, line
    assert str(typo / "train" / "red" / "0.png") in line and "and 3 more" in line, line


def test_missing_and_empty_images_are_recorded_as_skipped(tmp_path):
    """Partly missing images were left out of skipped_images (only undecodable ones were there)."""
    manifest = make_manifest(tmp_path / "data", n_train=8, n_val=0)
    (tmp_path / "data" / "img1.png").unlink()
    (tmp_path / "data" / "img2.png").unlink()
    (tmp_path / "data" / "img3.png").write_bytes(b"")
    (tmp_path / "data" / "img4.png").write_text("not an image")
    out = tmp_path / "run"
    run(["--data", manifest, "--epochs", 2, "--out", out, *TINY])
    skipped = [r for r in train_losses(out)[1] if r["kind"] == "skipped_images"]
    assert len(skipped) == 1, skipped
    assert skipped[0]["reasons"] == {"missing image": 2, "empty image file": 1, "not an image": 1}
    assert skipped[0]["skipped"] == 4 and skipped[0]["images"] == 8


# ----------------------------------------------------------------------------- 14: nothing to do
def test_resume_with_nothing_left_to_do_changes_nothing(tmp_path, capsys):
    """--max-steps below (or at) the checkpoint's step rewrote last.pt and appended a validation line."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=4)
    out = tmp_path / "run"
    run(["--data", manifest, "--max-steps", 3, "--out", out, *TINY])
    before = _snapshot(out)
    for more in (["--max-steps", 2], []):  # below the checkpoint's step 3, and at it
        status, text, err = _cli(["--resume", out, *more], capsys)
        assert status == 0 and "nothing to do" in text and "holds step 3" in text, text + err
        assert _snapshot(out) == before


# ----------------------------------------------------------------------------- 15: a class never seen
def test_a_class_with_no_training_image_is_warned_about(tmp_path, caplog):
    data = make_image_folder(tmp_path / "images", per_class=(2, 1), classes=("red", "green", "blue"))
    split = tmp_path / "split.json"
    items = {"train": [[f"train/{c}/{i}.png", k, c] for k, c in enumerate(("red", "green", "blue")) if c != "blue"
                       for i in range(2)],
             "val": [[f"val/{c}/0.png", k, c] for k, c in enumerate(("red", "green", "blue"))]}
    split.write_text(json.dumps(items))
    caplog.set_level(logging.WARNING)
    run(["--task", "classification", "--data", split, "--root", data, "--max-steps", 1, "--eval-every", 0,
         "--out", tmp_path / "run", *TINY])
    warned = [r.getMessage() for r in caplog.records if "no training image" in r.getMessage()]
    assert len(warned) == 1 and "['blue']" in warned[0] and "1 of the 3 classes" in warned[0], warned


# ----------------------------------------------------------------------------- 16: SIGTERM, SIGINT
def _signalled_run(tmp_path, signum):
    """`python -m nearl.train` at the repo root, sent `signum` (to the whole process group, DataLoader
    worker included) after its third step: (exit status, stderr, out folder, the steps it logged)."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "nearl.train", "--model", "NEARL-Tiny", "--data", str(manifest), "--batch-size", "2",
            "--epochs", "100000", "--workers", "1", "--no-progress", "--device", "cpu", "--out", str(out)]
    # a shell's background job inherits SIGINT ignored; Ctrl-C reaches a job in the foreground
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if (
        signal.getsignal(signal.SIGINT) == signal.SIG_IGN) else None
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=restore)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count('"train"') >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    steps = [r["step"] for r in train_losses(out)[1] if r["kind"] == "train"]
    return proc.returncode, stderr, out, steps


def test_sigterm_stops_at_a_step_boundary_saves_and_releases_the_lock(tmp_path):
    """What Slurm, docker stop and systemd send, here to the whole process group (DataLoader worker
    included): the run used to die at once, with no message, leaving train.lock behind."""
    status, stderr, out, steps = _signalled_run(tmp_path, signal.SIGTERM)
    assert status == 143, (status, stderr[-2000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"nearl.train: stopped by SIGTERM after step {steps[-1]}") and "--resume" in last, stderr
    assert C.load_checkpoint(out)["step"] == steps[-1] == len(steps) >= 3
    assert not (out / "train.lock").exists()
    summary = run(["--resume", out, "--max-steps", steps[-1] + 1, "--epochs", 100000, "--workers", 0])
    assert summary["step"] == steps[-1] + 1


def test_a_first_ctrl_c_stops_at_a_step_boundary_as_sigterm_does(tmp_path):
    """Ctrl-C (SIGINT to the foreground process group, DataLoader worker included) used to stop at
    once, losing the steps since the last checkpoint. Now the first one is said at once and stops the
    run at the next step boundary, saved, with exit status 130 (128 + 2)."""
    status, stderr, out, steps = _signalled_run(tmp_path, signal.SIGINT)
    assert status == 130, (status, stderr[-2000:])
    lines = stderr.strip().splitlines()
    notices = [line for line in lines if "Ctrl-C again" in line]
    assert len(notices) == 1 and "without saving" in notices[0], stderr
    assert lines[-1].startswith(f"nearl.train: stopped by Ctrl-C (SIGINT) after step {steps[-1]}"), stderr
    assert "--resume" in lines[-1] and "Traceback" not in stderr, stderr
    assert C.load_checkpoint(out)["step"] == steps[-1] == len(steps) >= 3
    assert not (out / "train.lock").exists()


def test_a_second_ctrl_c_aborts_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Ctrl-C twice: the second one does not wait for the step boundary; nothing more is saved, the lock
    is released, exit status 130, and the previous SIGINT handler is back afterwards."""
    from nearl.training import loop

    def twice(self, step, record):
        if step == 2:  # after step 2's checkpoint (--save-every 1)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the second Ctrl-C did not stop the run at once")

    monkeypatch.setattr(loop.Hooks, "on_step", twice)
    manifest = make_manifest(tmp_path / "data", n_train=16, n_val=0)
    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGINT)
    status, _, err = _cli(["--data", manifest, "--max-steps", 10, "--save-every", 1, "--out", out, *TINY], capsys)
    assert signal.getsignal(signal.SIGINT) is previous
    lines = err.strip().splitlines()
    assert status == 130 and lines[-1] == "nearl.train: interrupted", err
    assert len([line for line in lines if "Ctrl-C again" in line]) == 1 and "stopped by" not in err, err
    assert C.load_checkpoint(out)["step"] == 2 and not (out / "train.lock").exists()


def test_ctrl_c_before_the_loop_stops_at_once(tmp_path, monkeypatch, capsys):
    """Reading the data there is no step to finish: Ctrl-C stops there as it always did."""
    from nearl.training import run as RUN

    real = RUN.load_train_data

    def reading(args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(args)

    monkeypatch.setattr(RUN, "load_train_data", reading)
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    status, _, err = _cli(["--data", manifest, "--max-steps", 2, "--out", out, *TINY], capsys)
    assert status == 130 and err.strip().splitlines()[-1] == "nearl.train: interrupted", err
    assert "Ctrl-C again" not in err
    assert not (out / "train.lock").exists() and not (out / "last.pt").exists()


def test_sigterm_before_the_loop_stops_at_once(tmp_path, monkeypatch, capsys):
    """Reading the data or building the model, there is no step to finish: the run stops there, the lock
    released, nothing saved, and the previous SIGTERM handler is back afterwards."""
    from nearl.training import run as RUN

    real = RUN.load_train_data

    def reading(args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(args)

    def killed(signum, frame):  # what would have ended pytest itself, had the run not taken the signal
        raise AssertionError("SIGTERM reached the handler the run should have replaced")

    monkeypatch.setattr(RUN, "load_train_data", reading)
    previous = signal.signal(signal.SIGTERM, killed)
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    try:
        status, _, err = _cli(["--data", manifest, "--max-steps", 2, "--out", out, *TINY], capsys)
        assert signal.getsignal(signal.SIGTERM) is killed
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 143 and err.strip().splitlines()[-1] == ("nearl.train: stopped by SIGTERM outside the training "
                                                              "loop: nothing was saved"), err
    assert not (out / "train.lock").exists() and not (out / "last.pt").exists()


def test_a_worker_forked_in_the_loop_outlives_a_group_sigterm_but_not_its_parents():
    """Slurm and systemd signal every process of the job: a DataLoader worker must not die under the run
    (torch's do), yet the DataLoader's own terminate() of a stuck worker must still end it."""
    import multiprocessing

    from nearl.training.stop import SigtermStop

    with SigtermStop().deferred():
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
        child.start()
    try:
        time.sleep(0.5)  # the child's SIGTERM thread started
        subprocess.run(["kill", "-TERM", str(child.pid)], check=True)  # from another process: ignored
        subprocess.run(["kill", "-INT", str(child.pid)], check=True)  # Ctrl-C, sent to the group: ignored
        child.join(1.0)
        assert child.is_alive()
        child.terminate()  # from its parent: it exits, as torch's worker does
        child.join(10.0)
        assert not child.is_alive() and child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
