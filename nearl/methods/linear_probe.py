"""Linear probe (CLIP, Radford et al. 2021) as a baseline: logistic regression on frozen image features.

The image features of the frozen CLIP (L2-normalised) are computed once and cached; a torch
nn.Linear (E -> C, with bias) is fitted full-batch with L-BFGS (strong-Wolfe line search) on the
cross-entropy plus an L2 penalty wd/2 * |W|^2. The penalty is chosen on the validation split from a
small grid (`weight_decays`), by accuracy (ties: lower validation loss); without validation data
the middle of the grid is used. Each L-BFGS iteration is one "step" of the shared step budget.
Classification only; the text tower is not used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nearl.methods.options import DEFAULT_WEIGHT_DECAYS  # --probe-wd's default (parsed by options.weight_decays)
from nearl.methods.base import MethodConfig, MethodModel
from nearl.methods.registry import MethodSpec


@dataclass
class LinearProbeConfig(MethodConfig):
    num_classes: int = 0  # set from the data when the model is built for training
    weight_decays: List[float] = field(default_factory=lambda: list(DEFAULT_WEIGHT_DECAYS))
    weight_decay: Optional[float] = None  # the value the search chose (recorded in checkpoints)
    normalize: bool = True

    def __post_init__(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if not self.weight_decays or any(w < 0 for w in self.weight_decays):
            raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {self.weight_decays}")


class LinearProbe(MethodModel):
    method = "linear-probe"
    tasks = ("classification",)
    refusals = {"multilabel": "its head is fitted as a softmax over single labels, not per-class sigmoids"}

    def __init__(self, backbone: nn.Module, config: Optional[LinearProbeConfig] = None, **kw):
        config = config or LinearProbeConfig()
        super().__init__(backbone, config, **kw)
        self.embed_dim = self.tower("vision").output_dim()
        self.head = nn.Linear(self.embed_dim, config.num_classes) if config.num_classes else None

    def set_num_classes(self, num_classes: int) -> None:
        self.config.num_classes = int(num_classes)
        device = next(self.backbone.parameters()).device
        self.head = nn.Linear(self.embed_dim, num_classes).to(device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        f = self._image_features(images)  # the frozen CLIP's (MethodModel)
        return F.normalize(f.float(), dim=-1) if self.config.normalize else f.float()

    def classification_logits(self, image_features: torch.Tensor, classnames: Sequence[str], templates=None,
                              device=None) -> torch.Tensor:
        """(n, C) logits from the features encode_image returns (the frozen CLIP's)."""
        if self.head is None:
            raise ValueError("linear-probe: the probe has not been fitted (no classifier head)")
        if len(classnames) != self.head.out_features:
            raise ValueError(f"linear-probe: fitted on {self.head.out_features} classes, asked to score "
                             f"{len(classnames)} ({list(classnames)[:5]}...): a linear probe cannot score new classes")
        f = image_features.float()
        f = F.normalize(f, dim=-1) if self.config.normalize else f
        head = self.head
        return head(f.to(head.weight.device)).to(image_features.device)

    def _breakdown(self) -> Dict[str, int]:
        n = 0 if self.head is None else sum(p.numel() for p in self.head.parameters())
        return {f"Linear head ({self.embed_dim} x {self.config.num_classes} + bias)": n}


def _objective(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, wd: float) -> torch.Tensor:
    return F.cross_entropy(head(x), y) + 0.5 * wd * head.weight.pow(2).sum()


def fit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, steps: int, seed: int = 0,
             on_step: Optional[Callable[[int, float], None]] = None) -> nn.Linear:
    """Full-batch L-BFGS on cached features: `steps` iterations, each reported to on_step(step, loss)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], num_classes).to(x.device)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = _objective(head, x, y, wd)
        loss.backward()
        return loss

    for step in range(1, steps + 1):
        opt.step(closure)
        if on_step is not None:
            with torch.no_grad():
                on_step(step, float(_objective(head, x, y, wd)))
    return head


@torch.no_grad()
def _val_score(head: nn.Linear, x: torch.Tensor, y: torch.Tensor):
    logits = head(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def fit_linear_probe(model: LinearProbe, train_x: torch.Tensor, train_y: torch.Tensor,
                     val_x: Optional[torch.Tensor], val_y: Optional[torch.Tensor], steps: int, *, seed: int = 0,
                     on_step: Optional[Callable[[int, float], None]] = None,
                     on_search: Optional[Callable[[Dict[str, float]], None]] = None) -> Dict[str, float]:
    """Search the L2 weight on validation, keep that head in `model`; on_step sees the kept run's losses."""
    cfg = model.config
    x, y = train_x.float(), train_y.long()
    if cfg.normalize:
        x = F.normalize(x, dim=-1)
    grid = list(cfg.weight_decays)
    have_val = val_x is not None and val_y is not None and len(val_y) > 0
    if have_val and len(grid) > 1:
        vx = F.normalize(val_x.float(), dim=-1) if cfg.normalize else val_x.float()
        best = None
        for wd in grid:
            head = fit_head(x, y, cfg.num_classes, wd, steps, seed)
            acc, loss = _val_score(head, vx, val_y.long())
            if on_search is not None:
                on_search({"weight_decay": wd, "val_accuracy": 100.0 * acc, "val_loss": loss})
            if best is None or (acc, -loss) > (best[1], -best[2]):
                best = (wd, acc, loss)
        chosen = best[0]
    else:
        chosen = grid[len(grid) // 2]
    head = fit_head(x, y, cfg.num_classes, chosen, steps, seed, on_step)  # the kept run, traced
    model.head = head
    cfg.weight_decay = chosen
    return {"weight_decay": chosen, "searched": bool(have_val and len(grid) > 1)}


SPEC = MethodSpec(  # its aliases and option (--probe-wd, `weight_decays`): nearl/methods/options.py
    model_cls=LinearProbe, config_cls=LinearProbeConfig,
    summary="logistic regression on frozen image features", trainer="features",
    scores_unseen_classes=False,  # its head has one output per trained class
    training_note="fitting, {steps} L-BFGS iterations per weight-decay candidate",
    config_from_data=lambda data: {"num_classes": len(data.classnames) if data and data.classnames else 0},
)
