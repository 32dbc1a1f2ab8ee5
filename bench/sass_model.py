"""A latency / roofline MODEL of the kernels' GPU time, built from their SASS. NOT A MEASUREMENT.

Inputs: per launch, the SASS segments (bench/sass_summary.py: the straight-line code and each
loop's own body, with its instruction count, opcodes and MMAs), num_warps and num_stages, the CTAs
resident per SM (bench/occupancy.py), the grid, and each loop's estimated trips
(bench/loop_trips.py); per kernel, the bytes its loads and stores request (bench/traffic.py's
count, at the same tiling, scaled from its small batch to B). Two parameter sets, `optimistic` and
`pessimistic` (printed with every report), for the GPU the tiling names (h100: sm_90; a100: sm_80).

One segment, once, for one CTA, in SM cycles, with W warps per CTA and R CTAs resident per SM
(R = min(occupancy, ceil(grid / SMs)): a partial wave shares its SMs with fewer CTAs):
  issue  = instructions x W / issue_rate          (the SM issues issue_rate warp-instructions a cycle)
  tensor = MMA operations of the CTA / tensor rate (wgmma at the peak of its precision, mma.sync at
           mma_sync_share of it; an FP32 "ieee" product is FFMA, counted in issue)
  L      = load_latency if the segment has a global (or spill) load, else 0
  no async copy in the segment (the loads of an iteration wait for nothing in flight):
      t = max(L + issue + tensor, R x issue, R x tensor)      -- in series, or the SM's throughput
  async copies in the segment (cp.async / TMA, loads in flight across iterations):
      t = max(L / max(1, num_stages - 1), R x issue, R x tensor)  -- latency hidden across stages
The straight-line code counts as one series segment (its loads are one round of latency).
  CTA time    = straight-line t + sum over loops of trips x t   (nested loops: at their outer
                loop's trips)
  launch time = waves x CTA time / clock,  waves = ceil(grid / (CTAs per SM x SMs))
  kernel time = max(memory floor, sum of its launches' times), the memory floor from the bytes it
                requests: pessimistic, every request from DRAM (requested / dram_bw); optimistic,
                the token-sized tensors' requests from DRAM and all requests within the L2
                bandwidth (max(token / dram_bw, requested / l2_bw)): the small per-sample matrices
                and weights, re-read by every tile, are L2 hits.
  torch ops   = for each call whose bytes grow with the batch (the traffic counter's batch part,
                scaled to B): bytes / dram_bw + torch_op_cost (launch and ramp of a small kernel);
                modelled as memory-bound: a compute-bound matmul takes longer than this says.
  op time     = the sum of its kernels and torch ops, per mode (no overlap between them).
What it leaves out: caches beyond the floor's rule, bank conflicts, dependency chains inside a
segment other than one load latency, divergence (every instruction counts for every warp),
the tail of a partial wave, launch gaps between kernels. Its numbers are for ranking and for
spotting what binds (latency, issue, tensor, memory), not for quoting as times.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .sass_parse import ASYNC_COPY, MMA_WARPGROUP, mma_flops, mma_precision

GLOBAL_LOADS = ("LDG", "LD", "LDL", "LDGSTS", "UTMALDG", "UBLKCP")


@dataclass(frozen=True)
class ModelParams:
    name: str
    gpu: str
    dram_bw: float          # bytes/s
    l2_bw: float            # bytes/s, the optimistic floor's rule only
    small_from_l2: bool     # whether the floor takes re-read small tensors from L2
    load_latency: int       # cycles, a global load's round trip
    clock: float            # SM clock, Hz
    issue_rate: float       # warp-instructions per cycle per SM
    tensor_flops: Dict[str, float] = field(default_factory=dict)  # per cycle per SM, by precision
    mma_sync_share: float = 1.0  # of the peak, what mma.sync (HMMA) reaches; wgmma reaches it all
    torch_op_cost: float = 5e-6  # seconds per torch op call

    def to_dict(self) -> dict:
        return asdict(self)


# Dense tensor peaks, operations per cycle per SM: H100 SXM 989 TF/s bf16 = 132 SMs x 4096 x 1.83 GHz.
_H100_TENSOR = {"tf32": 2048.0, "16bit": 4096.0, "fp8": 8192.0, "int8": 8192.0, "fp64": 256.0}
_A100_TENSOR = {"tf32": 1024.0, "16bit": 2048.0, "fp8": 0.0, "int8": 4096.0, "fp64": 128.0}
PARAMS = {
    90: (ModelParams("optimistic", "H100 SXM", 3.0e12, 7.0e12, True, 600, 1.755e9, 4.0, _H100_TENSOR, 2 / 3, 3e-6),
         ModelParams("pessimistic", "H100 SXM", 2.6e12, 5.5e12, False, 1000, 1.755e9, 4.0, _H100_TENSOR, 0.5, 6e-6)),
    80: (ModelParams("optimistic", "A100 SXM", 1.8e12, 4.5e12, True, 600, 1.41e9, 4.0, _A100_TENSOR, 1.0, 3e-6),
         ModelParams("pessimistic", "A100 SXM", 1.5e12, 3.5e12, False, 1000, 1.41e9, 4.0, _A100_TENSOR, 0.75, 6e-6)),
}


def tensor_cycles(mma: Dict[str, int], warps: int, p: ModelParams) -> float:
    """Cycles of the SM's tensor units for one CTA's MMAs of a segment (each warp issues each)."""
    cycles = 0.0
    for opcode, count in mma.items():
        rate = p.tensor_flops.get(mma_precision(opcode), 0.0)
        if not rate:
            continue
        if opcode.split(".")[0] not in MMA_WARPGROUP:
            rate *= p.mma_sync_share
        cycles += count * mma_flops(opcode) * warps / rate
    return cycles


def segment_time(seg: dict, warps: int, resident: int, stages: int, p: ModelParams,
                 straight: bool = False) -> dict:
    """One execution of a segment by one CTA: cycles, its terms, and what binds it."""
    ops = seg["ops"]
    issue = seg["instructions"] * warps / p.issue_rate
    tensor = tensor_cycles(seg["mma"], warps, p)
    latency = p.load_latency if any(ops.get(op, 0) for op in GLOBAL_LOADS) else 0
    pipelined = not straight and any(ops.get(op, 0) for op in ASYNC_COPY)
    hidden = latency / max(1, stages - 1) if pipelined else None
    terms = {"chain": (hidden if pipelined else latency + issue + tensor),
             "issue": resident * issue, "tensor": resident * tensor}
    cycles = max(terms.values())
    binds = max(terms, key=terms.get)
    if binds == "chain":  # name the chain's largest part
        binds = "latency" if pipelined else max((("latency", latency), ("issue", issue), ("tensor", tensor)),
                                                key=lambda kv: kv[1])[0]
    return {"cycles": cycles, "latency": latency, "issue": issue, "tensor": tensor, "pipelined": pipelined,
            "binds": binds}


def launch_time(summary: dict, warps: int, stages: int, ctas_per_sm: int, grid_ctas: int, sm_count: int,
                trips: int, p: ModelParams) -> dict:
    """One launch: per-segment times, the CTA's cycles, waves and seconds (no memory floor)."""
    if ctas_per_sm <= 0:
        return {"fits": False}
    resident = max(1, min(ctas_per_sm, math.ceil(grid_ctas / sm_count)))
    straight = segment_time(summary["straight"], warps, resident, stages, p, straight=True)
    loops = [dict(segment_time(loop, warps, resident, stages, p), trips=trips, depth=loop["depth"])
             for loop in summary["loops"]]
    cta = straight["cycles"] + sum(lp["trips"] * lp["cycles"] for lp in loops)
    waves = math.ceil(grid_ctas / (ctas_per_sm * sm_count))
    heaviest = max([dict(straight, trips=1)] + loops, key=lambda s: s["trips"] * s["cycles"])
    return {"fits": True, "resident": resident, "straight": straight, "loops": loops, "cta_cycles": cta,
            "cta_s": cta / p.clock, "waves": waves, "seconds": waves * cta / p.clock, "binds": heaviest["binds"]}


