"""Issue 24, items 13 and 20: an output folder that cannot be written is found out before any work,
and a write the system refuses (a full disk, a read-only or immutable folder) is one line with exit
status 2, naming the path; the earlier files are kept and no partial file is left behind.

The tests run as root, where chmod does not stop a write, so the system's refusals are made by
`refuse_writes`: it makes the calls that open, create or write files under a folder fail with the
errno the system gives (what a read-only mount, an immutable folder or a full disk does), below
everything nearl calls. A real read-only folder is tested too when not root."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from nearl.store import checkpoint as C
from nearl import evaluate as E
from nearl import export as X
from nearl import predict as P
from nearl import train as TR
from nearl.errors import UserError, run_cli
from nearl.training.plots import plot_curves
from train_helpers import _one_thread, FAST, make_manifest, run, TINY_RUN, one_error_line, one_step_run

TINY = TINY_RUN


def _under(path, folder: str) -> bool:
    if isinstance(path, int):
        return False
    try:
        path = os.path.realpath(os.fsdecode(os.fspath(path)))
    except TypeError:
        return False
    return path == folder or path.startswith(folder + os.sep)


class _FullFile:
    """A file on a disk with `left` bytes free: a write past them fails with ENOSPC (nothing of it
    written), as write(2) does."""

    def __init__(self, f, state):
        self._f, self._state = f, state

    def write(self, data):
        if len(data) > self._state["left"]:
            self._state["left"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._state["left"] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def refuse_writes(monkeypatch):
    """refuse_writes(folder, errno.EROFS): making a file or folder under `folder`, or opening one there
    for writing, fails with that errno (a read-only mount: EROFS; no permission: EACCES; an immutable
    folder: EPERM). refuse_writes(folder, errno.ENOSPC, left=N): files open, and writes fail once N
    more bytes would not fit (a full disk)."""
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def arm(folder, code, left=None):
        folder = os.path.realpath(folder)
        state = {"left": left}

        def refuse(path):
            raise OSError(code, os.strerror(code), os.fsdecode(os.fspath(path)))

        def fake_open(file, mode="r", *a, **kw):
            writing = any(c in mode for c in "wax+")
            if writing and _under(file, folder):
                if left is None:
                    refuse(file)
                return _FullFile(real_open(file, mode, *a, **kw), state)
            return real_open(file, mode, *a, **kw)

        def fake_os_open(path, flags, *a, **kw):
            if left is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, folder):
                refuse(path)
            return real_os_open(path, flags, *a, **kw)

        def fake_mkdir(path, *a, **kw):
            if left is None and _under(path, folder):
                refuse(path)
            return real_mkdir(path, *a, **kw)

        for module in (builtins, io):
            monkeypatch.setattr(module, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
    return arm




def _leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob(".*") if ".tmp." in p.name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A NEARL-Tiny retrieval run of one step, its manifest (shared: tests copy it)."""
    return one_step_run(tmp_path_factory.mktemp("writes"))


# ----------------------------------------------------------------------------- item 13: checked first
@pytest.mark.parametrize("code, says", [(errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.EPERM, "operation not permitted")])
def test_evaluate_out_unwritable_is_refused_before_any_work(tmp_path, refuse_writes, capsys, code, says):
    """It used to run the whole evaluation, then crash on the first write of results.json."""
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_writes(locked, code)
    argv = ["--out", str(locked / "results"), "--workers", "0", "--no-progress", "--device", "cpu"]
    assert run_cli(E.main, argv, prog="nearl.evaluate") == 2
    out = capsys.readouterr()
    assert "encoding" not in out.out and "### retrieval" not in out.out  # no evaluation ran
    line = _last_line(out.err, "nearl.evaluate")
    assert line.startswith(f"nearl.evaluate: error: --out {locked / 'results'}: cannot write {locked}: {says}"), line
    assert not (locked / "results").exists()


