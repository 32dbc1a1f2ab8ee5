"""python -m nearl.predict (nearl/evaluation/prediction.py): class probabilities and text rankings for images given
as files and folders, with an adapter, a checkpoint or the zero-shot CLIP; bad input is one line."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nearl
from data_fixtures import write_dicom
from nearl.store import adapter_files as AF
from nearl import methods as MT
from nearl import predict as P
from nearl.evaluation import prediction as PR
from nearl.model.classify import TEMPLATES, classification_logits
from nearl.model.multilabel import multilabel_logits
from nearl.data.images import load_image
from nearl.errors import UserError, run_cli
from train_helpers import FAST as TRAIN_FAST
from train_helpers import _image, _one_thread, make_image_folder, run  # noqa: F401  (_one_thread: autouse)

FAST = ["--workers", "0", "--no-progress", "--device", "cpu"]
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A NEARL-Tiny adapter with changed (as if trained) weights, trained classes and templates recorded."""
    model = MT.build_method("nearl", "NEARL-Tiny", None, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("predict") / "adapter"
    return AF.save_adapter(model, folder, model_name="NEARL-Tiny", pretrained=None, task="classification",
                           classnames=CLASSES, templates=["a {} image."])


def make_images(root: Path) -> Path:
    """root/scans: PNG, JPEG in a subfolder, a 16-bit grey PNG, a DICOM without suffix, an undecodable
    .png; a text file and a hidden image, which are not taken."""
    rng = np.random.default_rng(0)
    scans = root / "scans"
    (scans / "sub").mkdir(parents=True)
    _image(scans / "red.png", "red", rng)
    _image(scans / "sub" / "green.jpg", "green", rng)
    Image.fromarray((rng.random((24, 24)) * 60000).astype(np.uint16)).save(scans / "gray16.png")
    write_dicom(scans / "sub" / "ct_slice", (rng.random((20, 20)) * 4000).astype(np.uint16))
    (scans / "broken.png").write_bytes(b"not a png at all")
    (scans / "notes.txt").write_text("not an image")
    _image(scans / ".hidden.png", "blue", rng)
    return scans


def expected_images(scans: Path):
    return [str(scans / n) for n in ("gray16.png", "red.png", "sub/ct_slice", "sub/green.jpg")]


# ----------------------------------------------------------------------------- classification
def test_classification_with_an_adapter(adapter, tmp_path, capsys):
    scans = make_images(tmp_path)
    out = tmp_path / "out"
    report = P.main(["--adapter", str(adapter), "--images", str(scans), "--classes", "red,green", "blue",
                     "--out", str(out), *FAST])
    pred = report["predictions"]
    assert pred.images == expected_images(scans)  # folders recursed, DICOM without suffix found, sorted
    assert pred.skipped == [(str(scans / "broken.png"), "not an image")]
    assert torch.allclose(pred.probabilities.sum(dim=1), torch.ones(4))
    # The probabilities are the softmax of evaluation's logits, with the adapter's recorded templates.
    model = nearl.load(adapter)
    transform = model.image_transform(False)
    with torch.no_grad():
        features = model.encode_image(torch.stack([transform(load_image(p)) for p in pred.images]))
    logits = classification_logits(model, features, CLASSES, ["a {} image."])
    assert torch.allclose(pred.probabilities, logits.softmax(dim=-1), atol=1e-6)
    printed = capsys.readouterr().out
    assert "| image | prediction | probability | p(red) | p(green) | p(blue) |" in printed
    assert f"skipped 1 image(s) that could not be read: {scans / 'broken.png'} (not an image)" in printed
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert list(rows[0]) == ["image", "prediction", "probability", "p(red)", "p(green)", "p(blue)"]
    assert [r["image"] for r in rows] == pred.images
    assert [r["prediction"] for r in rows] == [CLASSES[i] for i in logits.argmax(dim=1).tolist()]
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["task"] == "classification" and saved["classes"] == CLASSES
    assert saved["templates"] == ["a {} image."] and saved["method"] == "nearl" and saved["n_images"] == 4
    assert saved["skipped"] == [{"image": str(scans / "broken.png"), "reason": "not an image"}]
    first = saved["predictions"][0]
    assert first["image"] == pred.images[0] and first["probabilities"]["red"] == float(pred.probabilities[0, 0])


def test_an_adapter_scores_its_own_classes_when_none_are_given(adapter, tmp_path):
    scans = make_images(tmp_path)
    pred = P.main(["--adapter", str(adapter), "--images", str(scans / "red.png"), *FAST])["predictions"]
    assert pred.labels == CLASSES and pred.images == [str(scans / "red.png")]


def test_zero_shot_and_checkpoint(tmp_path, capsys):
    scans = make_images(tmp_path)
    pred = P.main(["--model", "NEARL-Tiny", "--images", str(scans), "--classes", "red,blue", *FAST])["predictions"]
    frozen = MT.build_method("nearl", "NEARL-Tiny", None, seed=0)  # fresh NEARL-CLIP is the frozen CLIP
    transform = frozen.image_transform(False)
    with torch.no_grad():
        features = frozen.backbone.encode_image(torch.stack([transform(load_image(p)) for p in pred.images]))
    want = classification_logits(MT.build_method("zeroshot", "NEARL-Tiny", None, seed=0), features,
                                 ["red", "blue"], TEMPLATES)
    assert torch.allclose(pred.probabilities, want.softmax(dim=-1), atol=1e-6)
    assert "RANDOM" in capsys.readouterr().out
    data = make_image_folder(tmp_path / "folder", per_class=(2, 1), classes=("red", "green"))
    run(["--task", "classification", "--model", "NEARL-Tiny", "--data", data, "--batch-size", 4, "--max-steps", 1,
         "--eval-every", 0, "--out", tmp_path / "run", *TRAIN_FAST])
    report = P.main(["--checkpoint", str(tmp_path / "run"), "--images", str(scans / "red.png"), *FAST])
    assert report["predictions"].labels == ["green", "red"] and report["checkpoint"].endswith("last.pt")


# ----------------------------------------------------------------------------- multi-label
def test_multilabel_probabilities_are_the_sigmoid_of_the_multilabel_logits(tmp_path, capsys):
    scans = make_images(tmp_path)
    out = tmp_path / "out"
    findings = ["effusion", "edema", "nodule"]
    report = P.main(["--model", "NEARL-Tiny", "--images", str(scans), "--classes", ",".join(findings),
                     "--multilabel", "--out", str(out), *FAST])
    pred = report["predictions"]
    assert report["task"] == pred.task == "multilabel" and pred.labels == findings
    frozen = MT.build_method("nearl", "NEARL-Tiny", None, seed=0)
    transform = frozen.image_transform(False)
    with torch.no_grad():
        features = frozen.encode_image(torch.stack([transform(load_image(p)) for p in pred.images]))
    logits = multilabel_logits(frozen, features, findings)
    assert torch.allclose(pred.probabilities, torch.sigmoid(logits), atol=1e-6)
    called = (torch.sigmoid(logits) >= 0.5).int()
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert list(rows[0]) == ["image", "present", "p(effusion)", "effusion", "p(edema)", "edema", "p(nodule)", "nodule"]
    for i, row in enumerate(rows):
        assert [float(row[f"p({c})"]) for c in findings] == pytest.approx(torch.sigmoid(logits[i]).tolist(), abs=1e-6)
        assert [int(row[c]) for c in findings] == called[i].tolist()
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["task"] == "multilabel" and saved["classes"] == findings and saved["threshold"] == 0.5
    first = saved["predictions"][0]
    assert first["probabilities"]["edema"] == pytest.approx(float(torch.sigmoid(logits[0, 1])))
    assert first["labels"] == dict(zip(findings, called[0].tolist()))
    assert first["present"] == [c for c, k in zip(findings, called[0].tolist()) if k]
    assert "| image | present (p >= 0.5) | p(effusion) | p(edema) | p(nodule) |" in capsys.readouterr().out


def test_an_adapter_trained_on_multilabel_predicts_multilabel_by_default(tmp_path):
    model = MT.build_method("nearl", "NEARL-Tiny", None, seed=0)
    folder = AF.save_adapter(model, tmp_path / "ml", model_name="NEARL-Tiny", pretrained=None, task="multilabel",
                             classnames=["effusion"], templates=None)
    scans = make_images(tmp_path)
    pred = P.main(["--adapter", str(folder), "--images", str(scans / "red.png"), *FAST])["predictions"]
    assert pred.task == "multilabel" and pred.labels == ["effusion"]  # one finding: scored on its own
    assert 0.0 < float(pred.probabilities[0, 0]) < 1.0


# ----------------------------------------------------------------------------- retrieval
def test_texts_are_ranked_for_each_image(adapter, tmp_path, capsys):
    scans = make_images(tmp_path)
    (tmp_path / "texts.txt").write_text("a green picture\n\n  a dark ct slice  \n")
    out = tmp_path / "out"
    report = P.main(["--adapter", str(adapter), "--images", str(scans / "red.png"), str(scans / "sub"),
                     "--texts", "a red image", "a blue photo", "--texts-file", str(tmp_path / "texts.txt"),
                     "--top-k", "2", "--out", str(out), *FAST])
    pred = report["predictions"]
    texts = ["a red image", "a blue photo", "a green picture", "a dark ct slice"]
    assert report["task"] == "retrieval" and pred.labels == texts
    assert pred.images == [str(scans / "red.png"), str(scans / "sub" / "ct_slice"), str(scans / "sub" / "green.jpg")]
    model = nearl.load(adapter)
    transform = model.image_transform(False)
    with torch.no_grad():
        image = model.encode_image(transform(load_image(scans / "red.png"))[None], normalize=True)
        text = model.encode_text(model.tokenizer()(texts), normalize=True)
    assert torch.allclose(pred.scores[0], (image @ text.T)[0], atol=1e-6)
    assert torch.allclose(pred.probabilities.sum(dim=1), torch.ones(3))
    printed = capsys.readouterr().out
    assert "| image | rank | text | probability | similarity |" in printed
    assert printed.count(f"| {scans / 'red.png'} |") == 2  # --top-k 2
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 3 * 4 and list(rows[0]) == ["image", "rank", "text", "text_index", "probability", "similarity"]
    first = [r for r in rows if r["image"] == str(scans / "red.png")]
    assert [float(r["similarity"]) for r in first] == sorted((float(r["similarity"]) for r in first), reverse=True)
    assert first[0]["text"] == texts[int(pred.scores[0].argmax())]
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["texts"] == texts and [e["rank"] for e in saved["predictions"][0]["ranking"]] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- bad input
def cli_error(argv, capsys) -> str:
    assert run_cli(P.main, [str(a) for a in argv], prog="nearl.predict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nearl.predict: error: ")
    return err[-1]


def test_bad_input_is_one_line_and_exit_2(adapter, tmp_path, capsys):
    scans = make_images(tmp_path)
    (tmp_path / "empty").mkdir()
    zero = ["--model", "NEARL-Tiny", *FAST]
    empty = [*zero, "--images", tmp_path / "empty", "--classes", "a"]
    assert "--images: no image files found in" in cli_error(empty, capsys)
    assert "--images " + str(tmp_path / "nope") + ": no such file or folder" in cli_error(
        [*zero, "--images", tmp_path / "nope", "--classes", "a"], capsys)
    assert "--classes: no class names given" in cli_error([*zero, "--images", scans, "--classes", " , "], capsys)
    twice = [*zero, "--images", scans, "--classes", "a,b,a"]
    assert "--classes: ['a'] given more than once" in cli_error(twice, capsys)
    assert "not both" in cli_error([*zero, "--images", scans, "--classes", "a", "--texts", "b"], capsys)
    assert "give --classes (classification) or --texts" in cli_error([*zero, "--images", scans], capsys)
    assert "--texts-file " in cli_error([*zero, "--images", scans, "--texts-file", tmp_path / "none.txt"], capsys)
    assert "--texts: no texts to rank" in cli_error([*zero, "--images", scans, "--texts", " "], capsys)
    assert "none of the 1 prediction images could be loaded" in cli_error(
        [*zero, "--images", scans / "broken.png", "--classes", "a,b"], capsys)
    assert "adapter folder " in cli_error(["--adapter", tmp_path / "nowhere", "--images", scans, *FAST], capsys)
    with pytest.raises(SystemExit) as stop:
        P.main(["--adapter", str(adapter), "--checkpoint", "run", "--images", str(scans)])
    assert stop.value.code == 2


def test_one_class_is_refused_not_scored_1(adapter, tmp_path, capsys):
    """`--classes tumor` printed probability 1.0000 for every image: a softmax over one class."""
    scans = make_images(tmp_path)
    for argv in (["--model", "NEARL-Tiny", "--classes", "tumor"], ["--adapter", adapter, "--classes", "tumor,"]):
        assert "--classes tumor: one class" in cli_error([*argv, "--images", scans / "red.png", *FAST], capsys)


def test_the_command_line_itself(tmp_path):
    """`python -m nearl.predict` with nothing to predict: exit status 2 and one line on stderr."""
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "nearl.predict", "--model", "NEARL-Tiny", "--images",
                        str(tmp_path / "empty"), "--classes", "pneumonia,normal", "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    suffixes = ", ".join(PR.IMAGE_SUFFIXES)
    assert r.stderr.strip().splitlines() == [f"nearl.predict: error: --images: no image files found in "
                                            f"{tmp_path / 'empty'} (looked for {suffixes} and DICOM files "
                                            "without a suffix)"]


# ----------------------------------------------------------------------------- the helpers
def test_helpers(tmp_path):
    scans = make_images(tmp_path)
    explicit = scans / "notes.txt"  # a file named is taken as it is (DICOM often has no image suffix)
    assert PR.find_images([scans / "red.png", scans, explicit]) == [  # each once, in the order found
        scans / "red.png", scans / "broken.png", scans / "gray16.png", scans / "sub" / "ct_slice",
        scans / "sub" / "green.jpg", explicit]
    assert PR.split_classes(["pleural_effusion, normal", "mass"]) == ["pleural_effusion", "normal", "mass"]
    assert PR.resolve_classes(None, CLASSES, "nearl") == CLASSES
    assert PR.resolve_classes(["a", "b"], CLASSES, "coop") == ["a", "b"]  # prompts name any class
    with pytest.raises(UserError, match="linear-probe scores the classes it was trained on, in their order: "
                                        "red,green,blue"):
        PR.resolve_classes(["green", "red", "blue"], CLASSES, "linear-probe")
    assert PR.read_texts(None, None) is None
