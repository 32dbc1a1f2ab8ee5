"""Quiet, useful progress (issue 26 item 6): one bar for a run, and a run of many short epochs (few-shot)
validates and saves about 20 times, not once a step."""
from __future__ import annotations

import json

from nearl.training import loop
from train_helpers import _one_thread, make_image_folder, run  # noqa: F401  (_one_thread: autouse)

FEW_SHOT = ["--task", "classification", "--model", "NEARL-Tiny", "--batch-size", 6, "--warmup", 1, "--workers", 0,
            "--device", "cpu"]


def val_steps(out):
    return [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "val"]


def test_many_one_step_epochs_validate_about_twenty_times(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))  # 6 images, batch 6: one step an epoch
    saves = []
    real_save = loop.GradientRun.save
    monkeypatch.setattr(loop.GradientRun, "save", lambda self, *a, **k: (saves.append(self.step), real_save(self, *a, **k))[1])
    run(["--data", data, "--max-steps", 40, "--no-progress", "--out", tmp_path / "auto", *FEW_SHOT])
    assert val_steps(tmp_path / "auto") == list(range(2, 41, 2))  # every ceil(40 / 20) = 2 epochs, 20 in all
    assert [s for s in saves if s % 2] == []  # last.pt as often (never at an odd step)
    run(["--data", data, "--max-steps", 6, "--eval-every", 1, "--no-progress", "--out", tmp_path / "given", *FEW_SHOT])
    assert val_steps(tmp_path / "given") == [1, 2, 3, 4, 5, 6]  # --eval-every as given


def test_a_run_shows_one_bar_and_its_validation_none(tmp_path, monkeypatch):
    from nearl.evaluation import run as EV

    made = []

    class Spy(loop.tqdm):
        def __init__(self, *a, **k):
            if not k.get("disable"):
                made.append(k.get("desc"))
            super().__init__(*a, **k)

    monkeypatch.setattr(loop, "tqdm", Spy)
    monkeypatch.setattr(EV, "tqdm", Spy)
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    run(["--data", data, "--max-steps", 4, "--eval-every", 1, "--out", tmp_path / "run", *FEW_SHOT])
    assert made == ["training"]  # shown: not one bar an epoch plus one a validation
