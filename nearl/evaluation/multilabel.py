"""Multi-label evaluation (--task multilabel): per-class AUROC (the main metric is their macro mean), average
precision and F1 at probability 0.5 of the positive-vs-negative prompt scoring (nearl/model/multilabel.py),
and the per-class table of results.json / results.md."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from nearl.data.multilabel import UNCERTAIN_RULE, MultiLabelDataset
from nearl.evaluation import metrics as M
from nearl.evaluation.run import scored_images
from nearl.logging_utils import json_safe, markdown_table
from nearl.model.classify import TEMPLATES
from nearl.model.multilabel import SCORING, multilabel_logits


def evaluate_multilabel(model, records: Sequence, classnames: Sequence[str], *, templates: Sequence[str] = TEMPLATES,
                        device, batch_size: int = 64, workers: int = 0, precision: str = "fp32",
                        progress: bool = True, source: Optional[str] = None, details: bool = False
                        ) -> Dict[str, Any]:
    """metrics.multilabel_metrics of the per-class logits z_c (macro_auroc, macro_ap, macro_f1_at_50), with
    "details" (results.json's per-class block) when asked."""
    ds = MultiLabelDataset(records, model.image_transform(False))
    kept, targets, logits = scored_images(
        model, ds, lambda feats: multilabel_logits(model, feats, classnames, templates, device=device),
        device=device, batch_size=batch_size, workers=workers, precision=precision, progress=progress, source=source)
    out: Dict[str, Any] = M.multilabel_metrics(logits, targets)
    out["n_images"], out["n_skipped"], out["n_classes"] = int(kept.numel()), ds.bad_count, len(classnames)
    if details:
        out["details"] = {**M.multilabel_details(logits, targets, classnames), "scoring": SCORING,
                          "threshold": M.MULTILABEL_THRESHOLD, "uncertain": UNCERTAIN_RULE}
    return out


def markdown(report: Dict[str, Any]) -> str:
    """The scoring note and the per-class table after the results table."""
    rows = {name: {"AUROC": json_safe(c["auroc"]), "AP": json_safe(c["average_precision"]),
                   "F1@0.5": json_safe(c["f1_at_50"]), "positives": c["positives"], "negatives": c["negatives"]}
            for name, c in report["per_class"].items()}
    notes = f"Scoring: {report['scoring']}. F1: {report['threshold']}."
    return notes + "\n\n" + markdown_table(rows, title="per class")
