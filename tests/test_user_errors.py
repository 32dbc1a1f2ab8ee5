"""Issue 24, items 19 and 21-25: every user error is one line and exit status 2 (a checkpoint that does
not fit, prompt templates without '{}', numbers past what a run can use, weights that cannot be
downloaded, data that are not there), and the messages say what is true (a garbage lock, a
diverged run without a checkpoint, a folder holding only a log, a checkpoint fallback said once).
No test reaches the network: the download functions are replaced by what they raise offline."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from nearl.store import checkpoint as C
from nearl import evaluate as E
from nearl import export as X
from nearl import predict as P
from nearl.training import run_dir as R
from nearl import train as TR
from nearl import training as T
from nearl.errors import UserError, run_cli
from nearl.model.nearl_clip import create_backbone
from train_helpers import _one_thread, FAST, make_image_folder, make_manifest, run, TINY_RUN, one_error_line, one_step_run

TINY = TINY_RUN




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A NEARL-Tiny retrieval run of one step (shared: tests copy it)."""
    return one_step_run(tmp_path_factory.mktemp("user_errors"))


# ----------------------------------------------------------------------------- item 19
def _broken(trained, tmp_path, change) -> Path:
    """A copy of the trained run whose last.pt was edited by `change(checkpoint dict)`."""
    run_dir = Path(shutil.copytree(trained[0], tmp_path / "run"))
    (run_dir / "last.prev.pt").unlink(missing_ok=True)
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, run_dir / "last.pt")
    return run_dir


def _no_model(ckpt):
    del ckpt["model"]


def _other_shape(ckpt):
    name = sorted(ckpt["model"])[0]
    ckpt["model"][name] = torch.zeros(3, 5)


@pytest.mark.parametrize("change, says", [(_no_model, "holds no 'model' entry"),
                                          (_other_shape, r"another shape: \S+ is \(3, 5\), the model's")])
def test_a_checkpoint_that_does_not_fit_is_one_line_everywhere(trained, tmp_path, capsys, change, says):
    """evaluate, export, predict and a resume each ended in a KeyError or RuntimeError traceback."""
    import re

    run_dir = _broken(trained, tmp_path, change)
    image = next(trained[1].parent.glob("*.png"))
    common = ["--workers", "0", "--no-progress", "--device", "cpu"]
    for module, prog, argv in [
        (E, "nearl.evaluate", ["--checkpoint", str(run_dir), "--data", str(trained[1]), "--split", "val", *common]),
        (X, "nearl.export", ["--checkpoint", str(run_dir), "--out", str(tmp_path / "adapter")]),
        (P, "nearl.predict", ["--checkpoint", str(run_dir), "--images", str(image), "--texts", "a", "b", *common]),
        (TR, "nearl.train", ["--resume", str(run_dir), "--max-steps", "2", "--no-progress", "--workers", "0"]),
    ]:
        assert run_cli(module.main, argv, prog=prog) == 2, prog
        line = one_error_line(capsys, prog)
        assert str(run_dir / "last.pt") in line and re.search(says, line), line


# ----------------------------------------------------------------------------- item 21
@pytest.mark.parametrize("template", ["a photo", "a {} of {}"])
def test_train_templates_need_one_placeholder(tmp_path, capsys, template):
    root = make_image_folder(tmp_path / "folder", per_class=(2, 1), classes=("red", "green"))
    argv = ["--task", "classification", "--data", root, "--templates", template, "--max-steps", 1,
            "--out", tmp_path / "run", *TINY]
    assert run_cli(TR.main, [str(a) for a in argv], prog="nearl.train") == 2
    line = one_error_line(capsys, "nearl.train")
    assert line.startswith("nearl.train: error: --templates: each template needs exactly one '{}'"), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any work


def test_compare_templates_need_one_placeholder(tmp_path, capsys):
    from nearl import compare as CMP
    argv = ["--methods", "zeroshot", "--seeds", "0", "--templates", "a photo", "--device", "cpu", "--workers", "0",
            "--out", str(tmp_path / "cmp")]
    assert run_cli(CMP.main, argv, prog="nearl.compare") == 2
    assert "--templates: each template needs exactly one '{}'" in one_error_line(capsys, "nearl.compare")


