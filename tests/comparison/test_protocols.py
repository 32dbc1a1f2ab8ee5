"""The protocols adapter papers report, end to end on the embedded demo set (steps limited; the
numbers only show the pipeline): base-to-novel (`--classes`, `nearl.compare --protocol base2novel`)
and few-shot sweeps (`--protocol few-shot --shots`)."""
from __future__ import annotations

import json

import pytest

from nearl import compare as CMP
from nearl import evaluate as E
from nearl.store.checkpoint import load_checkpoint
from nearl.data import demo
from nearl.data.labelled import read_labelled_splits, select_classes
from nearl.errors import UserError
from nearl.comparison.protocols import harmonic_mean
from train_helpers import FAST, _one_thread, run

CMP_FAST = ["--batch-size", "8", "--bench-batch", "2", "--bench-iters", "1", *FAST]


@pytest.fixture()
def demo_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARL_DEMO_DIR", str(tmp_path / "demo"))


def test_base_and_novel_are_the_two_halves_of_the_class_list(demo_dir):
    splits, names = read_labelled_splits(demo.demo_split_json(), None)
    base, base_names = select_classes(splits["test"], names, "base")
    novel, novel_names = select_classes(splits["test"], names, "novel")
    assert base_names == names[:3] and novel_names == names[3:]
    assert len(base) + len(novel) == len(splits["test"])
    assert {r.label for r in novel} <= {0, 1, 2}  # renumbered within the subset
    assert [names.index(novel_names[r.label]) for r in novel] == [r.label for r in splits["test"] if r.label >= 3]
    with pytest.raises(ValueError, match=r"the 1 classes \['ct'\] leave the novel half 0 classes \(\[\]\)"):
        select_classes(splits["test"], names[:1], "novel")
    assert harmonic_mean(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120) and harmonic_mean(0.0, 0.0) == 0.0


def test_train_and_evaluate_on_the_base_or_novel_classes(tmp_path, demo_dir):
    out = tmp_path / "run"
    run(["--task", "classification", "--classes", "base", "--max-steps", 1, "--batch-size", 4, "--eval-every", 0,
         "--out", out, *FAST])
    ckpt = load_checkpoint(out)
    _, names = read_labelled_splits(demo.demo_split_json(), None)
    assert ckpt["classnames"] == names[:3] and ckpt["args"]["classes"] == "base"
    common = ["--checkpoint", str(out), "--split", "test", "--workers", "0", "--no-progress"]
    novel = E.main([*common, "--classes", "novel"])
    splits, _ = read_labelled_splits(demo.demo_split_json(), None)
    assert novel["metrics"]["n_images"] == sum(r.label >= 3 for r in splits["test"])
    assert novel["classes"] == "novel"
    with pytest.raises(UserError, match="--classes applies to --task classification only"):
        run(["--classes", "novel", "--max-steps", 1, "--out", tmp_path / "r2", *FAST])


def test_compare_base2novel_end_to_end(tmp_path, demo_dir, capsys):
    out = tmp_path / "b2n"
    report = CMP.main(["--protocol", "base2novel", "--methods", "nearl,coop,zeroshot", "--seeds", "0,1",
                       "--max-steps", "2", "--out", str(out), *CMP_FAST])
    assert "only show that the pipeline runs" in capsys.readouterr().out
    saved = json.loads((out / "comparison.json").read_text())
    _, names = read_labelled_splits(demo.demo_split_json(), None)
    assert saved["protocol"] == "base2novel" and saved["main_metric"] == "hm"
    assert saved["classes"] == {"base": names[:3], "novel": names[3:]}
    for method, m in saved["methods"].items():
        for r in m["runs"]:
            b, n = r["results"]["base"]["accuracy"], r["results"]["novel"]["accuracy"]
            assert r["metrics"] == pytest.approx({"base": b, "novel": n, "hm": harmonic_mean(b, n)})
            assert load_checkpoint(r["checkpoint"])["classnames"] == names[:3]  # trained on base only
        b, n, hm = (m["metrics"][k] for k in ("base", "novel", "hm"))
        assert hm["n"] == 2 and hm["mean"] == pytest.approx(harmonic_mean(b["mean"], n["mean"]))  # as CoCoOp reports
    # zeroshot's numbers are a plain evaluation on each half
    for seed, r in zip((0, 1), saved["methods"]["zeroshot"]["runs"]):
        for half in ("base", "novel"):
            ref = E.main(["--method", "zeroshot", "--task", "classification", "--classes", half, "--seed", str(seed),
                          "--split", "test", "--batch-size", "8", *FAST])
            assert r["results"][half]["accuracy"] == pytest.approx(ref["metrics"]["accuracy"])
    md = (out / "comparison.md").read_text()
    assert "| method | base | novel | HM | learnable params |" in md and "base2novel protocol" in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert report["methods"]["coop"]["learnable_parameters"] > 0


