"""Adapter files (nearl/store/adapter_files.py, python -m nearl.export, nearl.load, evaluate --adapter):
a bit-for-bit round trip, and every way a folder can be wrong refused with the file named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nearl
from nearl.store import adapter_files as AF
from nearl.store import checkpoint as C
from nearl import evaluate as E
from nearl import export as X
from nearl import methods as MT
from nearl.errors import UserError, run_cli
from nearl.store.nonfinite import NonFiniteError
from train_helpers import FAST, _one_thread, make_image_folder, one_intra_op_thread, run  # noqa: F401  (_one_thread: autouse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A NEARL-Tiny classification run of 2 steps and its exported adapter (shared: tests copy it)."""
    root = tmp_path_factory.mktemp("export")
    data = make_image_folder(root / "folder", per_class=(3, 1))
    with one_intra_op_thread():
        run(["--task", "classification", "--model", "NEARL-Tiny", "--data", data, "--batch-size", 6, "--max-steps", 2,
             "--lr", 1e-2, "--eval-every", 0, "--templates", "a {} image.", "a photo of {}.", "--out", root / "run",
             *FAST])
        assert X.main(["--checkpoint", str(root / "run"), "--out", str(root / "adapter")]) == root / "adapter"
    return root / "run", root / "adapter", data


def copy_adapter(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained[1], tmp_path / "adapter"))


def edit_config(folder: Path, change, seal: bool = True) -> None:
    """Change adapter_config.json; sealed (its config_sha256 written anew), as a deliberate edit would
    be, so the checks behind the integrity check are reached."""
    path = folder / AF.CONFIG_FILE
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(AF.seal_config(record) if seal else record))


def images_and_tokens(model):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=g), model.tokenizer()(["a red image", "green", "a photo of blue."])


# ----------------------------------------------------------------------------- the round trip
def test_round_trip_is_bit_for_bit(trained):
    run_dir, adapter, _ = trained
    ckpt = C.load_checkpoint(run_dir)
    restored = MT.build_from_checkpoint(ckpt).eval()
    loaded = nearl.load(adapter)
    assert not loaded.training and type(loaded) is type(restored)
    state = loaded.trainable_state_dict()
    assert set(state) == set(ckpt["model"])
    for name, tensor in ckpt["model"].items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    fresh = MT.build_method("nearl", "NEARL-Tiny", None, seed=0)
    w_up = "adapters.vision.layers.1.w_up"
    assert not torch.equal(state[w_up], fresh.trainable_state_dict()[w_up])  # trained, not fresh
    images, tokens = images_and_tokens(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), restored.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), restored.encode_text(tokens))


