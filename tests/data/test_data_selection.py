"""The one choice of a source's split (nearl/data/selection.py), for training and evaluation alike:
every kind of source, the 'validation' alias, a missing split under each rule, and that both
commands' data loaders go through it."""
import json
import logging

import pytest

from data_fixtures import write_png
from nearl.data import demo
from nearl.data import selection as S
from nearl.errors import UserError

EVALUATE_LOG = "nearl.evaluate"  # the logger evaluation's fallbacks have always been said on


def _manifest(tmp_path, rows, header="image,caption,split"):
    """tmp_path/m.csv over one PNG a row; rows: (name, split) or (name,) without a split column."""
    lines = [header]
    for row in rows:
        write_png(tmp_path / row[0])
        lines.append(",".join([row[0], f"caption of {row[0]}", *row[1:]]))
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _names(selection):
    return sorted(r.image.name for r in selection.records)


def _folder(root, splits, classes=("a", "b")):
    """root/<split>/<class>/1.png for each split (a flat root/<class>/1.png for splits=(None,))."""
    for split in splits:
        for c in classes:
            write_png((root / split if split else root) / c / "1.png")
    return root


def _split_file(tmp_path, splits):
    """A CoOp split .json: {split: [[path, label, classname], ...]} over two classes."""
    body = {}
    for split, n in splits.items():
        body[split] = []
        for i in range(n):
            label, name = i % 2, ("x", "y")[i % 2]
            write_png(tmp_path / "images" / split / f"{i}.png")
            body[split].append([f"images/{split}/{i}.png", label, name])
    path = tmp_path / "split.json"
    path.write_text(json.dumps(body))
    return path


MIXED = [("tr.png", "train"), ("none.png", ""), ("v1.png", "val"), ("v2.png", "validation"), ("te.png", "test"),
         ("dev.png", "dev")]


# ----------------------------------------------------------------------------- a manifest with a split column
def test_manifest_with_a_split_column_under_each_rule(tmp_path):
    path = _manifest(tmp_path, MIXED)
    train, val = S.select_splits("retrieval", str(path), ("train", "val"), fallback=S.TRAINING)
    assert _names(train) == ["none.png", "tr.png"] and train.split == "train"  # no split: training data
    assert _names(val) == ["v1.png", "v2.png"] and train.source == str(path) and train.classnames is None
    test, ev_train, ev_val, ev_validation = S.select_splits("retrieval", path, ("test", "train", "val", "validation"),
                                                            fallback=S.EVALUATION)
    assert _names(test) == ["te.png"] and test.split == "test"
    assert _names(ev_train) == ["tr.png"]  # evaluation: a row without a split is not "train"
    assert _names(ev_val) == _names(ev_validation) == ["v1.png", "v2.png"]  # 'validation' is 'val'
    assert (ev_val.split, ev_validation.split) == ("val", "validation")  # named as asked
    [whole] = S.select_splits("retrieval", path, ("val",), fallback=S.VAL_DATA)
    assert len(whole.records) == len(MIXED) and whole.split == "all"  # --val-data: every row


def test_manifest_missing_split_under_each_rule(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=EVALUATE_LOG)
    path = _manifest(tmp_path, [("tr.png", "train"), ("v.png", "val")])
    [test] = S.select_splits("retrieval", path, ("test",), fallback=S.EVALUATION)
    assert _names(test) == ["v.png"] and test.split == "val"
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (EVALUATE_LOG, "no records with split 'test'; using split 'val'")]
    [train_only_val] = S.select_splits("retrieval", path, ("test",), fallback=S.TRAINING)
    assert train_only_val.records == [] and train_only_val.split == "test"  # training: empty, and silent
    assert len(caplog.records) == 1
    other = _manifest(tmp_path / "o", [("tr.png", "train"), ("te.png", "test")])
    [val] = S.select_splits("retrieval", other, ("val",), fallback=S.EVALUATION)
    assert _names(val) == ["te.png"] and val.split == "test"  # a manifest's val falls back to test
    nothing = _manifest(tmp_path / "n", [("dev.png", "dev")])
    caplog.clear()
    [all_rows] = S.select_splits("retrieval", nothing, ("test",), fallback=S.EVALUATION)
    assert _names(all_rows) == ["dev.png"] and all_rows.split == "all"
    assert caplog.records[-1].getMessage() == "no records with split 'test' (nor test/val); evaluating on all 1 records"


# ----------------------------------------------------------------------------- a manifest without one
def test_manifest_without_a_split_column(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=EVALUATE_LOG)
    path = _manifest(tmp_path, [("a.png",), ("b.png",)], header="image,caption")
    train, val = S.select_splits("retrieval", path, ("train", "val"), fallback=S.TRAINING)
    assert _names(train) == ["a.png", "b.png"] and val.records == []
    [test] = S.select_splits("retrieval", path, ("test",), fallback=S.EVALUATION)
    assert _names(test) == ["a.png", "b.png"] and test.split == "all"
    assert "evaluating on all 2 records" in caplog.text


