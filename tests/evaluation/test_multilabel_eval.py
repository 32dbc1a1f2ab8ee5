"""--task multilabel end to end (issue 26 item 1): the positive-vs-negative prompt scoring, the per-class
metrics, a NEARL-Tiny train + evaluate writing per-class AUROC to results.json, and nearl.compare."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))

from nearl import compare as CMP  # noqa: E402
from nearl import evaluate as E  # noqa: E402
from nearl.evaluation import metrics as M  # noqa: E402
from nearl.methods import build_method, check_task  # noqa: E402
from nearl.model.classify import TEMPLATES, build_prompts  # noqa: E402
from nearl.model.multilabel import (NEGATIVE_TEMPLATES, MultiLabelClassifier, MultiLabelLoss,  # noqa: E402
                                    multilabel_logits, multilabel_prompt_tokens)
from test_multilabel import FINDINGS, chexpert_csv  # noqa: E402
from train_helpers import _one_thread, FAST, run  # noqa: E402,F401

COLUMN_FLAGS = ["--task", "multilabel", "--label-columns", ",".join(FINDINGS)]


def test_scoring_is_sigmoid_of_scaled_positive_minus_negative_cosine():
    torch.manual_seed(0)
    model = build_method("nearl", "NEARL-Tiny", None, seed=0).eval()
    images = torch.randn(3, 3, *model.tower("vision").image_size)
    with torch.no_grad():
        feats = model.encode_image(images)
        tok = model.tokenizer()
        pos = F.normalize(model.encode_text(tok(build_prompts(FINDINGS, TEMPLATES))).float(), dim=-1)
        neg = F.normalize(model.encode_text(tok(build_prompts(FINDINGS, NEGATIVE_TEMPLATES))).float(), dim=-1)
        pos = F.normalize(pos.reshape(len(FINDINGS), len(TEMPLATES), -1).mean(1), dim=-1)
        neg = F.normalize(neg.reshape(len(FINDINGS), len(NEGATIVE_TEMPLATES), -1).mean(1), dim=-1)
        img = F.normalize(feats.float(), dim=-1)
        scale = model.logit_scale.float()
        expected = torch.sigmoid(scale * (img @ pos.T - img @ neg.T))
        got = torch.sigmoid(multilabel_logits(model, feats, FINDINGS))
        # softmax over (positive, negative) is the same thing
        pair = torch.softmax(torch.stack([scale * img @ pos.T, scale * img @ neg.T]), dim=0)[0]
        # training's module scores the same way
        module = MultiLabelClassifier(model, *multilabel_prompt_tokens(model, FINDINGS), len(FINDINGS))
        trained = torch.sigmoid(module(images).logits)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pair, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained, expected, atol=1e-4, rtol=1e-4)
    loss = MultiLabelLoss(lambda_q=0.0)(module(images), torch.tensor([[1., 0, 0], [0, 1, 1], [0, 0, 0]]))
    assert set(loss) >= {"loss", "binary_cross_entropy"} and torch.isfinite(loss["loss"])


def test_metrics_are_per_class_auroc():
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.0], [-1.0, 0.2], [-2.0, 3.0]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]])
    got = M.multilabel_metrics(logits, targets)
    per = [100 * roc_auc_score(targets[:, c], logits[:, c]) for c in range(2)]
    assert got["macro_auroc"] == pytest.approx(np.mean(per)) and got["auroc_classes"] == 2
    details = M.multilabel_details(logits, targets, ["a", "b"])["per_class"]
    assert [details[c]["auroc"] for c in "ab"] == pytest.approx(per)
    assert details["a"]["positives"] == 2 and details["b"]["f1_at_50"] == pytest.approx(100 * 2 / 2.5)
    one_sided = M.multilabel_metrics(logits, torch.tensor([[1, 0], [1, 1], [1, 0], [1, 1]]))
    assert one_sided["auroc_classes"] == 1  # a class without negatives is left out of the mean


def test_train_then_evaluate_writes_per_class_auroc(tmp_path):
    path = chexpert_csv(tmp_path / "data")
    out = tmp_path / "run"
    summary = run([*COLUMN_FLAGS, "--data", path, "--model", "NEARL-Tiny", "--batch-size", 4, "--max-steps", 2,
                   "--out", out, *FAST])
    assert summary["step"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all("binary_cross_entropy" in r and "query_alignment" in r for r in train)
    assert any(r["kind"] == "val" and "macro_auroc" in r for r in records)
    report = E.main(["--checkpoint", str(out), "--data", str(path), "--split", "val", "--label-columns",
                     ",".join(FINDINGS), "--out", str(tmp_path / "res"), "--workers", "0", "--no-progress",
                     "--device", "cpu"])
    assert report["task"] == "multilabel"
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(saved["per_class"]) == set(FINDINGS)
    for c in FINDINGS:
        assert set(saved["per_class"][c]) >= {"auroc", "average_precision", "f1_at_50", "positives", "negatives"}
    assert "macro_auroc" in saved["metrics"] and "sigmoid" in saved["scoring"]
    assert "per class" in (tmp_path / "res" / "results.md").read_text()


def test_methods_that_cannot_score_multilabel_are_refused():
    for method in ("nearl", "zeroshot", "clip-adapter", "clip-lora", "alta"):
        check_task(method, "multilabel")
    for method in ("coop", "biomedcoop", "linear-probe", "tip-adapter", "tip-adapter-f"):
        with pytest.raises(ValueError, match=r"does not apply to task 'multilabel' \(.+\): it supports"):
            check_task(method, "multilabel")


def test_compare_nearl_and_zeroshot(tmp_path):
    path = chexpert_csv(tmp_path / "data")
    out = tmp_path / "cmp"
    CMP.main(["--methods", "nearl,zeroshot", "--seeds", "0", "--max-steps", "2", "--batch-size", "4",
              "--model", "NEARL-Tiny", "--data", str(path), "--split", "val", "--allow-train-data", *COLUMN_FLAGS,
              "--bench-batch", "2", "--bench-iters", "1", "--out", str(out), *FAST])
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["task"] == "multilabel" and saved["main_metric"] == "macro_auroc"
    assert saved["shown"][0] == "macro_auroc" and "label_ece" in saved["shown"]  # calibration beside AUROC
    assert "label_ece (↓)" in (out / "comparison.md").read_text()
    assert list(saved["methods"]) == ["nearl", "zeroshot"]
    for v in saved["methods"].values():
        assert "macro_auroc" in v["metrics"] and "label_ece" in v["metrics"]
        run_results = v["runs"][0]["results"]["test"]
        assert "macro_auroc" in run_results
        assert set(run_results["details"]["per_class"]) == set(FINDINGS)  # per-class AUROC, AP, F1
        assert "auroc" in run_results["details"]["per_class"][FINDINGS[0]]
