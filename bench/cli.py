"""Argument parsing and the main function of `python -m bench.run` (see bench/run.py for the docs)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from .providers import PROVIDERS

KERNELS = ("oca", "layer", "model")

EPILOG = """\
without a GPU every provider runs at a small size on the CPU (the triton provider on the
TRITON_INTERPRET=1 interpreter) for correctness; the table then carries CPU times, not GPU speed.

traffic (bytes each kernel and torch op moves, in passes over x; CPU, no GPU needed):
  python -m bench.run --kernel layer --traffic --shape text-b16 --out traffic.json

SASS (registers, occupancy, loops, async copies, MMAs of every launch compiled for sm_90, and a
latency/roofline MODEL on top; CPU, no GPU needed):
  python -m bench.run --kernel layer --sass --shape text-b16 --out sass.json

profiling (see bench/README.md):
  nsys profile -t cuda,nvtx -o oca python -m bench.run --kernel oca --nvtx
  ncu --nvtx --nvtx-include "oca/triton/fwd/" --set full -c 1 -o oca \\
      python -m bench.run --kernel oca --nvtx --providers triton --mode fwd --reps 3
  python -m bench.run --kernel model --profile model_trace.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Benchmarks of NEARL-CLIP: the OCA op, one NEARL layer, or the whole model.")
    p.add_argument("--kernel", choices=KERNELS, default="oca",
                   help="oca: ops.oca; layer: ops.nearl_layer; model: NEARL-CLIP end to end (default: oca)")
    g = p.add_argument_group("problem (oca / layer)")
    g.add_argument("--shape", choices=("vit-b16", "text-b16"), default=None,
                   help="vit-b16: B 256, N 197, d 768; text-b16: B 256, N 77, d 512 with a padding mask "
                        "(default: vit-b16; on CPU they shrink to B 2, N 65 / 77, d 64)")
    for name, help_text in (("B", "batch"), ("N", "tokens"), ("d", "width"), ("M", "queries (16)"),
                            ("D", "query width, layer only (128)"), ("H", "query heads, layer only (4)"),
                            ("r", "OCA rank, layer only (32)")):
        g.add_argument(f"--{name}", type=int, default=None, metavar="INT", help=f"{help_text}; overrides --shape")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="input dtype (for --kernel model: the autocast dtype; fp32 = no autocast)")
    g.add_argument("--mode", default=None,
                   help="comma list of fwd, bwd, fwd+bwd, or 'all' (default: all)")
    g.add_argument("--orth", choices=("hard", "soft", "none"), default="hard")
    g.add_argument("--providers", default=None,
                   help=f"comma list of {', '.join(PROVIDERS)} (default: all; with --traffic: triton)")
    g = p.add_argument_group("model (--kernel model)")
    g.add_argument("--model", default=None, help="open_clip architecture (default: ViT-B-16; NEARL-Tiny on CPU)")
    g.add_argument("--batch", type=int, default=None, help="batch size (default: 128; 8 on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="also run the training step with the frozen blocks checkpointed "
                        "(model.set_grad_checkpointing) and compare peak memory (CUDA only) and step time")
    g = p.add_argument_group("run")
    g.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: 100 on GPU, 20 for model; 5 / 3 on CPU)")
    g.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 on GPU; 1 on CPU)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--nvtx", action="store_true",
                   help="NVTX ranges per provider and phase, e.g. oca > triton > fwd (needs the nvtx package)")
    g.add_argument("--profile", metavar="FILE", default=None, help="write a torch profiler chrome trace")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="oca / layer: also time each provider and mode as the replay of one call captured in a CUDA "
                        "graph, rows '<provider> (graph)' (compile and a failed capture: skipped with the reason; "
                        "on the CPU every such row is skipped: CUDA graphs need a GPU)")
    g.add_argument("--out", metavar="FILE.json", default=None, help="write the results as JSON")
    g.add_argument("--traffic", action="store_true",
                   help="oca / layer: count the bytes each kernel and the op's torch operations move, in passes "
                        "over x, on the CPU interpreter with a GPU's tiling (NEARL_TILING, default h100) at the "
                        "real N and d, --B 2 splitting its work as B 256 does (modes fwd,bwd by default)")
    g = p.add_argument_group("SASS (--sass)")
    g.add_argument("--sass", action="store_true",
                   help="oca / layer: compile every launch the op makes at the GPU tiling (NEARL_TILING, default h100; "
                        "NEARL_SM_COUNT) for its GPU without one, and report per kernel registers, spills, shared "
                        "memory, occupancy, waves at --B (default: the shape's 256), loops, async copies, MMAs and a "
                        "loop-weighted instruction mix, then a latency/roofline MODEL (not a measurement) of the "
                        "triton provider (and split, for layer) from those facts and the --traffic byte counts "
                        "(modes fwd,bwd by default)")
    g.add_argument("--target", default=None, metavar="CC",
                   help="--sass: also compile for these targets, a comma list of 90, 80 (the tiling's own, 90 for "
                        "h100, always; the launches are those NEARL_TILING picks)")
    g.add_argument("--sass-dump", default=None, metavar="DIR", help="--sass: write each compiled SASS listing here")
    return p


