"""PEFT-style adapters (issue 25, item 7; nearl/store/pretrained.py): model.save_pretrained(DIR) and
nearl.from_pretrained(DIR or Hub repo id), adapter_model.safetensors (folders with the older
adapter.safetensors still load), unknown config entries warned about and ignored, and a Hub that
cannot be reached as one line. Offline: the Hub is huggingface_hub.snapshot_download, mocked."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

import nearl
from nearl import methods as MT
from nearl.errors import UserError
from nearl.model.frozen import BackboneSource
from nearl.store import adapter_files as AF
from nearl.towers import downloads
from train_helpers import _one_thread  # noqa: F401  (autouse)

CLASSES = ["red", "green", "blue"]


def trained_like(model, seed: int = 1):
    """`model` with its learnable tensors moved, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(model):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), model.tokenizer()(["a red image", "a photo of blue."])


def same_outputs(a, b) -> None:
    images, tokens = inputs(a)
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))
    for name, tensor in a.trainable_state_dict().items():
        assert torch.equal(b.trainable_state_dict()[name], tensor), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-like NEARL-CLIP on NEARL-Tiny (random backbone, seed 3) and its save_pretrained folder."""
    model = trained_like(nearl.build("NEARL-Tiny", seed=3))
    folder = tmp_path_factory.mktemp("pretrained") / "adapter"
    assert model.save_pretrained(folder, classnames=CLASSES) == folder
    return model, folder


def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved[1], tmp_path / "adapter"))


def rewrite_config(folder: Path, change, seal: bool = True) -> None:
    path = folder / AF.CONFIG_FILE
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(AF.seal_config(record) if seal else record, indent=2))


# ----------------------------------------------------------------------------- the model knows its backbone
def test_builders_record_the_backbone_source_and_leave_the_state_alone():
    built = nearl.build("NEARL-Tiny", seed=5)
    assert built.backbone_source == BackboneSource("NEARL-Tiny", None, 5)
    method = MT.build_method("nearl", "NEARL-Tiny", None, seed=5)
    assert method.backbone_source == BackboneSource("NEARL-Tiny", None, 5)
    # nearl.build(seed=) is build_method's model, and the record is no part of the state
    assert list(built.state_dict()) == list(method.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), method.state_dict().values()))
    assert not any("backbone_source" in k for k in built.state_dict())
    ckpt = {"model_name": "NEARL-Tiny", "pretrained": None, "backbone_seed": 5, "method": "clip-adapter",
            "config": {}, "model": MT.build_method("clip-adapter", "NEARL-Tiny", None, seed=5).trainable_state_dict()}
    assert MT.build_from_checkpoint(ckpt).backbone_source == BackboneSource("NEARL-Tiny", None, 5)
    assert nearl.build("NEARL-Tiny").backbone_source == BackboneSource("NEARL-Tiny", None, None)  # global generator


# ----------------------------------------------------------------------------- round trips
def test_save_pretrained_then_from_pretrained_is_bit_for_bit(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    record = json.loads((folder / AF.CONFIG_FILE).read_text())
    assert record["weights"]["file"] == "adapter_model.safetensors"
    assert record["backbone"] | {"fingerprint": None} == {"model_name": "NEARL-Tiny", "pretrained": None, "seed": 3,
                                                          "fingerprint": None}
    assert (record["method"], record["task"], record["classnames"]) == ("nearl", "classification", CLASSES)
    card = (folder / "README.md").read_text()
    assert "`adapter_model.safetensors`" in card and "nearl.from_pretrained(" in card
    loaded = nearl.from_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.backbone_source == BackboneSource("NEARL-Tiny", None, 3)
    same_outputs(model, loaded)
    same_outputs(model, nearl.from_pretrained(str(folder / AF.CONFIG_FILE)))  # the config file names its folder


def test_another_method_round_trips(tmp_path):
    model = trained_like(MT.build_method("clip-adapter", "NEARL-Tiny", None, seed=2))
    model.save_pretrained(tmp_path / "a")
    record = json.loads((tmp_path / "a" / AF.CONFIG_FILE).read_text())
    assert (record["method"], record["task"], record["backbone"]["seed"]) == ("clip-adapter", "retrieval", 2)
    loaded = nearl.from_pretrained(tmp_path / "a")
    assert MT.method_of(loaded) == "clip-adapter"
    same_outputs(model, loaded)
    again = loaded.save_pretrained(tmp_path / "b")  # a loaded model knows its backbone too
    assert (again / AF.WEIGHTS_FILE).read_bytes() == (tmp_path / "a" / AF.WEIGHTS_FILE).read_bytes()


def test_a_model_without_a_recorded_source_is_refused_with_what_to_pass(tmp_path):
    model = MT.build_method("clip-adapter", "NEARL-Tiny", None, seed=4)
    model.backbone_source = None  # as a model made from its class directly
    with pytest.raises(UserError, match=r"^save_pretrained: this clip-adapter model does not record how its "
                                        r"backbone was built .*pass model_name= and pretrained="):
        model.save_pretrained(tmp_path / "a")
    with pytest.raises(UserError, match=r"^save_pretrained: the random backbone .*drawn from the global generator"
                                        r".*build it with seed="):
        nearl.build("NEARL-Tiny").save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model.save_pretrained(tmp_path / "a", model_name="NEARL-Tiny", pretrained=None, backbone_seed=4)
    same_outputs(model.eval(), nearl.from_pretrained(tmp_path / "a"))
    with pytest.raises(UserError, match="save_pretrained: method 'coop' does not apply to task 'retrieval'"):
        MT.build_method("coop", "NEARL-Tiny", None, seed=0).save_pretrained(tmp_path / "c", task="retrieval")


# ----------------------------------------------------------------------------- the older layout
def test_a_folder_with_the_older_weights_name_still_loads(saved, tmp_path):
    """Written before PEFT's name: adapter.safetensors, which its sealed config names."""
    folder = copy(saved, tmp_path)
    (folder / AF.WEIGHTS_FILE).rename(folder / "adapter.safetensors")
    rewrite_config(folder, lambda r: r["weights"].update(file="adapter.safetensors"))
    same_outputs(saved[0], nearl.from_pretrained(folder))
    same_outputs(saved[0], nearl.load(folder / "adapter.safetensors"))
    with pytest.raises(UserError, match=r"already holds adapter_config.json, README.md, adapter.safetensors; pass "
                                        r"--overwrite"):
        saved[0].save_pretrained(folder)
    saved[0].save_pretrained(folder, overwrite=True, classnames=CLASSES)  # the new layout, the old file gone
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (folder / AF.CONFIG_FILE).read_bytes() == (saved[1] / AF.CONFIG_FILE).read_bytes()
    rewrite_config(folder, lambda r: r["weights"].update(file="../adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"adapter_config.json: weights.file '../adapter_model.safetensors' is not "
                                        r"the name of a .safetensors file in the adapter folder"):
        nearl.from_pretrained(folder)


# ----------------------------------------------------------------------------- a newer nearl's config
def test_unknown_entries_are_warned_about_once_and_ignored(saved, tmp_path, caplog):
    folder = copy(saved, tmp_path)
    rewrite_config(folder, lambda r: r.update(peft_type="NEARL", zz_later={"a": 1}))  # sealed with them, as written
    with caplog.at_level(logging.WARNING, logger="nearl.adapter"):
        same_outputs(saved[0], nearl.from_pretrained(folder))
        nearl.from_pretrained(folder)
    said = [r.getMessage() for r in caplog.records if r.name == "nearl.adapter"]
    assert len(said) == 1, said
    assert str(folder / AF.CONFIG_FILE) in said[0] and "peft_type, zz_later" in said[0]
    rewrite_config(folder, lambda r: r.update(peft_type="other"), seal=False)  # an unknown entry is covered too
    with pytest.raises(UserError, match=r"adapter_config.json has changed since the export \(config_sha256 differs\)"):
        nearl.from_pretrained(folder)


def test_a_changed_known_entry_is_still_refused(saved, tmp_path):
    folder = copy(saved, tmp_path)
    rewrite_config(folder, lambda r: r.update(peft_type="NEARL"))
    rewrite_config(folder, lambda r: r.update(classnames=["blue", "green", "red"]), seal=False)
    with pytest.raises(UserError, match=r"adapter_config.json has changed since the export \(config_sha256 differs\)"):
        nearl.from_pretrained(folder)


# ----------------------------------------------------------------------------- the Hub (mocked)
def test_a_hub_repo_id_is_downloaded_then_loaded(saved, tmp_path, monkeypatch):
    import huggingface_hub

    cache = copy(saved, tmp_path)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(downloads, "hub_unreachable", lambda: None)  # no probe of the network
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    same_outputs(saved[0], nearl.from_pretrained("someone/tiny-adapter", revision="v1"))
    assert [c[0] for c in calls] == ["someone/tiny-adapter"] and calls[0][1]["revision"] == "v1"
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter.safetensors"} <= set(
        calls[0][1]["allow_patterns"])
    (cache / AF.CONFIG_FILE).unlink()
    with pytest.raises(UserError, match="Hub repository 'someone/tiny-adapter' holds no adapter_config.json"):
        nearl.from_pretrained("someone/tiny-adapter")


