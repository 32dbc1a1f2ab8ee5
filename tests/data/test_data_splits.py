"""Splits made for a source that has none (--val-fraction / --test-fraction, nearl/data/splitting.py):
seeded, stratified, written into the run folder as splits.json, and reused by nearl.evaluate on that run
(and by --resume); a source with its own splits and bad fractions are refused in one line."""
import json
import shutil

import pytest

from data_fixtures import write_png
from nearl import evaluate as E
from nearl.data import selection as S
from nearl.data.splitting import HeldOut, SPLITS_FILE, run_held_out
from nearl.errors import UserError, run_cli
from nearl.training.config import TrainConfig
from nearl.training.data import load_train_data
from train_helpers import _one_thread, TINY_RUN, one_error_line, run  # noqa: F401  (_one_thread: autouse)

CLASSES = ("red", "green", "blue")


def _flat(root, per_class=6, classes=CLASSES):
    """root/<class>/<i>.png: a flat ImageFolder (no split folders)."""
    for c in classes:
        for i in range(per_class):
            write_png(root / c / f"{i}.png", value=10 * i + 1)
    return root


def _lists(selections):
    return {s.split: sorted(r.image.relative_to(s.source).as_posix() for r in s.records) for s in selections}


def _split(root, seed=0, val=0.2, test=0.2):
    return S.select_splits("classification", root, ("train", "val", "test"), fallback=S.TRAINING,
                           held_out=HeldOut(val, test, seed))


def test_a_flat_folder_is_split_seeded_and_stratified(tmp_path):
    root = _flat(tmp_path / "flat")
    train, val, test = _split(root)
    names = {s.split: [r.classname for r in s.records] for s in (train, val, test)}
    assert (len(train.records), len(val.records), len(test.records)) == (10, 4, 4)
    for split in ("val", "test"):
        assert set(names[split]) == set(CLASSES), split  # stratified: each class held out
    assert _lists(_split(root)) == _lists((train, val, test))  # the same seed: the same lists
    assert _lists(_split(root, seed=1)) != _lists((train, val, test))  # another seed: others
    document = train.split_file
    assert (document["seed"], document["val_fraction"], document["test_fraction"]) == (0, 0.2, 0.2)
    assert document["stratified"] and document["root"] == str(root.resolve())
    assert {k: sorted(document[k]) for k in ("train", "val", "test")} == _lists((train, val, test))
    assert all(not p.startswith("/") for p in document["test"])  # relative to the data root


def test_an_image_text_manifest_without_a_split_column_is_split_by_image(tmp_path):
    rows = ["image,caption"]
    for i in range(10):
        write_png(tmp_path / f"{i}.png", value=i + 1)
        rows += [f"{i}.png,first caption {i}", f"{i}.png,second caption {i}"]  # two rows an image
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    train, val, test = S.select_splits("retrieval", str(tmp_path / "m.csv"), ("train", "val", "test"),
                                       fallback=S.TRAINING, held_out=HeldOut(0.2, 0.1, 3))
    images = {s.split: {r.image.name for r in s.records} for s in (train, val, test)}
    assert (len(images["train"]), len(images["val"]), len(images["test"])) == (7, 2, 1)
    assert not (images["train"] & images["val"]) and not (images["train"] & images["test"])  # an image stays whole
    assert len(train.records) == 14 and not train.split_file["stratified"]


def test_a_source_with_splits_refuses_the_fractions(tmp_path):
    root = tmp_path / "split"
    for split in ("train", "val"):
        _flat(root / split, per_class=2)
    with pytest.raises(UserError, match=r"has its own splits \(train, val\)"):
        _split(root)
    manifest = tmp_path / "m.csv"
    write_png(tmp_path / "a.png")
    manifest.write_text("image,caption,split\na.png,x,train\n")
    with pytest.raises(UserError, match="has its own splits"):
        S.select_splits("retrieval", manifest, ("train",), fallback=S.TRAINING, held_out=HeldOut(0.5, 0, 0))


@pytest.mark.parametrize("val, test, message", [
    (0.0 - 0.1, None, r"--val-fraction must be in \(0, 1\), got -0.1"),
    (None, 1.5, r"--test-fraction must be in \(0, 1\), got 1.5"),
    (0.6, 0.5, r"--val-fraction 0.6 \+ --test-fraction 0.5 = 1.1: the held-out fractions must sum to less than 1"),
])
def test_bad_fractions_are_one_line(tmp_path, val, test, message):
    with pytest.raises(UserError, match=message) as err:
        load_train_data(TrainConfig(task="classification", data=str(_flat(tmp_path / "flat")), val_fraction=val,
                                    test_fraction=test))
    assert "\n" not in str(err.value)


def test_bad_fractions_on_the_command_line(tmp_path, capsys):
    from nearl import train

    for value in ("0", "1", "-0.2", "nan"):
        with pytest.raises(SystemExit):
            train.main(["--val-fraction", value, "--out", str(tmp_path / "run")])
        assert "argument --val-fraction" in one_error_line(capsys, "python -m nearl.train")


