"""Nsight Compute's CSV for the kernels of OCA, the fused layer and its split path, read into
per-kernel and per-phase figures.

`python -m bench.gpu_check` runs `bench.ncu_case` under ncu with `ncu_command` and reads what ncu
wrote with `read_csv`; `summarise` turns the rows into bytes over the minimum (one pass = B N d
elements of x: forward 2 passes, backward 3, as in `bench.run --traffic`), achieved bandwidth and
the sections' key figures (throughputs, occupancy, registers, waves, stalls, hit rates). The case
launches a marker kernel (torch.cuda._sleep's) before each phase ("oca fwd", "fused bwd", ...),
so the launches between two markers are that phase's; without markers (an older case) the fused
layer's kernels are grouped by name as before.
"""
from __future__ import annotations

import csv
import io
from typing import Dict, List, Optional, Sequence, Tuple

METRICS = (
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_sectors_srcunit_tex_op_read.sum",  # L2 sectors (32 bytes) the SMs read
    "smsp__inst_executed.sum",
    "gpu__time_duration.sum",
)
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis")
COMMAND_LINE_SECTION = "Command line profiler metrics"  # where ncu puts the --metrics rows
SECTOR_BYTES = 32
# which op each kernel belongs to, and that op's minimum in passes over x (markerless CSVs)
OPS = {"fwd": ("layer_fwd_kernel", "layer_attn_kernel"),
       "bwd": ("layer_bwd_dout_kernel", "layer_bwd_rows_kernel", "layer_bwd_cols_kernel")}
MIN_PASSES = {"fwd": 2, "bwd": 3}
TRITON_PREFIXES = ("_oca_", "layer_")  # this project's kernels: always shown in summary.md
SMALL_SHARE = 0.03  # other kernels under this share of their phase's time are one summary.md line
# (column, section name contains, metric label): the sections' figures summary.md shows
KEY_FIGURES = (
    ("SM %", "speed of light", "Compute (SM) Throughput"),
    ("memory %", "speed of light", "Memory Throughput"),
    ("DRAM %", "speed of light", "DRAM Throughput"),
    ("occupancy %", "occupancy", "Achieved Occupancy"),
    ("theoretical %", "occupancy", "Theoretical Occupancy"),
    ("registers", "launch", "Registers Per Thread"),
    ("waves/SM", "launch", "Waves Per SM"),
    ("cycles/issue", "warp state", "Warp Cycles Per Issued Instruction"),
    ("L1 hit %", "memory workload", "L1/TEX Hit Rate"),
    ("L2 hit %", "memory workload", "L2 Hit Rate"),
)


def ncu_command(ncu: str, csv_path: str, launch_count: int = 2000) -> List[str]:
    """ncu's part of the command line: every kernel launched between the case's cudaProfilerStart
    and Stop (--profile-from-start off: the warm-up and compile before it are not profiled), with
    the five sections and the byte metrics in base units (bytes, nanoseconds), as CSV into
    csv_path; kernel names without their parameters. Clocks are left alone (the device README:
    --clock-control none); caches are flushed before each kernel (ncu's default), so each row is
    one kernel from cold."""
    sections = [arg for name in SECTIONS for arg in ("--section", name)]
    return [ncu, "--clock-control", "none", "--profile-from-start", "off", "--print-kernel-base", "function",
            *sections, "--metrics", ",".join(METRICS), "--csv", "--print-units", "base",
            "--launch-count", str(launch_count), "--log-file", csv_path]


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_csv(text: str) -> List[dict]:
    """One dict per kernel launch: {"kernel", "id", each metric of METRICS found, "sections":
    [{"section", "name", "unit", "value"}, ...]}. ncu's "details" CSV has a row per (launch,
    section, metric); its own ==PROF== lines and its rule rows (no metric) are skipped."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    launches: Dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if not row.get("ID") or not row.get("Metric Name"):
            continue
        launch = launches.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"], "sections": []})
        name, raw = row["Metric Name"], row.get("Metric Value", "")
        value = _number(raw or "")
        if name in METRICS:
            if value is not None:
                launch[name] = value
        elif row.get("Section Name") != COMMAND_LINE_SECTION:
            launch["sections"].append({"section": row.get("Section Name"), "name": name,
                                       "unit": row.get("Metric Unit"), "value": raw if value is None else value})
    return sorted(launches.values(), key=lambda r: r["id"])


def key_figures(launch: dict) -> Dict[str, object]:
    """The KEY_FIGURES a launch's sections hold, by column."""
    out = {}
    for column, section, label in KEY_FIGURES:
        for m in launch.get("sections", []):
            if m["name"] == label and section in (m["section"] or "").lower():
                out[column] = m["value"]
                break
    return out