def test_predict_export_and_compare_outputs_are_checked_first(tmp_path, refuse_writes, run_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    image = next(run_dir[1].parent.glob("*.png"))
    refuse_writes(locked, errno.EROFS)
    assert run_cli(P.main, ["--images", str(image), "--classes", "red,green", "--out", str(locked / "p"),
                            "--workers", "0", "--no-progress", "--device", "cpu"], prog="nearl.predict") == 2
    out = capsys.readouterr()
    assert "red" not in out.out and f"--out {locked / 'p'}: cannot write" in out.err  # no prediction ran
    assert run_cli(X.main, ["--checkpoint", str(run_dir[0]), "--out", str(locked / "a")], prog="nearl.export") == 2
    out = capsys.readouterr()
    assert "exporting" not in out.out and "read-only file system" in _last_line(out.err, "nearl.export")
    from nearl import compare as CMP
    assert run_cli(CMP.main, ["--methods", "zeroshot", "--seeds", "0", "--max-steps", "1", "--device", "cpu",
                              "--workers", "0", "--no-progress", "--out", str(locked / "c")], prog="nearl.compare") == 2
    out = capsys.readouterr()
    assert "===" not in out.out and f"--out {locked / 'c'}: cannot write" in _last_line(out.err, "nearl.compare")


def _last_line(err: str, prog: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith(prog)]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode")
def test_a_real_read_only_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert run_cli(E.main, ["--out", str(locked / "r"), "--workers", "0", "--no-progress"],
                       prog="nearl.evaluate") == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------- item 20: refused writes
def test_train_disk_full_at_the_first_save_is_one_line(tmp_path, refuse_writes, capsys):
    """The first checkpoint of a run on a full disk used to end in torch's traceback."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    refuse_writes(out.parent, errno.ENOSPC, left=200_000)  # metrics.jsonl fits, a checkpoint (2 MB) does not
    argv = ["--data", manifest, "--max-steps", 1, "--out", out, *TINY]
    assert run_cli(TR.main, [str(a) for a in argv], prog="nearl.train") == 2
    line = one_error_line(capsys, "nearl.train")
    assert line == f"nearl.train: error: cannot write {out / 'last.pt'}: no space left on device"
    assert not (out / "last.pt").exists() and _leftovers(out) == [] and not (out / "train.lock").exists()


def test_train_disk_full_keeps_the_earlier_checkpoints(run_dir, tmp_path, refuse_writes, capsys):
    out = Path(shutil.copytree(run_dir[0], tmp_path / "run"))
    before = {n: (out / n).read_bytes() for n in ("last.pt", "best.pt")}
    refuse_writes(out, errno.ENOSPC, left=200_000)
    argv = ["--resume", out, "--max-steps", 2, "--eval-every", 0, "--no-progress", "--workers", "0"]
    assert run_cli(TR.main, [str(a) for a in argv], prog="nearl.train") == 2
    assert "no space left on device" in one_error_line(capsys, "nearl.train")
    assert {n: (out / n).read_bytes() for n in before} == before and _leftovers(out) == []


def test_torch_zip_writer_failure_on_a_full_disk_is_said_so(tmp_path, monkeypatch):
    """torch.save by path reports a full disk as "[enforce fail at inline_container.cc:...]"."""
    from nearl import writes as W
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
    assert str(W.write_error(err, tmp_path / "last.pt")) == f"cannot write {tmp_path / 'last.pt'}: no space left on device"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 0, 10 ** 9))
    assert W.write_error(err, tmp_path / "last.pt") is None  # not a full disk: a bug, its traceback kept


@pytest.mark.parametrize("code, says", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EROFS, "read-only file system")])
def test_checkpoint_write_refused_keeps_last_good(tmp_path, refuse_writes, code, says):
    C.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, tmp_path)
    C.save_checkpoint({"step": 2, "model": {"w": torch.ones(3)}}, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    refuse_writes(tmp_path, code, left=0 if code == errno.ENOSPC else None)
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'last.pt'}: {says}"):
        C.save_checkpoint({"step": 3, "model": {"w": torch.zeros(3)}}, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary, nothing replaced


def test_evaluate_disk_full_keeps_earlier_results(tmp_path, refuse_writes, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    refuse_writes(out, errno.ENOSPC, left=100)
    argv = ["--out", str(out), "--workers", "0", "--no-progress", "--device", "cpu"]
    assert run_cli(E.main, argv, prog="nearl.evaluate") == 2
    line = one_error_line(capsys, "nearl.evaluate")
    assert line == f"nearl.evaluate: error: cannot write {out / 'results.json'}: no space left on device"
    assert (out / "results.json").read_text() == '{"earlier": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no results.md, no temporary


def test_predict_disk_full_leaves_no_empty_csv(tmp_path, refuse_writes, run_dir, capsys):
    """predictions.csv used to be left behind with 0 bytes."""
    out = tmp_path / "preds"
    out.mkdir()
    image = next(run_dir[1].parent.glob("*.png"))
    refuse_writes(out, errno.ENOSPC, left=0)
    argv = ["--images", str(image), "--classes", "red,green", "--out", str(out), "--workers", "0", "--no-progress",
            "--device", "cpu"]
    assert run_cli(P.main, argv, prog="nearl.predict") == 2
    assert one_error_line(capsys, "nearl.predict") == (f"nearl.predict: error: cannot write {out / 'predictions.csv'}: "
                                                         "no space left on device")
    assert list(out.iterdir()) == []


def test_export_disk_full_keeps_the_earlier_adapter(tmp_path, refuse_writes, run_dir, capsys):
    adapter = tmp_path / "adapter"
    assert run_cli(X.main, ["--checkpoint", str(run_dir[0]), "--out", str(adapter)], prog="nearl.export") == 0
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    capsys.readouterr()
    refuse_writes(adapter, errno.ENOSPC, left=10_000)  # the weights (0.7 MB) do not fit
    assert run_cli(X.main, ["--checkpoint", str(run_dir[0]), "--out", str(adapter), "--overwrite"],
                   prog="nearl.export") == 2
    assert one_error_line(capsys, "nearl.export") == (f"nearl.export: error: cannot write "
                                                       f"{adapter / 'adapter_model.safetensors'}: no space left on "
                                                       "device")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_plots_and_reports_leave_no_temporary(tmp_path, refuse_writes, run_dir):
    """A 0-byte .curves.png.tmp.* used to stay behind for ever."""
    out = Path(shutil.copytree(run_dir[0], tmp_path / "run"))
    refuse_writes(out, errno.ENOSPC, left=0)
    with pytest.raises(UserError, match=r"cannot write .*curves\.png: no space left on device"):
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    assert _leftovers(out) == []
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from nearl.training.plots import save_figure
    with pytest.raises(UserError, match=r"cannot write .*comparison\.png: no space left on device"):
        save_figure(plt.figure(), out / "comparison.png")  # nearl.compare's plot
    assert _leftovers(out) == [] and not (out / "comparison.png").exists()


def test_temporaries_a_killed_write_left_are_removed_by_the_next_run(tmp_path):
    names = [".curves.png.tmp.123.png", ".curves.png.tmp.77", ".metrics.jsonl.tmp.5", ".last.pt.tmp.9"]
    for name in names + ["notes.txt", ".other.tmp.1"]:
        (tmp_path / name).write_bytes(b"")
    assert C.remove_stale_temporaries(tmp_path) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp.1", "notes.txt"]