def memory_floor(token_bytes: float, small_bytes: float, p: ModelParams) -> float:
    total = token_bytes + small_bytes
    if p.small_from_l2:
        return max(token_bytes / p.dram_bw, total / p.l2_bw)
    return total / p.dram_bw


def kernel_time(launch_seconds: List[float], token_bytes: float, small_bytes: float, p: ModelParams) -> dict:
    floor = memory_floor(token_bytes, small_bytes, p)
    compute = sum(launch_seconds)
    return {"floor_s": floor, "compute_s": compute, "seconds": max(floor, compute),
            "bound": "memory" if floor >= compute else "latency/issue/tensor"}


def torch_time(ops: Dict[str, dict], scale: float, p: ModelParams) -> dict:
    """The torch ops of one call: bytes (scaled from the traffic count's batch by `scale`) at DRAM
    bandwidth, plus torch_op_cost per call."""
    nbytes = scale * sum(v for o in ops.values() for k, v in o.items() if k != "calls")
    calls = sum(o["calls"] for o in ops.values())
    return {"calls": calls, "bytes": nbytes, "seconds": nbytes / p.dram_bw + calls * p.torch_op_cost}


def params_for(cc: int) -> Optional[tuple]:
    return PARAMS.get(cc)


__all__ = ["ModelParams", "PARAMS", "params_for", "segment_time", "launch_time", "kernel_time", "torch_time",
           "memory_floor", "tensor_cycles"]
