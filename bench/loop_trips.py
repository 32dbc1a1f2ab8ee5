"""How many times a launch's loops run: an estimate from its constexprs, integer arguments and grid.

The kernels' loops walk either a sample's token tiles (the column kernels: `for t in range(pid_s,
n_tiles, n_splits)`; the attention kernel: `tiles_per_split` tiles) or a token tile's column
chunks (the forward, rows and dout kernels: cdiv(d, BLOCK_DC) or cdiv(d, BLOCK_C) chunks). The
rules below are tried in that order and the first that applies names itself in the report. A loop
the compiler nests inside another (depth 2 or more) is counted at its outer loop's trips (its own
trip count is unknown); a kernel none of the rules fits counts its loops once.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple


def loop_trips(consts: Dict[str, object], ints: Dict[str, int], grid: Sequence[int]) -> Tuple[int, str]:
    """(trips of a depth-1 loop of one CTA, the rule that gave it)."""
    if "n_tiles" in ints and len(grid) >= 2:
        n, splits = ints["n_tiles"], grid[1]
        return math.ceil(n / splits), f"token tiles: cdiv(n_tiles={n}, splits={splits})"
    if "tiles_per_split" in ints:
        n = ints["tiles_per_split"]
        return n, f"token tiles: tiles_per_split={n}"
    for block in ("BLOCK_DC", "BLOCK_C"):
        for width in ("d", "D"):  # the layer's token width is d (D is its query width); OCA's is D
            if block in consts and width in ints:
                n, w = ints[width], int(consts[block])
                return math.ceil(n / w), f"column chunks: cdiv({width}={n}, {block}={w})"
    return 1, "no rule: loops counted once"


__all__ = ["loop_trips"]
