"""Evaluation metrics: image-text retrieval Recall@k and classification accuracy / F1 / AUC / balanced
accuracy / sensitivity / specificity / calibration error, per class too, with bootstrap intervals; multi-label
per-class AUROC / AP / F1, 2x2 counts and calibration error, with the same bootstrap.

Every metric is reported in percent (0-100), like the papers this project compares against.
Ties count against the query (a tied wrong item ranks above the right one), so a collapsed model
whose embeddings are all equal scores 0 rather than 100. NaN and inf never help either: a
non-finite score ranks last, so a query whose right answer has one is a miss at every k, and a
non-finite logit row is a wrong prediction; the count of such rows is returned as
"nonfinite_rows" (only when there are any) and logged as a warning.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score, multilabel_confusion_matrix,
                             roc_auc_score)

from nearl.evaluation.metric_table import ECE_BINS, RECALL_KS, recall_key

logger = logging.getLogger("nearl.metrics")

# The decision rule of the sensitivities and specificities (and of accuracy, F1 and the confusion matrix)
THRESHOLD = ("one-vs-rest at the predicted class: a class is called positive for an image where it has the "
             "highest softmax probability (the argmax; no probability threshold)")
_CHUNK = 1024  # rows of the similarity matrix computed at a time (bounds memory on big test sets)
_MISS = torch.iinfo(torch.long).max  # the rank of a query whose right answer has no finite score


def _warn_nonfinite(what: str, n_bad: int, n: int, counted: str) -> None:
    logger.warning("%d of %d %s hold NaN or inf (a diverged model?): %s", n_bad, n, what, counted)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(x, 'shape', type(x))}")


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Recall@k (percent) for image->text ("i2t_R@k") and text->image ("t2i_R@k"), plus
    "mean_recall" (their mean).

    image_emb (I, e), text_emb (T, e); text_to_image (T,) gives the image index of each text, so an
    image may own several captions. Image->text: a hit if ANY of the image's captions is in its top
    k. Text->image: a hit if its own image is in the top k. Embeddings are L2-normalised here.
    """
    _check_2d("image_emb", image_emb)
    _check_2d("text_emb", text_emb)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=text_emb.device).reshape(-1)
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: image {tuple(image_emb.shape)}, "
                         f"text {tuple(text_emb.shape)}")
    if t2i.numel() != n_txt:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {n_txt} texts")
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"text_to_image values must be in [0, {n_img}), got "
                         f"[{int(t2i.min())}, {int(t2i.max())}]")
    captions_per_image = torch.bincount(t2i, minlength=n_img)
    if n_img == 0 or (captions_per_image == 0).any():
        raise ValueError("every image needs at least one caption in text_to_image "
                         f"(images without one: {torch.nonzero(captions_per_image == 0).flatten().tolist()[:10]})")

    bad_rows = int((~torch.isfinite(image_emb).all(dim=1)).sum()) + int((~torch.isfinite(text_emb).all(dim=1)).sum())
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float().to(img.device), dim=-1)
    t2i = t2i.to(img.device)

    def scores(a, b):  # NaN (from a NaN or inf embedding) -> -inf: ranked below everything
        return torch.nan_to_num(a @ b.T, nan=-math.inf)

    # i2t rank of an image = number of wrong captions scoring >= its best right caption.
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=img.device)
    for s in range(0, n_img, _CHUNK):
        sim = scores(img[s:s + _CHUNK], txt)  # (c, T)
        own = t2i.unsqueeze(0) == torch.arange(s, s + sim.shape[0], device=img.device).unsqueeze(1)
        best_right = sim.masked_fill(~own, -math.inf).max(dim=1, keepdim=True).values
        rank = ((sim >= best_right) & ~own).sum(dim=1)
        i2t_rank[s:s + sim.shape[0]] = rank.masked_fill(best_right.squeeze(1) == -math.inf, _MISS)

    # t2i rank of a text = number of other images scoring >= its own image.
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=img.device)
    for s in range(0, n_txt, _CHUNK):
        sim = scores(txt[s:s + _CHUNK], img)  # (c, I)
        own_idx = t2i[s:s + sim.shape[0]].unsqueeze(1)
        right = sim.gather(1, own_idx)
        others = torch.ones_like(sim, dtype=torch.bool).scatter_(1, own_idx, False)
        rank = ((sim >= right) & others).sum(dim=1)
        t2i_rank[s:s + sim.shape[0]] = rank.masked_fill(right.squeeze(1) == -math.inf, _MISS)

    out: Dict[str, float] = {}
    for k in ks:
        out[recall_key("i2t", k)] = 100.0 * (i2t_rank < k).float().mean().item()
    for k in ks:
        out[recall_key("t2i", k)] = 100.0 * (t2i_rank < k).float().mean().item()
    out["mean_recall"] = mean_recall(out)
    if bad_rows:
        _warn_nonfinite("embeddings", bad_rows, n_img + n_txt, "their pairs are counted as misses")
        out["nonfinite_rows"] = float(bad_rows)
    return out


