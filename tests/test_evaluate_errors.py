"""nearl.evaluate given the wrong thing: split folders are never taken for classes, bad sizes and
devices are refused, and a user's mistake is one line on stderr with exit status 2."""
import logging

import pytest

from nearl import evaluate as E
from nearl.errors import UserError
from test_train import make_image_folder


def test_image_folder_without_test_uses_val_not_the_split_names_as_classes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nearl.evaluate")
    root = make_image_folder(tmp_path / "folder", per_class=(2, 1))  # train/ and val/, no test/
    records, classnames, split, src = E.load_eval_data("classification", str(root), split="test")
    assert classnames == ["blue", "green", "red"] and split == "val" and src == str(root / "val")
    assert len(records) == 3
    assert any("no test/ folder" in r.getMessage() and "using val/" in r.getMessage() for r in caplog.records)


def test_image_folder_with_only_train_refuses_naming_the_folders(tmp_path):
    root = make_image_folder(tmp_path / "folder", per_class=(2, 0))
    (root / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"folder: no test/ \(nor val/\) folder to evaluate on; split folders "
                                        r"found: train/\. Pass --split train"):
        E.load_eval_data("classification", str(root), split="test")
    records, classnames, split, _ = E.load_eval_data("classification", str(root), split="train")
    assert split == "train" and classnames == ["blue", "green", "red"]


def test_flat_image_folder_is_still_all_records(tmp_path):
    root = make_image_folder(tmp_path / "folder", per_class=(2, 0)) / "train"
    records, classnames, split, _ = E.load_eval_data("classification", str(root), split="test")
    assert split == "all" and classnames == ["blue", "green", "red"] and len(records) == 6