def test_an_unreachable_hub_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(downloads, "hub_unreachable", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        nearl.from_pretrained("someone/tiny-adapter")
    text = str(err.value)
    assert "\n" not in text and text.startswith("adapter 'someone/tiny-adapter': not a folder on this machine, and "
                                                "the Hugging Face Hub could not be reached")
    assert "Temporary failure in name resolution" in text and "HF_HUB_OFFLINE=1" in text
    assert err.value.__cause__ is None and err.value.__suppress_context__

    def not_called(repo_id, **kwargs):
        raise AssertionError("snapshot_download called although the Hub does not answer")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_called)
    monkeypatch.setattr(downloads, "hub_unreachable", lambda: "huggingface.co does not resolve")
    with pytest.raises(UserError, match=r"could not be reached to download it \(huggingface.co does not resolve\)"):
        nearl.from_pretrained("someone/tiny-adapter")


def test_neither_a_folder_nor_a_repo_id_is_named(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("no download"))
    for bad in (str(tmp_path / "nowhere"), "a/b/c", "./adapters/x", "bad name"):
        with pytest.raises(UserError, match=rf"^adapter '{re.escape(bad)}': neither a folder on this machine nor the id of a "
                                            r"Hugging Face Hub repository \(owner/name\)$"):
            nearl.from_pretrained(bad)
    with pytest.raises(UserError, match=r"revision='v1' names a revision of a Hub repository, but .* is a folder"):
        nearl.from_pretrained(tmp_path, revision="v1")


def test_from_pretrained_is_public_and_light():
    import nearl.store

    assert "from_pretrained" in nearl.__all__ and "from_pretrained" in dir(nearl)
    assert nearl.from_pretrained is nearl.store.from_pretrained
    assert nearl.store.save_pretrained is not None
