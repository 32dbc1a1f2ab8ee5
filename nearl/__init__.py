"""NEARL-CLIP: a frozen open_clip backbone adapted with USEformer queries and orthogonal cross-attention."""
from nearl._checkout import map_uninstalled_folders
from nearl._lazy import lazy_attributes

map_uninstalled_folders()  # before ops imports nearl_kernels

# Every public name loads on first use (PEP 562): `import nearl` and the command lines' --help stay
# free of torch, and `from nearl import ops` (the kernels, their tests and `bench.run --kernel oca |
# layer`) works where open_clip, which the model and the loss import, is absent.
_SUBMODULES = {"ops": "ops", "reference": "ops.reference"}
_LAZY = {"NEARLConfig": "model.config", "build": "model.nearl_clip", "NEARLCLIP": "model.nearl_clip",
         "NEARLOutput": "model.nearl_clip", "NEARLLoss": "model.losses", "load": "store.adapter_files",
         "from_pretrained": "store.pretrained"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)


__all__ = ["ops", "reference", "build", "load", "from_pretrained", "NEARLCLIP", "NEARLConfig", "NEARLLoss",
           "NEARLOutput"]
__version__ = "0.1.0"
