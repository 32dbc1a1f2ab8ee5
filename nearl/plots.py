"""Training curves from metrics.jsonl: loss (and its terms) by step, validation metrics by step."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .logging_utils import read_metrics
from .metric_table import VALIDATION_SHOWN
from .writes import atomic_write

PathLike = Union[str, os.PathLike]
LOSS_TERMS = ("loss", "contrastive", "cross_entropy", "query_alignment", "orth")
VAL_KEYS = VALIDATION_SHOWN  # the validation metrics drawn (nearl/metric_table.py)


def plot_curves(metrics_path: PathLike, out_path: PathLike) -> Path:
    """Write a two-panel PNG (matplotlib Agg, no display needed); returns the path written."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for term in LOSS_TERMS:
        pts = [(r["step"], r[term]) for r in train if r.get(term) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax_loss.plot(xs, ys, label=term, lw=1.8 if term == "loss" else 1.0,
                         marker="." if len(xs) < 30 else None)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    if train:
        ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    for key in VAL_KEYS:
        pts = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax_val.plot(xs, ys, marker="o", label=key)
    ax_val.set(xlabel="optimizer step", ylabel="percent", title="validation")
    if val:
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=100)


def save_figure(fig, path: PathLike, dpi: int = 110) -> Path:
    """Write `fig` as a PNG atomically (a reader never sees half a file; a refused write removes its
    temporary file and raises WriteError, nearl/writes.py) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