# ----------------------------------------------------------------------------- item 22
@pytest.mark.parametrize("argv, message", [
    (["--seed", str(2 ** 70)], "argument --seed: must be at most 2**63 - 1"),
    (["--max-steps", str(10 ** 23)], "argument --max-steps: must be at most 1,000,000,000"),
    (["--epochs", str(10 ** 12)], "argument --epochs: must be at most 1,000,000,000"),
    (["--num-queries", "100000"], "argument --num-queries: must be at most 1,024"),
])
def test_numbers_past_what_a_run_can_use(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_seeds_of_the_other_command_lines_are_bounded(capsys):
    from nearl.comparison import run as CMP
    for parser in (E.build_parser(), P.build_parser()):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seed", str(2 ** 70)])
        assert "argument --seed: must be at most 2**63 - 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        CMP.build_parser().parse_args(["--max-steps", str(10 ** 23)])
    assert "must be at most 1,000,000,000" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--seeds: each seed must be in \[0, 2\*\*63 - 1\]"):
        CMP.compare(CMP.parse_config(["--seeds", f"0,{2 ** 70}", "--device", "cpu"]))


# ----------------------------------------------------------------------------- item 23
class _Offline:
    """What huggingface_hub raises offline: LocalEntryNotFoundError, from a connection error. `resolves`:
    whether the Hub's host resolves; `connects`: whether it then takes a connection (no answer: the
    connection times out, as behind a firewall that drops packets)."""

    def __init__(self, monkeypatch, resolves: bool, connects: Optional[bool] = None):
        import huggingface_hub
        import open_clip.pretrained
        from huggingface_hub.errors import LocalEntryNotFoundError

        self.calls = []

        def download(*a, **kw):
            self.calls.append((a, kw))
            try:
                raise ConnectionError("[Errno -2] Name or service not known")
            except ConnectionError as err:
                raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                              "cannot find the requested files in the local cache.") from err

        def resolve(host, *a, **kw):
            if not resolves:
                raise socket.gaierror(-2, "Name or service not known")
            return []

        monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", download)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        self.probed = []

        def connect(address, timeout=None, *a, **kw):
            self.probed.append(address)
            resolve(address[0])
            if not (resolves if connects is None else connects):
                time.sleep(timeout)
                raise socket.timeout("timed out")
            return _Socket()

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        monkeypatch.setattr(socket, "create_connection", connect)
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: None)


class _Socket:
    def close(self):
        pass


def _says_how_to_work_offline(message: str) -> None:
    assert "could not be downloaded" in message and "local-dir:" in message and "HF_HUB_OFFLINE" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("resolves", [False, True])
@pytest.mark.parametrize("model, pretrained, named", [("ViT-B-16", "openai", "'openai' of ViT-B-16"),
                                                       ("ViT-B-16", "hf-hub:org/repo", "'hf-hub:org/repo'")])
def test_weights_that_cannot_be_downloaded_are_one_line(monkeypatch, resolves, model, pretrained, named):
    """Offline, --pretrained openai spent a minute in retries and ended in a 40-line traceback. When the
    Hub's host does not resolve it is said before any download; when it does, the download's error is."""
    offline = _Offline(monkeypatch, resolves)
    with pytest.raises(UserError) as e:
        create_backbone(model, pretrained)
    assert f"cannot get the backbone weights {named}" in str(e.value)
    _says_how_to_work_offline(str(e.value))
    assert bool(offline.calls) == resolves  # no retries when the network is not there at all


def test_a_transformers_repo_offline_is_not_called_a_missing_config(monkeypatch):
    import transformers
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(source, **kw):
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as err:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                          "them in the cached files.") from err

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **kw: [])
    monkeypatch.setattr(socket, "create_connection", lambda *a, **kw: _Socket())  # the Hub answers; the download fails
    with pytest.raises(UserError) as e:
        create_backbone("ViT-B-16", "transformers:vinid/plip")
    assert "cannot get the backbone weights 'transformers:vinid/plip'" in str(e.value)
    _says_how_to_work_offline(str(e.value))


def test_evaluate_checks_its_data_before_any_download(monkeypatch, tmp_path, capsys):
    offline = _Offline(monkeypatch, resolves=True)
    argv = ["--model", "ViT-B-16", "--pretrained", "openai", "--data", str(tmp_path / "missing.csv"),
            "--device", "cpu", "--workers", "0", "--no-progress"]
    assert run_cli(E.main, argv, prog="nearl.evaluate") == 2
    assert "missing.csv" in one_error_line(capsys, "nearl.evaluate") and offline.calls == []
    argv[argv.index("--data") + 1] = str(make_manifest(tmp_path / "data", n_train=0, n_val=2))
    assert run_cli(E.main, argv, prog="nearl.evaluate") == 2  # the data are there: now the download, in one line
    _says_how_to_work_offline(one_error_line(capsys, "nearl.evaluate"))


