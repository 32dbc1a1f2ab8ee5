"""What every adapted model shares: a frozen backbone (open_clip's, or a transformers checkpoint's) and the plumbing around its
learnable parts (trainable parameters and their state, the parameter table, data helpers).

NEARLCLIP (nearl/model/nearl_clip.py) and the comparison methods (nearl/methods/) subclass it; the training
loop, the evaluation and the checkpoints rely only on this interface plus forward / image_tower /
text_tower. The hooks in which methods differ (num_views, decays, class_prompt_tokens, prompt_tower,
classification_logits) are declared here with their defaults; callers call them, never look them up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nearl.logging_utils import reporter
from nearl.towers import downloads
from nearl.towers import Tower, tower_of

if TYPE_CHECKING:
    from nearl.model.nearl_clip import TowerResult

# ALTA's two additions to a block: (after_attention, beside_mlp), as `Tower.adapted_block` takes them.
BlockAdditions = Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def count(params) -> int:
    return sum(p.numel() for p in params)


@dataclass(frozen=True)
class BackboneSource:
    """How a model's frozen backbone was built, as nearl.methods.build_method takes it: what
    `save_pretrained` records so that loading builds the same backbone again. seed: the one the
    weights were drawn with (None: from the global generator, unknown; random weights then cannot
    be saved)."""
    model_name: str
    pretrained: Optional[str] = None
    seed: Optional[int] = None


class FrozenCLIPWrapper(nn.Module):
    title = "adapted CLIP"  # the parameter table's heading

    def __init__(self, backbone: nn.Module, *, model_name: str = ""):
        super().__init__()
        self.model_name = model_name
        self.backbone = backbone.requires_grad_(False).eval()
        self._tower_cache: Dict[str, Tower] = {}  # plain objects holding references into the backbone
        self.grad_checkpointing = False  # see set_grad_checkpointing
        # A plain attribute (no buffer): state_dicts and checkpoints are unchanged. Set by nearl.build,
        # nearl.methods.build_method and what builds through them (checkpoints, adapters).
        self.backbone_source: Optional[BackboneSource] = None

    def tower(self, kind: str) -> Tower:
        """The backbone's "vision" or "text" tower behind `nearl.towers`' protocol (found on first
        use; a ValueError naming the supported tower types when the backbone has none)."""
        if kind not in self._tower_cache:
            self._tower_cache[kind] = tower_of(self.backbone, kind)
        return self._tower_cache[kind]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: dropout and friends stay off whatever the adapters do
        return self

    # ----------------------------------------------------------------- stepping blocks
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip's switch: while training with grad enabled, keep no activation inside a frozen
        block; the backward runs the block again instead (less memory for about one more forward)."""
        self.grad_checkpointing = bool(enable)

    def run_block(self, tower: Tower, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  additions: Optional[BlockAdditions] = None) -> torch.Tensor:
        """Block k of `tower` (`tower.adapted_block` with ALTA's `additions` when given). The model and
        every method step their blocks here, so grad checkpointing reaches them all."""
        if additions is None:
            def step(x, attn_mask):
                return tower.block(k, x, attn_mask)
        else:
            def step(x, attn_mask):
                return tower.adapted_block(k, x, attn_mask, *additions)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(step, x, attn_mask, use_reentrant=False)
        return step(x, attn_mask)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale.detach().exp()

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        """A SigLIP backbone's learned bias (frozen), None for a CLIP backbone."""
        bias = getattr(self.backbone, "logit_bias", None)
        return None if bias is None else bias.detach()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_tower(images).features
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_tower(tokens).features
        return F.normalize(features, dim=-1) if normalize else features

    # ----------------------------------------------------------------- hooks a method may override
    # nearl.model.classify imports the models (through nearl.model.losses), hence its imports inside the defaults.
    @property
    def num_views(self) -> int:
        """The most images of one sample image_tower takes, as (B, V, 3, H, W) with a view mask
        (ALTA's multi-view studies: 4); 1: one image a sample."""
        return 1

    def decays(self, name: str, p: torch.Tensor) -> bool:
        """Whether AdamW decays the learnable tensor `name` (nearl.training.param_groups asks). By
        default the matrices of the method's own modules: not biases, norms, gates, nor the backbone."""
        return p.ndim >= 2 and not name.startswith("backbone.")

    def class_prompt_tokens(self, classnames: Sequence[str], templates: Optional[Sequence[str]] = None) -> torch.Tensor:
        """(P, context_length) token ids of the class prompts, class-major (P a multiple of the classes).
        By default every template (None: nearl.model.classify.TEMPLATES) filled with each class name; CoOp:
        one prompt a class around its learned context."""
        from nearl.model.classify import TEMPLATES, tokenize_prompts
        return tokenize_prompts(self.tokenizer(), classnames, TEMPLATES if templates is None else templates)

    def prompt_tower(self, tokens: torch.Tensor) -> TowerResult:
        """The text path of the class prompts (training's PromptClassifier and evaluation's classifier):
        by default the text tower; CoOp's puts its learned context into them."""
        return self.text_tower(tokens)

    def class_logits(self, image_features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(n, C) logits of image features against (C, E) unit class embeddings, in training
        (PromptClassifier) and evaluation (prompt_logits): by default logit_scale * cos(image, class);
        Tip-Adapter adds its cache model's logits."""
        scale = self.logit_scale.float().to(classes.device)
        return scale * F.normalize(image_features.float(), dim=-1) @ classes.T

    def classification_logits(self, image_features: torch.Tensor, classnames: Sequence[str],
                              templates: Optional[Sequence[str]] = None, device=None) -> torch.Tensor:
        """(n, C) logits for image features from encode_image (evaluation and prediction). By default
        logit_scale * cos(image, class), each class its prompts' ensemble (nearl.model.classify.prompt_logits);
        linear-probe: its fitted head, which scores its trained classes only."""
        from nearl.model.classify import TEMPLATES, prompt_logits
        return prompt_logits(self, image_features, classnames, TEMPLATES if templates is None else templates,
                             device=device)

    # ----------------------------------------------------------------- parameters
    def trainable_parameters(self):
        return (p for p in self.parameters() if p.requires_grad)

    def num_trainable_parameters(self) -> int:
        return count(self.trainable_parameters())

    def parameter_breakdown(self) -> Dict[str, int]:
        return {"Total learnable": self.num_trainable_parameters(),
                "Frozen backbone": count(p for p in self.backbone.parameters() if not p.requires_grad)}

    def format_parameter_breakdown(self) -> str:
        rows = self.parameter_breakdown()
        width = max(len(k) for k in rows)
        lines = [f"{self.title} parameters ({self.model_name or type(self.backbone).__name__})"]
        lines += [f"  {k:<{width}}  {v:>12,}" for k, v in rows.items()]
        return "\n".join(lines)

    def print_parameter_breakdown(self) -> None:
        """The breakdown on stdout, through the report logger (nearl.logging_utils.reporter)."""
        reporter("model").info(self.format_parameter_breakdown())

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The learnable parameters only: what a checkpoint needs besides the backbone's name."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        ours = {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()}
        if set(state) != set(ours):
            missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
            raise ValueError(f"{self.title} adapter state does not match this model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        shapes = [f"{k} is {tuple(v.shape)}, the model's {ours[k]}" for k, v in state.items() if tuple(v.shape) != ours[k]]
        if shapes:
            raise ValueError(f"{self.title} adapter state does not match this model: {len(shapes)} tensor(s) of "
                             f"another shape: {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, directory: Union[str, os.PathLike], *, task: Optional[str] = None,
                        classnames: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None,
                        overwrite: bool = False, **kwargs: Any):
        """Write this model's adapter folder (adapter_model.safetensors, adapter_config.json, README.md),
        for `nearl.from_pretrained`, recording the backbone it was built on (`backbone_source`). task:
        None is "classification" with classnames, else the method's first task. kwargs: as
        nearl.store.adapter_files.save_adapter takes them (model_name= / pretrained= / backbone_seed=
        for a model built another way). Returns the folder (nearl.store.pretrained.save_pretrained)."""
        from nearl.store.pretrained import save_pretrained  # the store imports the models

        return save_pretrained(self, directory, task=task, classnames=classnames, templates=templates,
                               overwrite=overwrite, **kwargs)

    # ----------------------------------------------------------------- data helpers
    def image_transform(self, train: bool = False):
        """open_clip's own preprocessing for this backbone."""
        from open_clip.transform import PreprocessCfg, image_transform_v2
        return image_transform_v2(PreprocessCfg(**self.tower("vision").preprocess_cfg), is_train=train)

    def tokenizer(self):
        own = getattr(self.backbone, "make_tokenizer", None)  # a transformers checkpoint's (transformers_backbone.py)
        with downloads.getting_tokenizer(self.model_name):  # one that cannot be downloaded: one line, within seconds
            return own() if own is not None else open_clip.get_tokenizer(self.model_name)
