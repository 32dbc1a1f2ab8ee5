"""One OCA and one NEARL layer, forward and backward through the fused kernels, at a small shape:
the program `python -m bench.gpu_check` runs under `compute-sanitizer --tool memcheck`.

    compute-sanitizer --tool memcheck python -m bench.memcheck_case --out memcheck.json

OCA on a ViT-B-16 vision layer (N 197: a partial last tile), orth "hard"; the layer on a text-b16
layer with its padding mask, orth "soft" (the cos^2 output too); batch 2, bf16. On the CPU (the
interpreter) the shapes shrink to bench.shapes' CPU presets. Exit 1 if an output or gradient is not
finite. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that each tensor is its own allocation and an
access past its end is an access memcheck can see.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def run_case(kernel: str, preset: str, orth: str, device) -> dict:
    import torch

    from . import providers as prov
    from .kernel_bench import rel_err
    from .shapes import make_case, resolve_shape, split_outputs

    shape = resolve_shape(preset, {"B": 2}, on_gpu=device.type == "cuda")
    case = make_case(kernel, shape, torch.bfloat16, orth, device, seed=0)
    result = {"kernel": kernel, "shape": shape.to_dict(), "orth": orth, "dtype": "bf16"}
    grads, outs = {}, {}
    for name in ("reference", "triton"):
        t = case.clone(requires_grad=True)
        out = split_outputs(case.invoke(prov.make_provider(name, kernel, orth, device), t))
        g = torch.Generator(device="cpu").manual_seed(1)
        douts = [torch.randn(o.shape, generator=g).to(device=device, dtype=o.dtype) for o in out]
        torch.autograd.backward(list(out), douts)
        outs[name], grads[name] = out[0].detach(), t["x"].grad.detach()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["finite"] = bool(torch.isfinite(outs["triton"]).all() and torch.isfinite(grads["triton"]).all())
    # Beside the point of memcheck, but cheap: a wrong result is worth seeing here too.
    result["rel_err_vs_reference"] = {"out": rel_err(outs["triton"], outs["reference"]),
                                      "dx": rel_err(grads["triton"], grads["reference"])}
    return result


def case_device(choice: str):
    """The device a case program runs on: CUDA when there is one and `choice` allows it, else
    the CPU with the Triton interpreter (set before the kernels are imported, lazily, by ops)."""
    import torch

    if choice == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memcheck_case", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", metavar="FILE.json", default=None)
    args = p.parse_args(argv)
    device = case_device(args.device)
    cases = [run_case("oca", "vit-b16", "hard", device), run_case("layer", "text-b16", "soft", device)]
    payload = {"device": str(device), "triton_interpret": os.environ.get("TRITON_INTERPRET"), "cases": cases}
    for c in cases:
        err = c["rel_err_vs_reference"]
        print(f"{c['kernel']:5s} {c['shape']['name']}: finite {c['finite']}, rel. err vs reference: "
              f"out {err['out']:.1e}, dx {err['dx']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
    bad = [c["kernel"] for c in cases if not c["finite"] or any(math.isnan(v) for v in c["rel_err_vs_reference"].values())]
    if bad:
        print(f"non-finite results from: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