def test_folder_layout_and_config(trained):
    run_dir, adapter, _ = trained
    ckpt = C.load_checkpoint(run_dir)
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                         "train_images.json"]
    assert sum(p.stat().st_size for p in adapter.iterdir()) < 3_000_000  # a few MB at most; no backbone
    record = json.loads((adapter / AF.CONFIG_FILE).read_text())
    assert record["format"] == "nearl-adapter" and record["nearl_version"] == nearl.__version__
    assert (record["method"], record["task"]) == ("nearl", "classification")
    assert record["config"] == ckpt["config"] and record["config"]["rank"] == 32  # every hyper-parameter
    assert record["classnames"] == ["blue", "green", "red"]
    assert record["templates"] == ["a {} image.", "a photo of {}."]
    assert record["backbone"] | {"fingerprint": None} == {"model_name": "NEARL-Tiny", "pretrained": None, "seed": 0,
                                                          "fingerprint": None}
    assert record["backbone"]["fingerprint"] == AF.fingerprint(MT.build_from_checkpoint(ckpt))
    assert record["weights"]["parameters"] == sum(v.numel() for v in ckpt["model"].values())
    assert record["source"]["step"] == 2
    assert record["train_images"] | {"sha256": None} == {"file": "train_images.json", "sha256": None, "count": 9,
                                                         "algorithm": "nearl-image-content-v1"}
    with safe_open(str(adapter / AF.WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(ckpt["model"])
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: nearl-clip") and "nearl.load(" in card and "random (seed 0)" in card


def test_evaluate_with_adapter_equals_checkpoint(trained, capsys):
    run_dir, adapter, data = trained
    common = ["--data", str(data), "--split", "val", "--workers", "0", "--no-progress"]
    by_adapter = E.main(["--adapter", str(adapter), *common])
    by_checkpoint = E.main(["--checkpoint", str(run_dir), *common])
    assert by_adapter["task"] == "classification"
    assert json.dumps(by_adapter["metrics"]) == json.dumps(by_checkpoint["metrics"])  # NaN-safe equality
    assert by_adapter["checkpoint"].endswith("adapter_model.safetensors")
    assert "RANDOM" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # one or the other
        E.main(["--adapter", str(adapter), "--checkpoint", str(run_dir), *common])
    assert stop.value.code == 2
    with pytest.raises(UserError, match="--model ViT-B-16: the adapter .* is for 'NEARL-Tiny'"):
        E.main(["--adapter", str(adapter), "--model", "ViT-B-16", *common])
    with pytest.raises(UserError, match="--method alta but the adapter .* holds method 'nearl'"):
        E.main(["--adapter", str(adapter), "--method", "alta", *common])


@pytest.mark.parametrize("method", ["alta", "clip-adapter", "coop", "biomedcoop", "linear-probe", "zeroshot",
                                    "tip-adapter", "tip-adapter-f", "clip-lora"])
def test_every_method_round_trips(tmp_path, method):
    """save_adapter on a model whose learnable tensors were changed (as training would); ALTA trains
    backbone LayerNorms, which the fingerprint must leave out."""
    tip = MT.spec(method).prepare is not None  # Tip-Adapter's cache of 6 images travels with it
    cfg = {"num_classes": 3} if method == "linear-probe" else {"classnames": ["red", "green", "blue"]} if tip else {}
    model = MT.build_method(method, "NEARL-Tiny", None, seed=0, **cfg)
    if tip:
        model.set_cache(torch.randn(6, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g))
    AF.save_adapter(model, tmp_path / "a", model_name="NEARL-Tiny", pretrained=None, task="classification",
                    classnames=["red", "green", "blue"])
    loaded = AF.load_adapter(tmp_path / "a")
    assert (loaded.method, loaded.classnames) == (MT.canonical(method), ["red", "green", "blue"])
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(loaded.model.trainable_state_dict()[name], tensor), name
    images, _ = images_and_tokens(model)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval().encode_image(images), model.eval().encode_image(images))


# ----------------------------------------------------------------------------- the fingerprint
def test_fingerprint_is_deterministic_and_tells_backbones_apart():
    a, b = (MT.build_method("nearl", "NEARL-Tiny", None, seed=0) for _ in range(2))
    other = MT.build_method("nearl", "NEARL-Tiny", None, seed=1)
    assert AF.fingerprint(a) == AF.fingerprint(b)
    assert AF.fingerprint(other)["architecture"] == AF.fingerprint(a)["architecture"]
    assert AF.fingerprint(other)["weights"] != AF.fingerprint(a)["weights"]
    with torch.no_grad():  # trained adapters are not the backbone
        next(a.trainable_parameters()).add_(1.0)
        assert AF.fingerprint(a) == AF.fingerprint(b)
        b.backbone.token_embedding.weight[0, 0] += 1.0  # sampled: element 0 of a large tensor is read
    assert AF.fingerprint(a)["weights"] != AF.fingerprint(b)["weights"]
    assert AF.fingerprint(a)["tensors"] == len([t for t in a.backbone.state_dict().values() if t.is_floating_point()])


# ----------------------------------------------------------------------------- refusals
def test_another_backbone_is_refused(trained, tmp_path):
    from tiny_timm import register

    register()
    folder = copy_adapter(trained, tmp_path)
    edit_config(folder, lambda r: r["backbone"].update(model_name="NEARL-Tiny-Sigmoid"))
    with pytest.raises(UserError, match=r"adapter_config.json: the backbone built from model_name='NEARL-Tiny-Sigmoid'"
                                        r".* is not the one this adapter was trained on: its architecture differs"):
        nearl.load(folder)
    edit_config(folder, lambda r: r["backbone"].update(model_name="NEARL-Tiny", seed=1))
    with pytest.raises(UserError, match="same architecture, different weights"):
        nearl.load(folder)
    edit_config(folder, lambda r: r["backbone"].update(seed=0))
    nearl.load(folder)  # as exported again
    edit_config(folder, lambda r: r["backbone"]["fingerprint"].update(weights="0" * 64))
    with pytest.raises(UserError, match=r"adapter_config.json: .*different weights \(fingerprint [0-9a-f]{16} != "
                                        r"recorded 0000000000000000\)"):
        nearl.load(folder)
    edit_config(folder, lambda r: r["backbone"].update(model_name="ViT-Nope-1"))
    with pytest.raises(UserError, match="adapter_config.json: its backbone cannot be built here: .*'ViT-Nope-1'"):
        nearl.load(folder)


def test_a_local_copy_of_the_same_weights_may_replace_the_source(trained, tmp_path):
    """pretrained= overrides where the backbone comes from; the fingerprint must still match."""
    adapter = trained[1]
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    torch.save(MT.build_method("zeroshot", "NEARL-Tiny", None, seed=0).backbone.state_dict(), same)
    torch.save(MT.build_method("zeroshot", "NEARL-Tiny", None, seed=5).backbone.state_dict(), other)
    loaded = AF.load_adapter(adapter, pretrained=str(same))
    assert loaded.pretrained == str(same)
    images, tokens = images_and_tokens(loaded.model)
    reference = nearl.load(adapter)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), reference.encode_image(images))
    with pytest.raises(UserError, match=r"pretrained='.*other.pt'.*same architecture, different weights"):
        nearl.load(adapter, pretrained=str(other))
    with pytest.raises(UserError, match=r"backbone weights file .*missing.pt not found here; pass --pretrained"):
        nearl.load(adapter, pretrained=str(tmp_path / "missing.pt"))


