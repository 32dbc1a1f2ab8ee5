"""--report-to tensorboard / wandb: the same scalars as metrics.jsonl, at the same steps; wandb offline
by default (a fake module stands in for it); a missing package stops the run before it trains."""
from __future__ import annotations

import json
import sys
import types

import pytest

from nearl import training as T
from nearl.errors import UserError
from nearl.training import tracking

from train_helpers import FAST, make_manifest, run
from train_helpers import _one_thread  # noqa: F401 (autouse: one intra-op thread)


def expected_scalars(out):
    """{(tag, step): value} read from metrics.jsonl on its own terms: every number of every record,
    tagged "<kind>/<name>", at the record's step."""
    found = {}
    for line in open(out / "metrics.jsonl"):
        rec = json.loads(line)
        for k, v in rec.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                found[(f"{rec['kind']}/{k}", rec["step"])] = v
    return found


def train(tmp_path, out, *extra):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=2)
    return run(["--model", "NEARL-Tiny", "--data", manifest, "--batch-size", 2, "--max-steps", 2,
                "--out", out, *FAST, *extra])


# ----------------------------------------------------------------------------- tensorboard
def tensorboard_scalars(log_dir):
    """What TensorBoard shows: its own reader, which applies the purge steps of restarted writers."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {(tag, e.step): tensor_util.make_ndarray(e.tensor_proto).item()
            for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag)}


def test_tensorboard_holds_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tmp_path, out, "--report-to", "tensorboard")
    expected = expected_scalars(out)
    assert ("train/loss", 2) in expected and ("val/mean_recall", 2) in expected
    assert tensorboard_scalars(out / "tensorboard") == expected  # float64 events: the very values
    # A new run over it (--overwrite, one step at another lr): the earlier events are purged from view.
    train(tmp_path, out, "--report-to", "tensorboard", "--overwrite", "--max-steps", 1, "--lr", 3e-2)
    expected = expected_scalars(out)
    assert ("train/loss", 2) not in expected
    assert tensorboard_scalars(out / "tensorboard") == expected


def test_tensorboard_resume_hides_what_a_stopped_run_logged_past_its_checkpoint(tmp_path):
    """As metrics.jsonl's truncate_after: a resumed writer purges the steps after the checkpoint's."""
    pytest.importorskip("tensorboard")
    first = tracking.TensorBoardTracker(tmp_path)
    for step in (1, 2, 3):
        first.log(step, {"train/loss": float(step)})
    first.close()  # killed after step 3; the checkpoint holds step 1
    resumed = tracking.TensorBoardTracker(tmp_path)
    resumed.truncate_after(1)
    resumed.log(2, {"train/loss": 20.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path) == {("train/loss", 1): 1.0, ("train/loss", 2): 20.0}


# ----------------------------------------------------------------------------- wandb, faked
class FakeWandb(types.ModuleType):
    """Records wandb.init's arguments and the run's log / finish calls."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finishes = [], [], []

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logs.append((dict(data), step))

            def finish(self, exit_code=None):
                fake.finishes.append(exit_code)
        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return fake


def test_wandb_logs_what_metrics_jsonl_holds_offline(tmp_path, fake_wandb):
    out = tmp_path / "my-run"
    train(tmp_path, out, "--report-to", "wandb", "--wandb-project", "proj")
    (init,) = fake_wandb.inits
    assert init["mode"] == "offline" and init["project"] == "proj" and init["name"] == "my-run"
    assert init["dir"] == str(out) and init["config"]["report_to"] == ["wandb"]
    logged = {(tag, step): v for values, step in fake_wandb.logs for tag, v in values.items()}
    assert logged == expected_scalars(out)
    assert fake_wandb.finishes == [0]


def test_wandb_mode_from_the_environment_and_closed_on_error(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(RuntimeError):
        with tracking.open_trackers(["wandb"], tmp_path / "r", main=True) as tracker:
            tracker.log(1, {"train/loss": 1.0})
            raise RuntimeError("boom")
    assert fake_wandb.inits[0]["mode"] == "online"
    assert fake_wandb.logs == [({"train/loss": 1.0}, 1)] and fake_wandb.finishes == [1]
    with tracking.open_trackers(["wandb"], tmp_path / "r", main=False) as tracker:  # another rank: nothing
        tracker.log(1, {"train/loss": 1.0})
    assert len(fake_wandb.inits) == 1


# ----------------------------------------------------------------------------- options and errors
def test_a_missing_package_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"--report-to wandb: .*pip install wandb") as err:
        train(tmp_path, out, "--report-to", "tensorboard,wandb")
    assert "\n" not in str(err.value)
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()


def test_report_to_parsing(capsys):
    parse = lambda *a: T.parse_args(list(a)).report_to
    assert parse() is None
    assert tracking.requested(parse("--report-to", "tensorboard,wandb", "--report-to", "wandb")) == ["tensorboard",
                                                                                                     "wandb"]
    assert parse("--report-to", "none") == []
    with pytest.raises(SystemExit):
        parse("--report-to", "mlflow")
    assert "--report-to" in capsys.readouterr().err


def test_scalars_are_the_record_numbers():
    rec = {"kind": "skipped_images", "step": 3, "set": "training", "source": None, "images": 9, "skipped": 2,
           "reasons": {"truncated": 2}, "ok": True, "nan": float("nan")}
    assert tracking.scalars(rec) == {"skipped_images/images": 9, "skipped_images/skipped": 2,
                                     "skipped_images/reasons/truncated": 2}
