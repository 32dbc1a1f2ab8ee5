"""Hub sharing (issue 26, item 7): `python -m nearl.export --push-to-hub REPO` and
`nearl.store.push_to_hub(folder, repo)` upload an adapter folder, `nearl.load("hf-hub:owner/name")` (and
`--adapter hf-hub:...`) fetch one, and the model card says what the adapter is, was trained and
validated on, and is not for. Offline: huggingface_hub.HfApi and snapshot_download are mocked, and the
network probe with them."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import nearl
from nearl import evaluate as E
from nearl import export as X
from nearl import predict as PR
from nearl.errors import UserError, run_cli
from nearl.store import adapter_files as AF
from nearl.store import pretrained as P
from nearl.towers import downloads
from train_helpers import FAST, _one_thread, make_image_folder, make_manifest, one_intra_op_thread, run  # noqa: F401

TOKEN = "hf_SECRETtoken0123456789abcdefXYZ"
REPO = "someone/tiny-adapter"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A NEARL-Tiny classification run (validated every epoch: best.pt, metrics.jsonl) and a retrieval run
    without a validation split."""
    root = tmp_path_factory.mktemp("hub")
    with one_intra_op_thread():
        folder = make_image_folder(root / "colours", per_class=(3, 1))
        run(["--task", "classification", "--model", "NEARL-Tiny", "--data", folder, "--batch-size", 6,
             "--max-steps", 2, "--lr", 1e-2, "--eval-every", 1, "--out", root / "cls", *FAST])
        manifest = make_manifest(root / "captions", n_train=4, n_val=0)  # no validation split
        run(["--data", manifest, "--model", "NEARL-Tiny", "--batch-size", 4, "--max-steps", 1, "--out", root / "ret",
             *FAST])
    return root


class FakeApi:
    """huggingface_hub.HfApi as far as push_to_hub uses it; `fail` maps a method to what it raises."""
    calls: list = []
    fail: dict = {}

    def __init__(self, *args, **kwargs):
        FakeApi.calls.append(("HfApi", args, kwargs))

    def _call(self, name, args, kwargs):
        FakeApi.calls.append((name, args, kwargs))
        if name in FakeApi.fail:
            raise FakeApi.fail[name]

    def create_repo(self, *args, **kwargs):
        self._call("create_repo", args, kwargs)
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def create_branch(self, *args, **kwargs):
        self._call("create_branch", args, kwargs)

    def upload_folder(self, *args, **kwargs):
        self._call("upload_folder", args, kwargs)
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0123abcd"


class HfHubHTTPError(Exception):
    """Named as huggingface_hub's (whose constructor differs between its versions)."""


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(downloads, "hub_unreachable", lambda: None)  # no probe of the network
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeApi


def called(name):
    return [(args, kwargs) for n, args, kwargs in FakeApi.calls if n == name]


def export(runs, tmp_path, *extra, checkpoint="cls"):
    out = tmp_path / "adapter"
    X.main(["--checkpoint", str(runs / checkpoint), "--out", str(out), *map(str, extra)])
    return out


