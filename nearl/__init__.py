"""NEARL-CLIP: a frozen open_clip backbone adapted with USEformer queries and orthogonal cross-attention."""
import importlib

from ._checkout import map_uninstalled_folders

map_uninstalled_folders()  # before ops imports nearl_kernels

# Every public name loads on first use (PEP 562): `import nearl` and the command lines' --help stay
# free of torch, and `from nearl import ops` (the kernels, their tests and `bench.run --kernel oca |
# layer`) works where open_clip, which the model and the loss import, is absent.
_SUBMODULES = ("ops", "reference")
_LAZY = {"NEARLConfig": "config", "build": "model", "NEARLCLIP": "model", "NEARLOutput": "model",
         "NEARLLoss": "losses", "load": "adapter_files"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it here too
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_LAZY))


__all__ = ["ops", "reference", "build", "load", "NEARLCLIP", "NEARLConfig", "NEARLLoss", "NEARLOutput"]
__version__ = "0.1.0"
