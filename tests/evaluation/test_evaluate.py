"""python -m nearl.evaluate: retrieval with several captions per image, prompt classification,
zero-shot (a fresh model is the frozen CLIP) and trained checkpoints."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nearl import evaluate as E
from nearl.evaluation import run as EV
from nearl.evaluation import metrics as M
from nearl.methods import build_method
from nearl.data.manifests import read_manifest
from train_helpers import _one_thread, FAST, make_image_folder, make_manifest, run

KW = dict(device="cpu", batch_size=4, workers=0, progress=False)


def test_zero_shot_retrieval_is_frozen_clip(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=0, n_val=6, captions_per_image=3)
    records = read_manifest(manifest)
    model = build_method("nearl", "NEARL-Tiny", None, seed=1)
    res = EV.evaluate_retrieval(model, records, **KW)
    assert res["n_images"] == 6 and res["n_texts"] == 18
    # The same numbers straight from the open_clip backbone.
    clip, tok, tf = model.backbone, model.tokenizer(), model.image_transform(False)
    from nearl.data.images import load_image
    with torch.no_grad():
        img = clip.encode_image(torch.stack([tf(load_image(r.image)) for r in records]))
        txt = clip.encode_text(tok([c for r in records for c in r.captions]))
    ref = M.retrieval_recall(img, txt, torch.arange(6).repeat_interleave(3))
    for k, v in ref.items():
        assert res[k] == pytest.approx(v), k


def test_bad_image_and_its_captions_are_dropped(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=0, n_val=5, captions_per_image=2)
    (tmp_path / "data" / "img2.png").write_bytes(b"\x89PNG broken")
    res = EV.evaluate_retrieval(build_method("nearl", "NEARL-Tiny"), read_manifest(manifest), **KW)
    assert (res["n_images"], res["n_texts"]) == (4, 8)


def test_cli_zero_shot_outputs(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "data", n_train=2, n_val=4)
    report = E.main(["--model", "NEARL-Tiny", "--data", str(manifest), "--split", "val", "--out",
                     str(tmp_path / "res"), "--workers", "0", "--no-progress"])
    assert report["checkpoint"] is None and report["split"] == "val"
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    assert saved["metrics"]["n_images"] == 4 and saved["metrics"]["n_texts"] == 8
    md = (tmp_path / "res" / "results.md").read_text()
    assert "| zero-shot NEARL-Tiny |" in md and "t2i_R@10" in md
    assert "RANDOM" in capsys.readouterr().out


def test_classification_checkpoint_and_zero_shot(tmp_path):
    root = make_image_folder(tmp_path / "folder", per_class=(2, 2))
    out = tmp_path / "run"
    run(["--task", "classification", "--model", "NEARL-Tiny", "--data", root, "--batch-size", 6,
         "--max-steps", 2, "--lr", 1e-2, "--eval-every", 0, "--out", out, *FAST])
    common = ["--data", str(root), "--split", "val", "--workers", "0", "--no-progress"]
    trained = E.main(["--checkpoint", str(out), *common])  # task taken from the checkpoint
    zero = E.main(["--model", "NEARL-Tiny", "--task", "classification", *common])
    for rep in (trained, zero):
        assert rep["task"] == "classification" and rep["metrics"]["n_images"] == 6
        assert {"accuracy", "macro_f1", "macro_auc"} <= set(rep["metrics"])
    # The trained run's own final validation used the same images, prompts and model.
    last_val = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
    assert last_val["kind"] == "val"
    assert trained["metrics"]["accuracy"] == pytest.approx(last_val["accuracy"])
    assert trained["metrics"]["macro_auc"] == pytest.approx(last_val["macro_auc"])


def test_split_fallback(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=3, n_val=2)
    records, _, split, _ = EV.load_eval_data("retrieval", str(manifest), split="test")
    assert split == "val" and len(records) == 2  # no test split: the val split, with a warning


def test_evaluating_the_training_images_is_refused_unless_allowed(tmp_path, capsys):
    """A flat ImageFolder (or a manifest without a split column) is all training data; evaluating the
    checkpoint on the same source scored its training images as results. The checkpoint records them:
    the evaluation is refused in one line, or with --allow-train-data warned about and counted."""
    from nearl import compare as CMP
    from nearl.errors import UserError, run_cli

    flat = make_image_folder(tmp_path / "folder", per_class=(3, 0)) / "train"
    out = tmp_path / "run"
    run(["--task", "classification", "--model", "NEARL-Tiny", "--data", flat, "--batch-size", 4, "--max-steps", 1,
         "--eval-every", 0, "--out", out, *FAST])
    common = ["--checkpoint", str(out), "--data", str(flat), "--workers", "0", "--no-progress"]
    assert run_cli(E.main, common, prog="nearl.evaluate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"nearl.evaluate: error: 9 of the 9 images evaluated ({flat}, split all) are images "
                              f"{out / 'last.pt'} was trained on") and "--allow-train-data" in err[-1]
    report = E.main([*common, "--allow-train-data"])
    printed = capsys.readouterr().out
    assert report["train_images_evaluated"] == 9 and "WARNING: 9 of the 9 images evaluated" in printed
    assert "(all, 9 images, 9 of them training images)" in printed
    held_out = make_image_folder(tmp_path / "other", per_class=(0, 2), seed=1)  # seed 0 redraws training images
    assert E.main(["--checkpoint", str(out), "--data", str(held_out), "--split", "val", "--workers", "0",
                   "--no-progress"])["train_images_evaluated"] == 0
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    lines = manifest.read_text().splitlines()
    manifest.write_text("".join(l.rsplit(",", 1)[0] + "\n" for l in lines))  # no split column: all is trained on
    assert lines[0] == "image,caption,split" and "split" not in manifest.read_text()
    run(["--data", manifest, "--model", "NEARL-Tiny", "--max-steps", 1, "--batch-size", 4, "--out", tmp_path / "r2",
         *FAST])
    with pytest.raises(UserError, match=r"4 of the 4 images evaluated \(.*manifest.csv, split all\) are images"):
        E.main(["--checkpoint", str(tmp_path / "r2"), "--data", str(manifest), "--workers", "0", "--no-progress"])
    with pytest.raises(UserError, match=r"9 of the 9 images evaluated .* are among the images the runs train on"):
        CMP.main(["--task", "classification", "--methods", "zeroshot", "--seeds", "0", "--data", str(flat),
                  "--batch-size", "4", "--out", str(tmp_path / "cmp"), *FAST])
    assert not (tmp_path / "cmp" / "runs").exists()


def test_copies_of_the_training_images_are_caught_through_checkpoints_and_adapters(tmp_path, capsys):
    """issue 24 item 9: the record held the images' paths only, so a copy of the training data elsewhere
    was scored as results, an exported adapter carried no record, and a checkpoint written before the
    record was evaluated without a word. Now each training image is also kept by a hash of its bytes,
    adapters carry those hashes (train_images.json, no paths), and a file without a record says so."""
    import shutil
    from pathlib import Path

    from nearl.store import adapter_files as AF
    from nearl import export as X
    from nearl.store.checkpoint import resolve
    from nearl.errors import UserError, run_cli

    data = make_image_folder(tmp_path / "folder", per_class=(3, 1))
    out = tmp_path / "run"
    run(["--task", "classification", "--model", "NEARL-Tiny", "--data", data / "train", "--batch-size", 4,
         "--max-steps", 1, "--eval-every", 0, "--out", out, *FAST])
    copy = Path(shutil.copytree(data / "train", tmp_path / "elsewhere" / "copy"))
    common = ["--data", str(copy), "--workers", "0", "--no-progress"]
    assert run_cli(E.main, ["--checkpoint", str(out), *common], prog="nearl.evaluate") == 2
    assert "error: 9 of the 9 images evaluated" in capsys.readouterr().err
    adapter = X.main(["--checkpoint", str(out), "--out", str(tmp_path / "adapter")])
    text = (adapter / "train_images.json").read_text()
    assert str(tmp_path) not in text and ".png" not in text and json.loads(text)["count"] == 9
    with pytest.raises(UserError, match=r"9 of the 9 images evaluated \(.*copy, split all\) are images "
                                        r".*adapter.* was trained on"):
        E.main(["--adapter", str(adapter), *common])
    assert E.main(["--adapter", str(adapter), *common, "--allow-train-data"])["train_images_evaluated"] == 9
    held_out = ["--data", str(data / "val"), "--workers", "0", "--no-progress"]
    capsys.readouterr()
    assert E.main(["--adapter", str(adapter), *held_out])["train_images_evaluated"] == 0
    assert "cannot check overlap" not in capsys.readouterr().out

    ckpt = torch.load(resolve(out), weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({**ckpt, "train_images": None}, old)  # as written before the record
    E.main(["--checkpoint", str(old), *held_out])
    assert f"cannot check overlap with training data: {old} predates the record" in capsys.readouterr().out
    by_path = {k: v for k, v in ckpt["train_images"].items() if not k.startswith("content")}
    torch.save({**ckpt, "train_images": by_path}, old)  # paths only, as the first record was
    assert E.main(["--checkpoint", str(old), "--data", str(data / "train"), "--workers", "0", "--no-progress",
                   "--allow-train-data"])["train_images_evaluated"] == 9
    assert f"by path only: {old} predates the content record" in capsys.readouterr().out
    record = json.loads((adapter / AF.CONFIG_FILE).read_text())
    record.pop("train_images")
    (adapter / AF.CONFIG_FILE).write_text(json.dumps(AF.seal_config(record)))  # an adapter exported before
    E.main(["--adapter", str(adapter), *held_out])
    assert (f"cannot check overlap with training data: {adapter / AF.CONFIG_FILE} predates the record"
            in capsys.readouterr().out)


def test_a_file_is_hashed_once_a_process_until_it_changes(tmp_path, monkeypatch):
    """nearl.compare hashes its training pool, then each run's fit and evaluation the same files: the
    content key of an unchanged file is read once; a rewritten one is read again."""
    from nearl.data import overlap

    image = tmp_path / "a.png"
    image.write_bytes(b"x" * 100)
    reads = []
    real = overlap._hash_content
    monkeypatch.setattr(overlap, "_hash_content", lambda path: reads.append(path) or real(path))
    first = overlap.content_key(image)
    assert overlap.content_keys([image, image]) == [first, first] and len(reads) == 1
    image.write_bytes(b"y" * 101)  # another size: another key, read again
    assert overlap.content_key(image) not in (first, None) and len(reads) == 2
    assert overlap.content_key(tmp_path / "missing.png") is None


def test_report_lines_reach_stdout_as_printed_and_a_level_silences_them(tmp_path, capsys):
    """Library code logs (nearl.logging_utils.reporter) and only the command lines print, yet a caller
    from Python, who configured no logging, sees on stdout exactly what `print` wrote; a root handler
    (the command lines' basicConfig) does not repeat them; nearl.report's level silences them, its
    WARNINGs (lines that qualify the numbers) last."""
    from nearl.logging_utils import markdown_table

    report = {"task": "retrieval", "data": "d.csv", "split": "val", "classes": "all",
              "metrics": {"mean_recall": 50.0, "n_images": 3}}
    table = markdown_table({"m": {"mean_recall": 50.0}}, title="retrieval on d.csv (val, 3 images)")
    printed = f"{table}\nwrote {tmp_path / 'results.json'} and {tmp_path / 'results.md'}\n"
    root, handler = logging.getLogger(), logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        EV._show_and_write(report, "m", 0, str(tmp_path))
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr() == (printed, "")
    logger = logging.getLogger("nearl.report")
    warned = "cannot check overlap with training data: old.pt predates the record\n"
    assert logger.level == logging.INFO and not logger.propagate
    try:
        logger.setLevel(logging.WARNING)
        EV._show_and_write(report, "m", 0, str(tmp_path))
        EV.check_training_overlap(None, [], "d.csv", "in it", False, record_of="old.pt")
        assert capsys.readouterr() == (warned, "")
        logger.setLevel(logging.ERROR)
        EV.check_training_overlap(None, [], "d.csv", "in it", False, record_of="old.pt")
        assert capsys.readouterr() == ("", "")
    finally:
        logger.setLevel(logging.INFO)
    assert (tmp_path / "results.md").read_text() == table  # silenced, not skipped
