"""Predictions for images a user points at: class probabilities, or a ranking of given texts, and the
table, CSV and JSON they are shown and written as (`python -m nearl.predict` is the command line).

Images are read as training and evaluation read them (nearl.data.images.load_image: DICOM, 16-bit,
gray), with the backbone's own preprocessing; one that cannot be read is reported and skipped.
Classification uses evaluation's classifier (prompt-ensembled class embeddings through the adapted
text tower, or the model's own head for linear-probe): probabilities are the softmax of
logit_scale * cos(image, class). Multi-label (an adapter or checkpoint trained with --task multilabel, or
--multilabel) scores each class on its own, as evaluation's multi-label scoring does (nearl/model/multilabel.py):
its probability is sigmoid(z_c), positive against negative prompts, and it is called present at 0.5. Retrieval
ranks the given texts for each image by cosine similarity; its probabilities are the softmax over the texts of
logit_scale * cos.

An image whose outputs hold NaN or inf (a diverged model) gets no label and no ranking: the table says
so, the CSV leaves its cells empty and the JSON writes null (never a bare NaN, which JSON parsers
reject); `python -m nearl.predict` then exits with status 2.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from nearl.model.classify import TEMPLATES, classification_logits
from nearl.model.multilabel import multilabel_logits
from nearl.cli_args import user_errors
from nearl.data.datasets import LabelledDataset
from nearl.data.images import is_dicom
from nearl.data.records import LabelledRecord
from nearl.errors import UserError
from nearl.evaluation.run import autocast, encode_images, encode_texts
from nearl.logging_utils import json_safe
from nearl.methods import spec
from nearl.writes import atomic_write_all

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".dcm",
                  ".dicom")
CSV_FILE, JSON_FILE = "predictions.csv", "predictions.json"
TABLE_CLASSES = 6  # more classes than this: the table shows the top ones per image, not a column each
NONFINITE = "no prediction: the model's outputs hold NaN or inf"
PRESENT_AT = 0.5  # multi-label: a class is called present where its probability is at least this


@dataclass
class Predictions:
    task: str  # "classification", "multilabel" or "retrieval"
    images: List[str]  # the images predicted, in the order found
    labels: List[str]  # the class names, or the texts ranked
    probabilities: torch.Tensor  # (images, labels): softmax over the labels (multilabel: sigmoid of each logit)
    scores: torch.Tensor  # (images, labels): logits (classification, multilabel) or cosine similarities
    skipped: List[Tuple[str, str]]  # (image, why) of those that could not be read

    def ranking(self, i: int) -> List[int]:
        """Label indices of image i, most probable first (ties keep the given order)."""
        return torch.sort(self.scores[i], descending=True, stable=True).indices.tolist()

    def finite(self, i: int) -> bool:
        """Whether image i's scores and probabilities are all finite (else it gets no label)."""
        return bool(torch.isfinite(self.scores[i]).all() and torch.isfinite(self.probabilities[i]).all())

    def present(self, i: int) -> List[int]:
        """Multi-label: the class indices of image i called present (probability at least PRESENT_AT)."""
        return [j for j, p in enumerate(self.probabilities[i].tolist()) if p >= PRESENT_AT]

    @property
    def nonfinite(self) -> List[str]:
        """The images that got no label: their outputs hold NaN or inf."""
        return [image for i, image in enumerate(self.images) if not self.finite(i)]


# ----------------------------------------------------------------------------- inputs
def _image_files(folder: Path) -> List[Path]:
    """Files under `folder` with an image suffix, or none and DICOM's magic bytes; hidden ones left out."""
    found = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and is_dicom(path)):
            found.append(path)
    return found


