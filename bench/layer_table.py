"""`python -m bench.layer_table`: the tables `nearl.ops.layer_path` chooses the layer's path from.

    python -m bench.layer_table estimate          # CPU: the MODEL's table, nearl/ops/layer_paths/model-sm90.json
    NEARL_TILING=a100 python -m bench.layer_table estimate    # ... and sm_80's, model-sm80.json
    python -m bench.layer_table measure           # GPU: this GPU's table, nearl/ops/layer_paths/<device name>.json

estimate: for each shape, batch and dtype, `python -m bench.run --kernel layer --sass` (the SASS of
every launch at the GPU tiling and its latency / roofline MODEL, not a measurement) and the model's
forward and backward times of the `triton` (fused) and `split` providers. The chooser reads the
pessimistic set's times (the optimistic set's are kept beside them).
measure: on the GPU, both paths timed forward and backward at each bucket (medians of CUDA-event
times, L2 flushed), the fused one at the tiling the launchers pick. Buckets are nearl.ops.layer_path's.
Both write one JSON file: device, versions, the command, and an entry per bucket.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Tuple

import torch

from nearl.ops import layer_path

from .report import environment, write_json
from .shapes import DTYPES, make_case, resolve_shape

SHAPES = ("vit-b16", "text-b16")
BATCHES = (8, 32, 256)
MODEL_SET = "pessimistic"  # what the chooser reads from an estimate: the set issue 23's goal is judged by


def _bucket(shape, dtype: torch.dtype, sm_count: int) -> dict:
    return layer_path.bucket(shape.B, shape.N, shape.d, shape.H * shape.M, dtype, sm_count).to_dict()


def _planned_bucket(shape_name: str, B: int, dtype: str, what: str) -> dict:
    """The bucket a grid point will fill, known before it runs: the GPU's SM count when measuring,
    else the tiling's that `bench.run --sass` models (NEARL_TILING, default h100; NEARL_SM_COUNT)."""
    shape = resolve_shape(shape_name, {"B": B}, on_gpu=True)
    if what == "measure":
        sm_count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    else:
        sm_count = _model_tiling()[0]
    return _bucket(shape, DTYPES[dtype], sm_count)


def _model_tiling() -> Tuple[int, int]:
    """(SM count, compute capability) of the GPU `bench.run --sass` models: NEARL_TILING's (an H100's
    when it is unset), NEARL_SM_COUNT's SM count; a bad value is a ValueError naming the variable."""
    from nearl_kernels import runtime
    _, sm_count, cc = runtime.tiling(torch.device("cpu"))
    return sm_count, cc


def _model_times(payload: dict, provider: str) -> dict:
    ops = {o["mode"]: o["total_s"] for o in payload["model"]["ops"] if o["provider"] == provider}
    out = {"fwd_s": ops["fwd"][MODEL_SET], "bwd_s": ops["bwd"][MODEL_SET]}
    out.update({f"{mode}_s_{name}": t for mode, sets in ops.items() for name, t in sets.items()})
    return out


