"""Backbone sources, parsed in one place: the strings given as model_name / pretrained.

  'openai', 'laion2b_s34b_b88k'      an open_clip tag (or an open_clip architecture, as a model name)
  'path/to/weights.safetensors'      a weights file: a path, or a name ending in a weights suffix
  'hf-hub:org/repo'                  an open_clip model on the Hugging Face Hub (names its architecture)
  'local-dir:FOLDER'                 a folder laid out as such a Hub repo (names its architecture)
  'transformers:<repo id or folder>' a transformers CLIP-family checkpoint
  None                               random weights

`parse` reads a string once into a `Source`; the prefixes are written only here. No torch, no
open_clip: the command lines check sources before they import the heavy stack.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HF_HUB, LOCAL_DIR, TRANSFORMERS = "hf-hub:", "local-dir:", "transformers:"
PREFIXES = {"hf-hub": HF_HUB, "local-dir": LOCAL_DIR, "transformers": TRANSFORMERS}  # kind: its prefix
SCHEMAS = tuple(PREFIXES.values())  # the sources that name their own architecture and weights
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
KINDS = ("random", "tag", "file", *PREFIXES)


def names_local_path(text: str) -> bool:
    """Whether `text` names a file or folder of this machine: one that exists, an absolute path, or
    one relative to here or to a home folder ('.', '~')."""
    path = Path(text).expanduser()
    return path.exists() or path.is_absolute() or text.startswith((".", "~"))


@dataclass(frozen=True)
class Source:
    kind: str  # one of KINDS
    value: str  # what follows the prefix ("" for random weights; the whole text for a tag or a file)
    text: Optional[str]  # as given (None: random weights)

    @property
    def is_schema(self) -> bool:
        """A prefixed source: it names its own architecture (hf-hub:, local-dir:) or checkpoint (transformers:)."""
        return self.kind in PREFIXES

    @property
    def prefix(self) -> str:
        """'hf-hub:', 'local-dir:' or 'transformers:'; '' for the others."""
        return PREFIXES.get(self.kind, "")

    @property
    def is_local(self) -> bool:
        """Whether it names a file or folder of this machine: a weights file, a local-dir: folder, a
        transformers: folder (`names_local_path`, even one not there), or a tag-like name that exists here."""
        if self.kind in ("file", "local-dir"):
            return True
        if self.kind == "transformers":
            return names_local_path(self.value)
        return self.kind == "tag" and Path(self.value).expanduser().exists()

    @property
    def local_path(self) -> Optional[Path]:
        """The file or folder of this machine it names, when there is one; None for a Hub id or a tag."""
        if self.kind in ("random", "hf-hub"):
            return None
        path = Path(self.value).expanduser()
        return path if path.exists() else None

    @property
    def hub_repo(self) -> Optional[str]:
        """The Hub repo id it downloads from: an hf-hub: id, or a transformers: repo id ('~' expanded)
        that is not a folder here; None for the others (a tag's repo is open_clip's to say)."""
        if self.kind == "hf-hub":
            return self.value
        if self.kind == "transformers":
            value = os.path.expanduser(self.value)
            return None if os.path.isdir(value) else value
        return None

    def renamed(self, value: str) -> str:
        """The source text with `value` in place of its own (its prefix kept)."""
        return self.prefix + value


def parse(text: Optional[str]) -> Source:
    """The `Source` a model_name / pretrained string names (None: random weights)."""
    if text is None:
        return Source("random", "", None)
    for kind, prefix in PREFIXES.items():
        if text.startswith(prefix):
            return Source(kind, text[len(prefix):], text)
    looks_like_file = os.sep in text or "/" in text or text.lower().endswith(WEIGHT_SUFFIXES)
    return Source("file" if looks_like_file else "tag", text, text)


def backbone_name(model_name: str, pretrained: Optional[str]) -> str:
    """The name a built backbone goes by: a prefixed pretrained source names its own, else model_name."""
    return pretrained if parse(pretrained).is_schema else model_name
