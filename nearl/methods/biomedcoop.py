"""BiomedCoOp (Koleilat et al., CVPR 2025, "BiomedCoOp: Learning to Prompt for Biomedical
Vision-Language Models", arXiv 2411.15232): CoOp's learned context, trained with two more terms
that tie it to LLM-written descriptions of each class (nearl/methods/biomedcoop_loss.py).

Followed from its public code, github.com/HealthX-Lab/BiomedCoOp: trainers/biomedcoop_clip.py and
trainers/biomedcoop_biomedclip.py (the recipe, the same for each backbone) and train.py's defaults
(cfg.TRAINER.BIOMEDCOOP):

    N_CTX 4, CTX_INIT "a photo of a"   the context starts from those words' embeddings (the code does
                                        so only when N_CTX is 4, the words' count; else random, std 0.02)
    class token at the end, one context shared by the classes (CSC False)
    N_PROMPTS 50                        descriptions a class (the first 50 of its list)
    SCCM_LAMBDA 1.0                     MSE(learned class features, mean description feature)
    KDSP_LAMBDA 1.0                     KL(zero-shot logits of the kept descriptions ‖ learned logits)
    TAU 1.5                             outlier descriptions out of the distillation (biomedcoop_loss.py)

Its per-dataset configs (configs/trainers/BiomedCoOp/few_shot/*.yaml) change the three numbers (e.g.
BTMRI: SCCM 0.5, KDSP 0.25, TAU 1.5); here they are --sccm-lambda, --kdsp-lambda and --prune-tau.
Its optimiser (SGD, lr 0.0025, batch 4, cosine, 100 epochs) is not taken: every method of
nearl.compare trains with the shared loop. The logit scale is the backbone's (no other temperature).

Its descriptions are its own, written for its datasets; our users bring their own classes, so
--class-descriptions takes a JSON {class: [description, ...]} (nearl/methods/class_descriptions.py).
Without it the teacher prompts are --templates (default nearl.model.classify.TEMPLATES) filled with
each class name, and the run says so. The model itself is CoOp's (only the context learns), so it
restores, evaluates and exports as coop does; the descriptions shape the training only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from nearl.logging_utils import reporter
from nearl.methods.biomedcoop_loss import BiomedCoOpClassifier, BiomedCoOpLoss
from nearl.methods.class_descriptions import read_descriptions, teacher_prompts
from nearl.methods.coop import PLACEHOLDER, CoOp, CoOpConfig
from nearl.methods.registry import MethodSpec
from nearl.model.classify import class_prompt_tokens

logger = logging.getLogger("nearl.methods")


@dataclass
class BiomedCoOpConfig(CoOpConfig):
    n_ctx: int = 4
    ctx_init: str = "a photo of a"  # "" : random context (std init_std)
    n_prompts: int = 50
    sccm_lambda: float = 1.0
    kdsp_lambda: float = 1.0
    tau: float = 1.5

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.n_prompts, int) or self.n_prompts < 1:
            raise ValueError(f"n_prompts must be a positive int, got {self.n_prompts!r}")
        if min(self.sccm_lambda, self.kdsp_lambda) < 0 or not self.tau > 0:
            raise ValueError(f"sccm_lambda and kdsp_lambda must be >= 0 and tau > 0, got {self.sccm_lambda}, "
                             f"{self.kdsp_lambda}, {self.tau}")


class BiomedCoOp(CoOp):
    method = "biomedcoop"

    def __init__(self, backbone: nn.Module, config: Optional[BiomedCoOpConfig] = None, **kw):
        config = config or BiomedCoOpConfig()
        super().__init__(backbone, config, **kw)  # the random context, drawn as CoOp draws it
        if config.ctx_init:
            self._start_from_words(config.ctx_init)

    @property
    def title(self) -> str:
        return "BiomedCoOp"

    def _start_from_words(self, words: str) -> None:
        """The context takes the embeddings of `words` when they are n_ctx tokens: the phrase and n_ctx
        placeholders then tokenise alike around them (same start, same end-of-text and padding)."""
        tok, at, n = self.tokenizer(), self._text.context_at, self.n_ctx
        phrase, placeholders = tok([words]), tok([" ".join([PLACEHOLDER] * n)])
        if not (torch.equal(phrase[0, :at], placeholders[0, :at])
                and torch.equal(phrase[0, at + n:], placeholders[0, at + n:])):
            logger.warning("biomedcoop: --ctx-init %r is not %d tokens (--n-ctx); the context starts random",
                           words, n)
            return
        with torch.no_grad():
            self.ctx.copy_(self._text.word_embeddings(phrase.to(self.ctx.device))[0, at:at + n].float())

    @torch.no_grad()
    def teacher_features(self, prompts: Sequence[str], device, batch_size: int = 256) -> torch.Tensor:
        """(len(prompts), E) the frozen text tower's features of plain prompts."""
        tok = self.tokenizer()
        return torch.cat([self.text_tower(tok(list(prompts[i:i + batch_size])).to(device)).features.float()
                          for i in range(0, len(prompts), batch_size)])


def _objective(model: BiomedCoOp, classnames: Sequence[str], templates: Sequence[str], device, config,
               rank: int = 0, world_size: int = 1):
    """(the training module, its loss, the loss of one unsharded probe step) of a biomedcoop run."""
    cfg = model.config
    prompts, per, line = teacher_prompts(classnames, config.option("class_descriptions"), templates, cfg.n_prompts)
    if rank == 0:
        reporter("train").info(line)
    teacher = model.teacher_features(prompts, device).reshape(len(classnames), per, -1)
    module = BiomedCoOpClassifier(model, class_prompt_tokens(model, classnames, templates).to(device),
                                  len(classnames)).to(device)

    def loss(r: int, w: int) -> BiomedCoOpLoss:
        return BiomedCoOpLoss(teacher, cfg.sccm_lambda, cfg.kdsp_lambda, cfg.tau, rank=r, world_size=w)
    return module, loss(rank, world_size), loss(0, 1)


def _check(config) -> None:
    """A --class-descriptions file that is not {class: [description, ...]} stops before the run."""
    path = config.option("class_descriptions")
    if path is not None:
        read_descriptions(path)


SPEC = MethodSpec(  # its options (--n-ctx, --ctx-init, --class-descriptions, ...): nearl/methods/options.py
    model_cls=BiomedCoOp, config_cls=BiomedCoOpConfig, title="BiomedCoOp", check=_check, objective=_objective,
    summary="CoOp + consistency with, and distillation from, LLM class descriptions",
)