def test_config_that_does_not_fit_the_weights_is_refused(trained, tmp_path):
    folder = copy_adapter(trained, tmp_path)
    edit_config(folder, lambda r: r["config"].update(rank=16))
    with pytest.raises(UserError, match=r"adapter_model.safetensors does not fit the nearl model that "
                                        r".*adapter_config.json describes \(method and config\): shapes differ: "
                                        r".* \(.*32.*\) in the file, \(.*16.*\) in the model"):
        nearl.load(folder)
    edit_config(folder, lambda r: r.update(method="clip-adapter", config={}))
    with pytest.raises(UserError, match="does not fit the clip-adapter model .*: missing .*unexpected"):
        nearl.load(folder)
    edit_config(folder, lambda r: r.update(method="nearl", config={"rank": 32, "depth": 3}))
    with pytest.raises(UserError, match=r"adapter_config.json: method 'nearl' has no option\(s\) \['depth'\]"):
        nearl.load(folder)
    edit_config(folder, lambda r: r.update(method="no-such-method"))
    with pytest.raises(UserError, match="adapter_config.json: unknown method 'no-such-method'"):
        nearl.load(folder)


@pytest.mark.parametrize("change", [
    lambda r: r["config"].update(orth="soft"),  # same shapes, other features (2.9e-3 off)
    lambda r: r["config"].update(heads=2),
    lambda r: r.update(classnames=["red", "green", "blue"]),
    lambda r: r.update(templates=["a {}."]),
    lambda r: r["backbone"].update(pretrained="openai"),
])
def test_a_changed_config_is_refused(trained, tmp_path, capsys, change):
    """adapter_config.json is covered as the weights are: any changed entry is refused, the file named;
    a file only re-indented (the same entries) loads."""
    folder = copy_adapter(trained, tmp_path)
    record = json.loads((folder / AF.CONFIG_FILE).read_text())
    assert record["format_version"] == 2 and len(record["weights"]["config_sha256"]) == 64
    (folder / AF.CONFIG_FILE).write_text(json.dumps(record, indent=4, sort_keys=True))
    nearl.load(folder)
    edit_config(folder, change, seal=False)
    with pytest.raises(UserError, match=r"adapter/adapter_config.json has changed since the export \(config_sha256 "
                                        r"differs\)"):
        nearl.load(folder)
    assert run_cli(E.main, ["--adapter", str(folder), "--data", str(trained[2]), "--workers", "0", "--no-progress"],
                   prog="nearl.evaluate") == 2
    assert "adapter_config.json has changed since the export" in capsys.readouterr().err