def mean_recall(metrics: Dict[str, float]) -> float:
    """Mean of all the "i2t_R@k" and "t2i_R@k" entries of a retrieval_recall result."""
    values = [v for k, v in metrics.items() if k.startswith(("i2t_R@", "t2i_R@"))]
    if not values:
        raise ValueError(f"no Recall@k entries in {sorted(metrics)}")
    return float(sum(values) / len(values))


def _classification_inputs(logits: torch.Tensor, labels: torch.Tensor):
    """(labels, softmax probabilities, predictions, non-finite rows) of (n, C) logits and (n,) labels, as numpy
    arrays, checked. A non-finite row predicts no class (-1): it is always a wrong prediction."""
    _check_2d("logits", logits)
    y = torch.as_tensor(labels).reshape(-1).long().cpu().numpy()
    n, n_classes = logits.shape
    if y.shape[0] != n:
        raise ValueError(f"{n} rows of logits but {y.shape[0]} labels")
    if n == 0:
        raise ValueError("no samples")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    bad = (~torch.isfinite(logits).all(dim=1)).cpu().numpy()
    probs = torch.softmax(logits.detach().double().nan_to_num(0.0, 0.0, 0.0), dim=1).cpu().numpy()
    return y, probs, np.where(bad, -1, probs.argmax(axis=1)), bad


def _auc_inputs(y: np.ndarray, probs: np.ndarray, bad: np.ndarray, present: np.ndarray):
    """(one-vs-rest indicators, scores) of the classes `present`. A non-finite row scores worst for every
    class: below every probability (-1) where it is a positive, above every one (2) where it is a negative."""
    positive = y[:, None] == present[None, :]
    return positive, np.where(bad[:, None], np.where(positive, -1.0, 2.0), probs[:, present])


def _confidence(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, bad: np.ndarray):
    """(the top softmax probability, whether the prediction is right) of each row; a non-finite row is a wrong
    prediction made with confidence 1, so it never lowers the calibration error."""
    return np.where(bad, 1.0, probs.max(axis=1)), pred == y


def _bin_ids(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Each confidence's bin among `n_bins` equal-width bins of [0, 1], binned as scikit-learn's
    calibration_curve bins: (lo, hi], the first one closed at 0."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE in percent: the sum over the bins of |bin| / n * |accuracy(bin) - mean confidence(bin)|."""
    gap = np.bincount(_bin_ids(confidence, n_bins), weights=correct - confidence, minlength=n_bins)
    return 100.0 * float(np.abs(gap).sum() / len(confidence))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 num / den, NaN where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, 100.0 * num / np.where(den > 0, den, 1), np.nan)


