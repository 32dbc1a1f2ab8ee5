"""The evaluation metrics, one row each: the one place that says which task a metric belongs to,
which metric is a task's main one, and where each is shown. nearl/evaluation/metrics.py computes them (a test
checks it computes exactly these); the validation line (training/loop.py), the curves (plots.py),
the comparison table (comparison/report.py), best.pt's score (evaluation.run.headline) and the
metrics `nearl.train --monitor` may choose from take their lists from here. Every metric is a percent;
higher is better except where `higher_is_better` is False (the calibration errors ece and label_ece), and
whatever compares two scores asks `better`. Imports nothing: the light modules (plots, the comparison report, the configs) read it."""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple


class Metric(NamedTuple):
    name: str  # its key in the results, metrics.jsonl and the reports
    task: str  # "retrieval", "classification" or "multilabel"
    main: bool = False  # the task's main metric: best.pt is chosen by it, a comparison plots it
    validation: bool = False  # printed in the validation line and drawn in curves.png
    comparison: bool = False  # a column of the comparison table (comparison.md)
    chance: Optional[Callable[[int], float]] = None  # what guessing scores among C classes (the plots' chance line)
    higher_is_better: bool = True  # False: a lower score is the better one (best.pt, --monitor)


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
    Metric("accuracy", "classification", main=True, validation=True, comparison=True, chance=lambda c: 100.0 / c),
    Metric("macro_f1", "classification", validation=True, comparison=True),
    Metric("macro_auc", "classification", validation=True, comparison=True, chance=lambda c: 50.0),
    # the mean recall of the classes present in the labels (scikit-learn's balanced_accuracy_score)
    Metric("balanced_accuracy", "classification", comparison=True, chance=lambda c: 100.0 / c),
    # one-vs-rest at the predicted class (argmax), averaged over the classes present in the labels
    Metric("macro_sensitivity", "classification", chance=lambda c: 100.0 / c),
    Metric("macro_specificity", "classification", chance=lambda c: 100.0 - 100.0 / c),
    # expected calibration error of the top softmax probability, ECE_BINS equal-width bins
    Metric("ece", "classification", comparison=True, higher_is_better=False),
    # multi-label (--task multilabel): per class, probability sigmoid(logit); the means over the classes
    Metric("macro_auroc", "multilabel", main=True, validation=True, comparison=True, chance=lambda c: 50.0),
    Metric("macro_ap", "multilabel", validation=True, comparison=True),  # mean average precision
    Metric("macro_f1_at_50", "multilabel", comparison=True),  # mean F1 at probability 0.5
    # expected calibration error of every (image, class) probability against its 0/1 target, ECE_BINS bins
    Metric("label_ece", "multilabel", comparison=True, higher_is_better=False),
)
ECE_BINS = 15  # the bins of the expected calibration error and of the reliability plot

TASKS: Tuple[str, ...] = tuple(dict.fromkeys(m.task for m in METRICS))


def names(task: Optional[str] = None) -> Tuple[str, ...]:
    """The metrics of `task` (all of them without one), in the table's order."""
    return tuple(m.name for m in METRICS if task in (None, m.task))


def chance_level(name: str, n_classes: Optional[float]) -> Optional[float]:
    """What guessing scores on metric `name` among `n_classes` classes (uniform guesses: accuracy and
    sensitivity 100/C, specificity 100 - 100/C, an AUC 50), or None where no such line means anything
    (recall, F1, ECE) or the classes are unknown."""
    row = next((m for m in METRICS if m.name == name), None)
    if row is None or row.chance is None or not n_classes:
        return None
    return row.chance(int(n_classes))


def metric(name: str) -> Metric:
    """The row of metric `name` (KeyError for a name the table does not hold)."""
    for m in METRICS:
        if m.name == name:
            return m
    raise KeyError(name)


def better(name: str, score: float, than: Optional[float]) -> bool:
    """Whether `score` on metric `name` beats `than` (None: nothing to beat yet), in the metric's
    direction; equal is not better."""
    if than is None:
        return True
    return score > than if metric(name).higher_is_better else score < than


def lower_is_better(name: str) -> bool:
    """Whether a lower score is the better one on metric `name` (False for a name the table does not hold)."""
    return any(m.name == name and not m.higher_is_better for m in METRICS)


MAIN_METRIC: Dict[str, str] = {m.task: m.name for m in METRICS if m.main}
VALIDATION_SHOWN: Tuple[str, ...] = tuple(m.name for m in METRICS if m.validation)
COMPARISON_SHOWN: Dict[str, Tuple[str, ...]] = {
    task: tuple(m.name for m in METRICS if m.task == task and m.comparison) for task in TASKS}
