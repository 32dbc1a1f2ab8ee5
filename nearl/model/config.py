"""NEARL-CLIP hyper-parameters (SPEC section 2 defaults)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

from nearl.ops.reference import ORTH_MODES


@dataclass
class NEARLConfig:
    num_queries: int = 16  # M
    query_dim: int = 128  # D
    heads: int = 4  # H
    rank: int = 32  # r
    mlp_ratio: int = 2  # USEformer MLP: D -> mlp_ratio * D -> D
    # Adapted blocks per tower, 1-based as in SPEC (k in 1..L); None adapts every block, [] none.
    vision_layers: Optional[List[int]] = None
    text_layers: Optional[List[int]] = None
    orth: str = "hard"
    lambda_q: float = 0.1  # weight of the query-alignment loss
    lambda_orth: float = 1.0  # weight of the mean cos^2 with orth="soft"
    q_temperature: float = 0.07
    towers: List[str] = field(default_factory=lambda: ["vision", "text"])

    def __post_init__(self):
        for name in ("num_queries", "query_dim", "heads", "rank", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.query_dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide query_dim={self.query_dim}")
        if self.orth not in ORTH_MODES:
            raise ValueError(f"orth must be one of {ORTH_MODES}, got {self.orth!r}")
        if self.q_temperature <= 0:
            raise ValueError(f"q_temperature must be > 0, got {self.q_temperature}")
        bad = [t for t in self.towers if t not in ("vision", "text")]
        if bad or not self.towers:
            raise ValueError(f"towers must be a non-empty subset of ['vision', 'text'], got {self.towers}")

    def layers_for(self, tower: str, depth: int) -> List[int]:
        """The adapted block indices (1-based) of a tower with `depth` blocks."""
        if tower not in self.towers:
            return []
        chosen = getattr(self, f"{tower}_layers")
        if chosen is None:
            return list(range(1, depth + 1))
        bad = [k for k in chosen if not isinstance(k, int) or not 1 <= k <= depth]
        if bad:
            raise ValueError(f"{tower}_layers must hold block indices in 1..{depth} (1-based, as in SPEC), got {bad}")
        return sorted(set(chosen))

    def to_dict(self) -> dict:
        return asdict(self)