def header(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("\n---\n", 1)[0]


# ----------------------------------------------------------------------------- pushing
def test_export_pushes_the_folder_it_wrote(runs, tmp_path, hub, capsys):
    out = export(runs, tmp_path, "--push-to-hub", REPO, "--private", "--revision", "v1", "--commit-message", "first")
    said = capsys.readouterr()
    [(args, kwargs)] = called("create_repo")
    assert (args[:1] or (kwargs["repo_id"],)) == (REPO,) and kwargs["private"] is True and kwargs["exist_ok"] is True
    [(_, up)] = called("upload_folder")
    assert up["repo_id"] == REPO and Path(up["folder_path"]) == out and up["revision"] == "v1"
    assert up["commit_message"] == "first"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(up["allow_patterns"])
    assert called("create_branch")[0][1]["branch"] == "v1"
    assert f"https://huggingface.co/{REPO}" in said.out and TOKEN not in said.out + said.err
    assert f'nearl.load("hf-hub:{REPO}")' in (out / AF.CARD_FILE).read_text()  # the card names the repo


def test_push_to_hub_pushes_a_written_folder(runs, tmp_path, hub, capsys):
    out = export(runs, tmp_path)
    assert not FakeApi.calls  # no push without --push-to-hub
    url = P.push_to_hub(out, REPO)
    assert url.startswith(f"https://huggingface.co/{REPO}") and called("create_repo")[0][1]["private"] is None
    assert not called("create_branch") and called("upload_folder")[0][1]["revision"] is None
    capsys.readouterr()
    X.main(["--out", str(out), "--push-to-hub", REPO])  # the folder as it is, without --checkpoint
    assert len(called("upload_folder")) == 2 and Path(called("upload_folder")[1][1]["folder_path"]) == out
    with pytest.raises(UserError, match=r"adapter folder .*nowhere not found"):
        P.push_to_hub(tmp_path / "nowhere", REPO)
    with pytest.raises(UserError, match=r"'not a repo id' is not the id of a Hugging Face Hub repository"):
        P.push_to_hub(out, "not a repo id")


@pytest.mark.parametrize("failure", ["unauthorised", "no token", "unreachable", "refused connection", "offline"])
def test_a_failed_push_is_one_line_and_the_folder_stays(runs, tmp_path, hub, monkeypatch, capsys, failure):
    if failure == "unauthorised":
        hub.fail["create_repo"] = HfHubHTTPError(f"401 Client Error: Unauthorized for url: https://huggingface.co/"
                                                 f"api/repos/create (Request ID: x)\nInvalid credentials in "
                                                 f"Authorization header: Bearer {TOKEN}")
    elif failure == "no token":
        hub.fail["create_repo"] = type("LocalTokenNotFoundError", (EnvironmentError,), {})(
            "Token is required (`token=True`), but no token found.")
    elif failure == "unreachable":
        monkeypatch.setattr(downloads, "hub_unreachable", lambda: "huggingface.co does not resolve")
    elif failure == "refused connection":
        hub.fail["upload_folder"] = ConnectionError(f"Max retries exceeded (token {TOKEN})")
    else:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "adapter"
    status = run_cli(X.main, ["--checkpoint", str(runs / "cls"), "--out", str(out), "--push-to-hub", REPO],
                     prog="nearl.export")
    said = capsys.readouterr()
    assert status == 2
    err = said.err.strip()
    assert "\n" not in err and err.startswith(f"nearl.export: error: could not push {out} to the Hugging Face Hub "
                                              f"repository '{REPO}'"), err
    assert TOKEN not in said.out + said.err
    assert f"the adapter is written in {out}" in err and f"--out {out} --push-to-hub {REPO}" in err
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    nearl.load(out)  # whole
    if failure in ("unreachable", "offline"):
        assert not called("create_repo") and not called("upload_folder")  # said before any try
        assert ("does not resolve" if failure == "unreachable" else "HF_HUB_OFFLINE") in err
    if failure in ("unauthorised", "no token"):
        assert "HF_TOKEN" in err or "hf auth login" in err


# ----------------------------------------------------------------------------- loading hf-hub:
def test_hf_hub_names_a_hub_repository_for_load_from_pretrained_predict_and_evaluate(runs, tmp_path, hub, monkeypatch):
    import huggingface_hub

    cache = export(runs, tmp_path)
    fetched = []

    def snapshot_download(repo_id, **kwargs):
        fetched.append((repo_id, kwargs))
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    want = nearl.load(cache)
    for got in (nearl.load(f"hf-hub:{REPO}"), nearl.from_pretrained(f"hf-hub:{REPO}"),
                nearl.from_pretrained(f"hf-hub:{REPO}", revision="v1")):
        for name, tensor in want.trainable_state_dict().items():
            assert torch.equal(got.trainable_state_dict()[name], tensor), name
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(got.encode_image(images), want.encode_image(images))
    assert [r for r, _ in fetched] == [REPO] * 3 and fetched[2][1]["revision"] == "v1"
    images = make_image_folder(tmp_path / "scans", per_class=(1, 0))
    report = PR.main(["--adapter", f"hf-hub:{REPO}", "--images", str(images / "train"), "--workers", "0",
                      "--no-progress", "--device", "cpu"])
    assert report["task"] == "classification" and len(report["predictions"].images) == 3
    other = make_image_folder(tmp_path / "held_out", per_class=(1, 1), seed=5)
    scored = E.main(["--adapter", f"hf-hub:{REPO}", "--data", str(other), "--split", "val", "--workers", "0",
                     "--no-progress", "--device", "cpu"])
    assert scored["task"] == "classification" and scored["metrics"]["n_images"] == 3
    for bad in ("hf-hub:", "hf-hub:a/b/c", "hf-hub:bad name"):
        with pytest.raises(UserError, match=r"not the id of a Hugging Face Hub repository \(owner/name\)"):
            nearl.load(bad)


# ----------------------------------------------------------------------------- the model card
def test_the_card_has_its_header_intended_use_limitations_and_own_classes(runs, tmp_path, hub):
    out = export(runs, tmp_path, "--license", "cc-by-4.0")
    card = (out / AF.CARD_FILE).read_text()
    head = header(card)
    for line in ("library_name: nearl-clip", "- nearl-clip", "- medical", 'license: "cc-by-4.0"', "metrics:",
                 "- accuracy"):
        assert line in head.splitlines(), (line, head)
    assert "base_model" not in head  # a random backbone has none
    assert "## Intended use" in card and "## Limitations" in card
    assert "not a medical device" in card and "research" in card.lower()
    assert "pipeline check only" in card  # a random backbone
    # the adapter's own classes in the predict example, quoted for a shell
    assert re.search(r'nearl\.predict --adapter hf-hub:owner/name --images scans/ --classes "blue,green(,red)?"', card)
    record = json.loads((out / AF.CONFIG_FILE).read_text())
    validation = record["source"]["validation"]
    assert (validation["metric"], validation["split"], validation["step"]) == ("accuracy", "val", 2)
    assert record["source"]["data"]["name"] == "colours" and record["source"]["data"]["train_records"] == 9
    assert validation["images"] == 3 and validation["run_best"] == 100.0
    assert "validation" in card.lower() and "`colours`" in card and "not a test result" in card
    # no path of this machine: the run, the data, the home folder
    for text in (card, (out / AF.CONFIG_FILE).read_text()):
        assert str(runs) not in text and str(Path.home()) not in text and str(tmp_path) not in text
        assert "/tmp/" not in text


def test_the_card_of_best_pt_a_retrieval_run_and_an_unstated_license(runs, tmp_path, hub):
    out = export(runs, tmp_path, checkpoint="cls/best.pt")
    record = json.loads((out / AF.CONFIG_FILE).read_text())
    assert record["source"]["validation"]["step"] == 1 and record["source"]["validation"]["score"] == 100.0
    card = (out / AF.CARD_FILE).read_text()
    assert "license" not in header(card) and "no license was stated" in card.lower()
    shutil.rmtree(out)
    out = export(runs, tmp_path, checkpoint="ret")
    card = (out / AF.CARD_FILE).read_text()
    assert "--texts " in card and "--classes" not in card.split("## Use", 1)[1]
    assert "no validation" in card.lower()  # the retrieval run had no validation
    assert "`manifest.csv`" in card and "- mean_recall" not in header(card)


@pytest.mark.parametrize("model_name, pretrained, base_model", [
    ("ViT-B-16", "openai", "timm/vit_base_patch16_clip_224.openai"),
    ("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ("hf-hub:org/biomed", "hf-hub:org/biomed", "org/biomed"),
    ("transformers:org/plip", "transformers:org/plip", "org/plip"),
    ("NEARL-Tiny", None, None),
    ("NEARL-Tiny", "weights.pt", None),
])
def test_base_model_is_the_backbones_hub_id(model_name, pretrained, base_model):
    record = {"method": "nearl", "task": "classification", "classnames": ["pleural effusion", "no finding"],
              "templates": None, "weights": {"file": AF.WEIGHTS_FILE, "parameters": 10},
              "backbone": {"model_name": model_name, "pretrained": pretrained, "seed": 0,
                           "fingerprint": {"algorithm": "nearl-backbone-v1", "weights": "0" * 64}},
              "train_images": None, "source": {}}
    if pretrained == "weights.pt":
        record["backbone"]["pretrained_local"] = True
    head = header(AF.model_card(record))
    assert (f'base_model: "{base_model}"' in head.splitlines()) if base_model else "base_model" not in head
    card = AF.model_card(record)
    assert '--classes "pleural effusion,no finding"' in card
    assert ("pipeline check only" in card) == (pretrained is None)


def test_push_to_hub_is_public_and_the_library_does_not_print():
    import nearl.store

    assert nearl.store.push_to_hub is P.push_to_hub
    source = Path(P.__file__).read_text() + Path(AF.__file__).read_text()
    assert not re.search(r"^\s*print\(", source, re.M)
    assert os.environ.get("HF_TOKEN") != TOKEN  # monkeypatched per test only
