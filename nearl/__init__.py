"""NEARL-CLIP: a frozen open_clip backbone adapted with USEformer queries and orthogonal cross-attention."""
import importlib

from ._checkout import map_uninstalled_folders

map_uninstalled_folders()  # before ops imports nearl_kernels

from . import ops, reference  # noqa: E402
from .config import NEARLConfig  # noqa: E402

# The model and the loss import open_clip; loading them on first use keeps `from nearl import ops`
# (the kernels, their tests and `bench.run --kernel oca | layer`) working where open_clip is absent.
_LAZY = {"build": "model", "NEARLCLIP": "model", "NEARLOutput": "model", "NEARLLoss": "losses",
         "load": "adapter_files"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ops", "reference", "build", "load", "NEARLCLIP", "NEARLConfig", "NEARLLoss", "NEARLOutput"]
__version__ = "0.1.0"
