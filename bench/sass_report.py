"""The text report of `python -m bench.run --sass` (bench/sass_run.py builds its payload)."""
from __future__ import annotations

import json
from typing import List, Optional

from .report import format_table
from .sass_parse import CLASSES
from .shapes import fmt_bytes
from .traffic import MIN_PASSES

_MIX_NAMES = {"global load": "gld", "global store": "gst", "async copy": "async", "shared": "shared",
              "local (spill)": "local", "MMA": "MMA", "SHFL": "SHFL", "barrier": "bar", "FP32": "FP32",
              "int/address": "int", "other": "other"}


def _us(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e6:.1f}"


def _pair(a: Optional[float], b: Optional[float], fmt=_us) -> str:
    return f"{fmt(a)} / {fmt(b)}"


def _header(p: dict) -> List[str]:
    s, t = p["shape"], p["tiling"]
    layer = p["kernel"] == "layer"
    desc = (f"B={s['B']} N={s['N']} d={s['d']} M={s['M']}"
            + (f" D={s['D']} H={s['H']} r={s['r']}{' text-mask' if s['masked'] else ''}" if layer else ""))
    targets = ", ".join(f"sm_{cc}" for cc in p["targets"])
    return [f"NEARL-CLIP {p['benchmark']}   shape {s['name']}: {desc}   dtype {p['dtype']}   orth {p['orth']}",
            f"torch {p['torch']}   triton {p['triton']}   (CPU: compiled for {targets} without a GPU, "
            f"{p['compile_seconds']} s)",
            f"launches as NEARL_TILING={t['tiling']} picks them for B={s['B']} on {t['sm_count']} SMs (captured at "
            f"B={t['captured_B']} on {t['captured_sm_count']} SM(s), which gives the same launch configurations; "
            f"grids and waves at B={s['B']})"]


def _launch_table(rows: List[dict]) -> str:
    headers = ["provider", "mode", "kernel", "sm", "grid", "warps", "stages", "regs", "spill st/ld", "smem",
               "CTAs/SM", "warps/SM", "binds", "waves"]
    table = []
    for r in rows:
        lead = [r["provider"], r["mode"], r["kernel"], str(r["cc"])]
        if not r["ok"]:
            table.append(("span", lead, f"FAILED: {r['error'][:300]}"))
            continue
        occ = r["occupancy"]
        table.append(lead + ["x".join(str(g) for g in r["grid"]) + f"={r['grid_ctas']}", str(r["num_warps"]),
                             str(r["num_stages"]), str(r["n_regs"]), f"{r['spill_stores']}/{r['spill_loads']}",
                             fmt_bytes(r["shared"]), str(occ["ctas_per_sm"]), str(occ["warps_per_sm"]), occ["limit"],
                             str(r["waves"])])
    return format_table(headers, table, [False] * 4 + [True] * 8 + [False, True], max_text=300)


def _loop_table(rows: List[dict]) -> str:
    headers = ["provider", "mode", "kernel", "sm", "loops", "trips (estimate: rule)", "async copies in loops",
               "LDG", "LDGSTS", "TMA", "DEPBAR", "HMMA", "HGMMA", "other MMA", "SHFL"]
    table = []
    for r in rows:
        if not r["ok"]:
            continue
        il = r["in_loops"]
        nested = sum(1 for lp in r["loops"] if lp["depth"] > 1)
        loops = f"{len(r['loops'])}" + (f" ({nested} nested)" if nested else "")
        table.append([r["provider"], r["mode"], r["kernel"], str(r["cc"]), loops, f"{r['trips']}: {r['trips_rule']}",
                      "yes" if r["async_copies_in_loops"] else "no", str(il["LDG"]), str(il["LDGSTS"]),
                      str(il["UTMALDG"] + il["UBLKCP"]), str(il["LDGDEPBAR"]), str(il["HMMA"]), str(il["HGMMA"]),
                      str(il["other MMA"]), str(il["SHFL"])])
    return format_table(headers, table, [False] * 4 + [True, False, False] + [True] * 8, max_text=300)


def _mix_table(rows: List[dict], cc: int) -> str:
    headers = ["kernel", "trips", "instrs", "in loops", "per warp"] + [_MIX_NAMES[c] for c in CLASSES]
    table, seen = [], set()
    for r in rows:
        key = (r["kernel"], json.dumps(r["consts"], sort_keys=True), r.get("trips"))
        if r["cc"] != cc or not r["ok"] or key in seen:
            continue
        seen.add(key)
        mix = r["mix"]
        weighted = sum(m["weighted"] for m in mix.values())
        table.append([r["kernel"], str(r["trips"]), str(r["instructions"]),
                      str(sum(m["in_loops"] for m in mix.values())), f"{weighted:.0f}"]
                     + [f"{100 * mix[c]['share']:.1f}" for c in CLASSES])
    return format_table(headers, table, [False] + [True] * (len(headers) - 1))


def _trip_cycles(row: dict, name: str) -> str:
    m = row.get("model", {}).get(name)
    if not m or not m.get("fits"):
        return "n/a"
    loops = [f"{lp['cycles']:.0f}" for lp in m["loops"]]
    return "+".join(loops) if loops else f"{m['straight']['cycles']:.0f} (no loop)"


