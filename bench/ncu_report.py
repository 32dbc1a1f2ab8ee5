"""Nsight Compute's CSV for the fused layer's kernels, read into per-kernel and per-op figures.

`python -m bench.gpu_check` runs `bench.ncu_case` under ncu with `ncu_command` and reads what ncu
wrote with `read_csv`; `summarise` turns the rows into bytes over the minimum (one pass = B N d
elements of x: forward 2 passes, backward 3, as in `bench.run --traffic`) and achieved bandwidth.
"""
from __future__ import annotations

import csv
import io
from typing import Dict, List, Optional

METRICS = (
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_sectors_srcunit_tex_op_read.sum",  # L2 sectors (32 bytes) the SMs read
    "smsp__inst_executed.sum",
    "gpu__time_duration.sum",
)
SECTOR_BYTES = 32
KERNEL_FILTER = "regex:^layer_"  # the fused layer's Triton kernels, nothing of torch's
# which op each kernel belongs to, and that op's minimum in passes over x
OPS = {"fwd": ("layer_fwd_kernel", "layer_attn_kernel"),
       "bwd": ("layer_bwd_dout_kernel", "layer_bwd_rows_kernel", "layer_bwd_cols_kernel")}
MIN_PASSES = {"fwd": 2, "bwd": 3}


def ncu_command(ncu: str, csv_path: str, launch_count: int = 20) -> List[str]:
    """ncu's part of the command line: the five metrics of every fused-layer kernel launch, in base
    units (bytes, nanoseconds), as CSV into csv_path. Clocks are left alone (the device README:
    --clock-control none); caches are flushed before each kernel (ncu's default), so each row is
    one kernel from cold."""
    return [ncu, "--clock-control", "none", "--metrics", ",".join(METRICS), "--csv", "--print-units", "base",
            "-k", KERNEL_FILTER, "--launch-count", str(launch_count), "--log-file", csv_path]


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_csv(text: str) -> List[dict]:
    """One dict per kernel launch: {"kernel", "id", and each metric of METRICS found}. ncu's
    "details" CSV has a row per (launch, metric); its own ==PROF== lines are skipped."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    launches: Dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name, value = row.get("Metric Name"), _number(row.get("Metric Value", ""))
        if name not in METRICS or value is None:
            continue
        launch = launches.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"]})
        launch[name] = value
    return sorted(launches.values(), key=lambda r: r["id"])


def summarise(launches: List[dict], pass_bytes: int) -> dict:
    """Per kernel (its last launch) and per op: DRAM bytes read + written in passes over x and
    over the op's minimum, L2 bytes read, instructions, time and DRAM GB/s."""
    last = {r["kernel"]: r for r in launches}
    kernels = []
    for name, r in last.items():
        dram = r.get("dram__bytes_read.sum", 0.0) + r.get("dram__bytes_write.sum", 0.0)
        ns = r.get("gpu__time_duration.sum")
        kernels.append({
            "kernel": name,
            "time_us": None if ns is None else ns / 1e3,
            "dram_read_bytes": r.get("dram__bytes_read.sum"),
            "dram_write_bytes": r.get("dram__bytes_write.sum"),
            "dram_passes": dram / pass_bytes,
            "l2_read_bytes": r.get("lts__t_sectors_srcunit_tex_op_read.sum", 0.0) * SECTOR_BYTES,
            "instructions": r.get("smsp__inst_executed.sum"),
            "dram_gb_s": dram / ns if ns else None,  # bytes per ns = GB/s
        })
    ops = {}
    for op, names in OPS.items():
        rows = [k for k in kernels if k["kernel"] in names]
        if not rows:
            continue
        passes = sum(k["dram_passes"] for k in rows)
        times = [k["time_us"] for k in rows]
        time_us = None if None in times else sum(times)
        ops[op] = {"kernels": [k["kernel"] for k in rows], "dram_passes": passes,
                   "over_min": passes / MIN_PASSES[op], "time_us": time_us,
                   "dram_gb_s": passes * pass_bytes / (time_us * 1e3) if time_us else None}
    return {"pass_bytes": pass_bytes, "kernels": kernels, "ops": ops}


def markdown(summary: dict) -> List[str]:
    """The tables summary.md shows."""
    def fmt(v, spec, scale=1.0):
        return "-" if v is None else format(v / scale, spec)

    out = ["| kernel | time (us) | DRAM read (MB) | DRAM write (MB) | DRAM passes | L2 read (MB) | instructions "
           "| DRAM GB/s |", "|---|---|---|---|---|---|---|---|"]
    for k in summary["kernels"]:
        out.append(f"| {k['kernel']} | {fmt(k['time_us'], '.1f')} | {fmt(k['dram_read_bytes'], '.1f', 1e6)} "
                   f"| {fmt(k['dram_write_bytes'], '.1f', 1e6)} | {k['dram_passes']:.2f} "
                   f"| {fmt(k['l2_read_bytes'], '.1f', 1e6)} | {fmt(k['instructions'], '.3g')} "
                   f"| {fmt(k['dram_gb_s'], '.0f')} |")
    out += ["", "| op | DRAM passes | over the minimum | time (us) | DRAM GB/s |", "|---|---|---|---|---|"]
    for op, o in summary["ops"].items():
        out.append(f"| {op} | {o['dram_passes']:.2f} | {o['over_min']:.2f}x | {fmt(o['time_us'], '.1f')} "
                   f"| {fmt(o['dram_gb_s'], '.0f')} |")
    return out
