"""Backbone weights that have to be downloaded, and what happens when they cannot be.

open_clip fetches a tag's weights (and an `hf-hub:` model's config) from the Hugging Face Hub, and
transformers a repo id's files. Offline, huggingface_hub retries every file for about half a minute
and open_clip tries two file names, so a run used to wait a minute and end in a 40-line traceback.
Here, a download that cannot happen is one UserError naming the source and the ways to give the
weights offline (`OFFLINE_HELP`); and when the files are not in the local cache and the Hub cannot
be reached (its host does not resolve, or takes no connection within PROBE_TIMEOUT seconds, as
behind a firewall that drops packets; through the proxy the environment names for it, if any), that
is said within seconds, before any retry. The tokenizer, which open_clip has transformers download
after the weights for a Hugging Face text tower (BiomedCLIP's PubMedBERT), is covered the same way
(`getting_tokenizer`).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

from nearl.errors import UserError
from nearl.towers.sources import parse

OFFLINE_HELP = (
    "To use weights without a network, give them as a file (--pretrained path/to/weights.safetensors, .bin or .pt, "
    "with --model naming its architecture), as local-dir:FOLDER (a folder holding open_clip_config.json and "
    "open_clip_model.safetensors or open_clip_pytorch_model.bin, a Hub repo's layout), as transformers:FOLDER "
    "(a folder written by save_pretrained), or download them once where there is a network into the Hugging "
    "Face cache (HF_HOME) and set HF_HUB_OFFLINE=1 here")
TOKENIZER_HELP = (
    "To use it without a network, download it once where there is a network into the Hugging Face cache "
    "(HF_HOME; any nearl command with this model does) and set HF_HUB_OFFLINE=1 here, or give the model as "
    "local-dir:FOLDER with the tokenizer's files in that folder")
PROBE_TIMEOUT = 5.0  # seconds the Hub (or its proxy) has to take a connection before it is called unreachable
TOKENIZER_FILES = ["tokenizer_config.json", "tokenizer.json", "vocab.txt", "config.json"]  # any one cached: no probe
# What huggingface_hub, httpx, requests and urllib3 raise when the network cannot be reached (by name:
# which of those libraries are installed, and their versions, vary).
UNREACHABLE = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout",
               "ConnectionError", "NewConnectionError", "MaxRetryError", "NameResolutionError"}


def describe(model_name: str, pretrained: Optional[str]) -> str:
    """The source named in the messages: the tag and its architecture, or the hf-hub: / repo name."""
    if pretrained and not parse(pretrained).is_schema:
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
    for source in (parse(pretrained), parse(model_name)):
        if source.kind == "hf-hub":
            return source.hub_repo, ["open_clip_config.json"]
        if source.kind == "transformers" and source.hub_repo is not None:
            return source.hub_repo, ["config.json"]
    if not pretrained or os.path.isfile(os.path.expanduser(pretrained)) or \
            parse(pretrained).kind in ("local-dir", "transformers"):
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
    must take a connection within seconds; else a UserError now, not minutes of retries later."""
    files = _hub_files(model_name, pretrained)
    if files is not None:
        _require_hub(files, lambda why: offline_error(model_name, pretrained, why))


