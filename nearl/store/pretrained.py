"""PEFT-style adapters: `model.save_pretrained(DIR)`, `nearl.from_pretrained(DIR or Hub repo id)` and
`push_to_hub(DIR, "owner/name")`.

    model = nearl.build("ViT-B-16", "openai")          # or nearl.methods.build_method(...), nearl.load(...)
    ...                                                # train it
    model.save_pretrained("adapters/mine")             # adapter_model.safetensors, adapter_config.json, README.md
    model = nearl.from_pretrained("adapters/mine")     # a local folder: nearl.load
    model = nearl.from_pretrained("owner/name")        # a Hugging Face Hub repository holding such a folder
    model = nearl.load("hf-hub:owner/name")            # the same ("hf-hub:" always names a Hub repository)
    push_to_hub("adapters/mine", "owner/name")         # the folder, uploaded (python -m nearl.export --push-to-hub)

The folder is the one `python -m nearl.export` writes (nearl/store/adapter_files.py). A model knows how
its backbone was built (`model.backbone_source`, set by nearl.build and nearl.methods.build_method),
which is what the folder records so that loading builds the same backbone again; the task, class
names and templates are save_pretrained's keywords. A Hub repository is fetched with
huggingface_hub.snapshot_download (the adapter's files only, into the Hugging Face cache); a Hub that
cannot be reached is one UserError, said within seconds (nearl/towers/downloads.py). `push_to_hub`
uploads a folder with huggingface_hub.HfApi (create_repo, then upload_folder) under the token
huggingface_hub finds itself (HF_TOKEN, `hf auth login`), which no message shows.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from torch import nn

from nearl.cli_args import user_errors
from nearl.methods import check_task, method_of
from nearl.store.adapter_files import (CARD_FILE, CONFIG_FILE, LEGACY_WEIGHTS_FILE, TRAIN_IMAGES_FILE, WEIGHTS_FILE,
                                       AdapterError, _read_weights, load, read_adapter_config, save_adapter,
                                       weights_file_name)
from nearl.towers import downloads
from nearl.towers.sources import parse

logger = logging.getLogger("nearl.adapter")
PathLike = Union[str, os.PathLike]
HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE, CARD_FILE, TRAIN_IMAGES_FILE]  # what is downloaded
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")  # "name" or "owner/name"
# What huggingface_hub raises for a repository or revision that is not there or not open to this user.
HUB_REFUSALS = {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "HFValidationError",
                "DisabledRepoError"}
HUB_OFFLINE_HELP = ("download it once where there is a network (nearl.from_pretrained or `hf download`, into the "
                    "Hugging Face cache, HF_HOME) and set HF_HUB_OFFLINE=1 here, or give a local copy of the folder")


def save_pretrained(model: nn.Module, directory: PathLike, *, task: Optional[str] = None,
                    classnames: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None,
                    overwrite: bool = False, **kwargs: Any) -> Path:
    """`model.save_pretrained(DIR)`: save_adapter with the backbone the model records (`backbone_source`).
    model_name= / pretrained= / backbone_seed= in kwargs override it (and stand in for it on a model
    built without one); the other kwargs go to save_adapter (source=, train_images=, read_from=, and the
    model card's license= and hub_repo=).
    task None: "classification" when classnames are given, else the method's first task."""
    recorded = getattr(model, "backbone_source", None)
    given = {k: kwargs.pop(k) for k in ("model_name", "pretrained", "backbone_seed") if k in kwargs}
    if recorded is None and "model_name" not in given:
        raise AdapterError(f"save_pretrained: this {method_of(model)} model does not record how its backbone was "
                           "built (nearl.build, nearl.methods.build_method and nearl.load record it); pass "
                           "model_name= and pretrained= (and backbone_seed= for random weights)")
    model_name = given.get("model_name", recorded.model_name if recorded else None)
    pretrained = given["pretrained"] if "pretrained" in given else (recorded.pretrained if recorded else None)
    seed = given["backbone_seed"] if "backbone_seed" in given else (recorded.seed if recorded else None)
    if seed is None and pretrained is None:
        raise AdapterError(f"save_pretrained: the random backbone of this model ({model_name}, no pretrained weights) "
                           "was drawn from the global generator, so loading could not draw it again; build it with "
                           "seed= (nearl.build(..., seed=0), nearl.methods.build_method(..., seed=0)) or pass "
                           "backbone_seed= the seed it was drawn with")
    task = task or ("classification" if classnames else type(model).tasks[0])
    with user_errors("save_pretrained: "):
        check_task(method_of(model), task)
    return save_adapter(model, directory, model_name=model_name, pretrained=pretrained,
                        backbone_seed=0 if seed is None else int(seed), task=task, classnames=classnames,
                        templates=templates, overwrite=overwrite, **kwargs)


def from_pretrained(name_or_path: PathLike, pretrained: Optional[str] = None, *, model: Optional[str] = None,
                    fused: bool = False, revision: Optional[str] = None) -> nn.Module:
    """The model of an adapter folder (`nearl.load`), given as a local folder or as the id of a Hugging
    Face Hub repository holding one ("owner/name"; revision: a branch, tag or commit). pretrained= /
    model=: as nearl.load takes them (where a local backbone is now). Refuses, in one line, a string that
    is neither, a Hub that cannot be reached, and everything nearl.load refuses."""
    return load(adapter_folder(name_or_path, revision=revision), pretrained, model=model, fused=fused)


def adapter_folder(name_or_path: PathLike, *, revision: Optional[str] = None) -> Path:
    """The local folder of an adapter given as a folder (or its adapter_config.json) or as a Hub repo id,
    which is downloaded (the adapter's files only) into the Hugging Face cache."""
    text = os.fspath(name_or_path)
    if isinstance(text, str) and parse(text).kind == "hf-hub":  # "hf-hub:owner/name": a Hub repository, always
        return _download(hub_repo_id(parse(text).value, f"adapter {text!r}"), revision)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise AdapterError(f"revision={revision!r} names a revision of a Hub repository, but {text} is a "
                               "folder on this machine")
        return path
    if not isinstance(text, str) or not REPO_ID.fullmatch(text) or ".." in text or "--" in text:
        raise AdapterError(f"adapter {text!r}: neither a folder on this machine nor the id of a Hugging Face Hub "
                           "repository (owner/name)")
    return _download(text, revision)


def hub_repo_id(text: str, what: str) -> str:
    """`text` when it is the id of a Hub repository, "owner/name"; else an AdapterError naming `what`."""
    if not REPO_ID.fullmatch(text) or "/" not in text or ".." in text or "--" in text:
        raise AdapterError(f"{what}: {text!r} is not the id of a Hugging Face Hub repository (owner/name)")
    return text


def _download(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")

    def unreachable(why: str) -> AdapterError:
        return AdapterError(f"adapter {where}: not a folder on this machine, and the Hugging Face Hub could not be "
                            f"reached to download it ({why}); {HUB_OFFLINE_HELP}")

    downloads._require_hub((repo_id, [CONFIG_FILE]), unreachable)  # said within seconds, not after retries
    with downloads._said_if_unreachable(unreachable), _hub_refusals(where):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"Hub repository {where} holds no {CONFIG_FILE}: not a nearl adapter (python -m "
                           "nearl.export or model.save_pretrained writes one)")
    return folder


@contextmanager
def _hub_refusals(where: str) -> Iterator[None]:
    """A repository or revision the Hub does not have (or does not open to this user): one line."""
    try:
        yield
    except Exception as err:
        if type(err).__name__ not in HUB_REFUSALS:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise AdapterError(f"adapter {where}: the Hugging Face Hub refused it ({type(err).__name__}: {first})") from None


def push_to_hub(folder: PathLike, repo_id: str, *, private: Optional[bool] = None, revision: Optional[str] = None,
                commit_message: Optional[str] = None, token: Optional[str] = None) -> str:
    """Upload an adapter folder (python -m nearl.export, model.save_pretrained) to the Hugging Face Hub
    repository `repo_id` ("owner/name"), created when it is not there (private: a new one's visibility;
    None: the Hub's default). revision: a branch, created when missing (None: main). The token is
    huggingface_hub's own (HF_TOKEN, or what `hf auth login` stored), or `token`; it is never logged nor
    put in a message. Returns the commit's URL. Refuses, in one AdapterError line, a folder whose files
    are not those its adapter_config.json names, a Hub that cannot be reached (said within seconds),
    and one that refuses the upload (no token, no right to write to the repository)."""
    from huggingface_hub import HfApi, constants

    folder, record = read_adapter_config(Path(folder))
    _read_weights(folder / weights_file_name(record, folder / CONFIG_FILE), record)  # the files loading will check
    repo_id = hub_repo_id(repo_id, "push_to_hub")

    def failed(why: str) -> AdapterError:
        return AdapterError(f"could not push {folder} to the Hugging Face Hub repository {repo_id!r} "
                            f"({_redacted(why, token)})")

    if constants.HF_HUB_OFFLINE:
        raise failed("HF_HUB_OFFLINE is set")
    why = downloads.hub_unreachable()
    if why is not None:
        raise failed(f"the Hub cannot be reached: {why}")
    api = HfApi(token=token)
    with downloads._said_if_unreachable(lambda why: failed(f"the Hub cannot be reached: {why}")), \
            _push_refusals(failed):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message or f"nearl {record['method']} adapter",
                                 allow_patterns=HUB_FILES)
    url = str(getattr(info, "commit_url", None) or info)
    logger.info("pushed %s to %s", folder, url)
    return url


PUSH_REFUSALS = HUB_REFUSALS | {"HfHubHTTPError", "LocalTokenNotFoundError", "BadRequestError"}
HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")  # what a Hugging Face token looks like


def _redacted(text: str, token: Optional[str]) -> str:
    """`text` without a token in it: the one given, huggingface_hub's own, anything shaped like one."""
    from huggingface_hub import get_token

    for secret in (token, get_token()):
        if secret:
            text = text.replace(secret, "***")
    return HUB_TOKEN.sub("hf_***", text)


@contextmanager
def _push_refusals(failed) -> Iterator[None]:
    """The Hub refused (no token, no right to write, a bad name): `failed(why)`, one line."""
    try:
        yield
    except Exception as err:
        if not any(kind.__name__ in PUSH_REFUSALS for kind in type(err).__mro__):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        status = getattr(getattr(err, "response", None), "status_code", None)
        denied = type(err).__name__ == "LocalTokenNotFoundError" or status in (401, 403) or \
            re.match(r"40[13]\b", first) is not None
        help_ = ("; log in with `hf auth login`, or set HF_TOKEN, as a user who may write to it" if denied else "")
        raise failed(f"{type(err).__name__}: {first}{help_}") from None