@pytest.mark.parametrize("how", ["times out", "never answers"])
def test_a_hub_that_resolves_but_does_not_answer_is_said_within_seconds(monkeypatch, how):
    """Behind a firewall that drops packets the host resolves, and huggingface_hub retried each file for
    minutes: a connection to the Hub is tried first, for a few seconds, before any download."""
    from nearl.towers import downloads

    offline = _Offline(monkeypatch, resolves=True, connects=False)
    monkeypatch.setattr(downloads, "PROBE_TIMEOUT", 0.5, raising=False)
    released = threading.Event()
    if how == "never answers":  # a connect that ignores its timeout: the probe's own wait bounds it
        monkeypatch.setattr(socket, "create_connection", lambda *a, **kw: released.wait(60) and _Socket())
    t0 = time.monotonic()
    try:
        with pytest.raises(UserError) as e:
            create_backbone("ViT-B-16", "openai")
    finally:
        released.set()
    assert time.monotonic() - t0 < 3.0
    assert "cannot get the backbone weights 'openai' of ViT-B-16" in str(e.value)
    assert "huggingface.co:443" in str(e.value) and "0.5 s" in str(e.value), str(e.value)
    _says_how_to_work_offline(str(e.value))
    assert offline.calls == []  # no download, so no retries


@pytest.mark.parametrize("env, probed", [({"HTTPS_PROXY": "http://proxy.example:3128"}, ("proxy.example", 3128)),
                                         ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "huggingface.co"},
                                          ("huggingface.co", 443)),
                                         ({"HF_ENDPOINT": "http://hub.internal:8080"}, ("hub.internal", 8080))])
def test_the_probe_goes_where_the_downloads_go(monkeypatch, env, probed):
    """Through the proxy the environment names for the Hub (the Hub's own host is then not looked up
    here), to HF_ENDPOINT's host and port."""
    import huggingface_hub.constants

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name == "HF_ENDPOINT":  # read once, when huggingface_hub is imported
            monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", value)
        else:
            monkeypatch.setenv(name, value)
    offline = _Offline(monkeypatch, resolves=True)
    with pytest.raises(UserError):
        create_backbone("ViT-B-16", "openai")
    assert offline.probed == [probed] and offline.calls  # reachable: the download was tried (and failed)


BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
PUBMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"


def _tokenizer_offline(monkeypatch, tmp_path, connects: bool):
    """BiomedCLIP's weights and open_clip config in the cache (the model was built), its tokenizer
    (PubMedBERT's, loaded by transformers.AutoTokenizer) not: (what AutoTokenizer was asked, the
    model's tokenizer() as nearl/model/frozen.py gives it)."""
    import huggingface_hub
    import open_clip.pretrained
    import transformers
    from huggingface_hub.errors import LocalEntryNotFoundError

    from nearl.model.frozen import FrozenCLIPWrapper

    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": {"embed_dim": 512, "text_cfg": {
        "hf_model_name": PUBMEDBERT, "hf_tokenizer_name": PUBMEDBERT, "context_length": 256}}}))
    _Offline(monkeypatch, resolves=True, connects=connects)
    cached = {"open_clip_config.json": str(config)}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: cached.get(name))
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", lambda repo_id, filename, **kw: cached[filename])
    asked = []

    def from_pretrained(source, **kw):
        asked.append(source)
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as err:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                          "them in the cached files. Check your connection or see how to run the library in "
                          "offline mode.") from err

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    stub = SimpleNamespace(backbone=object(), model_name=BIOMEDCLIP)
    return asked, lambda: FrozenCLIPWrapper.tokenizer(stub)


