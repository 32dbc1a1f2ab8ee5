"""What a run leaves behind and what loads it again.

    checkpoint.py     training checkpoints: the learnable parameters and the state to resume, atomic
    adapter_files.py  shareable adapter folders (weights, config, model card) and `nearl.load`
    pretrained.py     PEFT-style: model.save_pretrained(DIR), nearl.from_pretrained(DIR or Hub repo id),
                      push_to_hub(DIR, repo id)
    nonfinite.py      NaN and inf in a model's state, found and named before anything is written or used
"""
from nearl._lazy import lazy_attributes

_LAZY = {"load": "adapter_files", "save_adapter": "adapter_files", "load_checkpoint": "checkpoint",
         "from_pretrained": "pretrained", "save_pretrained": "pretrained", "push_to_hub": "pretrained"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
