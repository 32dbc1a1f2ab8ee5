"""Checks shared by the command lines (train, evaluate, compare): the --device (and whether --fused
runs on it), the --out folder, the backbone flags, and a way to say that the ValueErrors of a
library call are about the user's input. The argparse value types are in `argtypes`. Imports no
torch (the parsers use this module): what needs it imports it when called."""
from __future__ import annotations

import argparse
import difflib
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from nearl.errors import UserError
from nearl.logging_utils import reporter
from nearl.writes import check_writable

if TYPE_CHECKING:
    import torch


def resolve_device(name: Optional[str], flag: str = "--device") -> torch.device:
    """The torch.device a --device value names (None or "auto": CUDA when available, else CPU).
    A CUDA device without a GPU, or past the GPUs present, is a UserError, not torch's own error
    at the first tensor moved there."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: torch sees no CUDA GPU on this machine; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def use_fused(asked: bool, device: torch.device, say: Optional[Callable[[str], None]] = None) -> bool:
    """Whether the Triton kernels run: --fused `asked` on a CUDA `device`. Asked without one, the
    reference PyTorch path runs and `say` tells the user so (default: the report logger; training
    passes its main-rank `say`)."""
    if asked and device.type != "cuda":
        (say or reporter("device").info)("--fused: the Triton kernels need a CUDA GPU; none here, so the reference "
                                         "PyTorch path runs.")
        return False
    return bool(asked)


def check_out_dir(path: Optional[str], flag: str = "--out") -> None:
    """An output folder must be a folder (or not exist yet) that takes new files: found out before
    the work, not after it (`writes.check_writable`)."""
    check_writable(path, flag)


def check_backbone(model_name: str, pretrained: Optional[str]) -> None:
    """--model names an open_clip architecture and --pretrained a tag of it or an existing file
    (open_clip would say so only in a long traceback); hf-hub: / local-dir: sources name their own
    architecture and are left to open_clip. Raises UserError otherwise."""
    import importlib

    import open_clip

    from nearl.towers.sources import parse

    importlib.import_module("nearl.model.nearl_clip")  # adds our configs (NEARL-Tiny) to open_clip's
    if parse(model_name).is_schema or parse(pretrained).is_schema:
        return
    known = open_clip.list_models()
    if model_name not in known:
        near = difflib.get_close_matches(model_name, known, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else " (see open_clip.list_models())"
        raise UserError(f"--model {model_name!r} is not an open_clip architecture{hint}")
    if pretrained is None or Path(pretrained).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained.lower().replace("-", "_") not in tags:  # open_clip's own normalisation of a tag
        known_tags = f"its tags are {', '.join(tags)}" if tags else "it has no published weights"
        raise UserError(f"--pretrained {pretrained!r} is neither a file nor a tag open_clip knows for "
                        f"{model_name} ({known_tags}; or hf-hub:org/repo, local-dir:path)")


@contextmanager
def user_errors(context: str = "") -> Iterator[None]:
    """Re-raise the ValueErrors of the calls inside as UserErrors, prefixed with `context`.

    Only for calls whose ValueErrors all describe the user's input (a method name, a method's
    options, a checkpoint that does not fit the model asked for): wrapping more would hide bugs."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"{context}{err}") from err


def add_model_source(p: argparse.ArgumentParser) -> None:
    """The arguments that choose the model of nearl.evaluate and nearl.predict: a trained run or an
    adapter folder, else a fresh method on a backbone."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a checkpoint file or run directory (its last.pt); none: zero-shot")
    which.add_argument("--adapter", help="an adapter folder (python -m nearl.export); refuses another backbone")
    p.add_argument("--method", help="without --checkpoint / --adapter: the method to build fresh (default nearl, "
                   "which computes the frozen CLIP; zeroshot is the same by name). With one: must match it")
    p.add_argument("--model", help="open_clip architecture or transformers:<repo id or folder> (default: the "
                   "checkpoint's or adapter's; without one, ViT-B-16 with a GPU, NEARL-Tiny on CPU). With "
                   "--adapter: where its local backbone folder is now (transformers:/path or local-dir:/path)")
    p.add_argument("--pretrained", help="backbone weights: open_clip tag, file, hf-hub:, local-dir:, transformers: "
                   "(default: the checkpoint's or adapter's, which must match it; without one: random)")
