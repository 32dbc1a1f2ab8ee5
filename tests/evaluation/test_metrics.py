"""Retrieval Recall@k and classification metrics against hand-worked examples."""
import logging
import math

import pytest
import torch

import nearl.evaluation.metrics as metrics
from nearl.evaluation.metrics import classification_metrics, mean_recall, retrieval_recall

# Similarity of image i (rows) and text t (columns); texts 0,1 belong to image 0, text 2 to
# image 1, texts 3,4 to image 2.
#        T0   T1   T2   T3   T4
SIM = [[0.9, 0.3, 0.6, 0.2, 0.1],   # I0
       [0.1, 0.5, 0.4, 0.7, 0.0],   # I1
       [0.2, 0.1, 0.5, 0.3, 0.8]]   # I2
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])
# Worked by hand (rank = wrong items scoring >= the right one):
#  i2t: I0 best own caption T0 (0.9), nothing above -> rank 0
#       I1 own T2 (0.4); T1 0.5 and T3 0.7 above   -> rank 2
#       I2 own T3 (0.3) and T4 (0.8); T4 is top    -> rank 0  (T3 alone would give rank 1)
#  t2i: T0 0.9 top -> 0; T1 0.3 < I1 0.5 -> 1; T2 0.4 < I0 0.6, I2 0.5 -> 2;
#       T3 0.3 < I1 0.7 -> 1; T4 0.8 top -> 0
EXPECTED = {"i2t_R@1": 200 / 3, "i2t_R@2": 200 / 3, "i2t_R@3": 100.0,
            "t2i_R@1": 40.0, "t2i_R@2": 80.0, "t2i_R@3": 100.0}


def embeddings():
    """Unit-norm embeddings whose dot products are exactly SIM: images are basis vectors, each
    text's 4th coordinate pads it to norm 1."""
    sim = torch.tensor(SIM, dtype=torch.float64)
    images = torch.eye(3, 4, dtype=torch.float64)
    texts = torch.cat([sim.T, (1 - (sim.T ** 2).sum(1, keepdim=True)).sqrt()], dim=1)
    return images, texts


def check(result, expected):
    for k, v in expected.items():
        assert result[k] == pytest.approx(v, abs=1e-4), k


def test_recall_hand_worked_several_captions_per_image():
    images, texts = embeddings()
    result = retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(1, 2, 3))
    check(result, EXPECTED)
    assert result["mean_recall"] == pytest.approx(sum(EXPECTED.values()) / 6)
    assert mean_recall(result) == pytest.approx(result["mean_recall"])


def test_recall_normalises_inside():
    images, texts = embeddings()
    scaled = retrieval_recall(images * torch.tensor([[5.0], [0.1], [30.0]], dtype=torch.float64),
                              texts * 7, TEXT_TO_IMAGE, ks=(1, 2, 3))
    check(scaled, EXPECTED)


def test_recall_chunked_matches(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 2)
    images, texts = embeddings()
    check(retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(1, 2, 3)), EXPECTED)


def test_recall_against_topk_reference():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(40, 16, generator=g), torch.randn(100, 16, generator=g)
    t2i = torch.randint(40, (100,), generator=g)
    t2i[:40] = torch.arange(40)  # every image owns at least one caption
    result = retrieval_recall(img, txt, t2i, ks=(1, 5, 10))
    sim = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    for k in (1, 5, 10):
        top_t = sim.topk(k, dim=1).indices  # (I, k) texts
        i2t = sum(bool((t2i[top_t[i]] == i).any()) for i in range(40)) / 40
        top_i = sim.T.topk(k, dim=1).indices  # (T, k) images
        t2i_hits = sum(bool((top_i[t] == t2i[t]).any()) for t in range(100)) / 100
        assert result[f"i2t_R@{k}"] == pytest.approx(100 * i2t)
        assert result[f"t2i_R@{k}"] == pytest.approx(100 * t2i_hits)