def _model_table(payload: dict) -> str:
    model, rows = payload["model"], payload["rows"]
    o, p = "optimistic", "pessimistic"
    headers = ["provider", "mode", "part", "requested", "floor us", "cycles/trip", "CTA us", "waves", "launches us",
               "time us", "bound (opt / pess)"]
    table = []
    for op in model["ops"]:
        lead = [op["provider"], op["mode"]]
        for k in op["kernels"]:
            launches = [r for r in rows if r["cc"] == model["target"] and r["provider"] == op["provider"]
                        and r["mode"] == op["mode"] and r["kernel"] == k["kernel"] and r.get("model")]
            so, sp = k["sets"][o], k["sets"][p]
            first = launches[0] if launches else {}
            cta = first.get("model", {})
            table.append(lead + [k["kernel"] + (f" x{k['launches']}" if k["launches"] > 1 else ""),
                                 fmt_bytes(k["token_bytes"] + k["small_bytes"]) if k["counted"] else "not counted",
                                 _pair(so.get("floor_s"), sp.get("floor_s")),
                                 f"{_trip_cycles(first, o)} / {_trip_cycles(first, p)}",
                                 _pair(cta.get(o, {}).get("cta_s"), cta.get(p, {}).get("cta_s")),
                                 str(cta.get(o, {}).get("waves", "n/a")),
                                 _pair(so.get("compute_s"), sp.get("compute_s")),
                                 _pair(so["seconds"], sp["seconds"]),
                                 f"{_bound(so, cta.get(o))} / {_bound(sp, cta.get(p))}"])
        t = op["torch"]
        table.append(lead + [f"torch ops ({t[o]['calls']} calls)", fmt_bytes(t[o]["bytes"]), "", "", "", "", "",
                             _pair(t[o]["seconds"], t[p]["seconds"]), "bytes / DRAM + per-call cost"])
        minimum = f"min {fmt_bytes(MIN_PASSES[op['mode']] * payload['pass_bytes'])}"
        table.append(lead + ["total (vs the minimum)", minimum, _pair(op["minimum_s"][o], op["minimum_s"][p]),
                             "", "", "", "",
                             _pair(op["total_s"][o], op["total_s"][p]),
                             "x minimum: " + _pair(op["vs_minimum"][o], op["vs_minimum"][p], _x)])
    return format_table(headers, table, [False, False, False] + [True] * 7 + [False], max_text=300)


def _x(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _bound(kernel_set: dict, launch_model: Optional[dict]) -> str:
    if kernel_set.get("seconds") is None:
        return "n/a"
    if kernel_set["bound"] == "memory":
        return "memory"
    return (launch_model or {}).get("binds", "?")


def _params(model: dict) -> List[str]:
    lines = []
    for name, q in model["params"].items():
        tensor = ", ".join(f"{k} {v:.0f}" for k, v in q["tensor_flops"].items() if v)
        lines.append(f"  {name} ({q['gpu']}): DRAM {q['dram_bw'] / 1e12:.1f} TB/s, L2 {q['l2_bw'] / 1e12:.1f} TB/s "
                     f"({'small tensors from L2' if q['small_from_l2'] else 'not used: every request from DRAM'}), "
                     f"load latency {q['load_latency']} cycles, SM clock {q['clock'] / 1e9:.3f} GHz, issue "
                     f"{q['issue_rate']:.0f} warp-instr/cycle/SM, dense tensor peak (wgmma) ops/cycle/SM: {tensor}; mma.sync at "
                     f"{q['mma_sync_share']:.2f} of it; torch op {q['torch_op_cost'] * 1e6:.0f} us/call")
    return lines


def _ratios(model: dict, kernel: str) -> List[str]:
    op_name = "OCA" if kernel == "oca" else "layer"
    lines = []
    for mode, r in model["split_over_fused"].items():
        lines.append(f"  layer {mode}: split / fused (triton) = {_x(r['optimistic'])} optimistic, "
                     f"{_x(r['pessimistic'])} pessimistic (> 1: the fused layer is faster)")
    for op in model["ops"]:
        passes = MIN_PASSES[op["mode"]]
        lines.append(f"  {op_name} {op['mode']} ({op['provider']}): {_x(op['vs_minimum']['optimistic'])} optimistic, "
                     f"{_x(op['vs_minimum']['pessimistic'])} pessimistic of the DRAM time of its minimum "
                     f"({passes} passes over x)")
    return lines


def format_sass_report(payload: dict) -> str:
    model = payload["model"]
    cc = model["target"]
    out = _header(payload)
    out += ["", "Launches: resources and occupancy (per SM: 64K registers in 256-register warp units, 228 KB (sm_90) "
                "or 164 KB (sm_80) of shared memory with 1 KB a CTA, <= 32 CTAs and 64 warps)",
            _launch_table(payload["rows"])]
    out += ["", "Loops in the SASS (a backward BRA; counts are instructions inside loop bodies)",
            _loop_table(payload["rows"])]
    out += ["", f"Instruction mix, sm_{cc}, loop-weighted (% of what one warp executes; an ESTIMATE: loop bodies "
                "weighted by the trips above, nested loops at their outer loop's trips, predicated-off code counted)",
            _mix_table(payload["rows"], cc)]
    out += ["", f"*** {model['note']} ***", f"sm_{cc}, {model['sm_count']} SMs; each cell optimistic / pessimistic",
            _model_table(payload), "", "parameters:"] + _params(model)
    out += ["", "ratios (MODEL):"] + _ratios(model, payload["kernel"])
    return "\n".join(out)


__all__ = ["format_sass_report"]
