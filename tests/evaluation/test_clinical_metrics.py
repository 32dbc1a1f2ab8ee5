"""issue 26 item 3, clinical metrics: balanced accuracy, macro sensitivity and specificity (one-vs-rest at the
predicted class), the expected calibration error, per class AUROC / sensitivity / specificity / support, the
confusion matrix and the reliability bins, bootstrap 95% intervals, all in nearl.evaluate's results.json
(with confusion_matrix.png and reliability.png), and nearl.train --monitor choosing best.pt in the
metric's direction."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score)

from nearl import evaluate as E
from nearl.errors import UserError, run_cli
from nearl.evaluation import metric_table as MT
from nearl.evaluation import metrics as M
from train_helpers import _one_thread, FAST, make_image_folder, one_error_line, run  # noqa: F401

# Six images of three classes; each row's softmax is exactly the probabilities written (logits = log p).
LABELS = [0, 0, 0, 1, 1, 2]
PROBS = [[0.90, 0.05, 0.05],  # right, confidence 0.90
         [0.62, 0.28, 0.10],  # right, 0.62
         [0.28, 0.62, 0.10],  # wrong (says 1), 0.62
         [0.08, 0.82, 0.10],  # right, 0.82
         [0.10, 0.28, 0.62],  # wrong (says 2), 0.62
         [0.05, 0.05, 0.90]]  # right, 0.90
CLASSES = ["effusion", "normal", "pneumonia"]
# Worked by hand. Predictions 0 0 1 1 2 2 against 0 0 0 1 1 2:
#   class 0: tp 2, fn 1, fp 0, tn 3 -> sensitivity 2/3, specificity 3/3
#   class 1: tp 1, fn 1, fp 1, tn 3 -> 1/2, 3/4
#   class 2: tp 1, fn 0, fp 1, tn 4 -> 1/1, 4/5
#   balanced accuracy = macro sensitivity = (2/3 + 1/2 + 1) / 3; macro specificity = (1 + 3/4 + 4/5) / 3
# ECE, 15 bins of width 1/15: 0.62 -> (0.600, 0.667]: 3 rows, 1 right: |1/3 - 0.62| * 3/6
#   0.82 -> (0.800, 0.867]: 1 row right: |1 - 0.82| * 1/6;  0.90 -> (0.867, 0.933]: 2 right: |1 - 0.9| * 2/6
# AUROC: class 0 and 2 positives all score above the negatives (1.0); class 1 positives 0.82 (above all 4
#   negatives) and 0.28 (above two 0.05, tied with one 0.28: 2.5) -> 6.5 / 8
HAND = {"accuracy": 400 / 6, "balanced_accuracy": 100 * (2 / 3 + 1 / 2 + 1) / 3,
        "macro_sensitivity": 100 * (2 / 3 + 1 / 2 + 1) / 3, "macro_specificity": 100 * (1 + 3 / 4 + 4 / 5) / 3,
        "ece": 100 * (abs(1 / 3 - 0.62) * 3 / 6 + 0.18 / 6 + 0.1 * 2 / 6), "macro_auc": 100 * (1 + 6.5 / 8 + 1) / 3,
        "macro_f1": 100 * (0.8 + 0.5 + 2 / 3) / 3}
PER_CLASS = {"effusion": (100.0, 200 / 3, 100.0, 3), "normal": (81.25, 50.0, 75.0, 2), "pneumonia": (100.0, 100.0, 80.0, 1)}


def example():
    return torch.tensor(PROBS, dtype=torch.float64).log(), torch.tensor(LABELS)


def test_the_new_metrics_on_a_hand_worked_example_and_against_scikit_learn():
    logits, labels = example()
    got = M.classification_metrics(logits, labels)
    for k, v in HAND.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    y, pred = np.array(LABELS), np.array(PROBS).argmax(1)
    assert got["balanced_accuracy"] == pytest.approx(100 * balanced_accuracy_score(y, pred))
    assert got["macro_sensitivity"] == pytest.approx(100 * recall_score(y, pred, average="macro"))
    assert got["macro_f1"] == pytest.approx(100 * f1_score(y, pred, average="macro"))
    # specificity of class k is the recall of "not k" one-vs-rest
    spec = [recall_score(y != k, pred != k) for k in range(3)]
    assert got["macro_specificity"] == pytest.approx(100 * np.mean(spec))


def test_per_class_results_the_confusion_matrix_and_the_reliability_bins():
    logits, labels = example()
    details = M.classification_details(logits, labels, CLASSES)
    for name, (auroc, sens, spec, support) in PER_CLASS.items():
        c = details["per_class"][name]
        assert (c["auroc"], c["sensitivity"], c["specificity"], c["support"]) == pytest.approx(
            (auroc, sens, spec, support)), name
    y, p = np.array(LABELS), np.array(PROBS)
    assert [details["per_class"][n]["auroc"] for n in CLASSES] == pytest.approx(
        100 * roc_auc_score(np.eye(3)[y], p, average=None))
    matrix = details["confusion_matrix"]
    assert matrix["classes"] == CLASSES and matrix["counts"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert matrix["counts"] == confusion_matrix(y, p.argmax(1)).tolist() and "no_prediction" not in matrix
    bins = details["reliability"]
    assert bins["bins"] == MT.ECE_BINS == 15 and len(bins["edges"]) == 16 and sum(bins["count"]) == 6
    assert bins["count"][9] == 3 and bins["count"][12] == 1 and bins["count"][13] == 2
    filled = [i for i, c in enumerate(bins["count"]) if c]
    frac, conf = calibration_curve(p.argmax(1) == y, p.max(1), n_bins=15)  # scikit-learn's binning
    assert [bins["fraction_correct"][i] / 100 for i in filled] == pytest.approx(frac)
    assert [bins["mean_confidence"][i] / 100 for i in filled] == pytest.approx(conf)
    assert all(bins["fraction_correct"][i] is None for i in range(15) if i not in filled)


def test_a_nonfinite_row_is_a_missed_prediction_made_with_full_confidence(caplog):
    logits, labels = example()
    logits[1] = float("nan")  # was right, confidence 0.62
    with caplog.at_level(logging.WARNING):
        got = M.classification_metrics(logits, labels)
        details = M.classification_details(logits, labels, CLASSES)
    assert got["macro_sensitivity"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1) / 3) == got["balanced_accuracy"]
    assert details["confusion_matrix"]["counts"][0] == [1, 1, 0]
    assert details["confusion_matrix"]["no_prediction"] == [1, 0, 0]
    assert details["per_class"]["effusion"]["sensitivity"] == pytest.approx(100 / 3)
    # bins: 0.62 holds two wrong rows now, and the NaN row sits at confidence 1 (bin 14), wrong
    ece = 100 * (0.62 * 2 / 6 + 0.18 / 6 + 0.1 * 2 / 6 + 1.0 / 6)
    assert got["ece"] == pytest.approx(ece)


def test_a_single_class_leaves_the_auc_and_the_specificity_undefined():
    got = M.classification_metrics(torch.tensor([[2.0, 0.0], [1.0, 0.5]]), torch.tensor([0, 0]))
    assert np.isnan(got["macro_auc"]) and np.isnan(got["macro_specificity"])
    assert got["balanced_accuracy"] == got["macro_sensitivity"] == 100.0


def random_example(n=120, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    logits = torch.randn(n, n_classes, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, n_classes)
    logits[5] = float("nan")
    logits[10:14] = logits[9]  # tied scores
    return logits, labels


def test_the_vectorised_resamples_score_as_scikit_learn_scores_the_resampled_rows(caplog):
    logits, labels = random_example()
    y, probs, pred, bad = M._classification_inputs(logits, labels)
    draws = np.random.default_rng(3).integers(0, len(y), size=(25, len(y)))
    draws[0, :] = draws[0, 0]  # a single image drawn: one class, AUC and specificity undefined
    scores = M.bootstrap_scores(M.resample_weights(draws, len(y)), y, probs, pred, bad)
    assert set(scores) == set(MT.names("classification"))
    with caplog.at_level(logging.ERROR):
        for b, rows in enumerate(draws):
            ref = M.classification_metrics(logits[rows], labels[rows])
            for k, v in scores.items():
                assert v[b] == pytest.approx(ref[k], abs=1e-9, nan_ok=True), (b, k)


def test_the_bootstrap_intervals_are_seeded_and_hold_the_point_estimate():
    logits, labels = random_example(n=200)
    point = M.classification_metrics(logits, labels)
    ci = M.bootstrap_ci(logits, labels, resamples=400, seed=7)
    assert ci == M.bootstrap_ci(logits, labels, resamples=400, seed=7)
    assert ci != M.bootstrap_ci(logits, labels, resamples=400, seed=8)
    assert set(ci) == set(MT.names("classification"))
    for k, (low, high) in ci.items():
        assert low <= point[k] <= high, k
        assert high - low > 0.5, k  # 200 images: an interval, not a point


def test_the_table_says_which_way_is_better():
    assert not MT.metric("ece").higher_is_better and MT.lower_is_better("ece")
    assert all(m.higher_is_better for m in MT.METRICS if m.name not in ("ece", "label_ece"))
    assert MT.better("ece", 3.0, 4.0) and not MT.better("ece", 5.0, 4.0) and MT.better("ece", 5.0, None)
    assert MT.better("accuracy", 5.0, 4.0) and not MT.better("accuracy", 4.0, 4.0)
    assert MT.chance_level("balanced_accuracy", 4) == 25.0 and MT.chance_level("macro_specificity", 4) == 75.0
    assert MT.chance_level("ece", 4) is None


# ----------------------------------------------------------------------------- nearl.evaluate
def test_evaluate_writes_the_per_class_block_the_intervals_and_the_figures(tmp_path, capsys):
    root = make_image_folder(tmp_path / "folder", per_class=(0, 3))
    common = ["--model", "NEARL-Tiny", "--task", "classification", "--data", str(root), "--split", "val",
              "--workers", "0", "--no-progress", "--bootstrap", "200", "--seed", "3"]
    report = E.main([*common, "--out", str(tmp_path / "res")])
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    classes = ["blue", "green", "red"]
    assert set(saved["per_class"]) == set(classes)
    assert all(set(c) == {"auroc", "sensitivity", "specificity", "support"} and c["support"] == 3
               for c in saved["per_class"].values())
    matrix = saved["confusion_matrix"]
    assert matrix["classes"] == classes and (matrix["rows"], matrix["columns"]) == ("true class", "predicted class")
    assert [sum(r) for r in matrix["counts"]] == [3, 3, 3]
    assert saved["metrics"]["accuracy"] == pytest.approx(100 * sum(matrix["counts"][i][i] for i in range(3)) / 9)
    assert set(saved["ci95"]) == set(MT.names("classification"))
    assert saved["bootstrap"] == {"resamples": 200, "seed": 3, "level": 95,
                                  "method": "percentile; the images resampled with replacement"}
    low, high = saved["ci95"]["ece"]
    assert low <= saved["metrics"]["ece"] <= high
    assert "argmax" in saved["threshold"] and saved["reliability"]["bins"] == 15
    for name in ("confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "res" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert saved["figures"][name[:-4]] == str(tmp_path / "res" / name)
    md = (tmp_path / "res" / "results.md").read_text()
    assert "| 95% CI |" in md and "### per class" in md and "### confusion matrix" in md and "argmax" in md
    assert f"and {tmp_path / 'res' / 'reliability.png'}" in capsys.readouterr().out
    assert E.main(common)["ci95"] == report["ci95"]  # the same seed, the same intervals
    bare = E.main([*common[:-4], "--bootstrap", "0"])
    assert "ci95" not in bare and "per_class" in bare


# ----------------------------------------------------------------------------- nearl.train --monitor
def test_monitor_refuses_a_metric_not_of_the_task(tmp_path, capsys):
    from nearl import train as TR
    from nearl.training.config import TrainConfig

    with pytest.raises(UserError, match="--monitor bogus: not a classification metric; choose one of accuracy, "):
        TrainConfig(task="classification", monitor="bogus")
    with pytest.raises(UserError, match="--monitor ece: not a retrieval metric; choose one of mean_recall, "):
        TrainConfig(task="retrieval", monitor="ece")
    assert TrainConfig(task="classification").monitored() == "accuracy"
    assert run_cli(TR.main, ["--task", "classification", "--monitor", "recall", "--out", str(tmp_path / "r")],
                   prog="nearl.train") == 2
    line = one_error_line(capsys, "nearl.train")
    assert "--monitor recall" in line and "macro_specificity, ece" in line
    assert not (tmp_path / "r").exists()


def test_monitor_chooses_best_pt_by_a_lower_is_better_metric(tmp_path):
    from nearl.store.checkpoint import load_checkpoint

    root = make_image_folder(tmp_path / "folder", per_class=(4, 3))
    out = tmp_path / "run"
    run(["--task", "classification", "--model", "NEARL-Tiny", "--data", root, "--batch-size", 4, "--epochs", 4,
         "--lr", 3e-2, "--monitor", "ece", "--out", out, *FAST])
    val = [json.loads(l) for l in open(out / "metrics.jsonl") if '"val"' in l]
    eces = [r["ece"] for r in val]
    assert len(val) >= 3 and len(set(eces)) > 1 and all(r["score"] == r["ece"] for r in val)
    best = load_checkpoint(out / "best.pt")
    first_lowest = val[eces.index(min(eces))]
    assert best["args"]["monitor"] == "ece" and best["best"] == pytest.approx(min(eces))
    assert best["step"] == first_lowest["step"]


def test_a_resume_with_another_monitor_lets_the_next_validation_take_best_pt(tmp_path, capsys):
    from nearl.store.checkpoint import load_checkpoint

    root = make_image_folder(tmp_path / "folder", per_class=(4, 2))
    out = tmp_path / "run"
    common = ["--task", "classification", "--model", "NEARL-Tiny", "--data", root, "--batch-size", 4, "--lr", 3e-2,
              "--out", out, *FAST]
    run([*common, "--epochs", 1])
    assert load_checkpoint(out / "best.pt")["args"]["monitor"] is None  # the main metric, accuracy
    capsys.readouterr()
    run(["--resume", out, "--epochs", 2, "--monitor", "ece", *FAST])
    printed = capsys.readouterr().out
    assert "resume: best.pt was chosen by accuracy; from now on by ece (--monitor)" in printed
    assert "new best ece " in printed
    val = [json.loads(l) for l in open(out / "metrics.jsonl") if '"val"' in l]
    best = load_checkpoint(out / "best.pt")
    assert best["args"]["monitor"] == "ece" and best["step"] == val[-1]["step"]
    assert best["best"] == pytest.approx(val[-1]["ece"])
