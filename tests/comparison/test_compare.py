"""python -m nearl.compare end to end on the embedded demo set: 2 seeds, 3 methods, 2 steps."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nearl import compare as CMP
from nearl.comparison import run as CMPL
from nearl import evaluate as E
from nearl.store.checkpoint import load_checkpoint
from nearl.errors import UserError
from train_helpers import _one_thread

FAST = ["--workers", "0", "--no-progress", "--device", "cpu"]


def test_compare_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEARL_DEMO_DIR", str(tmp_path / "demo"))
    out = tmp_path / "cmp"
    report = CMP.main(["--methods", "nearl,clip-adapter,zeroshot", "--seeds", "0,1", "--max-steps", "2",
                       "--batch-size", "8", "--bench-batch", "4", "--bench-iters", "2", "--method-args", "clip-adapter=--alpha 0.3",
                       "--out", str(out), *FAST])
    text = capsys.readouterr().out
    for i, (m, s) in enumerate([(m, s) for m in ("nearl", "clip-adapter", "zeroshot") for s in (0, 1)], 1):
        assert f"=== [{i}/6] method {m}, seed {s}" in text  # progress per method and seed

    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (out / name).is_file(), name
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["task"] == "classification" and saved["split"] == "test" and saved["main_metric"] == "accuracy"
    assert list(saved["methods"]) == ["nearl", "clip-adapter", "zeroshot"]
    assert saved["config"]["seeds"] == [0, 1] and saved["config"]["max_steps"] == 2
    params = {m: v["learnable_parameters"] for m, v in saved["methods"].items()}
    assert params == {"nearl": 160_900, "clip-adapter": 1_024, "zeroshot": 0}  # NEARL-Tiny
    for m, v in saved["methods"].items():
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        assert [r["steps"] for r in v["runs"]] == ([0, 0] if m == "zeroshot" else [2, 2])
        for key in ("accuracy", "macro_f1", "macro_auc"):
            stat = v["metrics"][key]
            vals = [r["metrics"][key] for r in v["runs"]]
            assert stat["values"] == vals and stat["n"] == 2
            assert stat["mean"] == pytest.approx(np.mean(vals))
            assert stat["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-9)
        assert v["inference_images_per_s"] > 0
        assert (v["time_per_step_s"]["mean"] is None) == (m == "zeroshot")
        assert v["peak_memory_mb"]["mean"] is None  # CPU: not measured, said so
    assert saved["methods"]["nearl"]["time_per_step_s"]["mean"] > 0
    assert saved["peak_rss_mb"] > 0 and "n/a on CPU" in saved["peak_memory_kind"]

    # The numbers are the evaluation of each run's checkpoint: zeroshot's equal a plain zero-shot evaluation.
    for seed, run in zip((0, 1), saved["methods"]["zeroshot"]["runs"]):
        ref = E.main(["--method", "zeroshot", "--model", "NEARL-Tiny", "--task", "classification", "--seed",
                      str(seed), "--split", "test", "--batch-size", "8", *FAST])
        assert run["metrics"]["accuracy"] == pytest.approx(ref["metrics"]["accuracy"])
        assert run["metrics"]["macro_auc"] == pytest.approx(ref["metrics"]["macro_auc"])

    md = (out / "comparison.md").read_text()
    assert "only show that the pipeline runs" in md and "RANDOM" in md and "demo set" in md
    # issue 26 item 3: balanced accuracy and the calibration error (lower is better: marked) joined the columns
    assert ("| method | accuracy | macro_f1 | macro_auc | balanced_accuracy | ece (↓) | learnable params | "
            "s / train step |") in md
    nearl_row = next(l for l in md.splitlines() if l.startswith("| nearl |"))
    acc = saved["methods"]["nearl"]["metrics"]["accuracy"]
    assert f"{acc['mean']:.2f} ± {acc['std']:.2f}" in nearl_row and "160,900" in nearl_row
    assert "n/a (CPU)" in nearl_row
    assert "n/a (no training)" in next(l for l in md.splitlines() if l.startswith("| zeroshot |"))
    assert report["methods"]["nearl"]["learnable_parameters"] == 160_900
    ckpt = load_checkpoint(out / "clip-adapter" / "seed1")  # flat: <out>/<method>/seed<s>
    assert ckpt["method"] == "clip-adapter" and ckpt["config"]["alpha"] == 0.3  # --method-args reached it
    assert ckpt["backbone_seed"] == 1 and ckpt["step"] == 2


def test_compare_refuses_methods_outside_the_task(tmp_path):
    with pytest.raises(ValueError, match="coop, linear-probe do not apply to task 'retrieval'"):
        CMP.main(["--task", "retrieval", "--methods", "nearl,coop,linear-probe", "--out", str(tmp_path), *FAST])
    assert list(tmp_path.iterdir()) == []  # refused before any run
    assert CMPL._methods(CMPL.parse_config(["--task", "retrieval"])) == [
        "nearl", "alta", "clip-adapter", "zeroshot", "clip-lora"]


def test_mean_std_and_step_time(tmp_path):
    s = CMPL.mean_std([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert CMPL.mean_std([3.0])["std"] is None and CMPL.mean_std([None])["mean"] is None
    log = tmp_path / "metrics.jsonl"
    recs = [{"kind": "train", "step": i + 1, "samples": 8, "samples_per_s": 8 / t} for i, t in enumerate([9.0, 1.0, 3.0, 2.0])]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs + [{"kind": "val", "step": 4}]))
    assert CMPL.step_time(log) == pytest.approx(2.0)  # median of 1, 3, 2: the first (warm-up) step left out


def test_a_second_comparison_in_the_same_folder_needs_overwrite(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARL_DEMO_DIR", str(tmp_path / "demo"))
    argv = ["--methods", "clip-adapter", "--seeds", "0", "--max-steps", "1", "--batch-size", "8",
            "--bench-batch", "2", "--bench-iters", "1", "--out", str(tmp_path / "cmp"), *FAST]
    CMP.main(argv)
    with pytest.raises(UserError, match=r"seed0 already hold runs of an earlier comparison; pass --overwrite"):
        CMP.main(argv)
    report = CMP.main([*argv, "--overwrite"])
    assert [r["steps"] for r in report["methods"]["clip-adapter"]["runs"]] == [1]