SASS_PROVIDERS = ("triton", "split")


def _finish_sass_args(args: argparse.Namespace) -> None:
    """--sass's own defaults and checks (ValueError: a one-line parser error)."""
    if not args.sass:
        if args.target is not None or args.sass_dump is not None:
            raise ValueError("--target and --sass-dump go with --sass")
        return
    if args.kernel == "model":
        raise ValueError("--sass reads the launches of --kernel oca or layer, not model")
    if args.traffic:
        raise ValueError("--sass and --traffic are separate reports (--sass counts the traffic it needs itself)")
    if args.providers is None:
        args.providers = "triton,split" if args.kernel == "layer" else "triton"
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    if not names or any(n not in SASS_PROVIDERS for n in names):
        raise ValueError(f"--sass models the providers {', '.join(SASS_PROVIDERS)}, got {args.providers!r}")
    if "split" in names and args.kernel != "layer":
        raise ValueError("--providers split is the layer's unfused peer: --kernel layer only")
    targets = [t.strip() for t in (args.target or "").split(",") if t.strip()]
    if any(t not in ("90", "80") for t in targets):
        raise ValueError(f"--target takes a comma list of 90, 80, got {args.target!r}")
    args.sass_targets = [int(t) for t in targets]


def finish_args(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Defaults that depend on the kernel and the device, and parsed lists."""
    from .kernel_bench import parse_modes
    from .shapes import DTYPES

    on_gpu = device.type == "cuda"
    model = args.kernel == "model"
    if args.shape is None:
        args.shape = "vit-b16"
    if args.traffic and model:
        raise ValueError("--traffic counts --kernel oca or layer, not model")
    _finish_sass_args(args)
    if args.grad_checkpointing and not model:
        raise ValueError("--grad-checkpointing compares --kernel model's training step")
    if args.cuda_graphs and (model or args.traffic or args.sass):
        raise ValueError("--cuda-graphs times the rows of --kernel oca or layer (not model, --traffic or --sass)")
    if args.mode is None:
        args.mode = "fwd,bwd" if (args.traffic or args.sass) else "all"
    args.traffic_modes = parse_modes(args.mode)  # validate early
    if args.providers is None:
        args.providers = "triton" if args.traffic else ",".join(PROVIDERS)
    if args.reps is None:
        args.reps = (20 if model else 100) if on_gpu else (3 if model else 5)
    if args.warmup is None:
        args.warmup = (3 if model else 10) if on_gpu else 1
    if args.reps < 1 or args.warmup < 0:
        raise ValueError(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    bad = [n for n in names if n not in PROVIDERS]
    if bad or not names:
        raise ValueError(f"--providers takes a comma list of {', '.join(PROVIDERS)}, got {args.providers!r}")
    args.provider_list = list(dict.fromkeys(names))
    args.torch_dtype = DTYPES[args.dtype]
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice, torch.cuda.current_device()) if choice == "cuda" else torch.device("cpu")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device("cpu") if (args.traffic or args.sass) else pick_device(args.device)
        finish_args(args, device)
    except ValueError as err:
        parser.error(str(err))

    from .nvtx_ranges import Ranges

    ranges = Ranges(args.nvtx)
    if args.profile and device.type == "cpu":
        print("note: --profile on CPU records CPU activity only", file=sys.stderr)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The CPU problems are tiny; several intra-op threads on a shared machine turn a 0.3 ms op
        # into 60 ms of scheduler waits. One thread keeps the CPU (correctness) run quick and steady.
        torch.set_num_threads(1)
    try:
        return _run(parser, args, device, ranges)
    finally:
        torch.set_num_threads(threads)


def _run(parser, args, device, ranges) -> int:
    from .report import write_json

    try:
        if args.traffic:
            from .traffic import run_traffic
            payload, text = run_traffic(args.kernel, args)
            rows = payload["rows"]
        elif args.sass:
            from .sass_run import run_sass
            payload, text = run_sass(args.kernel, args)
            rows = payload["rows"]
        elif args.kernel == "model":
            from .model_bench import run_model
            payload, text = run_model(args, device, ranges)
            rows = payload["inference"] + payload["train"]
        else:
            from .kernel_bench import run_kernel
            payload, text = run_kernel(args.kernel, args, device, ranges)
            rows = payload["rows"]
    except ValueError as err:  # a bad size or option found while building the problem
        parser.error(str(err))
    print(text)
    if args.out:
        write_json(args.out, payload)
        print(f"results written to {args.out}")
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} row(s) FAILED (see the table)", file=sys.stderr)
        return 1
    return 0
