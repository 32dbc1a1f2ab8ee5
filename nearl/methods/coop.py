"""CoOp (Zhou et al., IJCV 2022) as a baseline: learned context vectors in the class prompt.

A class c is represented by the prompt "[SOS] v_1 ... v_M <class name>. [EOS]": the M learned
context vectors (M = 16, shared by all classes, "unified context", class token at the end) replace
the embeddings of a hand-written prefix such as "a photo of a", and the class-name tokens follow
them. The prompt goes through the frozen text transformer; the image tower is the frozen CLIP.
Classification only: the prompts describe classes, not free text.

The prompt is tokenised as "X X ... X <class name>." and the embeddings of the M placeholder
positions (1..M) are replaced, position embeddings kept, as in the published code. If the
backbone's context is too short for M = 16 (e.g. NEARL-Tiny's 16 tokens), M is reduced to half the
context length and the model says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from nearl.model.classify import prompt_name
from nearl.model.nearl_clip import TowerResult
from nearl.methods.base import MethodConfig, MethodModel
from nearl.methods.registry import MethodSpec

logger = logging.getLogger("nearl.methods")

PLACEHOLDER = "X"


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = 16  # M, the number of learned context vectors
    init_std: float = 0.02

    def __post_init__(self):
        if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {self.n_ctx!r}")


class CoOp(MethodModel):
    method = "coop"
    tasks = ("classification",)
    refusals = {"multilabel": "its learned context makes one prompt a class: there is no negative prompt to score "
                              "a finding's absence against"}

    def __init__(self, backbone: nn.Module, config: Optional[CoOpConfig] = None, **kw):
        config = config or CoOpConfig()
        super().__init__(backbone, config, **kw)
        self._text = self.tower("text")
        if not self._text.takes_context:  # said here, not mid-training
            raise ValueError(f"coop places learned context tokens in the text tower's stem; the text tower "
                             f"({self._text.type_name}) cannot take them")
        context = self._text.context_length
        n_ctx = config.n_ctx
        if n_ctx + 3 > context:  # SOS + context + >= 1 class token + EOS
            n_ctx = max(1, context // 2)
            logger.warning("coop: %d context vectors do not fit the %d-token text context; using %d",
                           config.n_ctx, context, n_ctx)
            config.n_ctx = n_ctx
        self.context_length = context
        self.ctx = nn.Parameter(torch.randn(n_ctx, self._text.width) * config.init_std)

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    # ----------------------------------------------------------------- classification protocol
    def class_prompt_tokens(self, classnames: Sequence[str], templates=None) -> torch.Tensor:
        """(C, context_length) ids of "X ... X <class>." (templates are not used: the context is learned)."""
        tok = self.tokenizer()
        prefix = " ".join([PLACEHOLDER] * self.n_ctx)
        names = [prompt_name(c) + "." for c in classnames]
        encode = getattr(tok, "encode", None)
        if encode is not None:
            for c, n in zip(classnames, names):
                used = 2 + self.n_ctx + len(encode(n))
                if used > self.context_length:
                    raise ValueError(f"coop: the prompt for class {c!r} needs {used} tokens with {self.n_ctx} "
                                     f"context vectors; the text context holds {self.context_length} "
                                     "(use a shorter class name or a smaller --n-ctx)")
        tokens = tok([f"{prefix} {n}" for n in names])
        if encode is not None:
            x_id = encode(PLACEHOLDER)
            at = self._text.context_at
            if len(x_id) == 1 and not bool((tokens[:, at:at + self.n_ctx] == x_id[0]).all()):
                raise ValueError(f"coop: the context placeholders did not land on positions {at}..{at + self.n_ctx - 1}")
        return tokens

    def prompt_tower(self, tokens: torch.Tensor) -> TowerResult:
        """Class prompts with the learned context: M positions after the start token hold ctx (+ their
        position embedding)."""
        tower = self._text
        x, attn_mask = tower.context_stem(tokens, self.ctx, at=tower.context_at)  # after [CLS] / <start_of_text>
        for k in range(tower.depth):
            x = self.run_block(tower, k, x, attn_mask)
        return TowerResult(tower.head(x, tokens), None, None)

    def _breakdown(self) -> Dict[str, int]:
        return {f"Context vectors ({self.n_ctx} x {self._text.width})": self.ctx.numel()}


SPEC = MethodSpec(  # its option (--n-ctx): nearl/methods/options.py
    model_cls=CoOp, config_cls=CoOpConfig, summary="learned prompt context (M = 16)",
)
