"""NEARL-CLIP itself as a method: the model of nearl/model/nearl_clip.py with its NEARLConfig and options."""
from __future__ import annotations

from nearl.model.config import NEARLConfig
from nearl.model.nearl_clip import NEARLCLIP
from nearl.methods.registry import MethodSpec

# its aliases and options: nearl/methods/options.py (DECLARED["nearl"])
SPEC = MethodSpec(
    model_cls=NEARLCLIP, config_cls=NEARLConfig, fused_kernels=True,
    summary="NEARL-CLIP: USEformer queries + orthogonal cross-attention in every adapted block",
    title=NEARLCLIP.title, named_in_messages=False,  # the project's own, and the default, method
    untrained_is_zero_shot=True,  # a fresh NEARL-CLIP is evaluated as the zero-shot CLIP it wraps
)
