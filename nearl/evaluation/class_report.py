"""The classification part of `nearl.evaluate`'s report: what results.json holds beyond the scalar
metrics (per class, the confusion matrix, the reliability bins, the bootstrap intervals), its Markdown
(results.md and the terminal), and the figures `--out` writes beside results.json: the confusion
matrix (confusion_matrix.png) and the reliability diagram (reliability.png), matplotlib Agg, atomic
writes through nearl.training.plots.save_figure."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from nearl.evaluation.metric_table import ECE_BINS, lower_is_better
from nearl.evaluation.metrics import THRESHOLD
from nearl.logging_utils import json_safe, markdown_table
from nearl.training.plots import save_figure

FIGURES = {"confusion_matrix": "confusion_matrix.png", "reliability": "reliability.png"}
CI_LEVEL = 95  # the bootstrap intervals' level, in percent (results.json's "ci95")
MATRIX_TABLE_MAX = 20  # classes up to which results.md shows the confusion matrix as a table


def report_block(details: Dict[str, Any], resamples: int, seed: int, threshold: str = THRESHOLD) -> Dict[str, Any]:
    """The keys results.json holds beside "metrics", from evaluate_classification's (or evaluate_multilabel's)
    "details": the decision rule stated (`threshold`), the bootstrap's settings and intervals, per class, the
    confusion matrix and the reliability bins (and whatever else the details hold)."""
    block: Dict[str, Any] = {"threshold": threshold, "ece_bins": ECE_BINS}
    if details.get("ci95"):
        block["ci95"] = details["ci95"]
        block["bootstrap"] = {"resamples": resamples, "seed": seed, "level": CI_LEVEL,
                              "method": "percentile; the images resampled with replacement"}
    block.update({k: v for k, v in details.items() if k != "ci95"})
    return block


def bootstrap_note(report: Dict[str, Any]) -> List[str]:
    """results.md's line on the intervals, when there are any."""
    b = report.get("bootstrap")
    return [f"95% CI: {b['method']}, {b['resamples']} resamples (seed {b['seed']})."] if b else []


def interval_text(interval: List[Optional[float]]) -> str:
    """"[low, high]" of an interval, "n/a" where it is undefined."""
    low, high = interval
    return "n/a" if low is None else f"[{low:.2f}, {high:.2f}]"


def ci_row(scores: Dict[str, Any], ci95: Dict[str, List[Optional[float]]]) -> Dict[str, str]:
    """The results table's "95% CI" row: "[low, high]" under each metric that has an interval."""
    return {k: interval_text(ci95[k]) for k in scores if k in ci95}


def markdown(report: Dict[str, Any]) -> str:
    """The notes, the per-class table and the confusion matrix, after the results table."""
    lower = [k for k in report["metrics"] if lower_is_better(k)]
    notes = [f"Sensitivity and specificity: {report['threshold']}. ECE: {report['ece_bins']} equal-width bins "
             f"of the top softmax probability" + (f"; lower is better: {', '.join(lower)}." if lower else "."),
             *bootstrap_note(report)]
    per_class = {name: {"AUROC": json_safe(c["auroc"]), "sensitivity": json_safe(c["sensitivity"]),
                        "specificity": json_safe(c["specificity"]), "support": c["support"]}
                 for name, c in report["per_class"].items()}
    matrix = report["confusion_matrix"]
    title = "confusion matrix (rows: true class, columns: predicted class)"
    if len(matrix["classes"]) > MATRIX_TABLE_MAX:  # unreadable as a table: the JSON and the figure hold it
        shown = f"### {title}\n\n{len(matrix['classes'])} classes: in results.json and confusion_matrix.png (--out).\n"
    else:
        rows = {true: dict(zip(matrix["classes"], counts)) for true, counts in zip(matrix["classes"], matrix["counts"])}
        for true, missed in zip(matrix["classes"], matrix.get("no_prediction") or ()):
            rows[true]["no prediction"] = missed
        shown = markdown_table(rows, title=title)
    return "\n".join([*notes, "", markdown_table(per_class, title="per class"), shown])


def write_figures(report: Dict[str, Any], out: Path, label: str) -> Dict[str, str]:
    """confusion_matrix.png and reliability.png in `out`; {figure: its path}."""
    confusion_matrix_png(report["confusion_matrix"], out / FIGURES["confusion_matrix"], title=label)
    reliability_png(report["reliability"], out / FIGURES["reliability"], report["metrics"]["ece"], title=label)
    return {k: str(out / name) for k, name in FIGURES.items()}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def confusion_matrix_png(matrix: Dict[str, Any], path: Path, title: str = "") -> Path:
    """The counts (rows: true class, columns: predicted class) as a heat map with each count written in
    its cell; a "no prediction" column when some rows were non-finite."""
    plt = _pyplot()
    classes, counts = matrix["classes"], [list(r) for r in matrix["counts"]]
    columns = list(classes)
    if matrix.get("no_prediction"):
        counts = [r + [m] for r, m in zip(counts, matrix["no_prediction"])]
        columns.append("no prediction")
    side = min(24.0, max(3.5, 0.55 * len(columns) + 2.0))  # inches: a few thousand pixels at most
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    top = max((max(r) for r in counts), default=0)
    if len(columns) <= 30:  # the counts stay legible
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if top and value > top / 2 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    fig.tight_layout()
    return save_figure(fig, path)


def reliability_png(bins: Dict[str, Any], path: Path, ece: float, title: str = "",
                    confidence: str = "top softmax probability", outcome: str = "bin accuracy") -> Path:
    """Accuracy against mean confidence per confidence bin (bars over the bins that hold images), the
    diagonal of perfect calibration, and the ECE in the title; `confidence` and `outcome` name the axes
    (multi-label: each class's probability against the fraction of positive targets)."""
    plt = _pyplot()
    edges = bins["edges"]
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    filled = [i for i, c in enumerate(bins["count"]) if c]
    ax.bar([edges[i] for i in filled], [bins["fraction_correct"][i] for i in filled],
           width=[edges[i + 1] - edges[i] for i in filled], align="edge", edgecolor="black", linewidth=0.6,
           color="tab:blue", alpha=0.8, label=outcome)
    ax.plot([bins["mean_confidence"][i] for i in filled], [bins["fraction_correct"][i] for i in filled], "o", color="tab:red",
            markersize=4, label="mean confidence")
    ax.plot([0, 100], [0, 100], ls="--", color="grey", lw=1.0, label="perfect calibration")
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel=f"confidence ({confidence}, %)", ylabel=f"{outcome} (%)",
           title=f"{title + ': ' if title else ''}ECE {ece:.2f}%, {bins['bins']} bins")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)
