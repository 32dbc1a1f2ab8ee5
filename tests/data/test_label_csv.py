"""Label CSVs for classification (nearl/data/label_csv.py): image + label (+ optional split) columns, the
column flags and open_clip's aliases (for image-text manifests too), and one-line errors for a missing
column, an unknown class in a split, a split cell that is none, and a multi-label cell."""
import json

import pytest

from data_fixtures import write_png
from nearl import evaluate as E
from nearl.data import selection as S
from nearl.data.tabular import Columns
from nearl.errors import UserError
from nearl.training import parse_config
from train_helpers import _one_thread, TINY_RUN, make_image_folder, one_error_line, run  # noqa: F401

ROWS = [("scans/a0.png", "pneumonia", "train"), ("scans/a1.png", "pneumonia", "train"),
        ("scans/b0.png", "normal", "train"), ("scans/b1.png", "normal", "train"),
        ("scans/a2.png", "pneumonia", "val"), ("scans/b2.png", "normal", "validation"),
        ("scans/a3.png", "pneumonia", "test"), ("scans/b3.png", "normal", "test")]


def _label_csv(folder, rows=ROWS, header=("image", "label", "split"), sep=",", name="labels.csv"):
    lines = [sep.join(header)]
    for i, row in enumerate(rows):
        write_png(folder / row[0], value=20 * i + 5)
        lines.append(sep.join(row[:len(header)]))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _read(path, split, fallback=S.EVALUATION, **kw):
    return S.select_splits("classification", path, (split,), fallback=fallback, **kw)[0]


def test_a_label_csv_is_a_labelled_source_with_sorted_classes(tmp_path):
    path = _label_csv(tmp_path)
    train = _read(path, "train", S.TRAINING)
    assert train.classnames == ["normal", "pneumonia"]  # sorted, whatever the rows' order
    assert sorted((r.image.name, r.label, r.classname) for r in train.records) == [
        ("a0.png", 1, "pneumonia"), ("a1.png", 1, "pneumonia"), ("b0.png", 0, "normal"), ("b1.png", 0, "normal")]
    assert sorted(r.image.name for r in _read(path, "val").records) == ["a2.png", "b2.png"]  # validation is val
    assert sorted(r.image.name for r in _read(path, "test").records) == ["a3.png", "b3.png"]


def test_without_a_split_column_every_row_is_all(tmp_path):
    path = _label_csv(tmp_path, header=("image", "label"))
    train = _read(path, "train", S.TRAINING)
    assert len(train.records) == len(ROWS) and train.split == "all"


def test_the_column_flags_and_a_separator(tmp_path):
    path = _label_csv(tmp_path, header=("file", "finding", "split"), sep="\t", name="labels.txt")
    train = _read(path, "train", S.TRAINING, columns=Columns(image="file", label="finding", separator="tab"))
    assert len(train.records) == 4 and train.classnames == ["normal", "pneumonia"]


def test_a_missing_column_names_the_columns_found(tmp_path):
    path = _label_csv(tmp_path, header=("path", "label", "split"))
    with pytest.raises(UserError, match=r"labels.csv: no column 'image' \(columns found: path, label, split\)") as e:
        _read(path, "train", S.TRAINING)
    assert "\n" not in str(e.value)


def test_an_unknown_class_in_a_split_is_refused(tmp_path):
    rows = [*ROWS[:4], ("scans/c.png", "pnuemonia", "test")]  # a typo: a class no train row has
    with pytest.raises(UserError, match=r"line 6: class 'pnuemonia' \(split test\) is in no train row; the train "
                                        r"rows' classes are \['normal', 'pneumonia'\]"):
        _read(_label_csv(tmp_path, rows), "test")


def test_a_split_cell_that_is_no_split_and_a_multi_label_cell_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"line 3: split 'dev' is none of train, val, validation, test"):
        _read(_label_csv(tmp_path / "a", [ROWS[0], ("scans/x.png", "normal", "dev")]), "train", S.TRAINING)
    with pytest.raises(UserError, match=r"line 2: label .* holds several labels"):
        _read(_label_csv(tmp_path / "b", [("scans/x.png", '"[""a"", ""b""]"', "train")]), "train", S.TRAINING)
    path = _label_csv(tmp_path / "c", [("scans/x.png", "effusion|edema", "train"), ("scans/y.png", "normal", "train")])
    assert _read(path, "train", S.TRAINING).classnames == ["effusion|edema", "normal"]  # one class of that name


def test_column_flags_refused_where_there_are_no_columns(tmp_path):
    root = make_image_folder(tmp_path / "folder")
    with pytest.raises(UserError, match="--label-column: name a label CSV's columns"):
        _read(root, "train", S.TRAINING, columns=Columns(label="finding"))
    with pytest.raises(UserError, match="--caption-column names a manifest's captions"):
        _read(_label_csv(tmp_path / "l"), "train", S.TRAINING, columns=Columns(caption="title"))


def test_an_open_clip_manifest_with_its_aliases(tmp_path):
    """open_clip's files: filepath<TAB>title, read with --csv-img-key / --csv-caption-key / --csv-separator."""
    rows = ["filepath\ttitle"]
    for i in range(4):
        write_png(tmp_path / f"{i}.jpg", value=30 * i + 1)
        rows.append(f"{i}.jpg\ta chest x-ray number {i}")
    path = tmp_path / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    config = parse_config(["--data", str(path), "--csv-img-key", "filepath", "--csv-caption-key", "title",
                           "--csv-separator", "\\t"])
    assert (config.image_column, config.caption_column, config.separator) == ("filepath", "title", "\\t")
    assert E.parse_config(["--csv-img-key", "filepath"]).image_column == "filepath"
    [train] = S.select_splits("retrieval", str(path), ("train",), fallback=S.TRAINING, columns=Columns.of(config))
    assert [r.captions for r in train.records][0] == ["a chest x-ray number 0"] and len(train.records) == 4
    with pytest.raises(UserError, match=r"missing column\(s\) \['image', 'caption'\]; columns are \['filepath', "
                                        r"'title'\]"):
        S.select_splits("retrieval", str(path), ("train",), fallback=S.TRAINING, columns=Columns(separator="tab"))
    with pytest.raises(UserError, match="--label-column: not for --task retrieval"):
        S.select_splits("retrieval", str(path), ("train",), fallback=S.TRAINING, columns=Columns(label="x"))


def test_a_label_csv_trains_and_evaluates(tmp_path, capsys):
    path = _label_csv(tmp_path / "data", header=("file", "finding", "split"))
    out = tmp_path / "run"
    run(["--task", "classification", "--data", path, "--csv-img-key", "file", "--label-column", "finding",
         "--max-steps", 2, "--out", out, *TINY_RUN])
    assert [json.loads(line)["kind"] for line in open(out / "metrics.jsonl")].count("train") == 2
    common = ["--checkpoint", str(out), "--data", str(path), "--workers", "0", "--no-progress", "--device", "cpu"]
    report = E.main([*common, "--image-column", "file", "--label-column", "finding"])
    assert report["split"] == "test" and report["metrics"]["n_images"] == 2 and report["metrics"]["n_classes"] == 2
    from nearl.errors import run_cli
    assert run_cli(E.main, common, prog="nearl.evaluate") == 2  # the columns not named again
    line = one_error_line(capsys, "nearl.evaluate")
    assert "no column 'image', 'label' (columns found: file, finding, split)" in line
