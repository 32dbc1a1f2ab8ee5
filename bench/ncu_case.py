"""One fused NEARL layer, forward and backward through the Triton kernels: the program
`python -m bench.gpu_check` runs under Nsight Compute (ncu) to read the layer kernels' DRAM and L2
bytes, instructions and times.

    ncu --clock-control none -k regex:^layer_ --metrics ... python -m bench.ncu_case --out case.json

The shape is a bench.shapes preset at its full batch (ViT-B/16 vision layer: B 256, N 197, d 768),
bf16, orth "hard", so the kernels run with the configurations the launchers pick for it; ncu
flushes the caches before each profiled kernel, so one call is enough (the Triton compile happens on
the host, before the launch ncu sees). --out writes the shape and the bytes of one pass over x, which
`bench.ncu_report` needs for the ratios to the minimum. On the CPU (the interpreter) the shape shrinks
to the CPU preset: the dry run only shows that the program runs.
"""
from __future__ import annotations

import argparse
import json
import sys

from .memcheck_case import case_device


def run(preset: str, orth: str, device) -> dict:
    import torch

    from . import providers as prov
    from .shapes import make_case, resolve_shape, split_outputs

    shape = resolve_shape(preset, {}, on_gpu=device.type == "cuda")
    case = make_case("layer", shape, torch.bfloat16, orth, device, seed=0)
    t = case.clone(requires_grad=True)
    out = split_outputs(case.invoke(prov.make_provider("triton", "layer", orth, device), t))
    torch.autograd.backward(list(out), [torch.ones_like(o) for o in out])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    x = t["x"]
    return {"kernel": "layer", "provider": "triton", "shape": shape.to_dict(), "orth": orth, "dtype": "bf16",
            "pass_bytes": x.numel() * x.element_size(), "finite": bool(torch.isfinite(x.grad).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ncu_case", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--shape", choices=("vit-b16", "text-b16"), default="vit-b16")
    p.add_argument("--orth", choices=("none", "hard", "soft"), default="hard")
    p.add_argument("--out", metavar="FILE.json", default=None)
    args = p.parse_args(argv)
    device = case_device(args.device)
    result = run(args.shape, args.orth, device)
    print(f"layer {result['shape']['name']} ({result['shape']['B']}x{result['shape']['N']}x{result['shape']['d']}, "
          f"bf16, orth {args.orth}) on {device}: forward and backward ran, dx finite: {result['finite']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