def kernel_figures(name: str, rows: List[dict], pass_bytes: int) -> dict:
    """One kernel's figures, summed over its launches `rows`; the key figures of its longest."""
    def total(metric):
        values = [r.get(metric) for r in rows]
        return None if None in values else sum(values)

    dram = sum(r.get("dram__bytes_read.sum", 0.0) + r.get("dram__bytes_write.sum", 0.0) for r in rows)
    ns = total("gpu__time_duration.sum")
    longest = max(rows, key=lambda r: r.get("gpu__time_duration.sum") or 0.0)
    return {
        "kernel": name,
        "calls": len(rows),
        "time_us": None if ns is None else ns / 1e3,
        "dram_read_bytes": total("dram__bytes_read.sum"),
        "dram_write_bytes": total("dram__bytes_write.sum"),
        "dram_passes": dram / pass_bytes,
        "l2_read_bytes": sum(r.get("lts__t_sectors_srcunit_tex_op_read.sum", 0.0) for r in rows) * SECTOR_BYTES,
        "instructions": total("smsp__inst_executed.sum"),
        "dram_gb_s": dram / ns if ns else None,  # bytes per ns = GB/s
        "figures": key_figures(longest),
    }


def op_figures(kernels: List[dict], min_passes: int, pass_bytes: int) -> dict:
    passes = sum(k["dram_passes"] for k in kernels)
    times = [k["time_us"] for k in kernels]
    time_us = None if None in times else sum(times)
    return {"kernels": [k["kernel"] for k in kernels], "launches": sum(k["calls"] for k in kernels),
            "dram_passes": passes, "over_min": passes / min_passes, "time_us": time_us,
            "dram_gb_s": passes * pass_bytes / (time_us * 1e3) if time_us else None}


def by_marker(launches: List[dict], marker: str, phases: Sequence[str]) -> List[Tuple[str, List[dict]]]:
    """The launches between markers, each group named by the case's phase list, in order."""
    groups: List[Tuple[str, List[dict]]] = []
    for launch in launches:
        if marker in launch["kernel"]:
            k = len(groups)
            groups.append((phases[k] if k < len(phases) else f"phase {k + 1}", []))
        elif groups:
            groups[-1][1].append(launch)
    return groups


def summarise(launches: List[dict], pass_bytes: int, phases: Optional[Sequence[str]] = None,
              marker: Optional[str] = None) -> dict:
    """Per phase (between the case's markers) and per kernel within it: DRAM bytes read + written
    in passes over x and over the phase's minimum, L2 bytes read, instructions, time, DRAM GB/s
    and the sections' key figures. Without markers: the fused layer's kernels (each its last
    launch), grouped into fwd and bwd by name."""
    if marker and any(marker in r["kernel"] for r in launches):
        kernels, ops = [], {}
        for phase, rows in by_marker(launches, marker, phases or ()):
            names = list(dict.fromkeys(r["kernel"] for r in rows))
            mine = [dict(kernel_figures(n, [r for r in rows if r["kernel"] == n], pass_bytes), phase=phase)
                    for n in names]
            kernels += mine
            ops[phase] = op_figures(mine, MIN_PASSES.get(phase.split()[-1], 2), pass_bytes)
        return {"pass_bytes": pass_bytes, "phases": list(ops), "kernels": kernels, "ops": ops}
    last = {r["kernel"]: r for r in launches}
    kernels = [kernel_figures(name, [r], pass_bytes) for name, r in last.items()]
    ops = {}
    for op, names in OPS.items():
        rows = [k for k in kernels if k["kernel"] in names]
        if rows:
            ops[op] = op_figures(rows, MIN_PASSES[op], pass_bytes)
    return {"pass_bytes": pass_bytes, "kernels": kernels, "ops": ops}


