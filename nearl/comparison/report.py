"""The report of a comparison (nearl/comparison/run.py): its Markdown table and its plot, for each
protocol (nearl/comparison/protocols.py), and the files they go to."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from nearl.logging_utils import json_safe
from nearl.evaluation.metric_table import (COMPARISON_SHOWN, MAIN_METRIC, chance_level,  # noqa: F401 (comparison.py reads MAIN_METRIC here)
                                           lower_is_better)
from nearl.training.plots import save_figure
from nearl.writes import atomic_write_all

SHOWN = COMPARISON_SHOWN  # the table's metric columns, per task (nearl/evaluation/metric_table.py)


def column(key: str) -> str:
    """A metric's column heading: HM for the harmonic mean, an arrow on a metric where lower is better."""
    return "HM" if key == "hm" else f"{key} (↓)" if lower_is_better(key) else key


def fmt_stat(stat: Dict[str, Any], digits: int = 2) -> str:
    """"mean ± std" of a mean_std dict, "n/a" without values."""
    if stat["mean"] is None:
        return "n/a"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _header(report: Dict[str, Any]) -> List[str]:
    task, cfg = report["task"], report["config"]
    protocol = "" if report["protocol"] == "standard" else f" ({report['protocol']} protocol)"
    lines = [f"# Method comparison{protocol}: {task} on {report['data']} ({report['split']} split)", ""]
    if report.get("note"):
        lines += [f"**{report['note']}**", ""]
    return lines + [f"Backbone {cfg['model']} ({cfg['pretrained'] or 'RANDOM weights, no --pretrained'}); "
                    f"seeds {', '.join(map(str, cfg['seeds']))}; {cfg['max_steps']} steps per run, batch "
                    f"{cfg['batch_size']}, lr {cfg['lr']}, precision {cfg['precision']}; device {report['device']}. "
                    f"Metrics are mean ± standard deviation over seeds (percent), on the final checkpoint of each "
                    f"run.", ""]


def markdown(report: Dict[str, Any]) -> str:
    if report["protocol"] == "few-shot":
        return "\n".join(_header(report) + few_shot_table(report) + [
            "", "Notes:", "- accuracy on the evaluated split; each run trained on K images per class "
            "(nearl.train --k-shot K, drawn by the run's seed)",
            f"- accuracy against K is plotted in {Path(report['files']['png']).name}."]) + "\n"
    cfg = report["config"]
    shown = report["shown"]
    on_gpu = report["device"].startswith("cuda")
    head = ["method", *[column(k) for k in shown], "learnable params", "s / train step",
            "peak memory (MB)", "inference img/s"]
    lines = _header(report) + ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, m in report["methods"].items():
        step = m["time_per_step_s"]
        cells = [method, *[fmt_stat(m["metrics"][k]) if k in m["metrics"] else "" for k in shown],
                 f"{m['learnable_parameters']:,}",
                 "n/a (no training)" if step["mean"] is None else fmt_stat(step, 4),
                 fmt_stat(m["peak_memory_mb"], 0) if on_gpu else "n/a (CPU)",
                 "n/a" if m["inference_images_per_s"] is None else f"{m['inference_images_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Notes:"]
    if report["protocol"] == "base2novel":
        lines.append(f"- base2novel: trained on the base classes {report['classes']['base']}; base / novel: "
                     f"accuracy on the images of the base / novel classes {report['classes']['novel']}, each "
                     "scored among its own classes; HM = 2 base novel / (base + novel) of the mean base and "
                     "novel accuracies (as CoCoOp's tables), ± the spread of the per-seed HM")
    lower = [k for k in shown if lower_is_better(k)]
    if lower:
        lines.append(f"- (↓): lower is better ({', '.join(lower)}: expected calibration error, of the top softmax "
                     "probability for classification, of every per-class probability for multilabel; "
                     "docs/evaluation.md); every other metric: higher is better.")
    lines += ["- s / train step: median wall time of one optimizer step, data loading included (first step left "
              "out); for linear-probe one L-BFGS iteration on cached features (feature extraction excluded).",
              "- peak memory: torch.cuda.max_memory_allocated over training and evaluation of a run"
              + ("." if on_gpu else f"; not measured on CPU (this process's peak RSS over the whole comparison "
                                    f"was {report['peak_rss_mb']:.0f} MB)."),
              f"- inference img/s: encode_image on a batch of {cfg['bench_batch']} random images, "
              f"{cfg['bench_iters']} timed calls after 2 warm-up ones, first seed's model.",
              f"- {', '.join(report['plotted'])} plotted in {Path(report['files']['png']).name}."]
    return "\n".join(lines) + "\n"


