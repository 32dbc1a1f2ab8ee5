"""The MODEL (bench/sass_model.py) applied to one --sass run: per launch, per kernel, per
provider and mode, for both parameter sets; the fused-vs-split ratios and each op against its
minimum (SPEC 5: fwd 2 passes over x, bwd 3) at DRAM bandwidth. NOT A MEASUREMENT."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

from .sass_model import kernel_time, launch_time, torch_time
from .traffic import MIN_PASSES

NOTE = ("MODEL, NOT A MEASUREMENT: a latency/roofline estimate from the SASS, occupancy, estimated loop trips "
        "and requested bytes (bench/sass_model.py says how); for ranking and for seeing what binds, not for "
        "quoting as times")


def model_launches(rows: List[dict], cc: int, sm_count: int, sets) -> None:
    """Add "model" {set name: launch_time(...)} to each compiled row of target `cc` (in place)."""
    for row in rows:
        if row["cc"] != cc or not row["ok"]:
            continue
        occ = row["occupancy"]
        row["model"] = {p.name: launch_time(row["summary"], row["num_warps"], row["num_stages"], occ["ctas_per_sm"],
                                            row["grid_ctas"], sm_count, row["trips"], p) for p in sets}


def _launch_seconds(launches: List[dict], name: str) -> Optional[List[float]]:
    """Each launch's modelled seconds, or None when one failed to compile or does not fit."""
    out = []
    for row in launches:
        m = row.get("model", {}).get(name)
        if not m or not m.get("fits"):
            return None
        out.append(m["seconds"])
    return out


def _kernel(name: str, launches: List[dict], kt: Optional[dict], scale: float, sets) -> dict:
    token = scale * (kt["token_load"] + kt["token_store"]) if kt else 0.0
    small = scale * (kt["small_load"] + kt["small_store"]) if kt else 0.0
    out = {"kernel": name, "launches": len(launches), "token_bytes": token, "small_bytes": small,
           "counted": kt is not None, "sets": {}}
    for p in sets:
        secs = _launch_seconds(launches, p.name)
        if secs is None:
            out["sets"][p.name] = {"seconds": None, "bound": "not modelled (a launch failed or does not fit)"}
        else:
            out["sets"][p.name] = kernel_time(secs, token, small, p)
    return out


def _op(provider: str, mode: str, launches: List[dict], trow: Optional[dict], scale: float, pass_bytes: int,
        sets) -> dict:
    by_kernel: Dict[str, List[dict]] = defaultdict(list)
    for row in launches:
        by_kernel[row["kernel"]].append(row)
    counted = (trow or {}).get("kernels", {})
    kernels = [_kernel(name, rows, counted.get(name), scale, sets) for name, rows in by_kernel.items()]
    ops = (trow or {}).get("torch", {}).get("ops", {})
    out = {"provider": provider, "mode": mode, "kernels": kernels, "torch": {}, "total_s": {}, "minimum_s": {},
           "vs_minimum": {}, "traffic_counted": trow is not None}
    for p in sets:
        out["torch"][p.name] = torch_time(ops, scale, p)
        parts = [k["sets"][p.name]["seconds"] for k in kernels] + [out["torch"][p.name]["seconds"]]
        total = None if any(v is None for v in parts) else sum(parts)
        minimum = MIN_PASSES[mode] * pass_bytes / p.dram_bw
        out["total_s"][p.name], out["minimum_s"][p.name] = total, minimum
        out["vs_minimum"][p.name] = None if total is None else total / minimum
    return out


def estimate(rows: List[dict], traffic: dict, cc: int, sm_count: int, scale: float, pass_bytes: int, sets,
             providers: List[str], modes: List[str]) -> dict:
    """The model section of the payload: parameters, per (provider, mode) its kernels, torch ops and
    total, and split / fused ratios per mode (layer)."""
    model_launches(rows, cc, sm_count, sets)
    trows = {(r["provider"], r["mode"]): r for r in traffic["rows"] if r.get("status") == "ok"}
    ops = []
    for provider in providers:
        for mode in modes:
            launches = [r for r in rows if r["cc"] == cc and r["provider"] == provider and r["mode"] == mode]
            ops.append(_op(provider, mode, launches, trows.get((provider, mode)), scale, pass_bytes, sets))
    ratios = {}
    if {"triton", "split"} <= set(providers):
        for mode in modes:
            fused = next(o for o in ops if o["provider"] == "triton" and o["mode"] == mode)
            split = next(o for o in ops if o["provider"] == "split" and o["mode"] == mode)
            ratios[mode] = {p.name: (None if not fused["total_s"][p.name] or split["total_s"][p.name] is None
                                     else split["total_s"][p.name] / fused["total_s"][p.name]) for p in sets}
    return {"note": NOTE, "target": cc, "sm_count": sm_count, "params": {p.name: p.to_dict() for p in sets},
            "ops": ops, "split_over_fused": ratios}


__all__ = ["estimate", "model_launches", "NOTE"]
