"""The model: a frozen backbone with NEARL-CLIP's learnable parts, and what every adapted model shares.

    config.py        NEARLConfig: the hyper-parameters (SPEC section 2), no torch
    modules.py       the learnable parts (query bank, USEformer, OCA weights) as parameter holders
    frozen.py        FrozenCLIPWrapper: the frozen backbone and the hooks every method may override
    nearl_clip.py    NEARLCLIP and `build`: the backbone stepped block by block with the layer op
    classify.py      prompt-based classification (class prompts through the text tower)
    losses.py        the training objective (SPEC 3.2)
    model_configs/   open_clip configurations this project adds (NEARL-Tiny)
"""
from nearl._lazy import lazy_attributes

# Loaded on first use (PEP 562): `nearl.model.config` serves the command lines' --help without torch.
_LAZY = {"NEARLConfig": "config", "NEARLCLIP": "nearl_clip", "NEARLOutput": "nearl_clip", "build": "nearl_clip",
         "create_backbone": "nearl_clip", "FrozenCLIPWrapper": "frozen", "NEARLLoss": "losses"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
