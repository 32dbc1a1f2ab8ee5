"""issue 26 item 1, multi-label with the clinical metrics: the calibration error of every (image, class)
probability (label_ece) with its reliability bins, per-class 2x2 confusion counts, sensitivity and specificity
at 0.5, bootstrap intervals (the headline metrics and per-class AUROC) in nearl.evaluate's results.json and
results.md (with confusion_matrix.png and reliability.png), U-ones recorded, and label_ece in nearl.compare."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import multilabel_confusion_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

from nearl import evaluate as E  # noqa: E402
from nearl.evaluation import metric_table as MT  # noqa: E402
from nearl.evaluation import metrics as M  # noqa: E402
from test_multilabel import FINDINGS, chexpert_csv  # noqa: E402
from train_helpers import _one_thread, FAST  # noqa: E402,F401

# Three images, two classes; logits = log(p / (1 - p)), so sigmoid(logit) is exactly p.
PROBS = [[0.90, 0.25], [0.65, 0.10], [0.93, 0.12]]
TARGETS = [[1, 0], [0, 0], [1, 1]]
HEADLINE = ("macro_auroc", "macro_ap", "macro_f1_at_50", "label_ece")


def _logits(probs):
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.log(p / (1 - p))


def test_label_ece_by_hand():
    got = M.multilabel_metrics(_logits(PROBS), torch.tensor(TARGETS))
    # 15 bins of (lo, hi]: 0.90 and 0.93 share (0.867, 0.933], 0.10 and 0.12 share (0.067, 0.133]; 0.25 and
    # 0.65 are alone. ECE = sum over bins |sum(target - p)| / 6 pairs.
    by_hand = (abs(2 - 1.83) + abs(1 - 0.22) + 0.25 + 0.65) / 6
    assert got["label_ece"] == pytest.approx(100 * by_hand)
    bins = M.multilabel_details(_logits(PROBS), torch.tensor(TARGETS), ["a", "b"])["reliability"]
    assert sum(bins["count"]) == 6 and bins["count"][13] == 2 and bins["fraction_correct"][13] == 100.0
    assert bins["mean_confidence"][1] == pytest.approx(100 * 0.11)


def test_confusion_counts_sensitivity_and_specificity_equal_sklearn():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(40, 4, generator=g), (torch.rand(40, 4, generator=g) < 0.4).int()
    details = M.multilabel_details(logits, targets, list("abcd"))
    reference = multilabel_confusion_matrix(targets.numpy(), (torch.sigmoid(logits) >= 0.5).int().numpy())
    for c, name in enumerate("abcd"):
        (tn, fp), (fn, tp) = reference[c]
        assert details["confusion_matrix"]["counts"][name] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
        assert details["per_class"][name]["sensitivity"] == pytest.approx(100 * tp / (tp + fn))
        assert details["per_class"][name]["specificity"] == pytest.approx(100 * tn / (tn + fp))


def test_bootstrap_scores_equal_the_metrics_of_resampled_rows():
    rng = np.random.default_rng(1)
    logits = torch.tensor(np.round(rng.normal(size=(30, 4)), 1))  # rounded: tied scores too
    targets = torch.tensor((rng.random((30, 4)) < 0.4).astype(int))
    y, probs, _ = M._multilabel_inputs(logits, targets)
    draws = rng.integers(0, 30, size=(6, 30))
    got = M.multilabel_bootstrap_scores(M.resample_weights(draws, 30), y, probs)
    for b, rows in enumerate(draws):
        expected = M.multilabel_metrics(logits[rows], targets[rows])
        details = M.multilabel_details(logits[rows], targets[rows], list("abcd"))["per_class"]
        for name in HEADLINE:
            assert got[name][b] == pytest.approx(expected[name], abs=1e-9), name
        per_class = [details[c]["auroc"] for c in "abcd"]
        np.testing.assert_allclose(got["per_class_auroc"][b], per_class, atol=1e-9)


def test_evaluate_writes_the_clinical_report(tmp_path):
    path = chexpert_csv(tmp_path / "data")
    out = tmp_path / "res"
    argv = ["--task", "multilabel", "--model", "NEARL-Tiny", "--data", str(path), "--split", "val",
            "--label-columns", ",".join(FINDINGS), "--bootstrap", "50", "--out", str(out), *FAST]
    report = E.main([*argv, "--uncertain-labels", "ones"])
    saved = json.loads((out / "results.json").read_text())
    assert set(MT.names("multilabel")) == set(HEADLINE)
    for name in HEADLINE:  # finite, and inside its interval
        low, high = saved["ci95"][name]
        assert math.isfinite(saved["metrics"][name]) and low <= saved["metrics"][name] <= high, name
    assert saved["bootstrap"]["resamples"] == 50 and saved["ece_bins"] == MT.ECE_BINS
    for name in FINDINGS:
        c = saved["per_class"][name]
        low, high = c["auroc_ci95"]
        assert low <= c["auroc"] <= high and math.isfinite(c["sensitivity"]) and math.isfinite(c["specificity"])
        assert set(saved["confusion_matrix"]["counts"][name]) == {"tn", "fp", "fn", "tp"}
        assert sum(saved["confusion_matrix"]["counts"][name].values()) == saved["metrics"]["n_images"]
    assert "flattened per-class probabilities" in saved["calibration"] and "0/1 targets" in saved["calibration"]
    assert saved["uncertain"].startswith("U-ones") and sum(saved["reliability"]["count"]) == 6 * len(FINDINGS)
    assert all((out / name).stat().st_size > 0 for name in ("confusion_matrix.png", "reliability.png"))
    md = (out / "results.md").read_text()
    assert "label_ece" in md and "95% CI" in md and "confusion counts per class" in md and "U-ones" in md
    # the same seed, the same intervals; the default reads -1 as a negative
    zeros = E.main(argv)
    assert zeros["uncertain"].startswith("U-zeros") and report["ci95"] == E.main([*argv, "--uncertain", "ones"])["ci95"]
    assert zeros["per_class"]["Edema"]["positives"] < report["per_class"]["Edema"]["positives"]


def test_compare_shows_label_ece_beside_macro_auroc():
    from nearl.comparison import report as CR

    assert CR.SHOWN["multilabel"][:1] == ("macro_auroc",) and "label_ece" in CR.SHOWN["multilabel"]
    assert CR.column("label_ece") == "label_ece (↓)" and MT.better("label_ece", 3.0, 4.0)


def test_the_run_records_its_uncertain_rule(tmp_path, capsys):
    from nearl.store.checkpoint import load_checkpoint
    from train_helpers import run

    path = chexpert_csv(tmp_path / "data")
    columns = ["--label-columns", ",".join(FINDINGS)]
    run(["--task", "multilabel", *columns, "--uncertain-labels", "ones", "--data", path, "--model", "NEARL-Tiny",
         "--batch-size", 4, "--max-steps", 1, "--eval-every", 0, "--out", tmp_path / "run", *FAST])
    assert load_checkpoint(tmp_path / "run")["args"]["uncertain_labels"] == "ones"
    capsys.readouterr()
    argv = ["--checkpoint", str(tmp_path / "run"), "--data", str(path), "--split", "val", *columns, "--bootstrap", "0",
            *FAST]
    report = E.main(argv)  # not given: the run's rule
    assert report["uncertain"].startswith("U-ones") and "ci95" not in report
    assert "was trained with" not in capsys.readouterr().out
    report = E.main([*argv, "--uncertain-labels", "zeros"])  # given and different: said
    assert report["uncertain"].startswith("U-zeros")
    assert "was trained with --uncertain-labels ones" in capsys.readouterr().out
