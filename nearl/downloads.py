"""Backbone weights that have to be downloaded, and what happens when they cannot be.

open_clip fetches a tag's weights (and an `hf-hub:` model's config) from the Hugging Face Hub, and
transformers a repo id's files. Offline, huggingface_hub retries every file for about half a minute
and open_clip tries two file names, so a run used to wait a minute and end in a 40-line traceback.
Here, a download that cannot happen is one UserError naming the source and the ways to give the
weights offline (`OFFLINE_HELP`); and when the files are not in the local cache and the Hub's host
does not even resolve (no network), that is said at once, before any retry.
"""
from __future__ import annotations

import os
import socket
import urllib.error
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urlparse

from .errors import UserError

OFFLINE_HELP = (
    "To use weights without a network, give them as a file (--pretrained path/to/weights.safetensors, .bin or .pt, "
    "with --model naming its architecture), as local-dir:FOLDER (a folder holding open_clip_config.json and "
    "open_clip_model.safetensors or open_clip_pytorch_model.bin, a Hub repo's layout), as transformers:FOLDER "
    "(a folder written by save_pretrained), or download them once where there is a network into the Hugging "
    "Face cache (HF_HOME) and set HF_HUB_OFFLINE=1 here")
# What huggingface_hub, httpx, requests and urllib3 raise when the network cannot be reached (by name:
# which of those libraries are installed, and their versions, vary).
UNREACHABLE = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout",
               "ConnectionError", "NewConnectionError", "MaxRetryError", "NameResolutionError"}


def describe(model_name: str, pretrained: Optional[str]) -> str:
    """The source named in the messages: the tag and its architecture, or the hf-hub: / repo name."""
    if pretrained and not pretrained.startswith(("hf-hub:", "local-dir:", "transformers:")):
        return f"{pretrained!r} of {model_name}"
    return repr(pretrained or model_name)


def unreachable(err: Optional[BaseException]) -> bool:
    """Whether `err`, or an exception it was raised from or while handling, says that a download
    could not reach its server (as opposed to a file that is not there, or a bug)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, socket.gaierror, socket.timeout, urllib.error.URLError)) or \
                type(err).__name__ in UNREACHABLE:
            return True
        err = err.__cause__ or err.__context__
    return False


def _innermost(err: BaseException) -> str:
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def offline_error(model_name: str, pretrained: Optional[str], why: str) -> UserError:
    return UserError(f"cannot get the backbone weights {describe(model_name, pretrained)}: they are not on this "
                     f"machine and could not be downloaded ({why}). {OFFLINE_HELP}")


def _hub_files(model_name: str, pretrained: Optional[str]) -> Optional[Tuple[str, List[str]]]:
    """(repo id, file names) open_clip downloads for this backbone from the Hub, or None (nothing to
    download, a URL, a transformers source: left to their libraries)."""
    for source in (pretrained, model_name):
        if source and source.startswith("hf-hub:"):
            return source[len("hf-hub:"):], ["open_clip_config.json"]
        if source and source.startswith("transformers:") and not os.path.isdir(source[len("transformers:"):]):
            return source[len("transformers:"):], ["config.json"]
    if not pretrained or os.path.isfile(os.path.expanduser(pretrained)) or pretrained.startswith(("local-dir:",
                                                                                                  "transformers:")):
        return None
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg.get("hf_hub") or cfg.get("file"):
        return None
    repo, name = os.path.split(cfg["hf_hub"])  # open_clip's download_pretrained: 'org/repo/' or 'org/repo/file'
    name = name or "open_clip_pytorch_model.bin"
    return repo, [name, os.path.splitext(name)[0] + ".safetensors", "open_clip_model.safetensors"]


def check_reachable(model_name: str, pretrained: Optional[str]) -> None:
    """Before open_clip downloads from the Hub: if none of the files is in the local cache, the Hub
    must at least resolve; else a UserError now, not a minute of retries later."""
    files = _hub_files(model_name, pretrained)
    if files is None:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    repo, names = files
    if constants.HF_HUB_OFFLINE or any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        return  # offline mode fails at once by itself; a cached file needs no network
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        raise offline_error(model_name, pretrained, f"{host} does not resolve: {err}") from None


@contextmanager
def downloading(model_name: str, pretrained: Optional[str]) -> Iterator[None]:
    """Around building a backbone: a download that could not reach its server becomes one UserError
    naming the source (`offline_error`); any other failure is raised as it was."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not unreachable(err):
            raise
        raise offline_error(model_name, pretrained, _innermost(err)) from None
