"""OCA, the fused NEARL layer and its split path, forward and backward: the program
`python -m bench.gpu_check` runs under Nsight Compute (ncu) to read every Triton kernel's (and the
split path's cuBLAS, attention and elementwise kernels') sections, DRAM and L2 bytes, instructions
and times.

    ncu --profile-from-start off --section SpeedOfLight ... --metrics ... python -m bench.ncu_case --out case.json

The shape is a bench.shapes preset at its full batch (ViT-B/16 vision layer: B 256, N 197, d 768),
bf16, orth "hard", so the kernels run with the configurations the launchers pick for it. Each op is
called once first (the Triton compile, cuBLAS's choices), then, between cudaProfilerStart and Stop,
once per phase: "oca fwd", "oca bwd", "fused fwd", "fused bwd", "split fwd", "split bwd", each
after a marker kernel (torch.cuda._sleep's `spin_kernel`) that tells bench.ncu_report where the
phase begins. ncu flushes the caches before each profiled kernel, so one call is enough. --out
writes the shape, the phases and the bytes of one pass over x, which `bench.ncu_report` needs for
the ratios to the minimum. On the CPU (the interpreter) the shape shrinks to the CPU preset and
there are no markers: the dry run only shows that the program runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List, Tuple

from .memcheck_case import case_device

OPS = ("oca", "fused", "split")
MARKER = "spin_kernel"  # the kernel torch.cuda._sleep launches


def prepare(op: str, shape, orth: str, device) -> Tuple[object, Callable, List]:
    """(case, function, cotangents) of one op; on a GPU called once, outside the profiled range."""
    import torch

    from . import providers as prov
    from .profile_case import one_call
    from .shapes import make_case, split_outputs

    case = make_case("oca" if op == "oca" else "layer", shape, torch.bfloat16, orth, device, seed=0)
    fn = prov.make_provider("triton", "oca", orth, device) if op == "oca" else prov.layer_path_fn(orth, op)
    douts = [torch.ones_like(o) for o in split_outputs(case.invoke(fn, case.clone(requires_grad=False)))]
    if device.type == "cuda":
        one_call(case, fn, douts)
    return case, fn, douts


def marker(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda._sleep(1)


def run(preset: str, orth: str, device) -> dict:
    import torch

    from .kernel_bench import differentiable
    from .shapes import resolve_shape, split_outputs

    on_gpu = device.type == "cuda"
    shape = resolve_shape(preset, {}, on_gpu=on_gpu)
    jobs = [(op, *prepare(op, shape, orth, device)) for op in OPS]
    phases, finite = [], True
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.profiler.start()  # ncu --profile-from-start off profiles from here
    for op, case, fn, douts in jobs:
        t = case.clone(requires_grad=True)
        marker(device)
        outs = differentiable(split_outputs(case.invoke(fn, t)))
        marker(device)
        torch.autograd.backward(outs, douts[:len(outs)])
        phases += [f"{op} fwd", f"{op} bwd"]
        finite = finite and bool(torch.isfinite(t["x"].grad).all())
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.profiler.stop()
    x = jobs[0][1].tensors["x"]
    return {"kernel": "oca, layer (fused and split)", "shape": shape.to_dict(), "orth": orth, "dtype": "bf16",
            "phases": phases, "marker": MARKER if on_gpu else None,
            "pass_bytes": x.numel() * x.element_size(), "finite": finite}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ncu_case", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shape", choices=("vit-b16", "text-b16"), default="vit-b16")
    p.add_argument("--orth", choices=("none", "hard", "soft"), default="hard")
    p.add_argument("--out", metavar="FILE.json", default=None)
    args = p.parse_args(argv)
    device = case_device(args.device)
    result = run(args.shape, args.orth, device)
    s = result["shape"]
    print(f"oca, fused and split layer, {s['name']} ({s['B']}x{s['N']}x{s['d']}, bf16, orth {args.orth}) on "
          f"{device}: phases {', '.join(result['phases'])} ran, dx finite: {result['finite']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
