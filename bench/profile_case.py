"""Every op once at the real shapes, forward and backward, under torch.profiler: which kernels each
launches and how long each takes. `python -m bench.gpu_check`'s `profile` step.

    python -m bench.profile_case --out profile.json

The ops: `ops.oca` (impl="triton"), the layer's fused path and its split path
(`bench.providers.layer_path_fn(orth, "fused" | "split")`, whatever `nearl.ops.layer_path` would
choose), each at ViT-B/16 (B 256, N 197, d 768) and text-B/16 (B 256, N 77, d 512, padding mask),
bf16, orth "hard". Each is called twice first, outside the profiler (the Triton compile, cuBLAS's
choices), then once inside it. Per op the JSON holds every CUDA kernel by name: calls and total
microseconds, the sum, and the wall time of the call. On the CPU (the interpreter) the shapes
shrink to bench.shapes' CPU presets and the rows are the torch CPU ops' self times, which say
nothing about a GPU: the dry run only shows that the program runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Dict, List

from .memcheck_case import case_device

OPS = ("oca", "layer-fused", "layer-split")
SHAPES = ("vit-b16", "text-b16")
TOP_CPU_OPS = 15  # CPU rows kept per op (by self time): the interpreter makes hundreds


def op_function(op: str, orth: str, device) -> Callable:
    from . import providers as prov

    if op == "oca":
        return prov.make_provider("triton", "oca", orth, device)
    return prov.layer_path_fn(orth, op.split("-", 1)[1])


def one_call(case, fn: Callable, douts) -> None:
    """One forward and backward on fresh leaves (their grads are the backward's outputs)."""
    import torch

    from .kernel_bench import differentiable
    from .shapes import split_outputs

    t = case.clone(requires_grad=True)
    outs = differentiable(split_outputs(case.invoke(fn, t)))
    torch.autograd.backward(outs, douts[:len(outs)])


def kernel_rows(prof, on_gpu: bool) -> List[dict]:
    """Per name: calls and total us; CUDA kernels on a GPU, CPU ops' self time on the CPU."""
    from torch.autograd import DeviceType

    rows: Dict[str, dict] = {}

    def add(name: str, us: float) -> None:
        row = rows.setdefault(name, {"name": name, "calls": 0, "total_us": 0.0})
        row["calls"] += 1
        row["total_us"] += us

    events = prof.events()
    for e in events:
        if on_gpu and e.device_type == DeviceType.CUDA:
            add(e.name, e.time_range.elapsed_us())
        elif not on_gpu and e.device_type == DeviceType.CPU and not e.name.startswith("profile/"):
            add(e.name, e.self_cpu_time_total)
    if on_gpu and not rows:  # a torch that hangs the kernels under their CPU ops only
        for e in events:
            for k in getattr(e, "kernels", []):
                add(k.name, k.duration)
    return sorted(rows.values(), key=lambda r: -r["total_us"])


def profile_op(op: str, shape_name: str, orth: str, device) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .shapes import make_case, resolve_shape, split_outputs

    on_gpu = device.type == "cuda"
    shape = resolve_shape(shape_name, {}, on_gpu=on_gpu)
    case = make_case("oca" if op == "oca" else "layer", shape, torch.bfloat16, orth, device, seed=0)
    fn = op_function(op, orth, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    douts = [torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype)
             for o in split_outputs(case.invoke(fn, case.clone(requires_grad=False)))]
    for _ in range(2 if on_gpu else 0):  # compile and warm up outside the profiler
        one_call(case, fn, douts)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        with record_function(f"profile/{op}/{shape_name}"):
            one_call(case, fn, douts)
        if on_gpu:
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    rows = kernel_rows(prof, on_gpu)
    return {"op": op, "shape": shape.to_dict(), "mode": "fwd+bwd", "dtype": "bf16", "orth": orth,
            "what": "CUDA kernels" if on_gpu else f"CPU ops, self time (the top {TOP_CPU_OPS} kept)",
            "wall_us": wall_us, "kernel_count": sum(r["calls"] for r in rows),
            "total_us": sum(r["total_us"] for r in rows), "kernels": rows if on_gpu else rows[:TOP_CPU_OPS]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_case", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--orth", choices=("none", "hard", "soft"), default="hard")
    p.add_argument("--out", metavar="FILE.json", default=None)
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not shapes or any(s not in SHAPES for s in shapes):
        p.error(f"--shapes takes a comma list of {', '.join(SHAPES)}, got {args.shapes!r}")
    device = case_device(args.device)
    results = []
    for shape_name in shapes:
        for op in OPS:
            r = profile_op(op, shape_name, args.orth, device)
            top = ", ".join(f"{k['name'][:40]} {k['total_us']:.0f}" for k in r["kernels"][:3])
            print(f"{op:12s} {shape_name}: {r['kernel_count']} {r['what']}, {r['total_us']:.0f} us "
                  f"(wall {r['wall_us']:.0f} us); top: {top}", flush=True)
            results.append(r)
    payload = {"device": str(device), "on_gpu": device.type == "cuda", "ops": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
