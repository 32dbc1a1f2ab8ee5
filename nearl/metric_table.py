"""The evaluation metrics, one row each: the one place that says which task a metric belongs to,
which metric is a task's main one, and where each is shown. nearl/metrics.py computes them (a test
checks it computes exactly these); the validation line (training/loop.py), the curves (plots.py),
the comparison table (comparison_report.py) and best.pt's score (evaluation.headline) take their
lists from here. Every metric is a percent and higher is better. Imports nothing: the light modules
(plots, the comparison report) read it."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple


class Metric(NamedTuple):
    name: str  # its key in the results, metrics.jsonl and the reports
    task: str  # "retrieval" or "classification"
    main: bool = False  # the task's main metric: best.pt is chosen by it, a comparison plots it
    validation: bool = False  # printed in the validation line and drawn in curves.png
    comparison: bool = False  # a column of the comparison table (comparison.md)


RECALL_KS = (1, 5, 10)  # the k's of the Recall@k rows below: retrieval_recall's default


def recall_key(direction: str, k: int) -> str:
    """The name of Recall@k image->text (direction "i2t") or text->image ("t2i")."""
    return f"{direction}_R@{k}"


# In the order the lists below keep (the columns of the comparison table, the curves' legend).
METRICS: Tuple[Metric, ...] = (
    Metric("mean_recall", "retrieval", main=True, validation=True, comparison=True),
    Metric(recall_key("i2t", 1), "retrieval", validation=True, comparison=True),
    Metric(recall_key("i2t", 5), "retrieval", comparison=True),
    Metric(recall_key("i2t", 10), "retrieval"),
    Metric(recall_key("t2i", 1), "retrieval", validation=True, comparison=True),
    Metric(recall_key("t2i", 5), "retrieval", comparison=True),
    Metric(recall_key("t2i", 10), "retrieval"),
    Metric("accuracy", "classification", main=True, validation=True, comparison=True),
    Metric("macro_f1", "classification", validation=True, comparison=True),
    Metric("macro_auc", "classification", validation=True, comparison=True),
)

TASKS: Tuple[str, ...] = tuple(dict.fromkeys(m.task for m in METRICS))


def names(task: Optional[str] = None) -> Tuple[str, ...]:
    """The metrics of `task` (all of them without one), in the table's order."""
    return tuple(m.name for m in METRICS if task in (None, m.task))


MAIN_METRIC: Dict[str, str] = {m.task: m.name for m in METRICS if m.main}
VALIDATION_SHOWN: Tuple[str, ...] = tuple(m.name for m in METRICS if m.validation)
COMPARISON_SHOWN: Dict[str, Tuple[str, ...]] = {
    task: tuple(m.name for m in METRICS if m.task == task and m.comparison) for task in TASKS}
