"""--task multilabel's data (issue 26 item 1): a CheXpert-style CSV (a 0/1/-1/empty column per finding) and an
NIH-style one (one delimited label field, "No Finding" no class), their splits, and their errors."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from nearl.data import selection as S
from nearl.data.multilabel import MultiLabelRecord, read_multilabel_csv
from nearl.data.splitting import HeldOut
from nearl.data.tabular import Columns
from nearl.errors import UserError
from train_helpers import make_image_folder

FINDINGS = ("Atelectasis", "Effusion", "Edema")


def chexpert_csv(root: Path, rows=None) -> Path:
    """root/labels.csv over make_image_folder's images: a split column and a column per finding."""
    make_image_folder(root, per_class=(2, 2))
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rows = rows or [["1", "", "-1"], ["0", "1", "1"], ["", "0", "1"], ["1", "1", "0"]]
    path = root / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", *FINDINGS, "split"])
        for i, image in enumerate(images):
            w.writerow([image, *rows[i % len(rows)], image.split("/")[0]])
    return path


def nih_csv(root: Path) -> Path:
    make_image_folder(root, per_class=(2, 2))
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    cells = ["Effusion|Edema", "No Finding", "Atelectasis", "Edema"]
    path = root / "nih.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels"])
        for i, image in enumerate(images):
            w.writerow([image, cells[i % len(cells)]])
    return path


COLUMNS = Columns(label_columns=",".join(FINDINGS))


def test_several_label_columns(tmp_path):
    path = chexpert_csv(tmp_path)
    by_split, classnames = read_multilabel_csv(path, columns=COLUMNS)
    assert classnames == list(FINDINGS)  # the columns' order
    assert sorted(by_split) == ["train", "val"] and len(by_split["train"]) == 6 and len(by_split["val"]) == 6
    first = by_split["train"][0]
    assert isinstance(first, MultiLabelRecord) and first.split == "train"
    # 1 positive; 0 and empty negative; -1 (uncertain) negative: U-zeros
    assert [r.targets for r in by_split["train"][:4]] == [(1, 0, 0), (0, 1, 1), (0, 0, 1), (1, 1, 0)]


def test_one_delimited_field(tmp_path):
    path = nih_csv(tmp_path)
    by_split, classnames = read_multilabel_csv(path, columns=Columns(label="labels", label_separator="|"))
    assert classnames == ["Atelectasis", "Edema", "Effusion"]  # sorted; "No Finding" is no class
    records = by_split["all"]
    assert [r.targets for r in records[:4]] == [(0, 1, 1), (0, 0, 0), (1, 0, 0), (0, 1, 0)]


def test_selection_and_a_plain_held_out_split(tmp_path):
    path = nih_csv(tmp_path)
    columns = Columns(label="labels", label_separator="|")
    train, val = S.select_splits("multilabel", path, ("train", "val"), fallback=S.TRAINING, columns=columns,
                                 held_out=HeldOut(0.25, 0.0, 0))
    assert train.classnames == ["Atelectasis", "Edema", "Effusion"]
    assert len(train.records) + len(val.records) == 12 and val.records
    assert train.split_file["stratified"] is False  # no stratification for multi-label data


def test_errors(tmp_path):
    path = chexpert_csv(tmp_path)
    with pytest.raises(UserError, match=r"no column 'Pneumonia' \(columns found: image, Atelectasis, Effusion, "
                                        r"Edema, split\)"):
        read_multilabel_csv(path, columns=Columns(label_columns="Atelectasis,Pneumonia"))
    with pytest.raises(UserError, match="needs one layout"):
        read_multilabel_csv(path)
    bad = chexpert_csv(tmp_path / "bad", rows=[["1", "yes", "0"]])
    with pytest.raises(UserError, match=r"line 2: column 'Effusion' holds 'yes'"):
        read_multilabel_csv(bad, columns=COLUMNS)


def test_multilabel_flags_are_refused_for_other_tasks(tmp_path):
    path = chexpert_csv(tmp_path)
    for task in ("classification", "retrieval"):
        with pytest.raises(UserError, match="--task multilabel"):
            S.select_splits(task, str(path), ("train",), fallback=S.TRAINING, columns=COLUMNS)


def test_uncertain_labels_ones_reads_minus_one_as_positive(tmp_path):
    """--uncertain-labels ones (U-ones): a -1 cell is a positive; the default (zeros) reads it as a negative."""
    path = chexpert_csv(tmp_path)
    zeros, _ = read_multilabel_csv(path, columns=COLUMNS)
    ones, _ = read_multilabel_csv(path, columns=Columns(label_columns=",".join(FINDINGS), uncertain="ones"))
    # the rows: ["1", "", "-1"], ["0", "1", "1"], ["", "0", "1"], ["1", "1", "0"]: only the first holds a -1
    assert [r.targets for r in zeros["train"][:4]] == [(1, 0, 0), (0, 1, 1), (0, 0, 1), (1, 1, 0)]
    assert [r.targets for r in ones["train"][:4]] == [(1, 0, 1), (0, 1, 1), (0, 0, 1), (1, 1, 0)]


def test_uncertain_labels_ones_needs_label_columns(tmp_path):
    with pytest.raises(UserError, match=r"--uncertain-labels ones reads the -1 cells of --label-columns"):
        read_multilabel_csv(nih_csv(tmp_path / "nih"), columns=Columns(label="labels", label_separator="|",
                                                                        uncertain="ones"))
    path = chexpert_csv(tmp_path / "chexpert")
    with pytest.raises(UserError, match="--uncertain-labels name a multi-label CSV's findings"):
        S.select_splits("classification", str(path), ("train",), fallback=S.TRAINING,
                        columns=Columns(uncertain="ones"))


def test_uncertain_labels_is_a_config_field_of_train_and_evaluate():
    from nearl import evaluate as E
    from nearl.comparison.options import parse_config as compare_config
    from nearl.evaluation.config import EvalConfig
    from nearl.training import parse_config

    config = parse_config(["--task", "multilabel", "--label-columns", "A,B", "--uncertain-labels", "ones"])
    assert config.uncertain_labels == "ones" and Columns.of(config).uncertain == "ones"
    assert parse_config(["--uncertain", "ones"]).uncertain_labels == "ones"  # the short name
    assert parse_config([]).uncertain_labels == "zeros"
    assert EvalConfig().uncertain_labels is None  # not given: the checkpoint's rule, else zeros
    assert E.parse_config(["--uncertain-labels", "ones"]).uncertain_labels == "ones"
    assert compare_config(["--uncertain-labels", "ones"]).uncertain_labels == "ones"