def test_recall_ties_count_against_the_query():
    same = torch.ones(3, 4)
    result = retrieval_recall(same, torch.ones(3, 4), torch.tensor([0, 1, 2]), ks=(1, 3))
    assert result["i2t_R@1"] == 0.0 and result["t2i_R@1"] == 0.0  # a collapsed model gets nothing
    assert result["i2t_R@3"] == 100.0  # only 2 wrong items, so everything is within the top 3


def test_recall_input_errors():
    images, texts = embeddings()
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(images, texts, torch.tensor([0, 0, 0, 2, 2]))
    with pytest.raises(ValueError, match="entries"):
        retrieval_recall(images, texts, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        retrieval_recall(images, texts, torch.tensor([0, 1, 2, 3, 0]))


# Probabilities chosen so softmax(log p) = p. Labels [0,0,1,1,2,2]; argmax -> [0,1,1,1,2,0].
P = torch.tensor([[0.70, 0.20, 0.10],
                  [0.35, 0.45, 0.20],
                  [0.10, 0.80, 0.10],
                  [0.10, 0.50, 0.40],
                  [0.10, 0.30, 0.60],
                  [0.50, 0.10, 0.40]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
# accuracy 4/6. F1: class 0 tp1 fp1 fn1 -> 1/2; class 1 tp2 fp1 fn0 -> 4/5; class 2 tp1 fp0 fn1 -> 2/3.
# AUC (positive > negative pairs, ties 1/2):
#   class 0: pos .70,.35 vs neg .10,.10,.10,.50 -> (4 + 3) / 8 = 0.875
#   class 1: pos .80,.50 vs neg .20,.45,.30,.10 -> 8 / 8 = 1.0
#   class 2: pos .60,.40 vs neg .10,.20,.10,.40 -> (4 + 3.5) / 8 = 0.9375 (a tie at .40)


def test_classification_hand_worked():
    m = classification_metrics(P.log(), LABELS)
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["macro_f1"] == pytest.approx(100 * (1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["macro_auc"] == pytest.approx(100 * (0.875 + 1.0 + 0.9375) / 3)
    assert m["auc_classes"] == 3


def test_f1_counts_predicted_classes_absent_from_labels():
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0, 5.0, 0], [0, 5.0, 0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 1, 1]))
    # class 0: tp1 fn1 -> 2/3; class 1: perfect -> 1; class 2 (only predicted): 0
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert m["auc_classes"] == 2  # AUC only over the classes present in the labels


def test_single_class_auc_is_nan_with_warning(caplog):
    caplog.set_level(logging.WARNING, logger="nearl.metrics")
    m = classification_metrics(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert math.isnan(m["macro_auc"]) and m["auc_classes"] == 0
    assert m["accuracy"] == 50.0
    assert "single class" in caplog.text


def test_classification_input_errors():
    with pytest.raises(ValueError, match="labels must be in"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- NaN is never a hit
NAN = float("nan")


def test_recall_nan_embeddings_are_misses(caplog):
    """A diverged model (every embedding NaN) scores 0 at every k, not 100 (issue 10, item 1)."""
    caplog.set_level(logging.WARNING, logger="nearl.metrics")
    images, texts = embeddings()
    result = retrieval_recall(torch.full_like(images, NAN), torch.full_like(texts, NAN), TEXT_TO_IMAGE,
                              ks=(1, 2, 3, 10))
    assert all(v == 0.0 for k, v in result.items() if "_R@" in k), result
    assert result["mean_recall"] == 0.0 and result["nonfinite_rows"] == 8
    assert "NaN or inf" in caplog.text
    inf = retrieval_recall(images * math.inf, texts, TEXT_TO_IMAGE, ks=(1, 10))
    assert inf["i2t_R@10"] == 0.0 and inf["t2i_R@10"] == 0.0


def test_recall_nan_rows_rank_last():
    """One NaN text: its own queries miss, and it never outranks a right answer elsewhere."""
    images, texts = embeddings()
    texts = texts.clone()
    texts[2] = NAN  # the only caption of image 1
    result = retrieval_recall(images, texts, TEXT_TO_IMAGE, ks=(1, 2, 3))
    # i2t: I0 rank 0, I2 rank 0 as before; I1's only caption is NaN -> a miss at every k.
    assert result["i2t_R@1"] == pytest.approx(200 / 3) and result["i2t_R@3"] == pytest.approx(200 / 3)
    # t2i: T2 misses at every k; the others keep their hand-worked ranks (0, 1, 1, 0).
    assert result["t2i_R@1"] == pytest.approx(40.0) and result["t2i_R@2"] == pytest.approx(80.0)
    assert result["t2i_R@3"] == pytest.approx(80.0)
    assert "nonfinite_rows" in result and "nonfinite_rows" not in retrieval_recall(*embeddings(), TEXT_TO_IMAGE)


def test_classification_nan_rows_are_wrong():
    m = classification_metrics(torch.tensor([[NAN, 0.0]]), torch.tensor([0]))
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0 and m["nonfinite_rows"] == 1
    everything_nan = classification_metrics(torch.full_like(P, NAN), LABELS)
    assert everything_nan["accuracy"] == 0.0 and everything_nan["macro_f1"] == 0.0
    assert everything_nan["macro_auc"] == 0.0  # each NaN row scores worst for every class
    # One NaN row among the hand-worked ones: row 0 (label 0, predicted right before) becomes wrong.
    logits = P.log().clone()
    logits[0, 1] = NAN
    m = classification_metrics(logits, LABELS)
    assert m["accuracy"] == pytest.approx(100 * 3 / 6)
    # class 0: tp0 fn2 -> 0 (row 5 predicted 0 wrongly: fp1); class 1: 4/5; class 2: 2/3
    assert m["macro_f1"] == pytest.approx(100 * (0 + 4 / 5 + 2 / 3) / 3)
    # AUC class 0: positive row 0 now below every negative: pos .35 vs .10,.10,.10,.50 -> 3 of 8
    assert m["macro_auc"] < classification_metrics(P.log(), LABELS)["macro_auc"]


# ----------------------------------------------------------------------------- scikit-learn agrees with the definitions
def _hand_f1(pred, y):
    """Per-class F1 = 2tp / (2tp + fp + fn) over the classes in the labels or the predictions."""
    classes = sorted(set(y.tolist()) | set(pred[pred >= 0].tolist()))
    f1s = []
    for c in classes:
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return 100 * sum(f1s) / len(f1s)


def _hand_auc(scores, positive):
    """Mann-Whitney: the share of (positive, negative) pairs ordered right, ties one half."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_sklearn_metrics_match_the_hand_written_definitions(seed):
    """Random logits with ties, a class never in the labels, a class never predicted and NaN rows."""
    g = torch.Generator().manual_seed(seed)
    n, C = 40, 5
    logits = torch.randint(0, 3, (n, C), generator=g).double()  # coarse values: many ties
    logits[:, 4] -= 10  # class 4 is never predicted
    labels = torch.randint(0, 4, (n,), generator=g)  # class 4 never occurs either
    labels[labels == 3] = 0  # nor class 3, which may still be predicted
    logits[torch.randperm(n, generator=g)[:3], 1] = NAN
    m = classification_metrics(logits, labels)
    bad = ~torch.isfinite(logits).all(dim=1)
    probs = torch.softmax(logits.nan_to_num(0.0), dim=1)
    pred = torch.where(bad, -1, probs.argmax(dim=1))
    assert m["macro_f1"] == pytest.approx(_hand_f1(pred, labels))
    present = sorted(set(labels.tolist()))
    aucs = []
    for c in present:
        worst = torch.where(labels == c, -math.inf, math.inf)
        aucs.append(_hand_auc(torch.where(bad, worst, probs[:, c]), labels == c))
    assert m["macro_auc"] == pytest.approx(100 * float(sum(aucs)) / len(aucs))
    assert m["auc_classes"] == len(present) and m["nonfinite_rows"] == 3


def test_macro_auc_is_sklearn_ovr_when_every_class_occurs():
    from sklearn.metrics import roc_auc_score
    m = classification_metrics(P.log(), LABELS)
    expected = roc_auc_score(LABELS.numpy(), P.numpy(), multi_class="ovr", average="macro")
    assert m["macro_auc"] == pytest.approx(100 * expected)