def test_missing_or_damaged_files_are_named(trained, tmp_path):
    folder = copy_adapter(trained, tmp_path)
    with pytest.raises(UserError, match="adapter folder .*nowhere not found"):
        nearl.load(tmp_path / "nowhere")
    weights = load_file(str(folder / AF.WEIGHTS_FILE))
    (folder / AF.WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match=r"adapter/adapter_model.safetensors not found: the adapter's weights"):
        nearl.load(folder)
    weights["queries.q0"] = weights["queries.q0"] + 1.0
    save_file(weights, str(folder / AF.WEIGHTS_FILE))
    with pytest.raises(UserError, match=r"adapter_model.safetensors is not the file its adapter_config.json was written "
                                        r"with \(sha256 differs\)"):
        nearl.load(folder)
    (folder / AF.WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    edit_config(folder, lambda r: r["weights"].update(sha256=__import__("hashlib").sha256(
        (folder / AF.WEIGHTS_FILE).read_bytes()).hexdigest()))
    with pytest.raises(UserError, match="adapter_model.safetensors: not a readable safetensors file"):
        nearl.load(folder)
    (folder / AF.CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="adapter_config.json: cannot be read as JSON"):
        nearl.load(folder)
    (folder / AF.CONFIG_FILE).write_text(json.dumps({"format": "nearl-adapter", "format_version": 1}))
    with pytest.raises(UserError, match="adapter_config.json: no 'method' entry"):
        nearl.load(folder)
    (folder / AF.CONFIG_FILE).unlink()
    with pytest.raises(UserError, match=r"adapter/adapter_config.json not found: .* is not an adapter folder"):
        nearl.load(folder)


def test_nan_is_neither_exported_nor_loaded(trained, tmp_path, capsys):
    ckpt = torch.load(C.resolve(trained[0]), weights_only=True)
    ckpt["model"]["queries.q0"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")  # past save_checkpoint, which would refuse it
    with pytest.raises(NonFiniteError, match=r"nan.pt: 1 of \d+ learnable tensors hold NaN or inf \(queries.q0\); "
                                             r"not exported"):
        AF.export_checkpoint(tmp_path / "nan.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert run_cli(X.main, ["--checkpoint", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "out")],
                   prog="nearl.export") == 2
    err = capsys.readouterr().err
    assert err.startswith("nearl.export: error: checkpoint ") and err.count("\n") == 1
    folder = copy_adapter(trained, tmp_path)
    weights = load_file(str(folder / AF.WEIGHTS_FILE))
    weights["queries.q0"][0, 0] = float("inf")
    save_file(weights, str(folder / AF.WEIGHTS_FILE))
    edit_config(folder, lambda r: r["weights"].update(sha256=__import__("hashlib").sha256(
        (folder / AF.WEIGHTS_FILE).read_bytes()).hexdigest()))
    with pytest.raises(UserError, match=r"adapter_model.safetensors: 1 tensors hold NaN or inf \(queries.q0\); refused"):
        nearl.load(folder)


def test_export_refuses_to_overwrite_and_names_a_missing_checkpoint(trained, tmp_path, capsys):
    run_dir, adapter, _ = trained
    with pytest.raises(UserError, match=r"already holds adapter_model.safetensors, adapter_config.json, README.md; pass "
                                        r"--overwrite"):
        X.main(["--checkpoint", str(run_dir), "--out", str(adapter)])
    folder = copy_adapter(trained, tmp_path)
    X.main(["--checkpoint", str(run_dir / "last.pt"), "--out", str(folder), "--overwrite"])
    assert (folder / AF.WEIGHTS_FILE).read_bytes() == (adapter / AF.WEIGHTS_FILE).read_bytes()  # reproducible
    assert run_cli(X.main, ["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")],
                   prog="nearl.export") == 2
    assert "checkpoint not found: " in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 24.17: no local paths
def test_an_export_records_no_local_path(trained, tmp_path):
    """A run trained on --pretrained /home/.../weights.pt: adapter_config.json and the model card, meant to
    be pushed to the Hub as they are, named that absolute path (and the checkpoint's). Now the weights
    are named by file name alone, with the backbone fingerprint; the folder still loads given a copy of
    them, and without one the message says to pass it."""
    private = tmp_path / "home" / "someone" / "private"
    private.mkdir(parents=True)
    weights = private / "weights.pt"
    torch.save(MT.build_method("zeroshot", "NEARL-Tiny", None, seed=0).backbone.state_dict(), weights)
    ckpt = torch.load(C.resolve(trained[0]), weights_only=True)
    ckpt["pretrained"] = str(weights)
    torch.save(ckpt, private / "last.pt")
    out = tmp_path / "adapter"
    X.main(["--checkpoint", str(private / "last.pt"), "--out", str(out)])
    for name in (AF.CONFIG_FILE, AF.CARD_FILE):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "someone" not in text, (name, text)
    record = json.loads((out / AF.CONFIG_FILE).read_text())
    assert record["backbone"]["pretrained"] == "weights.pt" and record["source"]["checkpoint"] == "last.pt"
    assert "`weights.pt`" in (out / AF.CARD_FILE).read_text()
    with pytest.raises(UserError, match=r"adapter_config.json: the backbone weights were read from a local file, "
                                        r"weights.pt, .*pass --pretrained \(pretrained=\) a copy"):
        nearl.load(out)
    loaded = AF.load_adapter(out, pretrained=str(weights))  # the sealed config and the fingerprint still check
    reference = nearl.load(trained[1])
    images, tokens = images_and_tokens(reference)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), reference.encode_image(images))