def _one_vs_rest(y: np.ndarray, pred: np.ndarray, n_classes: int):
    """(tn, fp, fn, tp) of each class, one-vs-rest at the predicted class (scikit-learn's
    multilabel_confusion_matrix); a row predicting no class (-1) is a false negative of its label."""
    mcm = multilabel_confusion_matrix(y, pred, labels=np.arange(n_classes))
    return mcm[:, 0, 0], mcm[:, 0, 1], mcm[:, 1, 0], mcm[:, 1, 1]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """accuracy, macro_f1, macro_auc, balanced_accuracy, macro_sensitivity, macro_specificity and ece (all
    percent) of (n, C) logits against (n,) labels.

    macro_f1 is scikit-learn's f1_score(average="macro") over the classes that occur in the labels
    or the predictions (a class never predicted correctly scores 0). macro_auc is scikit-learn's
    roc_auc_score(average="macro") of the one-vs-rest softmax probabilities over the classes
    present in the labels, each of which then has positives and negatives (ties count one half).
    With a single class present the AUC is undefined: macro_auc is nan, "auc_classes" is 0 and a
    warning says why. Sensitivity and specificity are one-vs-rest at the predicted class (the
    argmax: no probability threshold), averaged over the classes present in the labels (macro_sensitivity
    is then balanced_accuracy, scikit-learn's balanced_accuracy_score; macro_specificity is nan with a
    single class present). ece: expected calibration error of the top softmax probability over
    ECE_BINS equal-width bins (lower is better).
    """
    y, probs, pred, bad = _classification_inputs(logits, labels)
    n, n_classes = probs.shape
    # The classes seen in the labels or the predictions; the -1 of a non-finite row is no class, so
    # such a row counts only as a false negative of its label.
    seen = np.union1d(np.unique(y), np.unique(pred[pred >= 0]))
    macro_f1 = f1_score(y, pred, labels=seen, average="macro", zero_division=0)
    present = np.unique(y)
    if len(present) > 1:
        positive, scores = _auc_inputs(y, probs, bad, present)
        macro_auc = 100.0 * float(roc_auc_score(positive.astype(int), scores, average="macro"))
    else:
        logger.warning("macro_auc and macro_specificity are undefined: the labels contain a single class (%s), so "
                       "no class has both positives and negatives", present.tolist())
        macro_auc = float("nan")
    tn, fp, fn, tp = (a[present] for a in _one_vs_rest(y, pred, n_classes))
    with warnings.catch_warnings():  # a class predicted but absent from the labels: left out, as documented
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")  # one class: warned above
        balanced = 100.0 * float(balanced_accuracy_score(y, pred))
    specificity = _ratio(tn, tn + fp)
    out = {
        "accuracy": 100.0 * float((pred == y).mean()),
        "macro_f1": 100.0 * float(macro_f1),
        "macro_auc": macro_auc,
        "auc_classes": float(len(present)) if len(present) > 1 else 0.0,
        "balanced_accuracy": balanced,
        "macro_sensitivity": float(np.mean(_ratio(tp, tp + fn))),
        "macro_specificity": float(np.mean(specificity)) if len(present) > 1 else float("nan"),
        "ece": expected_calibration_error(*_confidence(y, probs, pred, bad)),
    }
    if bad.any():
        _warn_nonfinite("logit rows", int(bad.sum()), n, "counted as wrong predictions")
        out["nonfinite_rows"] = float(bad.sum())
    return out


