"""NEARL-CLIP: a frozen open_clip backbone adapted with USEformer queries and orthogonal cross-attention."""
from ._checkout import map_uninstalled_folders
from ._lazy import lazy_attributes

map_uninstalled_folders()  # before ops imports nearl_kernels

# Every public name loads on first use (PEP 562): `import nearl` and the command lines' --help stay
# free of torch, and `from nearl import ops` (the kernels, their tests and `bench.run --kernel oca |
# layer`) works where open_clip, which the model and the loss import, is absent.
_SUBMODULES = ("ops", "reference")
_LAZY = {"NEARLConfig": "config", "build": "model", "NEARLCLIP": "model", "NEARLOutput": "model",
         "NEARLLoss": "losses", "load": "adapter_files"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)


__all__ = ["ops", "reference", "build", "load", "NEARLCLIP", "NEARLConfig", "NEARLLoss", "NEARLOutput"]
__version__ = "0.1.0"