def _require_hub(files: Tuple[str, List[str]], error: Callable[[str], UserError]) -> None:
    """`files` (repo id, file names): when none is in the local cache and the Hub is not in offline
    mode (which fails at once by itself), the Hub must answer `hub_unreachable`; else error(why)."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, names = files
    if constants.HF_HUB_OFFLINE or any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        return
    why = hub_unreachable()
    if why is not None:
        raise error(why) from None


def _hub_address() -> Tuple[str, int, str]:
    """(host, port, how it is named) that a download from the Hub connects to first: HF_ENDPOINT's, or
    that of the proxy the environment names for it (HTTPS_PROXY, ALL_PROXY, ...; NO_PROXY honoured)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    scheme, host = url.scheme or "https", url.hostname or "huggingface.co"
    port = url.port or (80 if scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if via.hostname:
            via_port = via.port or {"https": 443, "socks5": 1080, "socks5h": 1080, "socks4": 1080}.get(via.scheme, 80)
            return via.hostname, via_port, f"the proxy {via.hostname}:{via_port} (for {host})"
    return host, port, f"{host}:{port}"


def hub_unreachable() -> Optional[str]:
    """Why the Hub cannot be reached from here (its host does not resolve, refuses, or takes no
    connection within PROBE_TIMEOUT seconds), or None when it takes one. In a thread, so that a name
    look-up that hangs is bounded too."""
    host, port, named = _hub_address()
    timeout, outcome = PROBE_TIMEOUT, []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except socket.gaierror as err:
            outcome.append(f"{host} does not resolve: {err}")
        except socket.timeout:
            outcome.append(f"{named} did not answer within {timeout:g} s")
        except OSError as err:
            outcome.append(f"{named} cannot be reached: {err or type(err).__name__}")

    probe = threading.Thread(target=connect, name="nearl-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return outcome[0] if outcome else f"{named} did not answer within {timeout:g} s"


@contextmanager
def _said_if_unreachable(error: Callable[[BaseException], UserError]) -> Iterator[None]:
    """A failure that could not reach its server becomes `error(its innermost cause)`, one UserError;
    any other failure is raised as it was."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not unreachable(err):
            raise
        raise error(_innermost(err)) from None


@contextmanager
def downloading(model_name: str, pretrained: Optional[str]) -> Iterator[None]:
    """Around building a backbone: a download that could not reach its server becomes one UserError
    naming the source (`offline_error`); any other failure is raised as it was."""
    with _said_if_unreachable(lambda why: offline_error(model_name, pretrained, why)):
        yield


def _tokenizer_files(model_name: str) -> Optional[Tuple[str, List[str]]]:
    """(repo id, file names) that loading `model_name`'s tokenizer downloads from the Hub (open_clip's
    get_tokenizer, or a transformers backbone's make_tokenizer), or None: nothing to download."""
    source = parse(model_name)
    if source.kind == "transformers":
        return None if source.hub_repo is None else (source.hub_repo, TOKENIZER_FILES)
    if source.kind == "local-dir":
        return None
    if source.kind == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        repo = source.hub_repo
        config = try_to_load_from_cache(repo, "open_clip_config.json")
        if not isinstance(config, str):
            return repo, ["open_clip_config.json"]  # get_tokenizer reads it first
        with open(config, encoding="utf-8") as f:
            text_cfg = (json.load(f).get("model_cfg") or {}).get("text_cfg") or {}
    else:
        import open_clip

        text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg") or {}
    name = text_cfg.get("hf_tokenizer_name")  # else open_clip's own tokenizer, shipped with it
    if not name or os.path.isdir(os.path.expanduser(name)):
        return None
    return name, TOKENIZER_FILES


def tokenizer_error(model_name: str, repo: str, why: str) -> UserError:
    return UserError(f"cannot get the tokenizer {repo!r} of {describe(model_name, None)}: it is not on this machine "
                     f"and could not be downloaded ({why}). {TOKENIZER_HELP}")


@contextmanager
def getting_tokenizer(model_name: str) -> Iterator[None]:
    """Around loading `model_name`'s tokenizer (nearl/model/frozen.py), as `check_reachable` and
    `downloading` are around its weights: not cached and the Hub unreachable, or a download that
    could not reach its server, is one UserError naming the tokenizer (`tokenizer_error`)."""
    files = _tokenizer_files(model_name)
    repo = files[0] if files is not None else model_name
    if files is not None:
        _require_hub(files, lambda why: tokenizer_error(model_name, repo, why))
    with _said_if_unreachable(lambda why: tokenizer_error(model_name, repo, why)):
        yield


def pretrained_example(model_name: str) -> str:
    """What to pass as --pretrained for real weights of `model_name`, for the random-backbone note: the
    repo of a transformers: or hf-hub: name, else open_clip's tags for it (those that exist: SigLIP has
    'webli', not 'openai'), else the sources every model takes."""
    if parse(model_name).is_schema:
        return f"e.g. {model_name}"
    import open_clip  # after the parse: the note is said once a run has started

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tags:
        return "e.g. " + " or ".join(tags[:3])
    return f"open_clip has no tag for {model_name}: a weights file, hf-hub:org/repo or local-dir:FOLDER"