def classification_details(logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                           n_bins: int = ECE_BINS) -> Dict[str, Any]:
    """What classification_metrics averages, class by class, and what it bins.

    "per_class": {class name: {"auroc", "sensitivity", "specificity" (percent; NaN where undefined:
    AUROC and sensitivity for a class absent from the labels, AUROC with one class present,
    specificity for a class with no negatives), "support" (its images)}}, one-vs-rest at the predicted
    class (argmax); "confusion_matrix": {"classes", "counts"} with rows the true class and columns the
    predicted one (scikit-learn's confusion_matrix), plus "no_prediction" (per true class) when rows
    were non-finite; "reliability": the ECE's bins (`reliability`).
    """
    y, probs, pred, bad = _classification_inputs(logits, labels)
    n_classes = probs.shape[1]
    if len(classnames) != n_classes:
        raise ValueError(f"{len(classnames)} class names for {n_classes} columns of logits")
    tn, fp, fn, tp = _one_vs_rest(y, pred, n_classes)
    present, auroc = np.unique(y), np.full(n_classes, np.nan)
    if len(present) > 1:
        positive, scores = _auc_inputs(y, probs, bad, present)
        auroc[present] = 100.0 * roc_auc_score(positive.astype(int), scores, average=None)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    per_class = {str(name): {"auroc": float(auroc[k]), "sensitivity": float(sensitivity[k]),
                             "specificity": float(specificity[k]), "support": int(tp[k] + fn[k])}
                 for k, name in enumerate(classnames)}
    matrix = {"classes": [str(c) for c in classnames], "rows": "true class", "columns": "predicted class",
              "counts": confusion_matrix(y, pred, labels=np.arange(n_classes)).tolist()}
    if bad.any():
        matrix["no_prediction"] = np.bincount(y[bad], minlength=n_classes).tolist()
    return {"per_class": per_class, "confusion_matrix": matrix,
            "reliability": reliability(*_confidence(y, probs, pred, bad), n_bins=n_bins)}


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> Dict[str, Any]:
    """The reliability diagram's data, per equal-width confidence bin: its edges, "count", "mean_confidence"
    and "fraction_correct" (the bin's accuracy), in percent (None for an empty bin)."""
    ids = _bin_ids(confidence, n_bins)
    count = np.bincount(ids, minlength=n_bins)
    mean_conf = _ratio(np.bincount(ids, weights=confidence, minlength=n_bins), count)
    accuracy = _ratio(np.bincount(ids, weights=correct.astype(float), minlength=n_bins), count)
    def listed(a):
        return [None if math.isnan(v) else float(v) for v in a]
    return {"bins": n_bins, "edges": [100.0 * e for e in np.linspace(0.0, 1.0, n_bins + 1).tolist()],
            "count": count.tolist(), "mean_confidence": listed(mean_conf), "fraction_correct": listed(accuracy)}


# ----------------------------------------------------------------------------- bootstrap intervals
_BOOTSTRAP_CELLS = 2_000_000  # resamples x images weighed at a time (bounds the memory of the intervals)


def bootstrap_ci(logits: torch.Tensor, labels: torch.Tensor, resamples: int = 1000, seed: int = 0,
                 level: float = 95.0) -> Dict[str, List[Optional[float]]]:
    """Percentile bootstrap intervals ([low, high], percent) of classification_metrics' scalar metrics:
    `resamples` draws of the n images with replacement (numpy's default_rng(seed): the same seed, the same
    intervals), each scored from these logits (bootstrap_scores: vectorised over the draws). A draw on which
    a metric is undefined (macro_auc with one class drawn) is left out of that metric's interval; [None,
    None] when it is undefined on every draw."""
    y, probs, pred, bad = _classification_inputs(logits, labels)
    return percentile_intervals(lambda w: bootstrap_scores(w, y, probs, pred, bad), len(y), resamples, seed, level)


