"""Checkpoints are written atomically: a failure or a kill mid-write leaves the last good one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nearl.store import checkpoint as C
from train_helpers import _one_thread, FAST, make_manifest, run, train_losses


def _state(step):
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_roundtrip_and_previous_kept(tmp_path):
    C.save_checkpoint(_state(1), tmp_path)
    C.save_checkpoint(_state(2), tmp_path)
    assert C.load_checkpoint(tmp_path)["step"] == 2
    assert C.load_checkpoint(tmp_path / C.PREVIOUS)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([C.LAST, C.PREVIOUS])  # no temp files


def test_failed_write_keeps_last_good(tmp_path, monkeypatch):
    C.save_checkpoint(_state(1), tmp_path)
    real_save = torch.save

    def torn_save(obj, f, *a, **kw):  # half a file, then the disk "fills up"
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        C.save_checkpoint(_state(2), tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert C.load_checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.LAST]

    real_replace = os.replace

    def failing_replace(src, dst):  # crash at the final rename, after last.prev.pt was made
        if str(dst).endswith(C.LAST):
            raise OSError("crash during rename")
        return real_replace(src, dst)

    monkeypatch.setattr(C.os, "replace", failing_replace)
    with pytest.raises(OSError):
        C.save_checkpoint(_state(3), tmp_path)
    monkeypatch.setattr(C.os, "replace", real_replace)
    assert C.load_checkpoint(tmp_path)["step"] == 1
    assert C.load_checkpoint(tmp_path / C.PREVIOUS)["step"] == 1


def test_corrupt_last_falls_back_to_previous(tmp_path, caplog):
    C.save_checkpoint(_state(1), tmp_path)
    C.save_checkpoint(_state(2), tmp_path)
    data = (tmp_path / C.LAST).read_bytes()
    (tmp_path / C.LAST).write_bytes(data[: len(data) // 2])  # a disk that lied about fsync
    assert C.load_checkpoint(tmp_path)["step"] == 1
    assert [r.getMessage() for r in caplog.records if "using the previous checkpoint" in r.getMessage()]
    with pytest.raises(C.CheckpointError):
        C.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"not": "ours"}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="not a NEARL-CLIP checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")


def test_killed_mid_write_leaves_previous(tmp_path):
    """A real SIGKILL of the writing process halfway through torch.save."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from nearl.store import checkpoint as C
        C.save_checkpoint({{"step": 1, "model": {{"w": torch.ones(1000)}}}}, {str(tmp_path)!r})
        def dying_save(obj, f, *a, **kw):
            f.write(b"x" * 4096); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        C.save_checkpoint({{"step": 2, "model": {{"w": torch.zeros(1000)}}}}, {str(tmp_path)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()
    ckpt = C.load_checkpoint(tmp_path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(1000))


def test_training_crash_during_checkpoint_then_resume(tmp_path, monkeypatch):
    manifest = make_manifest(tmp_path / "data", n_train=8, n_val=0)
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 3:  # the step-3 checkpoint dies mid-write
            f.write(b"garbage")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    args = ["--model", "NEARL-Tiny", "--data", manifest, "--batch-size", 2, "--max-steps", 4,
            "--save-every", 1, "--out", out, *FAST]
    with pytest.raises(KeyboardInterrupt):
        run(args)
    monkeypatch.setattr(torch, "save", real_save)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp file cleaned up
    ckpt = C.load_checkpoint(out)
    assert ckpt["step"] == 2
    assert len(train_losses(out)[0]) == 3  # step 3 was logged before its checkpoint failed
    assert run(["--resume", out, "--no-progress"])["step"] == 4
    assert [r["step"] for r in train_losses(out)[1]] == [1, 2, 3, 4]  # step 3 redone, logged once


# ----------------------------------------------------------------------------- issue 10, item 6
def test_save_after_fallback_keeps_the_good_previous(tmp_path):
    """last.pt corrupt -> load falls back to last.prev.pt; the next save must not move the corrupt
    file into last.prev.pt (that would throw away the only good copy)."""
    C.save_checkpoint(_state(1), tmp_path)
    C.save_checkpoint(_state(2), tmp_path)
    data = (tmp_path / C.LAST).read_bytes()
    (tmp_path / C.LAST).write_bytes(data[: len(data) // 2])
    assert C.load_checkpoint(tmp_path)["step"] == 1  # (with a warning: test_corrupt_last_falls_back_to_previous)
    C.save_checkpoint(_state(3), tmp_path)  # the resumed run's next save
    assert C.load_checkpoint(tmp_path / C.PREVIOUS)["step"] == 1
    assert C.load_checkpoint(tmp_path)["step"] == 3
    C.save_checkpoint(_state(4), tmp_path)  # and from now on the usual rotation
    assert C.load_checkpoint(tmp_path / C.PREVIOUS)["step"] == 3


def test_stale_temporaries_removed(tmp_path):
    C.save_checkpoint(_state(1), tmp_path)
    for name in (".last.pt.tmp.123", ".last.prev.pt.tmp.99", ".best.pt.tmp.7", ".other.tmp.1", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert C.remove_stale_temporaries(tmp_path) == [".best.pt.tmp.7", ".last.prev.pt.tmp.99", ".last.pt.tmp.123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp.1", C.LAST, "notes.txt"]


def test_nonfinite_model_is_never_written(tmp_path):
    from nearl.store.nonfinite import NonFiniteError
    C.save_checkpoint(_state(1), tmp_path)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match="1 of 1 parameter tensors hold NaN or inf"):
            C.save_checkpoint({"step": 2, "model": {"w": torch.tensor([1.0, bad])}}, tmp_path)
        with pytest.raises(NonFiniteError):
            C.save_checkpoint({"step": 2, "model": {"w": torch.tensor([bad])}}, tmp_path, C.BEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.LAST]
    assert C.load_checkpoint(tmp_path)["step"] == 1