@pytest.mark.parametrize("connects", [False, True])
def test_a_tokenizer_that_cannot_be_downloaded_is_one_line(monkeypatch, tmp_path, connects):
    """BiomedCLIP's tokenizer is downloaded after its weights, by transformers: offline it ended in
    transformers' OSError and its traceback, after the retries. Now: the Hub probed first (no
    connection: said within seconds, nothing asked of transformers), and a download that fails for
    want of a network is one line too, naming the tokenizer and the ways to work offline."""
    from nearl.towers import downloads

    monkeypatch.setattr(downloads, "PROBE_TIMEOUT", 0.5, raising=False)
    asked, tokenizer = _tokenizer_offline(monkeypatch, tmp_path, connects)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        tokenizer()
    assert time.monotonic() - t0 < 3.0
    message = str(e.value)
    assert f"cannot get the tokenizer {PUBMEDBERT!r} of {BIOMEDCLIP!r}" in message, message
    _says_how_to_work_offline(message)
    assert asked == ([PUBMEDBERT] if connects else [])


# ----------------------------------------------------------------------------- item 24
def test_a_missing_data_folder_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "roco" / "train" / "radiology"
    argv = ["--data", str(missing), "--device", "cpu", "--workers", "0", "--no-progress"]
    assert run_cli(E.main, argv, prog="nearl.evaluate") == 2
    assert one_error_line(capsys, "nearl.evaluate") == f"nearl.evaluate: error: {missing} does not exist (no such file or folder)"
    argv = ["--data", str(missing), "--max-steps", "1", "--out", str(tmp_path / "run"), *map(str, TINY)]
    assert run_cli(TR.main, argv, prog="nearl.train") == 2
    assert f"{missing} does not exist" in one_error_line(capsys, "nearl.train")
    assert run_cli(TR.main, ["--task", "classification", *argv], prog="nearl.train") == 2  # not "must be an ImageFolder"
    assert one_error_line(capsys, "nearl.train") == f"nearl.train: error: {missing} does not exist (no such file or folder)"


# ----------------------------------------------------------------------------- item 25
def test_a_garbage_lock_is_taken_over_not_called_another_hosts(tmp_path):
    (tmp_path / R.LOCK).write_bytes(b"\x00\x01 not json")
    lock = R.RunLock(tmp_path).acquire()
    try:
        assert lock.stale.get("unreadable")
        assert "unreadable train.lock" in lock.stale_note() and "host" not in lock.stale_note()
        assert json.loads(lock.path.read_text())["host"] == socket.gethostname()
    finally:
        lock.release()
    (tmp_path / R.LOCK).write_text("[1, 2]")  # JSON, but not a lock a run wrote
    R.RunLock(tmp_path).acquire().release()


def test_a_diverged_validation_without_a_checkpoint_does_not_say_resume(tmp_path, monkeypatch):
    from nearl.store.nonfinite import NonFiniteError
    from nearl.training import loop

    def diverged(model, records, **kw):
        return {"mean_recall": 0.0, "i2t_R@1": 0.0, "t2i_R@1": 0.0, "nonfinite_rows": len(records)}

    monkeypatch.setattr(loop, "evaluate_retrieval", diverged)
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=2)
    with pytest.raises(NonFiniteError) as e:
        run(["--data", manifest, "--max-steps", 1, "--out", tmp_path / "run", *TINY])
    message = str(e.value)
    assert "No checkpoint was written" in message and "resume" not in message.lower(), message
    assert "--overwrite" in message


def test_a_folder_holding_only_a_log_is_not_told_to_resume(tmp_path):
    (tmp_path / R.METRICS).write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(UserError) as e:
        R.prepare(tmp_path, resuming_here=False, overwrite=False)
    assert "--resume" not in str(e.value) and "--overwrite" in str(e.value) and "no checkpoint" in str(e.value)
    C.save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, tmp_path)  # with one, --resume is offered
    with pytest.raises(UserError, match="--resume"):
        R.prepare(tmp_path, resuming_here=False, overwrite=False)


def test_the_checkpoint_fallback_is_said_once(trained, tmp_path, caplog, recwarn, capsys):
    """A resumed run reads its checkpoint twice: the fallback to last.prev.pt was said three times."""
    run_dir = Path(shutil.copytree(trained[0], tmp_path / "run"))
    shutil.copy(run_dir / "last.pt", run_dir / "last.prev.pt")
    data = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(data[: len(data) // 2])
    assert run_cli(TR.main, ["--resume", str(run_dir), "--max-steps", "2", "--eval-every", "0", "--no-progress",
                             "--workers", "0"], prog="nearl.train") == 0
    said = [r for r in caplog.records if "last.prev.pt" in r.getMessage() and "cannot read" in r.getMessage()]
    said += [w for w in recwarn if "last.prev.pt" in str(w.message)]
    assert len(said) == 1, said
