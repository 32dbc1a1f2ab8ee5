"""One run per output folder, one process at a time (issue 10, items 2 and 3): a folder holding a run
refuses a new one unless resumed or overwritten; train.lock keeps a second process out, is cleared on
exit, and a lock left by a dead process is reported and taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from nearl.store import checkpoint as C
from nearl.training import run_dir as R
from nearl.errors import UserError
from train_helpers import _one_thread, FAST, make_manifest, run, train_losses

TINY = ["--model", "NEARL-Tiny", "--batch-size", 4, "--max-steps", 1, *FAST]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names no process now
    return p.pid


def _write_lock(directory, **owner):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / R.LOCK).write_text(json.dumps(owner))


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- the lock
def test_lock_excludes_a_second_holder_and_clears_on_release(tmp_path):
    with R.RunLock(tmp_path / "run").acquire() as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"in use by another training run \\(pid {os.getpid()} on host"):
            R.RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / R.LOCK).exists()
    R.RunLock(tmp_path / "run").acquire().release()  # free again


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, host=socket.gethostname(), started=1.0)
    lock = R.RunLock(tmp_path).acquire()
    try:
        assert lock.stale["pid"] == dead
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_lock_from_another_host_needs_force(tmp_path):
    _write_lock(tmp_path, pid=12345, host="some-other-host")
    with pytest.raises(UserError, match="another host.*--force-unlock"):
        R.RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / R.LOCK).read_text())["host"] == "some-other-host"  # left as it was
    R.RunLock(tmp_path).acquire(force=True).release()


def test_lock_held_by_another_process_then_killed(tmp_path):
    """A live holder in another process is refused by pid; after kill -9 its lock is stale."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from nearl.training.run_dir import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid} on host"):
            R.RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = R.RunLock(tmp_path).acquire()
    assert lock.stale["pid"] == holder.pid
    lock.release()


# ----------------------------------------------------------------------------- the folder
def test_prepare_refuses_a_used_folder_and_overwrite_deletes_only_the_run(tmp_path):
    C.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".last.pt.tmp.4242").write_bytes(b"torn")
    with pytest.raises(UserError, match="already holds a training run.*--resume.*--overwrite"):
        R.prepare(tmp_path, resuming_here=False, overwrite=False)
    assert R.prepare(tmp_path, resuming_here=True, overwrite=False)[0].startswith("removed 1 temporary")
    assert (tmp_path / C.LAST).exists()
    notes = R.prepare(tmp_path, resuming_here=False, overwrite=True)
    assert "deleted the earlier run" in notes[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_second_run_without_out_does_not_destroy_the_first(tmp_path, monkeypatch, capsys):
    """The default --out runs/nearl: a second run is refused and the first run's files stay byte for
    byte; --overwrite starts afresh (no last.prev.pt of the old run); --resume continues."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    monkeypatch.chdir(tmp_path)
    run(["--data", manifest, *TINY])
    first = _snapshot(tmp_path / "runs" / "nearl")
    assert {"last.pt", "metrics.jsonl"} <= set(first)
    with pytest.raises(UserError, match="runs/nearl already holds a training run"):
        run(["--data", manifest, "--lr", 1e-2, *TINY])
    assert _snapshot(tmp_path / "runs" / "nearl") == first
    run(["--data", manifest, "--lr", 1e-2, "--overwrite", *TINY])
    after = _snapshot(tmp_path / "runs" / "nearl")
    assert "last.prev.pt" not in after and after["last.pt"] != first["last.pt"]
    assert [r["step"] for r in train_losses(tmp_path / "runs" / "nearl")[1]] == [1]
    assert "--overwrite: deleted the earlier run" in capsys.readouterr().out
    assert run(["--resume", "runs/nearl", "--max-steps", 2, "--no-progress"])["step"] == 2
    assert not (tmp_path / "runs" / "nearl" / R.LOCK).exists()
    with pytest.raises(UserError, match="--overwrite would delete the run that --resume"):
        run(["--resume", "runs/nearl", "--overwrite", "--max-steps", 3])


def test_training_refused_while_another_holds_the_folder(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    with R.RunLock(out).acquire():
        with pytest.raises(UserError, match="in use by another training run"):
            run(["--data", manifest, "--out", out, *TINY])
        assert sorted(p.name for p in out.iterdir()) == [R.LOCK]  # nothing written by the refused run
    _write_lock(out, pid=_dead_pid(), host=socket.gethostname())  # as a kill -9 leaves it
    (out / ".last.pt.tmp.77").write_bytes(b"torn")
    run(["--data", manifest, "--out", out, *TINY])
    text = capsys.readouterr().out
    assert "stale train.lock" in text and "removed 1 temporary file(s)" in text
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "curves.png", "last.pt", "metrics.jsonl"]


def test_cli_user_error_is_one_line(tmp_path):
    """python -m nearl.train into a folder that holds a run: one line on stderr, exit 2."""
    C.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "nearl.train", "--out", str(tmp_path / "run"), "--max-steps", "1",
                        "--workers", "0", "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("nearl.train: error: ") and "already holds" in errors[0]
