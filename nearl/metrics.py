"""Evaluation metrics: image-text retrieval Recall@k and classification accuracy / F1 / AUC.

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
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score

from .metric_table import RECALL_KS, recall_key

logger = logging.getLogger("nearl.metrics")

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


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """accuracy, macro_f1 and macro_auc (all percent) of (n, C) logits against (n,) labels.

    macro_f1 is scikit-learn's f1_score(average="macro") over the classes that occur in the labels
    or the predictions (a class never predicted correctly scores 0). macro_auc is scikit-learn's
    roc_auc_score(average="macro") of the one-vs-rest softmax probabilities over the classes
    present in the labels, each of which then has positives and negatives (ties count one half).
    With a single class present the AUC is undefined: macro_auc is nan, "auc_classes" is 0 and a
    warning says why.
    """
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
    pred = np.where(bad, -1, probs.argmax(axis=1))  # a non-finite row predicts no class: always wrong

    # The classes seen in the labels or the predictions; the -1 of a non-finite row is no class, so
    # such a row counts only as a false negative of its label.
    seen = np.union1d(np.unique(y), np.unique(pred[pred >= 0]))
    macro_f1 = f1_score(y, pred, labels=seen, average="macro", zero_division=0)

    present = np.unique(y)
    if len(present) > 1:
        # One-vs-rest over the classes present. A non-finite row scores worst for every class: below
        # every probability (-1) where it is a positive, above every one (2) where it is a negative.
        positive = y[:, None] == present[None, :]
        scores = np.where(bad[:, None], np.where(positive, -1.0, 2.0), probs[:, present])
        macro_auc = 100.0 * float(roc_auc_score(positive.astype(int), scores, average="macro"))
    else:
        logger.warning("macro_auc is undefined: the labels contain a single class (%s), so no "
                       "class has both positives and negatives", present.tolist())
        macro_auc = float("nan")
    out = {
        "accuracy": 100.0 * float((pred == y).mean()),
        "macro_f1": 100.0 * float(macro_f1),
        "macro_auc": macro_auc,
        "auc_classes": float(len(present)) if len(present) > 1 else 0.0,
    }
    if bad.any():
        _warn_nonfinite("logit rows", int(bad.sum()), n, "counted as wrong predictions")
        out["nonfinite_rows"] = float(bad.sum())
    return out
