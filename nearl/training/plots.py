"""Training curves from metrics.jsonl: loss (and its terms), learning rate and validation metrics by step."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from nearl.logging_utils import read_metrics
from nearl.evaluation.metric_table import VALIDATION_SHOWN, chance_level
from nearl.writes import atomic_write

PathLike = Union[str, os.PathLike]
LOSS_TERMS = ("loss", "contrastive", "cross_entropy", "query_alignment", "orth", "sccm", "kdsp")  # sccm, kdsp: biomedcoop
VAL_KEYS = VALIDATION_SHOWN  # the validation metrics drawn (nearl/evaluation/metric_table.py)


def plot_curves(metrics_path: PathLike, out_path: PathLike) -> Path:
    """Write a three-panel PNG (matplotlib Agg, no display needed): the loss and its terms, the
    learning rate, the validation metrics with chance lines; returns the path written."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_lr, ax_val) = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": (4, 3, 4)})
    for term in LOSS_TERMS:
        if _draw(ax_loss, train, term, label=term, lw=1.8 if term == "loss" else 1.0, dots=len(train) < 30):
            ax_loss.legend(fontsize=8)
    ax_loss.set(ylabel="loss", title="training loss")
    if not _draw(ax_lr, train, "lr", color="tab:purple", dots=len(train) < 30):
        _empty(ax_lr, "no step yet")
    ax_lr.set(ylabel="learning rate", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for key in VAL_KEYS:
        if _draw(ax_val, val, key, label=key, dots=True):
            _chance_line(ax_val, key, val)
    ax_val.set(ylabel="percent", title="validation")
    if val:
        ax_val.legend(fontsize=8)
    else:
        _empty(ax_val, "no validation yet")
    for ax in (ax_loss, ax_lr, ax_val):
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=100)


def _draw(ax, records, key: str, *, dots: bool, **style) -> bool:
    """`key` against the step over `records` (those holding it); whether there was anything to draw."""
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if dots else None, markersize=3, **style)
    return bool(pts)


def _chance_line(ax, key: str, val) -> None:
    """A dotted line at what guessing scores on `key` (accuracy 100/C, an AUC 50), in the curve's colour."""
    level = chance_level(key, val[-1].get("n_classes"))
    if level is not None:
        ax.axhline(level, ls=":", lw=1.0, color=ax.lines[-1].get_color(), label=f"chance ({key})")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def save_figure(fig, path: PathLike, dpi: int = 110) -> Path:
    """Write `fig` as a PNG atomically (a reader never sees half a file; a refused write removes its
    temporary file and raises WriteError, nearl/writes.py) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
