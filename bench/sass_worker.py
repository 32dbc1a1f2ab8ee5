"""The compile half of `python -m bench.run --sass`, in its own process:

    python -m bench.sass_worker REQUEST.json RESULT.json

It must run without TRITON_INTERPRET (under it the kernels are interpreter objects), while the
traffic half of --sass must run under it, so bench/sass_run.py starts this as a subprocess. It
drives the op (triton provider: ops.oca / the layer's fused path; split: its split path) on CPU
tensors at the small batch and SM count whose launch configurations equal B's on the whole GPU,
with every launch captured instead of run (bench/compiled_launches.py), compiles each distinct
launch for each target in a pool of `jobs` processes, and writes per launch its grid at B and per
compile the ptxas report, shared memory and the SASS summary (bench/sass_summary.py). A fresh
TRITON_CACHE_DIR is used and removed on exit.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
if "NEARL_SASS_CACHE" not in os.environ:  # pool workers (fork or spawn) share the parent's
    os.environ["NEARL_SASS_CACHE"] = tempfile.mkdtemp(prefix="nearl_sass_")
    atexit.register(shutil.rmtree, os.environ["NEARL_SASS_CACHE"], ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = os.environ["NEARL_SASS_CACHE"]
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spills
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import contextlib  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402

from . import compiled_launches as CL  # noqa: E402
from .sass_summary import summarise_sass  # noqa: E402


@contextlib.contextmanager
def _triton_path_on_cpu():
    """ops.* refuse impl="triton" on CPU tensors without the interpreter; with every launch
    captured, nothing runs, so let them take the kernels' path (the launchers themselves read no
    interpreter flag but ROUND_BY_HAND, which stays False: the GPU's code)."""
    from nearl import ops

    saved = ops.interpreting
    ops.interpreting = lambda: True
    try:
        yield
    finally:
        ops.interpreting = saved


def _provider(name: str, kernel: str, orth: str):
    from nearl import ops

    from . import providers as prov

    if kernel == "oca":
        return lambda x, a, c, gate: ops.oca(x, a, c, gate, orth=orth, impl="triton")
    return prov.layer_path_fn(orth, "split" if name == "split" else "fused")


def capture_mode(case, fn, mode: str) -> list:
    """The launches of one call in `mode`, as bench.traffic.count_call counts them: fwd (inference
    inputs), bwd (the backward of a forward whose launches are not kept), fwd+bwd."""
    from .kernel_bench import differentiable
    from .shapes import split_outputs

    if mode == "fwd":
        with CL.capturing() as launches:
            case.invoke(fn, case.clone(requires_grad=False))
        return launches
    t = case.clone(requires_grad=True)
    with CL.capturing() as launches:
        outs = differentiable(split_outputs(case.invoke(fn, t)))
    if mode == "bwd":
        launches.clear()
    with CL.capturing() as more:
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return launches + more


def capture_all(req: dict) -> list:
    """[(provider, mode, Launch)] of the request, at its small batch."""
    from .shapes import DTYPES, Shape, make_case
    from .traffic import environ

    shape = Shape(**dict(req["shape"], B=req["small_B"]))
    case = make_case(req["kernel"], shape, DTYPES[req["dtype"]], req["orth"], torch.device("cpu"), seed=req["seed"])
    out = []
    for provider in req["providers"]:
        fn = _provider(provider, req["kernel"], req["orth"])
        for mode in req["modes"]:
            with environ(NEARL_TILING=req["tiling"], NEARL_SM_COUNT=str(req["small_sm_count"])), _triton_path_on_cpu():
                out += [(provider, mode, launch) for launch in capture_mode(case, fn, mode)]
    return out


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def compile_job(job) -> dict:
    """Compile one launch for one target; its facts and SASS summary, or the error."""
    spec, cc, dump_dir, index = job
    try:
        compiled, log, seconds = CL.compile_spec(spec, cc)
    except Exception as err:  # a compile failure is a result to report, not a crash
        return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
    sass = compiled.asm["sass"]
    if dump_dir:
        with open(os.path.join(dump_dir, f"{index:02d}_{spec[0]}_sm{cc}.sass"), "w") as f:
            f.write(sass)
    regs, stores, loads = CL.ptxas_usage(log)
    return {"ok": True, "seconds": round(seconds, 2), "n_regs": regs, "spill_stores": stores, "spill_loads": loads,
            "shared": compiled.metadata.shared, "summary": summarise_sass(sass)}


def run(req: dict) -> dict:
    t0 = time.time()
    captured = capture_all(req)
    keys, specs, launches = {}, [], []
    for provider, mode, launch in captured:
        if launch.grid[-1] != req["small_B"]:  # every launcher's grid ends with the batch
            raise RuntimeError(f"{launch.spec[0]}: grid {launch.grid} does not end with the batch "
                               f"{req['small_B']}; cannot scale it to B={req['B']}")
        if launch.key not in keys:
            keys[launch.key] = len(specs)
            specs.append(launch.spec)
        name, _, consts, _, opts = launch.spec
        launches.append({"provider": provider, "mode": mode, "kernel": name, "compile": keys[launch.key],
                         "grid": list(launch.grid[:-1]) + [req["B"]], "grid_small": list(launch.grid),
                         "consts": {k: _jsonable(v) for k, v in consts.items()}, "opts": opts, "ints": launch.ints})
    if req.get("dump_dir"):
        os.makedirs(req["dump_dir"], exist_ok=True)
    jobs = [(spec, cc, req.get("dump_dir"), i) for i, spec in enumerate(specs) for cc in req["targets"]]
    with ProcessPoolExecutor(max_workers=max(1, req.get("jobs", 2))) as pool:
        results = list(pool.map(compile_job, jobs))
    compiled = [{"kernel": spec[0], "targets": {}} for spec in specs]
    for (_, cc, _, i), res in zip(jobs, results):
        compiled[i]["targets"][str(cc)] = res
    return {"launches": launches, "compiled": compiled, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        req = json.load(f)
    result = run(req)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
