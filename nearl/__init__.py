"""NEARL-CLIP: a frozen open_clip backbone adapted with USEformer queries and orthogonal cross-attention."""
from . import ops, reference
from .config import NEARLConfig
from .losses import NEARLLoss
from .model import NEARLCLIP, NEARLOutput, build

__all__ = ["ops", "reference", "build", "NEARLCLIP", "NEARLConfig", "NEARLLoss", "NEARLOutput"]
__version__ = "0.1.0"