def test_compare_few_shot_end_to_end(tmp_path, demo_dir):
    out = tmp_path / "fs"
    report = CMP.main(["--protocol", "few-shot", "--shots", "2,1", "--methods", "nearl,zeroshot", "--seeds", "0,1",
                       "--max-steps", "1", "--out", str(out), *CMP_FAST])
    assert report["config"]["shots"] == [1, 2]
    for method in ("nearl", "zeroshot"):
        for k in (1, 2):
            stat = report["methods"][method]["shots"][str(k)]["metrics"]["accuracy"]
            runs = report["methods"][method]["shots"][str(k)]["runs"]
            assert stat["n"] == 2 and [r["seed"] for r in runs] == [0, 1] and {r["shots"] for r in runs} == {k}
            for r in runs:
                ckpt = load_checkpoint(r["checkpoint"])
                assert ckpt["args"]["k_shot"] == k and f"/k{k}/seed{r['seed']}" in r["checkpoint"]
                if method == "nearl":
                    assert ckpt["data"]["n"] == 6 * k  # K images of each of the 6 classes
    md = (out / "comparison.md").read_text()
    assert "| method | K = 1 | K = 2 | learnable params |" in md and "few-shot protocol" in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["--protocol", "base2novel", "--methods", "nearl,linear-probe"], "linear-probe's classifier cannot score them"),
    (["--protocol", "few-shot", "--task", "retrieval", "--methods", "nearl"], "add --task classification"),
    (["--protocol", "few-shot", "--k-shot", "4"], "drop --k-shot"),
    (["--protocol", "few-shot", "--shots", "0,2"], "--shots needs distinct positive integers"),
])
def test_protocol_mistakes_are_refused_before_any_run(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        CMP.main([*argv, "--out", str(tmp_path / "x"), *CMP_FAST])
    assert not (tmp_path / "x" / "runs").exists()


def test_base_to_novel_needs_two_classes_a_half(tmp_path, capsys):
    """Two classes gave base 100, novel 100, HM 100 on a random backbone: each half, scored among its
    own classes alone, had one class. A half with fewer than two classes is refused, naming them."""
    from train_helpers import make_image_folder

    root = make_image_folder(tmp_path / "folder", per_class=(2, 1), classes=("red", "green", "blue"))
    three = r"the 3 classes \['blue', 'green', 'red'\] leave the novel half 1 class \(\['red'\]\)"
    for half in ("base", "novel"):
        with pytest.raises(UserError, match=rf"--classes {half}: {three}.*at least two classes a half"):
            E.main(["--model", "NEARL-Tiny", "--task", "classification", "--data", str(root), "--split", "val",
                    "--classes", half, *FAST])
    with pytest.raises(UserError, match=rf"--classes novel: {three}"):
        run(["--task", "classification", "--classes", "novel", "--data", root, "--max-steps", 1,
             "--out", tmp_path / "run", *FAST])
    two = make_image_folder(tmp_path / "two", per_class=(2, 1), classes=("red", "green"))
    with pytest.raises(UserError, match=r"--classes base: the 2 classes \['green', 'red'\] leave the base half 1 "
                                        r"class \(\['green'\]\)"):
        CMP.main(["--protocol", "base2novel", "--methods", "zeroshot", "--seeds", "0", "--data", str(two),
                  "--split", "val", "--out", str(tmp_path / "b2n"), *CMP_FAST])
    assert not (tmp_path / "b2n" / "runs").exists()


def test_few_shot_refuses_a_k_that_would_not_run(tmp_path, demo_dir):
    """--shots 1,100 on classes of 5 and 6 images printed a 'K = 100' column for runs that trained on
    5 or 6 images a class. A K some class cannot give is refused before any run, naming the classes."""
    with pytest.raises(UserError, match=r"--shots 1,100: K = 100 needs 100 training images of each class, and 6 of "
                                        r"the 6 classes have fewer \('fundus green channel' 5, 'ct' 6, .*The largest "
                                        r"K every class allows is 5"):
        CMP.main(["--protocol", "few-shot", "--shots", "1,100", "--methods", "zeroshot", "--seeds", "0",
                  "--out", str(tmp_path / "fs"), *CMP_FAST])
    assert not (tmp_path / "fs" / "runs").exists()
