"""Multi-label evaluation (--task multilabel): per-class AUROC (the main metric is their macro mean), average
precision, F1, sensitivity and specificity at probability 0.5 and the calibration error of the positive-vs-
negative prompt scoring (nearl/model/multilabel.py), with bootstrap intervals; results.json's per-class block,
results.md's notes and tables, and the figures `--out` writes (confusion_matrix.png: a 2x2 matrix per class;
reliability.png). The shared pieces (intervals, the report block, the reliability plot) are class_report's."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from nearl.data.multilabel import UNCERTAIN_RULES, MultiLabelDataset
from nearl.evaluation import class_report as CR, metrics as M
from nearl.evaluation.run import scored_images
from nearl.logging_utils import json_safe, markdown_table
from nearl.model.classify import TEMPLATES
from nearl.model.multilabel import SCORING, multilabel_logits
from nearl.training.plots import save_figure

CALIBRATION = ("label_ece: the expected calibration error over the flattened per-class probabilities (every "
               "image and class) against their 0/1 targets; reliability's fraction_correct is the fraction of "
               "positive targets in a bin")


def evaluate_multilabel(model, records: Sequence, classnames: Sequence[str], *, templates: Sequence[str] = TEMPLATES,
                        device, batch_size: int = 64, workers: int = 0, precision: str = "fp32",
                        progress: bool = True, source: Optional[str] = None, details: bool = False,
                        bootstrap: int = 0, seed: int = 0, uncertain: str = "zeros") -> Dict[str, Any]:
    """metrics.multilabel_metrics of the per-class logits z_c (macro_auroc, macro_ap, macro_f1_at_50,
    label_ece), with "details" (results.json's per-class block, confusion counts, reliability bins, the rules
    stated: the scoring, the threshold, `uncertain`'s reading of -1 cells) when asked and, with `bootstrap`
    resamples drawn from `seed`, "ci95" (metrics.multilabel_bootstrap_ci; per class in "per_class")."""
    ds = MultiLabelDataset(records, model.image_transform(False))
    kept, targets, logits = scored_images(
        model, ds, lambda feats: multilabel_logits(model, feats, classnames, templates, device=device),
        device=device, batch_size=batch_size, workers=workers, precision=precision, progress=progress, source=source)
    out: Dict[str, Any] = M.multilabel_metrics(logits, targets)
    out["n_images"], out["n_skipped"], out["n_classes"] = int(kept.numel()), ds.bad_count, len(classnames)
    if details:
        out["details"] = {**M.multilabel_details(logits, targets, classnames), "scoring": SCORING,
                          "uncertain": UNCERTAIN_RULES[uncertain], "calibration": CALIBRATION}
        if bootstrap:
            ci95 = M.multilabel_bootstrap_ci(logits, targets, resamples=bootstrap, seed=seed)
            for name, interval in zip(out["details"]["per_class"].values(), ci95.pop("per_class_auroc")):
                name["auroc_ci95"] = interval
            out["details"]["ci95"] = ci95
    return out


def report_block(details: Dict[str, Any], resamples: int, seed: int) -> Dict[str, Any]:
    """The keys results.json holds beside "metrics" (class_report.report_block's, at probability 0.5)."""
    return CR.report_block(details, resamples, seed, threshold=M.MULTILABEL_THRESHOLD)


def markdown(report: Dict[str, Any]) -> str:
    """The notes, the per-class table and the per-class confusion counts after the results table."""
    def shown(c):
        ci = f" {CR.interval_text(c['auroc_ci95'])}" if "auroc_ci95" in c else ""
        return f"{c['auroc']:.2f}{ci}" if not math.isnan(c["auroc"]) else "n/a"
    rows = {name: {"AUROC": shown(c), "AP": json_safe(c["average_precision"]), "F1@0.5": json_safe(c["f1_at_50"]),
                   "sensitivity": json_safe(c["sensitivity"]), "specificity": json_safe(c["specificity"]),
                   "positives": c["positives"], "negatives": c["negatives"]}
            for name, c in report["per_class"].items()}
    notes = [f"Scoring: {report['scoring']}. F1, sensitivity, specificity and the confusion counts: "
             f"{report['threshold']}. Uncertain labels: {report['uncertain']}.",
             f"Calibration ({report['ece_bins']} equal-width bins; lower is better): {report['calibration']}.",
             *CR.bootstrap_note(report)]
    counts = report["confusion_matrix"]["counts"]
    return "\n".join([*notes, "", markdown_table(rows, title="per class"),
                      markdown_table(counts, title="confusion counts per class at probability 0.5")])


def write_figures(report: Dict[str, Any], out: Path, label: str) -> Dict[str, str]:
    """confusion_matrix.png (a 2x2 matrix per class) and reliability.png in `out`; {figure: its path}."""
    confusion_grid_png(report["confusion_matrix"], out / CR.FIGURES["confusion_matrix"], title=label)
    CR.reliability_png(report["reliability"], out / CR.FIGURES["reliability"], report["metrics"]["label_ece"],
                       title=label, confidence="per-class probability", outcome="fraction positive")
    return {k: str(out / name) for k, name in CR.FIGURES.items()}


def confusion_grid_png(matrix: Dict[str, Any], path: Path, title: str = "", per_row: int = 5) -> Path:
    """Each class's 2x2 counts at probability 0.5 (rows: true absent / present, columns: called absent /
    present) as a small heat map with its counts written in, `per_row` classes a row."""
    plt = CR._pyplot()
    classes = matrix["classes"]
    cols = min(per_row, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, classes):
        c = matrix["counts"][name]
        cells = [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
        top = max(max(r) for r in cells)
        ax.imshow(cells, cmap="Blues", vmin=0, vmax=max(top, 1))
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(cells[i][j]), ha="center", va="center", fontsize=9,
                        color="white" if top and cells[i][j] > top / 2 else "black")
        ax.set_xticks([0, 1], ["absent", "present"], fontsize=7)
        ax.set_yticks([0, 1], ["absent", "present"], fontsize=7)
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel("called (p >= 0.5)", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.suptitle(title or "confusion counts per class", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