def percentile_intervals(score: Callable[[np.ndarray], Dict[str, np.ndarray]], n: int, resamples: int,
                         seed: int = 0, level: float = 95.0) -> Dict[str, Any]:
    """The bootstrap of bootstrap_ci and multilabel_bootstrap_ci: `resamples` draws of the n images with
    replacement (default_rng(seed)), scored in chunks by score((B, n) multiplicities) -> {name: (B,) or
    (B, K) scores}; per name the percentile interval [low, high] of its finite scores ([None, None] where
    none is), a list of them for a (B, K) score (one a column)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _BOOTSTRAP_CELLS // n))
    parts = []
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        parts.append(score(resample_weights(draws, n)))
    tail = (100.0 - level) / 2

    def interval(values: np.ndarray) -> List[Optional[float]]:
        values = values[np.isfinite(values)]
        return ([float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))]
                if len(values) else [None, None])
    out: Dict[str, Any] = {}
    for name in parts[0]:
        values = np.concatenate([p[name] for p in parts])
        out[name] = interval(values) if values.ndim == 1 else [interval(column) for column in values.T]
    return out


def resample_weights(draws: np.ndarray, n: int) -> np.ndarray:
    """(B, n) multiplicities of each image in each of B draws of image indices (B, m)."""
    b = draws.shape[0]
    return np.bincount((draws + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)


def bootstrap_scores(weights: np.ndarray, y: np.ndarray, probs: np.ndarray, pred: np.ndarray,
                     bad: np.ndarray) -> Dict[str, np.ndarray]:
    """classification_metrics' scalar metrics of B resamples at once, each given by the (B, n) multiplicities
    of the images: the same definitions (a test checks them against scikit-learn on resampled rows),
    computed from weighted one-vs-rest counts and a weighted rank AUC so that no resample is scored alone."""
    w = weights.astype(np.float64)
    n_classes = probs.shape[1]
    total = w.sum(axis=1)
    truth = np.eye(n_classes)[y]
    guess = np.eye(n_classes + 1)[pred][:, :n_classes]  # the -1 of a non-finite row: no class
    right = pred == y
    support, predicted, tp = w @ truth, w @ guess, w @ (truth * right[:, None])
    fn, fp = support - tp, predicted - tp
    tn = total[:, None] - tp - fn - fp
    present = support > 0
    sensitivity = np.where(present, _ratio(tp, support), np.nan)
    specificity = np.where(present, _ratio(tn, tn + fp), np.nan)
    seen = present | (predicted > 0)
    f1 = np.where(seen, _ratio(2 * tp, 2 * tp + fp + fn), 0.0)
    confidence, correct = _confidence(y, probs, pred, bad)
    bins = np.eye(ECE_BINS)[_bin_ids(confidence, ECE_BINS)]
    gap = w @ (bins * (correct - confidence)[:, None])
    with warnings.catch_warnings():  # a draw on which a metric is undefined: NaN, left out of its interval
        warnings.simplefilter("ignore", RuntimeWarning)
        balanced = np.nanmean(sensitivity, axis=1)
        return {"accuracy": 100.0 * (w @ right) / total, "macro_f1": f1.sum(axis=1) / seen.sum(axis=1),
                "macro_auc": np.nanmean(_weighted_auc(w, y, probs, bad), axis=1),
                "balanced_accuracy": balanced, "macro_sensitivity": balanced,
                "macro_specificity": np.where(present.sum(axis=1) > 1, np.nanmean(specificity, axis=1), np.nan),
                "ece": 100.0 * np.abs(gap).sum(axis=1) / total}


def _weighted_auc(w: np.ndarray, y: np.ndarray, probs: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """(B, classes present) one-vs-rest AUC in percent of B weighted resamples (NaN where a draw holds no
    positive or no negative of the class): the weighted Mann-Whitney statistic, ties counting one half,
    which is what roc_auc_score computes."""
    return weighted_auc_columns(w, *_auc_inputs(y, probs, bad, np.unique(y)))


def weighted_auc_columns(w: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B, K) AUC in percent of each of the K columns of (n, K) 0/1 `positive` and `scores` under B weighted
    resamples (w: (B, n)); NaN where a draw holds no positive or no negative of the column."""
    out = np.full((w.shape[0], positive.shape[1]), np.nan)
    for j in range(positive.shape[1]):
        order = np.argsort(scores[:, j], kind="stable")
        ranked = scores[order, j]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # groups of tied scores
        weighed = w[:, order]
        pos = weighed * positive[order, j]
        neg = weighed - pos
        if len(starts) < len(ranked):  # ties: one group each
            pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        out[:, j] = _ratio((pos * (below + 0.5 * neg)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1))
    return out


# ----------------------------------------------------------------------------- multi-label
MULTILABEL_THRESHOLD = ("a finding is called present where its probability sigmoid(logit) is at least 0.5 "
                        "(the logit is at least 0)")


def _multilabel_inputs(logits: torch.Tensor, targets: torch.Tensor):
    """(targets 0/1, probabilities sigmoid(logits), non-finite rows) of (n, C) logits and (n, C) targets,
    as numpy arrays, checked. A non-finite row scores worst for every class (as in _auc_inputs)."""
    _check_2d("logits", logits)
    y = torch.as_tensor(targets).cpu()
    if y.shape != logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(y.shape)} differ in shape")
    if logits.shape[0] == 0:
        raise ValueError("no samples")
    y = (y.double().numpy() > 0.5).astype(int)
    bad = (~torch.isfinite(logits).all(dim=1)).cpu().numpy()
    probs = torch.sigmoid(logits.detach().double().nan_to_num(0.0, 0.0, 0.0)).cpu().numpy()
    probs = np.where(bad[:, None], np.where(y > 0, -1.0, 2.0), probs)
    return y, probs, bad


