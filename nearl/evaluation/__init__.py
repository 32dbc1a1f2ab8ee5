"""Evaluation, the library: `evaluate(EvalConfig(...))` runs what `python -m nearl.evaluate ...` runs.

    config.py         EvalConfig: an evaluation's settings, one field per flag (no torch)
    run.py            evaluate(): the model chosen, the data read, retrieval or classification scored
    metrics.py        Recall@k, accuracy, F1, AUC, balanced accuracy, sensitivity, specificity, ECE, per class,
                      bootstrap intervals
    class_report.py   classification's per-class block, confusion matrix and reliability figures in the report
    metric_table.py   the one table of metrics: task, main metric, where each is shown
    prediction.py     predictions for images a user points at (`python -m nearl.predict`)
"""
from nearl._lazy import lazy_attributes

# Loaded on first use (PEP 562): `nearl.evaluation.config` serves `nearl.evaluate --help` without torch.
_LAZY = {"EvalConfig": "config", "evaluate": "run", "evaluate_retrieval": "run", "evaluate_classification": "run"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