def test_missing_images_are_counted_for_their_split_only(tmp_path):
    path = _manifest(tmp_path, [("tr.png", "train"), ("v.png", "val")])
    path.write_text(path.read_text() + "gone.png,lost,train\ngone2.png,lost,val\n")
    train, val = S.select_splits("retrieval", path, ("train", "val"), fallback=S.TRAINING)
    assert [u.image.name for u in train.unusable] == ["gone.png"]
    assert [u.image.name for u in val.unusable] == ["gone2.png"]


def test_read_replaces_the_image_text_reader_and_root_goes_to_it(tmp_path):
    path = _manifest(tmp_path, [("tr.png", "train")])
    seen = []
    [train] = S.select_splits("retrieval", path, ("train",), fallback=S.TRAINING,
                              read=lambda p: seen.append(p) or [])
    assert seen == [path] and train.records == []
    elsewhere = tmp_path / "images"
    write_png(elsewhere / "tr.png", value=7)
    [train] = S.select_splits("retrieval", path, ("train",), root=str(elsewhere), fallback=S.TRAINING)
    assert [r.image for r in train.records] == [elsewhere / "tr.png"]


def test_no_data_is_the_demo_set(tmp_path, monkeypatch):
    manifest = _manifest(tmp_path, [("tr.png", "train"), ("te.png", "test")])
    split_file = _split_file(tmp_path, {"train": 2, "test": 2})
    monkeypatch.setattr(demo, "demo_manifest", lambda: manifest)
    monkeypatch.setattr(demo, "demo_split_json", lambda: split_file)
    [test] = S.select_splits("retrieval", None, ("test",))
    assert _names(test) == ["te.png"] and test.source == str(manifest)
    [train] = S.select_splits("classification", None, ("train",), fallback=S.TRAINING)
    assert len(train.records) == 2 and train.source == str(split_file) and train.classnames == ["x", "y"]


# ----------------------------------------------------------------------------- ImageFolder trees
def test_image_folder_with_split_folders(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=EVALUATE_LOG)
    root = _folder(tmp_path / "f", ("train", "validation", "test"))
    train, val = S.select_splits("classification", str(root), ("train", "val"), fallback=S.TRAINING)
    assert train.split == "train" and train.classnames == ["a", "b"] and train.source == str(root)
    assert {r.image.parent.parent.name for r in val.records} == {"validation"}  # validation/ is the val split
    [test] = S.select_splits("classification", str(root), ("test",), fallback=S.EVALUATION)
    assert test.split == "test" and test.source == str(root / "test") and len(test.records) == 2
    [val] = S.select_splits("classification", str(root), ("val",), fallback=S.EVALUATION)
    assert val.split == "validation" and val.source == str(root / "validation")
    assert "no val/ folder; using validation/ (split folders: train/, validation/, test/)" in caplog.text


def test_image_folder_evaluation_reads_only_the_folder_it_evaluates(tmp_path):
    root = _folder(tmp_path / "f", ("test",))
    _folder(root, ("train",), classes=("other", "names", "here"))  # training reads both: they must agree
    [test] = S.select_splits("classification", root, ("test",), fallback=S.EVALUATION)
    assert test.classnames == ["a", "b"]
    with pytest.raises(UserError, match=r"classes \['a', 'b'\] differ from train/'s"):
        S.select_splits("classification", root, ("train",), fallback=S.TRAINING)


def test_image_folder_missing_split_under_each_rule(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=EVALUATE_LOG)
    root = _folder(tmp_path / "f", ("train", "val"))
    [test] = S.select_splits("classification", root, ("test",), fallback=S.EVALUATION)
    assert test.split == "val" and test.source == str(root / "val")
    assert f"{root}: no test/ folder; using val/ (split folders: train/, val/)" in caplog.text
    [missing] = S.select_splits("classification", root, ("test",), fallback=S.TRAINING)
    assert missing.records == [] and missing.split == "test"
    no_val = _folder(tmp_path / "g", ("train", "test"))
    with pytest.raises(UserError) as e:  # an ImageFolder's val does not fall back to test/
        S.select_splits("classification", no_val, ("val",), fallback=S.EVALUATION)
    assert str(e.value) == (f"{no_val}: no val/ (nor val/) folder to evaluate on; split folders found: train/, "
                            "test/. Pass --split train to evaluate on it")
    with pytest.raises(UserError) as e:
        S.select_splits("classification", _folder(tmp_path / "h", ("test",)), ("train",), fallback=S.EVALUATION)
    assert str(e.value).endswith("h: no train/ folder to evaluate on; split folders found: test/. Pass --split "
                                 "test to evaluate on it")
    no_train = S.select_splits("classification", tmp_path / "h", ("train",), fallback=S.TRAINING)[0]
    assert no_train.records == []  # training says "no training records" itself


