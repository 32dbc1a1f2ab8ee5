"""What a kernel's SASS says the GPU will wait on, as plain numbers (JSON-able): per segment
(the straight-line code and each loop's own body, nested loops apart) its instruction count, its
opcodes and its MMA instructions; over all loop bodies the async copies, plain loads and MMAs;
and the loop-weighted instruction mix (see `weighted_mix`). The listing is read by
bench/sass_parse.py."""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List

from .sass_parse import ASYNC_COPY, CLASSES, Instr, Listing, instruction_class, parse_sass

# Reported inside loops, by opcode (the rest of the MMA class as "other MMA").
LOOP_OPCODES = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LDGDEPBAR", "HMMA", "HGMMA", "SHFL", "LDL", "STL")


def _segment(instrs: List[Instr]) -> dict:
    return {"instructions": len(instrs),
            "ops": dict(Counter(ins.base for ins in instrs)),
            "mma": dict(Counter(ins.opcode for ins in instrs if instruction_class(ins.base) == "MMA"))}


def summarise(listing: Listing) -> dict:
    """{"instructions", "straight" (segment), "loops" ([segment + start, end, depth, parent]),
    "in_loops" (LOOP_OPCODES counts and "other MMA" over all loop bodies),
    "async_copies_in_loops" (any LDGSTS / UTMALDG / UBLKCP in a loop body)}."""
    straight = [ins for ins in listing.instrs if listing.loop_of[ins.index] is None]
    loops = []
    for i, loop in enumerate(listing.loops):
        own = [ins for ins in listing.instrs if listing.loop_of[ins.index] == i]
        loops.append(dict(_segment(own), start=loop.start, end=loop.end, depth=loop.depth, parent=loop.parent))
    inside = Counter(ins.base for ins in listing.in_loops())
    in_loops = {op: inside.get(op, 0) for op in LOOP_OPCODES}
    in_loops["other MMA"] = sum(n for op, n in inside.items()
                                if instruction_class(op) == "MMA" and op not in ("HMMA", "HGMMA"))
    return {"instructions": len(listing.instrs), "straight": _segment(straight), "loops": loops,
            "in_loops": in_loops, "async_copies_in_loops": any(inside.get(op, 0) for op in ASYNC_COPY)}


def summarise_sass(text: str) -> dict:
    return summarise(parse_sass(text))


def class_counts(ops: Dict[str, int]) -> Dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    for op, n in ops.items():
        counts[instruction_class(op)] += n
    return counts


def weighted_mix(summary: dict, trips_at_depth: Callable[[int], float]) -> Dict[str, dict]:
    """Per instruction class: "static" (instructions in the listing), "in_loops" (of them in loop
    bodies), "weighted" (what one warp executes: straight-line code once, a loop's own body
    trips_at_depth(depth) times) and "share" (of the weighted total). An estimate: predicated-off
    and divergent paths count as executed, and branches inside a loop as both taken."""
    mix = {cls: {"static": 0, "in_loops": 0, "weighted": 0.0} for cls in CLASSES}
    segments = [(summary["straight"], 0)] + [(loop, loop["depth"]) for loop in summary["loops"]]
    for seg, depth in segments:
        weight = 1.0 if depth == 0 else float(trips_at_depth(depth))
        for cls, n in class_counts(seg["ops"]).items():
            mix[cls]["static"] += n
            mix[cls]["in_loops"] += n if depth else 0
            mix[cls]["weighted"] += n * weight
    total = sum(m["weighted"] for m in mix.values()) or 1.0
    for m in mix.values():
        m["share"] = m["weighted"] / total
    return mix


__all__ = ["summarise", "summarise_sass", "weighted_mix", "class_counts", "LOOP_OPCODES"]