def bar_plot(report: Dict[str, Any], path: Path) -> Path:
    """Grouped bars: each plotted metric (mean, std error bars) for each method."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys, names = report["plotted"], list(report["methods"])
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(names) * len(keys) ** 0.5 + 1.5), 4))
    top = 100.0
    for i, key in enumerate(keys):
        stats = [report["methods"][m]["metrics"].get(key, {"mean": None, "std": None}) for m in names]
        means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
        errs = [s["std"] if s["std"] is not None else 0.0 for s in stats]
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=4, label=key if key != "hm" else "HM",
                      edgecolor="black", linewidth=0.6)
        top = max(top, max(m + e for m, e in zip(means, errs)) * 1.12)
        for b, st, err in zip(bars, stats, errs):
            if st["mean"] is not None:  # above the error bar's cap, not on it
                ax.annotate(f"{st['mean']:.1f}", (b.get_x() + b.get_width() / 2, b.get_height() + err), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
        chance_line(ax, key, report, color=bars.patches[0].get_facecolor())
    n_seeds = len(report["config"]["seeds"])
    shown = ", ".join(k if k != "hm" else "HM" for k in keys)
    ax.set(ylabel="percent", title=f"{report['task']}: {shown}, mean ± std over {n_seeds} seed(s)", ylim=(0, top))
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:  # several metrics, or one and its chance line
        ax.legend(fontsize=8, loc="upper right")
    mark_pipeline_only(ax, report)
    fig.tight_layout()
    return save_figure(fig, path)


def few_shot_table(report: Dict[str, Any]) -> List[str]:
    """Markdown rows: one per method, accuracy (mean ± std over seeds) for each K."""
    shots = report["config"]["shots"]
    lines = ["| method | " + " | ".join(f"K = {k}" for k in shots) + " | learnable params |",
             "|---|" + "---:|" * (len(shots) + 1)]
    for method, m in report["methods"].items():
        cells = [fmt_stat(m["shots"][str(k)]["metrics"]["accuracy"]) for k in shots]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {m['learnable_parameters']:,} |")
    return lines


def few_shot_plot(report: Dict[str, Any], path: Path) -> Path:
    """Accuracy against K (log2 axis), one line per method, error bars the std over seeds."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    shots = report["config"]["shots"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, m in report["methods"].items():
        stats = [m["shots"][str(k)]["metrics"]["accuracy"] for k in shots]
        means = [s["mean"] if s["mean"] is not None else math.nan for s in stats]
        errs = [s["std"] or 0.0 for s in stats]
        ax.errorbar(shots, means, yerr=errs, marker="o", capsize=4, label=method)
    chance_line(ax, "accuracy", report, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    n_seeds = len(report["config"]["seeds"])
    ax.set(xlabel="shots per class (K)", ylabel="accuracy (%)", ylim=(0, 100),
           title=f"few-shot accuracy, mean ± std over {n_seeds} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    mark_pipeline_only(ax, report)
    fig.tight_layout()
    return save_figure(fig, path)


def n_classes(report: Dict[str, Any]) -> Optional[float]:
    """The number of classes the runs were scored on (each run's evaluation says), None for retrieval."""
    for run in (r for m in report["methods"].values() for r in _runs(m)):
        if run.get("metrics", {}).get("n_classes"):
            return run["metrics"]["n_classes"]
    return None


def _runs(method: Dict[str, Any]) -> List[Dict[str, Any]]:
    return method.get("runs") or [r for k in method.get("shots", {}).values() for r in k.get("runs", [])]


def chance_line(ax, key: str, report: Dict[str, Any], color) -> None:
    """A dotted line at what guessing scores on `key` (accuracy 100/C, an AUC 50), labelled once."""
    level = chance_level(key, n_classes(report))
    if level is not None:
        ax.axhline(level, ls=":", lw=1.2, color=color, label=f"chance ({key})", zorder=0)


def mark_pipeline_only(ax, report: Dict[str, Any]) -> None:
    """A red line on the plot when the report's numbers only show that the pipeline runs."""
    if report.get("note"):
        ax.text(0.5, 0.97, "pipeline check only: random backbone / tiny data", transform=ax.transAxes,
                ha="center", va="top", fontsize=8, color="#aa0000")


def write_report(report: Dict[str, Any], out: Path) -> str:
    """comparison.png, comparison.md and comparison.json in `out`; returns the Markdown."""
    (few_shot_plot if report["protocol"] == "few-shot" else bar_plot)(report, out / "comparison.png")
    md = markdown(report)
    document = json.dumps(json_safe(report), indent=2, default=str, allow_nan=False) + "\n"
    atomic_write_all({out / "comparison.md": md, out / "comparison.json": document})
    return md