def find_images(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """The images `--images` names: a file as given (whatever its suffix, DICOM often has none), a
    folder recursively (image suffixes, or DICOM without one). A path that does not exist, or
    nothing found, is a UserError."""
    found: List[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(_image_files(path))
        else:
            raise UserError(f"--images {given}: no such file or folder")
    if not found:
        raise UserError(f"--images: no image files found in {', '.join(str(p) for p in paths)} (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)} and DICOM files without a suffix)")
    return list(dict.fromkeys(found))  # each image once, in the order found


def split_classes(values: Sequence[str]) -> List[str]:
    """--classes "pneumonia,normal" (or several arguments) -> ['pneumonia', 'normal']; none, or the
    same name twice, is a UserError."""
    names = [name.strip() for value in values for name in value.split(",")]
    names = [n for n in names if n]
    if not names:
        raise UserError("--classes: no class names given (e.g. --classes \"pneumonia,normal\")")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--classes: {twice} given more than once")
    return names


def read_texts(texts: Optional[Sequence[str]], texts_file: Optional[str]) -> Optional[List[str]]:
    """The texts to rank: --texts, then the non-blank lines of --texts-file; None when neither is given."""
    if texts is None and texts_file is None:
        return None
    found = [t.strip() for t in texts or ()]
    if texts_file is not None:
        try:
            found += [line.strip() for line in Path(texts_file).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--texts-file {texts_file}: cannot be read ({err})") from None
    found = [t for t in found if t]
    if not found:
        raise UserError(f"{'--texts-file ' + texts_file if texts_file else '--texts'}: no texts to rank")
    return found


def resolve_classes(given: Optional[List[str]], recorded: Optional[Sequence[str]], method: str,
                    multilabel: bool = False) -> List[str]:
    """The classes to score: those given, else those the model was trained on. A method that does not
    score unseen classes (linear-probe's head, Tip-Adapter's cache) scores its trained classes only, in
    their order. One class is a UserError (its softmax is 1 whatever the image) unless `multilabel` (each
    class is scored on its own)."""
    if given is None:
        if not recorded:
            raise UserError("give --classes (classification) or --texts / --texts-file (retrieval): the model "
                            "records no class names")
        given = list(recorded)
    if len(given) < 2 and not multilabel:
        raise UserError(f"--classes {','.join(given)}: one class, whose probability is 1 whatever the image; "
                        "give at least two classes to choose between")
    if not spec(method).scores_unseen_classes and recorded and list(given) != list(recorded):
        raise UserError(f"--classes {','.join(given)}: {spec(method).display_name} scores the classes it was trained "
                        f"on, in their order: {','.join(recorded)} (or leave --classes out)")
    return list(given)


# ----------------------------------------------------------------------------- predicting
def _encode(model, images: Sequence[Path], **kw) -> Tuple[List[str], torch.Tensor, List[Tuple[str, str]]]:
    """(images read, their (n, E) features, (image, why) of those skipped)."""
    records = [LabelledRecord(image=Path(p), label=0, classname="") for p in images]
    dataset = LabelledDataset(records, model.image_transform(False))
    kept, features = encode_images(model, dataset, source="--images", what="prediction", **kw)
    skipped = [(str(images[i]), why) for i, why in dataset.failed()]
    return [str(images[i]) for i in kept.tolist()], features, skipped


@torch.no_grad()
def predict_classes(model, images: Sequence[Path], classnames: Sequence[str], *,
                    templates: Sequence[str] = TEMPLATES, device="cpu", batch_size: int = 64, workers: int = 0,
                    precision: str = "fp32", progress: bool = True, multilabel: bool = False) -> Predictions:
    """Class probabilities of each image: softmax of evaluation's classification logits or, `multilabel`,
    sigmoid of each class's multi-label logit z_c (nearl.model.multilabel.multilabel_logits)."""
    score = multilabel_logits if multilabel else classification_logits
    was_training = model.training
    model.eval()
    try:
        kept, features, skipped = _encode(model, images, device=device, batch_size=batch_size, workers=workers,
                                          precision=precision, progress=progress)
        with autocast(torch.device(device), precision), user_errors("--classes: "):
            logits = score(model, features, list(classnames), templates, device=device).float()
    finally:
        model.train(was_training)
    if multilabel:
        return Predictions("multilabel", kept, list(classnames), torch.sigmoid(logits), logits, skipped)
    return Predictions("classification", kept, list(classnames), logits.softmax(dim=-1), logits, skipped)


@torch.no_grad()
def rank_texts(model, images: Sequence[Path], texts: Sequence[str], *, device="cpu", batch_size: int = 64,
               workers: int = 0, precision: str = "fp32", progress: bool = True) -> Predictions:
    """The given texts ranked for each image by cosine similarity (probabilities: softmax over the texts
    of logit_scale * cos, as the contrastive loss sees them)."""
    if not texts:
        raise UserError("--texts: no texts to rank")
    was_training = model.training
    model.eval()
    try:
        kept, features, skipped = _encode(model, images, device=device, batch_size=batch_size, workers=workers,
                                          precision=precision, progress=progress)
        text_features = encode_texts(model, model.tokenizer()(list(texts)), device=device,
                                     batch_size=max(batch_size, 64), precision=precision, progress=progress)
    finally:
        model.train(was_training)
    cosine = F.normalize(features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    probabilities = (model.logit_scale.float().cpu() * cosine).softmax(dim=-1)
    return Predictions("retrieval", kept, list(texts), probabilities, cosine, skipped)


# ----------------------------------------------------------------------------- output
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(pred: Predictions, top_k: int = 5) -> str:
    """A Markdown table: per image the prediction and the class probabilities (the top ones when there
    are many classes), or the top_k texts with their probability and cosine similarity."""
    p = pred.probabilities
    if pred.task == "multilabel":
        return _multilabel_table(pred, top_k)
    if pred.task == "retrieval":
        lines = ["| image | rank | text | probability | similarity |", "|---|---|---|---|---|"]
        for i, image in enumerate(pred.images):
            if not pred.finite(i):
                lines.append(f"| {_cell(image)} | | {NONFINITE} | | |")
                continue
            for rank, j in enumerate(pred.ranking(i)[:top_k], 1):
                lines.append(f"| {_cell(image)} | {rank} | {_cell(pred.labels[j])} | {p[i, j]:.4f} | "
                             f"{pred.scores[i, j]:.4f} |")
        return "\n".join(lines) + "\n"
    wide = len(pred.labels) <= TABLE_CLASSES
    extra = [f"p({_cell(c)})" for c in pred.labels] if wide else [f"top {min(top_k, len(pred.labels))}"]
    lines = ["| " + " | ".join(["image", "prediction", "probability", *extra]) + " |",
             "|" + "---|" * (3 + len(extra))]
    for i, image in enumerate(pred.images):
        if not pred.finite(i):
            lines.append(f"| {_cell(image)} | {NONFINITE} | |" + " |" * len(extra))
            continue
        order = pred.ranking(i)
        cells = ([f"{p[i, j]:.4f}" for j in range(len(pred.labels))] if wide else
                 [", ".join(f"{_cell(pred.labels[j])} {p[i, j]:.3f}" for j in order[:top_k])])
        lines.append(f"| {_cell(image)} | {_cell(pred.labels[order[0]])} | {p[i, order[0]]:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _multilabel_table(pred: Predictions, top_k: int) -> str:
    """format_table's multi-label table: per image the classes called present and each class's probability
    (the top_k, when there are many classes)."""
    wide = len(pred.labels) <= TABLE_CLASSES
    extra = [f"p({_cell(c)})" for c in pred.labels] if wide else [f"top {min(top_k, len(pred.labels))}"]
    lines = ["| " + " | ".join(["image", f"present (p >= {PRESENT_AT})", *extra]) + " |",
             "|" + "---|" * (2 + len(extra))]
    for i, image in enumerate(pred.images):
        if not pred.finite(i):
            lines.append(f"| {_cell(image)} | {NONFINITE} |" + " |" * len(extra))
            continue
        p = pred.probabilities[i]
        cells = ([f"{p[j]:.4f}" for j in range(len(pred.labels))] if wide else
                 [", ".join(f"{_cell(pred.labels[j])} {p[j]:.3f}" for j in pred.ranking(i)[:top_k])])
        present = ", ".join(_cell(pred.labels[j]) for j in pred.present(i)) or "none"
        lines.append(f"| {_cell(image)} | {present} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _multilabel_columns(pred: Predictions, i: int) -> Dict[str, Any]:
    """The CSV's cells of image i in multi-label mode: the classes called present (';'-joined), then per class
    p(<class>) and <class> (1: called present at PRESENT_AT, else 0)."""
    probs, present = pred.probabilities[i].tolist(), set(pred.present(i))
    cells: Dict[str, Any] = {"present": ";".join(pred.labels[j] for j in sorted(present))}
    for j, c in enumerate(pred.labels):
        cells[f"p({c})"], cells[c] = probs[j], int(j in present)
    return cells


def prediction_rows(pred: Predictions) -> List[Dict[str, Any]]:
    """The CSV's rows. Classification: image, prediction, probability, then p(<class>) for every class.
    Multi-label: image, present, then p(<class>) and <class> (0/1 at PRESENT_AT) for every class. Retrieval:
    one row per image and text, image, rank, text, text_index, probability, similarity."""
    rows = []
    empty = {"classification": ["prediction", "probability", *(f"p({c})" for c in pred.labels)],
             "multilabel": list(_multilabel_columns(pred, 0)) if pred.images else [],
             "retrieval": ["rank", "text", "text_index", "probability", "similarity"]}[pred.task]
    for i, image in enumerate(pred.images):
        if not pred.finite(i):  # no label: every cell but the image's left empty
            rows.append({"image": image, **{key: None for key in empty}})
            continue
        if pred.task == "multilabel":
            rows.append({"image": image, **_multilabel_columns(pred, i)})
            continue
        order = pred.ranking(i)
        probs = pred.probabilities[i].tolist()
        if pred.task == "classification":
            rows.append({"image": image, "prediction": pred.labels[order[0]], "probability": probs[order[0]],
                         **{f"p({c})": probs[j] for j, c in enumerate(pred.labels)}})
            continue
        scores = pred.scores[i].tolist()
        rows += [{"image": image, "rank": rank, "text": pred.labels[j], "text_index": j, "probability": probs[j],
                  "similarity": scores[j]} for rank, j in enumerate(order, 1)]
    return rows


def predictions_json(pred: Predictions, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JSON document: `meta` (model, source, templates), the labels, one entry per image, the skipped."""
    entries = []
    for i, image in enumerate(pred.images):
        order, probs, scores = pred.ranking(i), pred.probabilities[i].tolist(), pred.scores[i].tolist()
        if not pred.finite(i):
            empty = {"classification": ("prediction", "probabilities"), "retrieval": ("ranking",),
                     "multilabel": ("present", "probabilities", "labels")}[pred.task]
            entries.append({"image": image, **dict.fromkeys(empty), "error": NONFINITE})
        elif pred.task == "multilabel":  # each class on its own: its probability and its 0/1 at PRESENT_AT
            present = set(pred.present(i))
            entries.append({"image": image, "present": [pred.labels[j] for j in sorted(present)],
                            "probabilities": {c: probs[j] for j, c in enumerate(pred.labels)},
                            "labels": {c: int(j in present) for j, c in enumerate(pred.labels)}})
        elif pred.task == "classification":
            entries.append({"image": image, "prediction": pred.labels[order[0]],
                            "probabilities": {c: probs[j] for j, c in enumerate(pred.labels)}})
        else:
            entries.append({"image": image, "ranking": [
                {"rank": rank, "text": pred.labels[j], "text_index": j, "probability": probs[j],
                 "similarity": scores[j]} for rank, j in enumerate(order, 1)]})
    key = "texts" if pred.task == "retrieval" else "classes"
    rule = {"threshold": PRESENT_AT} if pred.task == "multilabel" else {}
    return {"task": pred.task, **(meta or {}), key: pred.labels, **rule, "n_images": len(pred.images),
            "n_nonfinite": len(pred.nonfinite), "predictions": entries,
            "skipped": [{"image": image, "reason": why} for image, why in pred.skipped]}


def write_predictions(pred: Predictions, out_dir: Union[str, Path],
                      meta: Optional[Dict[str, Any]] = None) -> Tuple[Path, Path]:
    """out_dir/predictions.csv and out_dir/predictions.json; returns their paths."""
    out = Path(out_dir)
    rows = prediction_rows(pred)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["image"])
    writer.writeheader()
    writer.writerows(rows)
    document = json.dumps(json_safe(predictions_json(pred, meta)), indent=2, allow_nan=False)  # NaN: null
    atomic_write_all({out / CSV_FILE: table.getvalue(), out / JSON_FILE: document + "\n"})  # both, or neither
    return out / CSV_FILE, out / JSON_FILE