def _per_class_multilabel(y: np.ndarray, probs: np.ndarray):
    """(AUROC, average precision, F1 at 0.5) of each class in percent; AUROC and AP NaN for a class
    without both positives and negatives (AP: without positives)."""
    from sklearn.metrics import average_precision_score

    n_classes = y.shape[1]
    auroc, ap, f1 = (np.full(n_classes, np.nan) for _ in range(3))
    pred = (probs >= 0.5).astype(int)
    for c in range(n_classes):
        positives = int(y[:, c].sum())
        if 0 < positives < len(y):
            auroc[c] = 100.0 * roc_auc_score(y[:, c], probs[:, c])
        if positives:
            ap[c] = 100.0 * average_precision_score(y[:, c], probs[:, c])
        f1[c] = 100.0 * f1_score(y[:, c], pred[:, c], zero_division=0)
    return auroc, ap, f1


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """macro_auroc (the main metric: the mean of scikit-learn's roc_auc_score over the classes that have both
    positives and negatives), macro_ap (mean average precision over the classes with positives) and
    macro_f1_at_50 (mean F1 of each class at probability 0.5), all percent, of (n, C) per-class logits
    (probability sigmoid(logit)) against (n, C) 0/1 targets; "auroc_classes" counts the classes averaged.
    label_ece: the expected calibration error (ECE_BINS bins, as classification's ece) of every (image, class)
    probability, flattened, against its 0/1 target (lower is better)."""
    y, probs, bad = _multilabel_inputs(logits, targets)
    auroc, ap, f1 = _per_class_multilabel(y, probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = {"macro_auroc": float(np.nanmean(auroc)) if np.isfinite(auroc).any() else float("nan"),
               "macro_ap": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
               "macro_f1_at_50": float(np.mean(f1)),
               "label_ece": expected_calibration_error(*_label_calibration(y, probs)),
               "auroc_classes": float(np.isfinite(auroc).sum())}
    if not np.isfinite(auroc).any():
        logger.warning("macro_auroc is undefined: no class has both positives and negatives among the %d images",
                       len(y))
    if bad.any():
        _warn_nonfinite("logit rows", int(bad.sum()), len(y), "scored worst for every class")
        out["nonfinite_rows"] = float(bad.sum())
    return out


def _label_calibration(y: np.ndarray, probs: np.ndarray):
    """(probability, 0/1 target) of every (image, class) pair, flattened: what label_ece bins. A non-finite
    row's probabilities (-1 / 2 from _multilabel_inputs) clip to 1 - target: sure and wrong."""
    return np.clip(probs, 0.0, 1.0).ravel(), y.ravel().astype(float)


def multilabel_confusion(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C, 2, 2) [[tn, fp], [fn, tp]] of each class at probability 0.5 (scikit-learn's
    multilabel_confusion_matrix)."""
    return multilabel_confusion_matrix(y, (probs >= 0.5).astype(int))


def multilabel_details(logits: torch.Tensor, targets: torch.Tensor, classnames: Sequence[str],
                       n_bins: int = ECE_BINS) -> Dict[str, Any]:
    """"per_class": {class: {"auroc", "average_precision", "f1_at_50", "sensitivity", "specificity" (percent
    at probability 0.5; NaN where undefined), "positives", "negatives"}}; "confusion_matrix": each class's
    2x2 counts at 0.5 ({"classes", "counts": {class: {"tn", "fp", "fn", "tp"}}}); "reliability": label_ece's
    bins of the flattened (image, class) probabilities against the 0/1 targets (`reliability`; its
    "fraction_correct" is the fraction of positive targets)."""
    y, probs, _ = _multilabel_inputs(logits, targets)
    if len(classnames) != y.shape[1]:
        raise ValueError(f"{len(classnames)} class names for {y.shape[1]} columns of logits")
    auroc, ap, f1 = _per_class_multilabel(y, probs)
    mcm = multilabel_confusion(y, probs)
    tn, fp, fn, tp = mcm[:, 0, 0], mcm[:, 0, 1], mcm[:, 1, 0], mcm[:, 1, 1]
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    names = [str(name) for name in classnames]
    per_class = {name: {"auroc": float(auroc[c]), "average_precision": float(ap[c]), "f1_at_50": float(f1[c]),
                        "sensitivity": float(sensitivity[c]), "specificity": float(specificity[c]),
                        "positives": int(y[:, c].sum()), "negatives": int(len(y) - y[:, c].sum())}
                 for c, name in enumerate(names)}
    counts = {name: {"tn": int(tn[c]), "fp": int(fp[c]), "fn": int(fn[c]), "tp": int(tp[c])}
              for c, name in enumerate(names)}
    return {"per_class": per_class,
            "confusion_matrix": {"classes": names, "threshold": 0.5, "counts": counts},
            "reliability": reliability(*_label_calibration(y, probs), n_bins=n_bins)}


def multilabel_bootstrap_ci(logits: torch.Tensor, targets: torch.Tensor, resamples: int = 1000, seed: int = 0,
                            level: float = 95.0) -> Dict[str, Any]:
    """bootstrap_ci's intervals (the same draws of the images) of multilabel_metrics' scalar metrics, plus
    "per_class_auroc": an interval per class, in the classes' order."""
    y, probs, _ = _multilabel_inputs(logits, targets)
    return percentile_intervals(lambda w: multilabel_bootstrap_scores(w, y, probs), len(y), resamples, seed, level)


def multilabel_bootstrap_scores(weights: np.ndarray, y: np.ndarray, probs: np.ndarray) -> Dict[str, np.ndarray]:
    """multilabel_metrics' scalar metrics (and the (B, C) per-class AUROC) of B resamples at once, given by the
    (B, n) multiplicities of the images: weighted counts, rank AUC and average precision, so that no
    resample is scored alone (a test checks them against scikit-learn on resampled rows)."""
    w = weights.astype(np.float64)
    total = w.sum(axis=1)
    called = probs >= 0.5
    tp, fp, positives = w @ (y * called), w @ ((1 - y) * called), w @ y
    fn = positives - tp
    f1 = np.nan_to_num(_ratio(2 * tp, 2 * tp + fp + fn), nan=0.0)  # no positive called or present: 0
    auroc = weighted_auc_columns(w, y, probs)
    confidence, outcome = _label_calibration(y, probs)
    n, n_classes = y.shape
    gaps = np.zeros((n, ECE_BINS))  # per image, the sum over its classes of (target - probability), by bin
    np.add.at(gaps, (np.repeat(np.arange(n), n_classes), _bin_ids(confidence, ECE_BINS)), outcome - confidence)
    with warnings.catch_warnings():  # a draw on which a metric is undefined: NaN, left out of its interval
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"macro_auroc": np.nanmean(auroc, axis=1), "macro_ap": np.nanmean(_weighted_ap(w, y, probs), axis=1),
                "macro_f1_at_50": f1.mean(axis=1),
                "label_ece": 100.0 * np.abs(w @ gaps).sum(axis=1) / (total * n_classes),
                "per_class_auroc": auroc}


def _weighted_ap(w: np.ndarray, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(B, C) average precision in percent under B weighted resamples (NaN without a positive): the sum over
    the distinct scores, highest first, of the recall gained times the precision there (average_precision_score,
    tied scores one step)."""
    out = np.full((w.shape[0], y.shape[1]), np.nan)
    for c in range(y.shape[1]):
        order = np.argsort(-probs[:, c], kind="stable")
        ranked = probs[order, c]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        pos = np.add.reduceat(w[:, order] * y[order, c], starts, axis=1)
        seen = np.cumsum(np.add.reduceat(w[:, order], starts, axis=1), axis=1)
        precision = np.nan_to_num(_ratio(np.cumsum(pos, axis=1), seen))
        out[:, c] = _ratio((pos * precision).sum(axis=1) / 100.0, pos.sum(axis=1))
    return out