def test_flat_image_folder_is_all_records(tmp_path):
    root = _folder(tmp_path / "flat", (None,))
    train, val = S.select_splits("classification", root, ("train", "val"), fallback=S.TRAINING)
    assert len(train.records) == 2 and train.split == "all" and val.records == []
    [test] = S.select_splits("classification", root, ("test",), fallback=S.EVALUATION)
    assert len(test.records) == 2 and test.split == "all" and test.source == str(root)
    [other] = S.select_splits("classification", root, ("val",), fallback=S.VAL_DATA)
    assert len(other.records) == 2 and other.split == "all"


# ----------------------------------------------------------------------------- CoOp split files
def test_split_file_under_each_rule(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=EVALUATE_LOG)
    path = _split_file(tmp_path, {"train": 4, "val": 2, "test": 3})
    train, val = S.select_splits("classification", path, ("train", "val"), fallback=S.TRAINING)
    assert (len(train.records), len(val.records), train.classnames) == (4, 2, ["x", "y"])
    [test] = S.select_splits("classification", str(path), ("test",), fallback=S.EVALUATION)
    assert len(test.records) == 3 and test.split == "test" and test.source == str(path)
    [other] = S.select_splits("classification", path, ("val",), fallback=S.VAL_DATA)
    assert len(other.records) == 2 and other.split == "val"
    assert not caplog.records
    # a split file's keys are not aliased: 'validation' asked of it falls back to test, with a warning
    [validation] = S.select_splits("classification", path, ("validation",), fallback=S.EVALUATION)
    assert validation.split == "test"
    assert caplog.records[-1].getMessage() == f"{path}: no 'validation' split; using 'test'"


def test_split_file_missing_split_under_each_rule(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=EVALUATE_LOG)
    path = _split_file(tmp_path, {"train": 2, "val": 2, "test": 0})  # an empty split is none
    [test] = S.select_splits("classification", path, ("test",), fallback=S.EVALUATION)
    assert test.split == "val" and caplog.records[-1].getMessage() == f"{path}: no 'test' split; using 'val'"
    only_train = _split_file(tmp_path / "t", {"train": 2})
    with pytest.raises(UserError) as e:
        S.select_splits("classification", only_train, ("test",), fallback=S.EVALUATION)
    assert str(e.value) == f"{only_train}: no 'test' split with records (splits: train (2))"
    train, val = S.select_splits("classification", only_train, ("train", "val"), fallback=S.TRAINING)
    assert len(train.records) == 2 and val.records == []
    [other] = S.select_splits("classification", only_train, ("val",), fallback=S.VAL_DATA)
    assert len(other.records) == 2 and other.split == "train"  # --val-data: val, else test, train, all


def test_an_unknown_rule_or_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fallback must be one of"):
        S.select_splits("retrieval", tmp_path, ("test",), fallback="lenient")
    (tmp_path / "notes.txt").write_text("x")
    for fallback in S.FALLBACKS:
        with pytest.raises(UserError, match="classification data must be an ImageFolder directory or a CoOp split"):
            S.select_splits("classification", tmp_path / "notes.txt", ("test",), fallback=fallback)


# ----------------------------------------------------------------------------- both commands call it
def _spy(monkeypatch):
    calls, real = [], S.select_splits

    def spy(task, data, splits, **kw):
        calls.append((task, splits, kw.get("fallback")))
        return real(task, data, splits, **kw)
    monkeypatch.setattr(S, "select_splits", spy)
    return calls


def test_training_and_evaluation_both_choose_through_select_splits(tmp_path, monkeypatch):
    from nearl.evaluation.run import load_eval_data
    from nearl.training.config import TrainConfig
    from nearl.training.data import load_train_data

    calls = _spy(monkeypatch)
    manifest = _manifest(tmp_path, [("tr.png", "train"), ("v.png", "val"), ("te.png", "test")])
    data = load_train_data(TrainConfig(data=str(manifest), val_data=str(manifest)))
    assert len(data.train) == 1 and len(data.val) == 3 and data.source == str(manifest)
    records, _, split, _ = load_eval_data("retrieval", str(manifest), split="validation")
    assert [r.image.name for r in records] == ["v.png"] and split == "validation"
    root = _folder(tmp_path / "f", ("train", "val"))
    data = load_train_data(TrainConfig(task="classification", data=str(root), val_data=str(root)))
    assert data.classnames == ["a", "b"] and len(data.val) == 2
    load_eval_data("classification", str(root), split="val")
    assert calls == [("retrieval", ("train", "val"), S.TRAINING), ("retrieval", ("val",), S.VAL_DATA),
                     ("retrieval", ("validation",), S.EVALUATION),
                     ("classification", ("train", "val"), S.TRAINING), ("classification", ("val",), S.VAL_DATA),
                     ("classification", ("val",), S.EVALUATION)]
