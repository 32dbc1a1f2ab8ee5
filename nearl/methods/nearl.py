"""NEARL-CLIP itself as a method: the model of nearl/model.py with its NEARLConfig and options."""
from __future__ import annotations

from .. import argtypes as A
from ..config import NEARLConfig
from ..model import NEARLCLIP
from .registry import MethodSpec, Option

SPEC = MethodSpec(
    model_cls=NEARLCLIP, config_cls=NEARLConfig, fused_kernels=True, aliases=("nearl-clip",),
    summary="NEARL-CLIP: USEformer queries + orthogonal cross-attention in every adapted block",
    options=(
        Option(("--num-queries",), dict(type=A.queries, default=16, help="M (at most 1024)"), "num_queries", fixed=True),
        Option(("--query-dim",), dict(type=A.positive_int, default=128, help="D"), "query_dim", fixed=True),
        Option(("--heads",), dict(type=A.positive_int, default=4, help="H (query heads)"), "heads", fixed=True),
        Option(("--rank",), dict(type=A.positive_int, default=32, help="r (OCA rank)"), "rank", fixed=True),
        Option(("--orth",), dict(choices=("hard", "soft", "none"), default="hard"), "orth"),
        Option(("--lambda-q",), dict(type=A.non_negative_float, default=0.1,
                                     help="query-alignment weight (0 ablates it)"), "lambda_q"),
        Option(("--lambda-orth",), dict(type=A.non_negative_float, default=1.0,
                                        help="weight of mean cos^2 with --orth soft"), "lambda_orth"),
        Option(("--vision-layers",), dict(type=A.block_numbers, default=None,
                                          help="adapted vision blocks, 1-based: 'all' (default), 'none', '1,2,3', "
                                               "'7-12'"), "vision_layers", fixed=True),
        Option(("--text-layers",), dict(type=A.block_numbers, default=None, help="adapted text blocks (as above)"),
               "text_layers", fixed=True),
    ),
)