def sass_payload(shape_name: str, B: int, dtype: str, timeout_s: float) -> dict:
    """A `bench.run --kernel layer --sass` run's payload, from a subprocess (it sets TRITON_INTERPRET itself)."""
    with tempfile.TemporaryDirectory(prefix="nearl_layer_table_") as tmp:
        out = os.path.join(tmp, "sass.json")
        cmd = [sys.executable, "-m", f"{__package__ or 'bench'}.run", "--kernel", "layer", "--sass", "--shape",
               shape_name, "--B", str(B), "--dtype", dtype, "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(cmd[2:])} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def estimate_entry(shape_name: str, B: int, dtype: str, timeout_s: float) -> dict:
    """One bucket from the model of a --sass run."""
    payload = sass_payload(shape_name, B, dtype, timeout_s)
    shape = resolve_shape(shape_name, {"B": B}, on_gpu=True)
    sm_count = payload["tiling"]["sm_count"]
    return {"bucket": _bucket(shape, DTYPES[dtype], sm_count), "shape": shape.to_dict(), "dtype": dtype,
            "fused": _model_times(payload, "triton"), "split": _model_times(payload, "split")}


def measure_entry(shape_name: str, B: int, dtype: str, reps: int, warmup: int) -> dict:
    """One bucket timed on this GPU: both paths, forward (inference) and backward."""
    from .kernel_bench import make_runner
    from .providers import layer_path_fn
    from .shapes import split_outputs
    from .timing import Timer

    device = torch.device("cuda", torch.cuda.current_device())
    shape = resolve_shape(shape_name, {"B": B}, on_gpu=True)
    case = make_case("layer", shape, DTYPES[dtype], "hard", device)
    douts = [torch.randn_like(o) for o in split_outputs(case.invoke(layer_path_fn("hard", "split"),
                                                                      case.clone(False)))]
    timer, out = Timer(device), {}
    for path in layer_path.PATHS:
        fn = layer_path_fn("hard", path)
        times = {}
        for mode in ("fwd", "bwd"):
            run, setup = make_runner(case, fn, mode, douts)
            t = timer.time(run, reps=reps, warmup=warmup, setup=setup)
            times[f"{mode}_s"], times[f"{mode}_p20_p80_ms"] = t.median_ms / 1e3, [t.p20_ms, t.p80_ms]
        out[path] = times
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return {"bucket": _bucket(shape, DTYPES[dtype], sm_count), "shape": shape.to_dict(), "dtype": dtype, **out}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.layer_table", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("estimate", "measure"))
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of bench.run shapes")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma list of batch sizes")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--out", default=None, help="the table's file (default: nearl/ops/layer_paths/<its name>)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting entries after this long")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    return p


def _grid(args) -> List[tuple]:
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    for s in shapes:
        resolve_shape(s, {}, on_gpu=True)  # a bad name: ValueError naming it
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    return [(s, b, d) for s in shapes for b in batches for d in dtypes]


def _default_out(what: str) -> str:
    if what == "estimate":  # the model of the GPU NEARL_TILING names (bench.run --sass's default: h100)
        return str(layer_path.TABLES / f"model-sm{_model_tiling()[1]}.json")
    return str(layer_path.TABLES / layer_path.device_file_name(torch.cuda.get_device_name()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.what == "measure" and not torch.cuda.is_available():
        parser.error("measure times the paths on a GPU, and there is none here; `estimate` runs on the CPU")
    try:
        grid = _grid(args)
        if args.what == "estimate":
            _model_tiling()  # a bad NEARL_TILING / NEARL_SM_COUNT is one line, whatever --out says
        out = args.out or _default_out(args.what)
    except ValueError as err:
        parser.error(str(err))
    start, entries, skipped, failed, same, filled = time.monotonic(), [], [], [], [], {}
    for shape_name, B, dtype in grid:
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            skipped.append([shape_name, B, dtype])
            continue
        # one entry a bucket: the chooser looks buckets up, and a second entry would be one it never reads
        bucket = json.dumps(_planned_bucket(shape_name, B, dtype, args.what), sort_keys=True)
        if bucket in filled:
            print(f"{args.what}: {shape_name} B={B} {dtype} falls in the bucket of {filled[bucket]}: not run")
            same.append([shape_name, B, dtype, filled[bucket]])
            continue
        filled[bucket] = f"{shape_name} B={B} {dtype}"
        print(f"{args.what}: {shape_name} B={B} {dtype}", flush=True)
        try:
            entries.append(estimate_entry(shape_name, B, dtype, timeout_s=1800) if args.what == "estimate"
                           else measure_entry(shape_name, B, dtype, args.reps, args.warmup))
        except (RuntimeError, ValueError) as err:  # one bucket's failure is written down, not the end
            print(f"  failed: {err}", file=sys.stderr)
            failed.append([shape_name, B, dtype, str(err)[-500:]])
    source = (f"MODEL ({MODEL_SET} set of bench.run --sass), not a measurement" if args.what == "estimate"
              else "measured")
    device = torch.device("cuda") if args.what == "measure" else torch.device("cpu")
    # the command as a user types it (environment()'s is sys.argv: this machine's absolute path of the file)
    write_json(out, {"source": source, **environment(device),
                     "command": "python -m bench.layer_table " + " ".join(argv or sys.argv[1:]), "skipped_for_budget": skipped, "same_bucket": same, "failed": failed,
                     "entries": entries})
    print(f"{len(entries)} entries written to {out}" + (f"; {len(skipped)} skipped for the budget" if skipped else "")
          + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