def _clip_folder(folder: Path, seed: int) -> str:
    """A tiny transformers CLIPModel folder with weights (seed `seed`) and a config that names a Hub id, as a
    download of one has it; returns its 'transformers:' name."""
    import tiny_transformers

    name = tiny_transformers.write(folder, "clip")
    tiny_transformers.save_weights(MT.build_method("zeroshot", name, None, seed=seed).backbone.hf, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "vinid/plip"}))
    return name


def test_a_local_transformers_backbone_is_recorded_by_name_and_loads_from_a_moved_copy(tmp_path, capsys):
    """issue 24.17, the rest: --model transformers:/local/folder (random weights from its config) and
    --pretrained transformers:/local/folder were written into adapter_config.json and the model card as
    given, absolute path and all. Now by the folder's name, the Hub id its config names and the sha256
    of its weights files; loading says which keyword (flag) gives the folder, takes it from where it
    lives now, and still checks the backbone fingerprint."""
    import hashlib

    private = tmp_path / "home" / "someone" / "clip"
    name = _clip_folder(private, seed=0)
    models, adapters = {}, {}
    for case, pretrained in (("weights", name), ("random", None)):
        models[case] = MT.build_method("nearl", name, pretrained, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in models[case].trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        adapters[case] = AF.save_adapter(models[case].eval(), tmp_path / f"adapter-{case}", model_name=name,
                                         pretrained=pretrained, task="classification", classnames=["a", "b"])
        for path in adapters[case].iterdir():
            if path.suffix != ".safetensors":
                text = path.read_text()
                assert str(tmp_path) not in text and "someone" not in text, (case, path.name, text)
    bb = json.loads((adapters["weights"] / AF.CONFIG_FILE).read_text())["backbone"]
    assert (bb["model_name"], bb["pretrained"]) == ("transformers:clip", "transformers:clip")
    assert bb["model_local"] and bb["pretrained_local"]
    weights_sha = hashlib.sha256((private / "model.safetensors").read_bytes()).hexdigest()
    assert bb["local_sources"]["pretrained"]["files"] == {"model.safetensors": weights_sha}
    assert bb["local_sources"]["pretrained"]["config_name_or_path"] == "vinid/plip"
    assert "vinid/plip" in (adapters["weights"] / AF.CARD_FILE).read_text()
    random_bb = json.loads((adapters["random"] / AF.CONFIG_FILE).read_text())["backbone"]
    assert random_bb["pretrained"] is None and random_bb["model_name"] == "transformers:clip"

    images, tokens = images_and_tokens(models["weights"])  # its tokenizer is read from the folder
    moved = tmp_path / "elsewhere" / "clip-copy"
    shutil.move(str(private), str(moved))
    here = "transformers:" + str(moved)
    with pytest.raises(UserError, match=r"local folder, transformers:clip, .*pass --pretrained \(pretrained=\)"):
        nearl.load(adapters["weights"])
    with pytest.raises(UserError, match=r"built from a local folder, transformers:clip, .*pass --model \(model=\)"):
        nearl.load(adapters["random"])
    for case, kw in (("weights", {"pretrained": here}), ("weights", {"model": here}), ("random", {"model": here})):
        loaded = AF.load_adapter(adapters[case], **kw)
        with torch.no_grad():
            assert torch.equal(loaded.model.encode_image(images), models[case].encode_image(images)), (case, kw)
            assert torch.equal(loaded.model.encode_text(tokens), models[case].encode_text(tokens)), (case, kw)
    from nearl import predict as P
    image = make_image_folder(tmp_path / "data", per_class=(1, 0)) / "train" / "red" / "0.png"
    for case in adapters:
        report = P.main(["--adapter", str(adapters[case]), "--model", here, "--images", str(image), "--workers", "0",
                         "--no-progress", "--device", "cpu"])
        assert report["predictions"].images == [str(image)] and report["predictions"].labels == ["a", "b"]
    other = _clip_folder(tmp_path / "other" / "clip", seed=1)
    with pytest.raises(UserError, match=r"different weights \(fingerprint [0-9a-f]{16} != recorded [0-9a-f]{16}\).*"
                                        r"weights files [0-9a-f]{16} != recorded [0-9a-f]{16}"):
        nearl.load(adapters["weights"], pretrained=other)
    capsys.readouterr()
    assert run_cli(P.main, ["--adapter", str(adapters["random"]), "--images", str(image), "--workers", "0",
                            "--no-progress"], prog="nearl.predict") == 2
    err = capsys.readouterr().err
    assert err.startswith("nearl.predict: error: ") and err.count("\n") == 1 and "pass --model (model=)" in err


def test_an_adapter_written_with_an_absolute_path_still_loads(tmp_path):
    """Adapters exported before 24.17 recorded a transformers: folder by its path: they load as they are,
    and --model (model=) may still say where the folder is now."""
    name = _clip_folder(tmp_path / "clip", seed=0)
    model = MT.build_method("nearl", name, None, seed=0).eval()
    folder = AF.save_adapter(model, tmp_path / "adapter", model_name=name, pretrained=None)

    def as_before(record):
        record["backbone"]["model_name"] = name
        for key in ("model_local", "local_sources"):
            record["backbone"].pop(key, None)

    edit_config(folder, as_before)
    images, _ = images_and_tokens(model)
    with torch.no_grad():
        assert torch.equal(nearl.load(folder).encode_image(images), model.encode_image(images))
    moved = Path(shutil.move(str(tmp_path / "clip"), str(tmp_path / "moved")))
    with torch.no_grad():
        loaded = nearl.load(folder, model="transformers:" + str(moved))
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
