"""ImageFolder / CoOp split readers, few-shot sampling and the base-to-novel split."""
import json
import logging
import random
from pathlib import Path

import pytest

from data_fixtures import write_empty, write_png
from nearl.data.labelled import (base_novel_split, k_shot, read_coop_split, read_image_folder,
                                 subset_by_labels)
from nearl.data.records import LabelledRecord


def test_image_folder(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    root = tmp_path / "folder"
    # created out of order: labels must follow the sorted class names, not creation order
    write_png(root / "pneumonia" / "p1.jpeg")
    write_png(root / "normal" / "sub" / "n2.PNG")  # nested, upper-case suffix
    write_png(root / "normal" / "n1.png")
    write_png(root / "covid" / "c1.bmp")
    (root / "covid" / "notes.txt").write_text("not an image")
    write_empty(root / "covid" / "c0.png")
    write_png(root / ".hidden" / "h.png")
    recs, classes = read_image_folder(root)
    assert classes == ["covid", "normal", "pneumonia"]
    assert [(r.image.relative_to(root).as_posix(), r.label, r.classname) for r in recs] == [
        ("covid/c1.bmp", 0, "covid"), ("normal/n1.png", 1, "normal"),
        ("normal/sub/n2.PNG", 1, "normal"), ("pneumonia/p1.jpeg", 2, "pneumonia")]
    assert "kept 4 records, skipped 1 (empty image file: 1)" in caplog.text


def _coop_fixture(tmp_path):
    root = tmp_path / "ds"
    for name in ("a/1.jpg", "a/2.jpg", "b/3.jpg", "c/4.jpg", "c/5.jpg"):
        write_png(root / "images" / name)
    split = {"train": [["images/b/3.jpg", 1, "benign"], ["images/a/1.jpg", 0, "adenoma"]],
             "val": [["images/c/4.jpg", 2, "carcinoma"]],
             "test": [["images/a/2.jpg", 0, "adenoma"], ["images/c/5.jpg", 2, "carcinoma"],
                      ["images/c/gone.jpg", 2, "carcinoma"]]}
    path = tmp_path / "split_zhou_Demo.json"
    path.write_text(json.dumps(split))
    return path, root


def test_coop_split(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    path, root = _coop_fixture(tmp_path)
    splits, classes = read_coop_split(path, root=root)
    assert classes == ["adenoma", "benign", "carcinoma"]  # by label, not by first appearance
    assert {k: [(r.image.name, r.label) for r in v] for k, v in splits.items()} == {
        "train": [("3.jpg", 1), ("1.jpg", 0)], "val": [("4.jpg", 2)],
        "test": [("2.jpg", 0), ("5.jpg", 2)]}
    assert splits["val"][0].split == "val" and splits["val"][0].image == root / "images/c/4.jpg"
    assert "kept 5 records, skipped 1 (missing image: 1)" in caplog.text


def test_coop_split_inconsistent_names_and_gaps(tmp_path):
    write_png(tmp_path / "x.png")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["x.png", 0, "a"], ["x.png", 0, "b"]]}))
    with pytest.raises(ValueError, match="named both"):
        read_coop_split(bad, root=tmp_path)
    bad.write_text(json.dumps({"train": [["x.png", 0, "a"], ["x.png", 2, "c"]]}))
    with pytest.raises(ValueError, match="0..C-1"):
        read_coop_split(bad, root=tmp_path)


def _records(n_per_class):
    return [LabelledRecord(Path(f"/d/{c}/{i:02d}.png"), c, f"class{c}")
            for c, n in enumerate(n_per_class) for i in range(n)]


def test_k_shot_deterministic_and_order_independent():
    recs = _records([10, 10, 10])
    shuffled = recs[:]
    random.Random(123).shuffle(shuffled)
    a = k_shot(recs, 4, seed=1)
    assert a == k_shot(shuffled, 4, seed=1) == k_shot(list(reversed(recs)), 4, seed=1)
    assert [sum(r.label == c for r in a) for c in range(3)] == [4, 4, 4]
    assert len(set(r.image for r in a)) == 12
    assert a != k_shot(recs, 4, seed=2)  # the seed matters
    # a class's draw does not depend on the other classes being present
    only0 = k_shot([r for r in recs if r.label == 0], 4, seed=1)
    assert only0 == [r for r in a if r.label == 0]


def test_k_shot_small_class_takes_all_with_warning(caplog):
    recs = _records([5, 2])
    out = k_shot(recs, 3, seed=0)
    assert [r.image.name for r in out if r.label == 1] == ["00.png", "01.png"]
    assert sum(r.label == 0 for r in out) == 3
    assert "class 1 (class1) has 2 images < k=3" in caplog.text
    with pytest.raises(ValueError):
        k_shot(recs, 0, seed=0)


@pytest.mark.parametrize("n, base, novel", [(5, [0, 1, 2], [3, 4]), (4, [0, 1], [2, 3]),
                                            (1, [0], [])])
def test_base_novel_split(n, base, novel):
    assert base_novel_split([f"c{i}" for i in range(n)]) == (base, novel)


def test_subset_by_labels_relabels_in_sorted_order():
    recs = _records([1, 1, 1, 1, 1])
    sub = subset_by_labels(recs, [4, 3])
    assert [(r.classname, r.label) for r in sub] == [("class3", 0), ("class4", 1)]
    assert [r.label for r in subset_by_labels(recs, [4, 3], relabel=False)] == [3, 4]
    assert recs[3].label == 3  # inputs untouched