def test_too_few_images_a_class_to_stratify_is_one_line(tmp_path):
    root = _flat(tmp_path / "flat", per_class=1)
    with pytest.raises(UserError, match="cannot hold out a test split of 3 images stratified by class"):
        _split(root)


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """A NEARL-Tiny classification run of two steps on a flat folder, 20% held out for val and test."""
    from train_helpers import make_image_folder, one_intra_op_thread

    tmp = tmp_path_factory.mktemp("flat_run")
    with one_intra_op_thread():
        make_image_folder(tmp / "made", per_class=(5, 0))
        shutil.move(str(tmp / "made" / "train"), str(tmp / "flat"))  # flat: flat/<class>/<i>.png
        run(["--task", "classification", "--data", tmp / "flat", "--val-fraction", 0.2, "--test-fraction", 0.2,
             "--max-steps", 2, "--out", tmp / "run", *TINY_RUN])
    return tmp


def test_a_flat_folder_trains_with_a_held_out_split_that_evaluate_reuses(flat_run, tmp_path):
    document = json.loads((flat_run / "run" / SPLITS_FILE).read_text())
    assert (len(document["train"]), len(document["val"]), len(document["test"])) == (9, 3, 3)
    assert document["data"] == str((flat_run / "flat").resolve()) and document["seed"] == 0
    trained = {r["kind"] for r in map(json.loads, open(flat_run / "run" / "metrics.jsonl"))}
    assert "val" in trained  # the held-out val list validated the run
    common = ["--checkpoint", str(flat_run / "run"), "--data", str(flat_run / "flat"), "--workers", "0",
              "--no-progress", "--device", "cpu"]
    report = E.main(common)  # the run's test list (without it a flat folder is evaluated whole: training images)
    assert report["split"] == "test" and report["metrics"]["n_images"] == 3 and report["train_images_evaluated"] == 0
    report = E.main([*common, "--split", "val"])
    assert report["split"] == "val" and report["metrics"]["n_images"] == 3


def test_evaluate_names_a_listed_image_the_data_no_longer_has(flat_run, tmp_path, capsys):
    copy = tmp_path / "flat"
    shutil.copytree(flat_run / "flat", copy)
    run_dir = tmp_path / "run"
    shutil.copytree(flat_run / "run", run_dir)
    document = json.loads((run_dir / SPLITS_FILE).read_text())
    document["data"] = str(copy.resolve())
    (run_dir / SPLITS_FILE).write_text(json.dumps(document))
    gone = document["test"][0]
    (copy / gone).unlink()
    argv = ["--checkpoint", str(run_dir), "--data", str(copy), "--workers", "0", "--no-progress", "--device", "cpu"]
    assert run_cli(E.main, argv, prog="nearl.evaluate") == 2
    line = one_error_line(capsys, "nearl.evaluate")
    assert f"its test list names {gone}" in line and "no longer has" in line


def test_the_lists_apply_to_the_same_data_only(flat_run, tmp_path):
    assert run_held_out(flat_run / "run", str(flat_run / "flat")) is not None
    assert run_held_out(flat_run / "run", str(tmp_path)) is None  # another source: its own splits
    assert run_held_out(tmp_path, str(flat_run / "flat")) is None  # a run without splits.json


def test_resume_reuses_the_lists(flat_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(flat_run / "run", run_dir)
    before = (run_dir / SPLITS_FILE).read_text()
    config = TrainConfig(task="classification", data=str(flat_run / "flat"), resume=str(run_dir), seed=5,
                         val_fraction=0.4, out=str(run_dir))
    data = load_train_data(config)  # another seed and fraction: the run's own lists all the same
    assert sorted(r.image.relative_to(flat_run / "flat").as_posix() for r in data.train) == \
        sorted(json.loads(before)["train"])
    assert data.split_file == json.loads(before)


def test_resume_of_a_run_without_lists_refuses_fractions(tmp_path):
    (tmp_path / "old").mkdir()
    config = TrainConfig(task="classification", data=str(_flat(tmp_path / "flat")), resume=str(tmp_path / "old"),
                         test_fraction=0.2)
    with pytest.raises(UserError, match="has no splits.json: it trained on all of its data"):
        load_train_data(config)


def test_images_added_since_the_split_are_left_out_with_a_warning(tmp_path, caplog):
    root = _flat(tmp_path / "flat")
    before = _split(root)
    write_png(root / "red" / "new.png")
    train = before[0]
    held = HeldOut(document=train.split_file, file="run/splits.json")
    with caplog.at_level("WARNING", logger="nearl.data"):
        again = S.select_splits("classification", root, ("train", "val", "test"), fallback=S.TRAINING, held_out=held)
    assert _lists(again) == _lists(before)  # the lists, not a new split of 19 images
    assert "1 images are in none of run/splits.json's lists" in caplog.text


def test_a_run_without_a_split_removes_a_stale_splits_file(tmp_path):
    from nearl.training.data import TrainData, save_split_file

    (tmp_path / SPLITS_FILE).write_text("{}")
    save_split_file(TrainData("classification", [], [], ["a", "b"], "x"), tmp_path)
    assert not (tmp_path / SPLITS_FILE).exists()
    save_split_file(TrainData("classification", [], [], ["a", "b"], "x", split_file={"train": ["a.png"]}), tmp_path)
    assert json.loads((tmp_path / SPLITS_FILE).read_text()) == {"train": ["a.png"]}
