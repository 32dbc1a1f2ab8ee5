"""`python -m bench.run`: the benchmarks of NEARL-CLIP.

    python -m bench.run --kernel oca                       # the headline: ops.oca, ViT-B-16 vision layer
    python -m bench.run --kernel oca --shape text-b16 --mode fwd --providers reference,triton
    python -m bench.run --kernel layer --shape text-b16 --out layer.json
    python -m bench.run --kernel model --batch 128 --profile model_trace.json
    python -m bench.run --kernel layer --traffic             # bytes moved, in passes over x (bench/traffic.py)
    python -m bench.run --kernel layer --sass                # SASS facts and a MODEL of GPU time (bench/sass_run.py)

Each row: median (p20, p80) time, effective GB/s over the minimum bytes and its % of the copy
bandwidth measured in the same run, speed-up over `reference`, relative error against a float64
reference. Without a GPU the command sets TRITON_INTERPRET=1 itself (before anything imports the
kernels), runs every provider at a small size on the CPU and says so: CPU times say nothing about
the kernels' GPU performance.

Profiling (the ranges are nested push/pop ranges "oca" > "triton" > "fwd" in the default domain; in
Nsight Compute's filter syntax '/' separates nested push/pop ranges and the trailing '/' marks them
as push/pop rather than start/end ranges, so "oca/triton/fwd/" selects the kernels launched inside;
-c 1 stops after one kernel, since every timed rep is in the range):

    nsys profile -t cuda,nvtx -o oca python -m bench.run --kernel oca --nvtx
    ncu --nvtx --nvtx-include "oca/triton/fwd/" --set full -c 1 -o oca \\
        python -m bench.run --kernel oca --nvtx --providers triton --mode fwd --reps 3
"""
from __future__ import annotations

import os
import sys


def _device_choice(argv) -> str:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "auto"


def _prepare_environment(argv) -> None:
    """TRITON_INTERPRET=1 when the run will be on the CPU (--traffic always is: it counts on the interpreter;
    so is --sass, whose traffic half counts here and whose compile half runs in a subprocess without it).

    Must happen before triton decorates any kernel; nearl.ops imports kernels/ lazily, on the first
    impl="triton" call, so setting it here, before the benchmark starts, is early enough.
    """
    import torch

    if "--traffic" in argv or "--sass" in argv or _device_choice(argv) == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv=None) -> int:
    _prepare_environment(sys.argv[1:] if argv is None else list(argv))
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