def _fmt(v, spec, scale=1.0):
    if isinstance(v, str):
        return v
    return "-" if v is None else format(v / scale, spec)


def shown_kernels(summary: dict) -> List[dict]:
    """summary.md's kernel rows: this project's kernels and every kernel of at least SMALL_SHARE of
    its phase's time; the rest of a phase as one "(n other kernels)" row."""
    if "phases" not in summary:
        return summary["kernels"]
    out = []
    for phase in summary["phases"]:
        mine = [k for k in summary["kernels"] if k["phase"] == phase]
        total = summary["ops"][phase]["time_us"] or 0.0
        big = [k for k in mine
               if k["kernel"].startswith(TRITON_PREFIXES) or (k["time_us"] or 0.0) >= SMALL_SHARE * total]
        rest = [k for k in mine if k not in big]
        out += big
        if rest:
            out.append({"phase": phase, "kernel": f"({len(rest)} other kernels)",
                        "calls": sum(k["calls"] for k in rest),
                        "time_us": sum(k["time_us"] or 0.0 for k in rest),
                        "dram_passes": sum(k["dram_passes"] for k in rest), "dram_read_bytes": None,
                        "dram_write_bytes": None, "l2_read_bytes": None, "instructions": None, "dram_gb_s": None,
                        "figures": {}})
    return out


def markdown(summary: dict) -> List[str]:
    """The tables summary.md shows."""
    phased = "phases" in summary
    lead = ["phase", "kernel", "calls"] if phased else ["kernel"]
    out = ["| " + " | ".join(lead) + " | time (us) | DRAM read (MB) | DRAM write (MB) | DRAM passes | L2 read (MB) "
           "| instructions | DRAM GB/s |", "|" + "---|" * (len(lead) + 7)]
    rows = shown_kernels(summary)
    for k in rows:
        cells = [k["phase"], k["kernel"], str(k["calls"])] if phased else [k["kernel"]]
        out.append(f"| {' | '.join(cells)} | {_fmt(k['time_us'], '.1f')} | {_fmt(k['dram_read_bytes'], '.1f', 1e6)} "
                   f"| {_fmt(k['dram_write_bytes'], '.1f', 1e6)} | {k['dram_passes']:.2f} "
                   f"| {_fmt(k['l2_read_bytes'], '.1f', 1e6)} | {_fmt(k['instructions'], '.3g')} "
                   f"| {_fmt(k['dram_gb_s'], '.0f')} |")
    out += ["", "| op | DRAM passes | over the minimum | time (us) | DRAM GB/s |", "|---|---|---|---|---|"]
    for op, o in summary["ops"].items():
        out.append(f"| {op} | {o['dram_passes']:.2f} | {o['over_min']:.2f}x | {_fmt(o['time_us'], '.1f')} "
                   f"| {_fmt(o['dram_gb_s'], '.0f')} |")
    figured = [k for k in rows if k.get("figures")]
    if figured:
        cols = [c for c, _, _ in KEY_FIGURES]
        out += ["", "| " + " | ".join(lead[:2] if phased else lead) + " | " + " | ".join(cols) + " |",
                "|" + "---|" * (len(cols) + (2 if phased else 1))]
        for k in figured:
            cells = [k["phase"], k["kernel"]] if phased else [k["kernel"]]
            cells += [_fmt(k["figures"].get(c), ".3g") for c in cols]
            out.append("| " + " | ".join(cells) + " |")
    return out
