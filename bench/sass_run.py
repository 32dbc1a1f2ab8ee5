"""`python -m bench.run --kernel oca|layer --sass`: what the GPU will wait on, read from the SASS of
every launch the op makes at the GPU tiling, and a latency / roofline MODEL built on it.

Two halves, at once: bench/sass_worker.py, a subprocess without TRITON_INTERPRET, captures the
launches at a small batch whose launch configurations equal B's on the whole GPU and compiles them
(registers, spills, shared memory, SASS); meanwhile this process counts the bytes each kernel and
torch op requests on the interpreter (bench/traffic.py) at that same small batch and SM count.
Then, per launch, occupancy (bench/occupancy.py), waves at B, loops and their trips
(bench/loop_trips.py), the loop-weighted instruction mix (bench/sass_summary.py), and the model
(bench/sass_model.py), summed per provider and mode. Tables: bench/sass_report.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import List, Tuple

import torch

from nearl_kernels import runtime

from .loop_trips import loop_trips
from .occupancy import occupancy, waves
from .report import environment
from .sass_estimate import estimate
from .sass_model import params_for
from .sass_summary import weighted_mix
from .shapes import resolve_shape
from .traffic import TrafficRun, environ, launch_configs

SMALL_B = 2  # the batch the launches are captured and the bytes counted at, where it can be
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `python -m <package>` finds it


@dataclass
class SassPlan:
    kernel: str
    args: object
    shape: object
    tiling: str
    sm_count: int
    cc: int
    targets: List[int]
    small_B: int
    small_sm_count: int
    providers: List[str]
    modes: List[str]


def _capture(kernel, shape, dtype, orth, tiling, sm_count) -> Tuple[int, int]:
    """The smallest batch (2, 4, 8, ... up to shape.B) and, for it, the smallest SM count at which it
    gets the launch configurations of shape.B on sm_count SMs: a small batch splits its work finer
    (policy.tokens_to_fill), so B = 32 may have no batch-2 twin, while B = 256 has."""
    with environ(NEARL_TILING=tiling, NEARL_SM_COUNT=str(sm_count)):
        want = launch_configs(kernel, shape, dtype, shape.B, orth)
    small_B = min(SMALL_B, shape.B)
    while True:
        for n in range(1, sm_count + 1):
            with environ(NEARL_TILING=tiling, NEARL_SM_COUNT=str(n)):
                if launch_configs(kernel, shape, dtype, small_B, orth) == want:
                    return small_B, n
        if small_B >= shape.B:
            raise ValueError(f"no batch up to B={shape.B} on fewer SMs gets the launch configurations of "
                             f"B={shape.B} on {sm_count} SMs; try another --B")
        small_B = min(2 * small_B, shape.B)


def make_plan(kernel: str, args) -> SassPlan:
    overrides = {k: getattr(args, k, None) for k in ("B", "N", "d", "M", "D", "H", "r")}
    if kernel == "oca":
        overrides.update(D=None, H=None, r=None)
    shape = resolve_shape(args.shape, overrides, on_gpu=True)
    if not any(v is not None for v in overrides.values()):
        shape = replace(shape, name=args.shape)
    tiling = os.environ.get("NEARL_TILING", "").strip().lower() or "h100"
    with environ(NEARL_TILING=tiling):
        _, sm_count, cc = runtime.tiling(torch.device("cpu"))  # a bad value: ValueError naming it
    if params_for(cc) is None:
        raise ValueError(f"no model parameters for sm_{cc}")
    targets = list(dict.fromkeys([cc] + list(args.sass_targets)))
    small_B, small_sm = _capture(kernel, shape, args.torch_dtype, args.orth, tiling, sm_count)
    return SassPlan(kernel, args, shape, tiling, sm_count, cc, targets, small_B, small_sm,
                    list(args.provider_list), list(args.traffic_modes))


# ------------------------------------------------------------------------------------------- halves
def start_worker(plan: SassPlan, workdir: str) -> subprocess.Popen:
    req = {"kernel": plan.kernel, "shape": plan.shape.to_dict(), "B": plan.shape.B, "small_B": plan.small_B,
           "small_sm_count": plan.small_sm_count, "tiling": plan.tiling, "dtype": plan.args.dtype,
           "orth": plan.args.orth, "seed": plan.args.seed, "providers": plan.providers, "modes": plan.modes,
           "targets": plan.targets, "jobs": 2, "dump_dir": getattr(plan.args, "sass_dump", None)}
    with open(os.path.join(workdir, "request.json"), "w") as f:
        json.dump(req, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package = __package__ or "bench"
    return subprocess.Popen([sys.executable, "-m", f"{package}.sass_worker", os.path.join(workdir, "request.json"),
                             os.path.join(workdir, "result.json")], cwd=PACKAGE_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish_worker(proc: subprocess.Popen, workdir: str) -> dict:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the SASS compile subprocess failed (exit {proc.returncode}):\n{err[-4000:]}")
    with open(os.path.join(workdir, "result.json")) as f:
        return json.load(f)


def count_traffic(plan: SassPlan) -> dict:
    """bench/traffic.py's count at the small batch and SM count (the same launches as the worker's)."""
    a = plan.args
    targs = SimpleNamespace(shape=a.shape, B=plan.small_B, N=plan.shape.N, d=plan.shape.d, M=plan.shape.M,
                            D=plan.shape.D, H=plan.shape.H, r=plan.shape.r, torch_dtype=a.torch_dtype, dtype=a.dtype,
                            traffic_modes=plan.modes, orth=a.orth, provider_list=plan.providers, seed=a.seed)
    with environ(NEARL_TILING=plan.tiling, NEARL_SM_COUNT=str(plan.small_sm_count)):
        return TrafficRun(plan.kernel, targs).run()


def both_halves(plan: SassPlan) -> Tuple[dict, dict]:
    workdir = tempfile.mkdtemp(prefix="nearl_sass_run_")
    proc = None
    try:
        proc = start_worker(plan, workdir)
        traffic = count_traffic(plan)
        return finish_worker(proc, workdir), traffic
    finally:
        if proc is not None and proc.poll() is None:  # the traffic half failed: stop our own subprocess
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- facts
def launch_rows(plan: SassPlan, compiled: dict) -> List[dict]:
    """Per launch and target: resources, occupancy, waves at B, loops, async copies, MMAs, mix."""
    rows = []
    for launch in compiled["launches"]:
        grid_ctas = math.prod(launch["grid"])
        for cc, res in compiled["compiled"][launch["compile"]]["targets"].items():
            row = dict(provider=launch["provider"], mode=launch["mode"], kernel=launch["kernel"], cc=int(cc),
                       grid=launch["grid"], grid_ctas=grid_ctas, num_warps=launch["opts"]["num_warps"],
                       num_stages=launch["opts"]["num_stages"], consts=launch["consts"], ok=res["ok"])
            if not res["ok"]:
                rows.append(dict(row, error=res["error"]))
                continue
            occ = occupancy(res["n_regs"], row["num_warps"], res["shared"], int(cc))
            s = res["summary"]
            trips, rule = (loop_trips(launch["consts"], launch["ints"], launch["grid"]) if s["loops"]
                           else (1, "no loop"))
            row.update(n_regs=res["n_regs"], spill_stores=res["spill_stores"], spill_loads=res["spill_loads"],
                       shared=res["shared"], occupancy=occ, waves=waves(grid_ctas, occ["ctas_per_sm"], plan.sm_count),
                       trips=trips, trips_rule=rule, loops=[{k: lp[k] for k in ("start", "end", "depth", "instructions")}
                                                            for lp in s["loops"]],
                       in_loops=s["in_loops"], async_copies_in_loops=s["async_copies_in_loops"],
                       instructions=s["instructions"], mix=weighted_mix(s, lambda depth: trips), summary=s)
            rows.append(row)
    return rows


def _pass_bytes(plan: SassPlan) -> int:
    return plan.shape.B * plan.shape.N * plan.shape.d * torch.empty(0, dtype=plan.args.torch_dtype).element_size()


def run_sass(kernel: str, args) -> Tuple[dict, str]:
    from .sass_report import format_sass_report

    plan = make_plan(kernel, args)
    compiled, traffic = both_halves(plan)
    rows = launch_rows(plan, compiled)
    for row in rows:
        row["status"] = "ok" if row["ok"] else "failed"
    model = estimate(rows, traffic, plan.cc, plan.sm_count, plan.shape.B / plan.small_B, _pass_bytes(plan),
                     params_for(plan.cc), plan.providers, plan.modes)
    payload = {
        "benchmark": f"SASS of nearl.ops.{'oca' if kernel == 'oca' else 'nearl_layer'}",
        "kernel": kernel,
        **environment(torch.device("cpu")),
        "cpu_only": True,
        "note": "compiled for the GPU target on the CPU (no GPU); the model section is a MODEL, NOT A MEASUREMENT",
        "shape": plan.shape.to_dict(), "dtype": args.dtype, "orth": args.orth, "modes": plan.modes,
        "providers": plan.providers, "targets": plan.targets,
        "tiling": {"tiling": plan.tiling, "sm_count": plan.sm_count, "compute_capability": plan.cc,
                   "captured_B": plan.small_B, "captured_sm_count": plan.small_sm_count},
        "pass_bytes": _pass_bytes(plan), "compile_seconds": compiled["seconds"],
        "rows": rows, "model": model,
        "traffic": {"rows": traffic["rows"], "pass_bytes_at_captured_B": traffic["pass_bytes"]},
    }
    return payload, format_sass_report(payload)


__all__ = ["run_sass", "make_plan", "launch_rows", "SassPlan"]
