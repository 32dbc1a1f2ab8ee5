"""Compile the OCA kernels for GPU targets without a GPU (run in a subprocess by
tests/kernels/test_kernel_compile.py, because under TRITON_INTERPRET=1 the kernels are interpreter objects).

The launchers in kernels/oca.py and kernels/layer.py run for real on small CPU tensors with
`nearl_kernels.runtime.instrumented(hook=...)`,
so each launch they would make is captured instead of run: kernel, constexprs, num_warps,
num_stages and the arguments (the capture and the compile of one launch live in
bench/compiled_launches.py, shared with `python -m bench.run --sass`). Each argument is specialised exactly as the Triton JIT would
(`native_specialize_impl`: pointer dtypes, 16-divisibility, integers equal to 1 as constexprs),
distinct launches are compiled once per target with `triton.compile(ASTSource(...))`, and the
shared memory (`metadata.shared`) plus the ptxas register / spill report is printed as one JSON line
per (target, launch). Nothing is cached across runs (a fresh TRITON_CACHE_DIR per run).

    python tests/kernel_compile_check.py [--full] [--targets 90,80] [--jobs 2]

Default: a covering set (every value of every constexpr of each kernel at least once, both dot
precisions, every orth mode, and the heaviest tiles: BLOCK_M = 64 with 64-column chunks).
--full: every configuration `_oca_config` can choose over d in multiples of 16 (represented by
d in {16, 32, 48, 64, 80, 96, 768}, which realise every chunk width), M in 1..64 (represented by
M in {16, 32, 64}, one per BLOCK_M), every orth mode, and x / parameter dtypes bf16/bf16,
bf16/fp32 (dot precision tf32), fp32/fp32 and fp16/fp16 (tf32x3).
Exit status 1 if any compile fails, exceeds shared memory or the register file, or spills
registers under pressure
(see `pressure_spill` and the test for why).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
for _name in ("NEARL_TILING", "NEARL_SM_COUNT"):  # the targets' own tiles, whatever the caller's environment
    os.environ.pop(_name, None)
if "NEARL_COMPILE_CHECK_CACHE" not in os.environ:  # workers (fork or spawn) share the parent's
    os.environ["NEARL_COMPILE_CHECK_CACHE"] = tempfile.mkdtemp(prefix="nearl_compile_check_")
    # a run compiles up to 800 MB of kernels: left behind, 251 runs had filled 16 GB of /tmp
    atexit.register(shutil.rmtree, os.environ["NEARL_COMPILE_CHECK_CACHE"], ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = os.environ["NEARL_COMPILE_CHECK_CACHE"]
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spills
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import nearl  # noqa: E402,F401  (in an uninstalled checkout, maps nearl_kernels and nearl_bench onto the folders)
from nearl_bench import compiled_launches as CL  # noqa: E402  (capture and compile, shared with bench.run --sass)
from nearl_kernels import layer as L  # noqa: E402
from nearl_kernels import layer_norm_fork as LNF  # noqa: E402
from nearl_kernels import oca as K  # noqa: E402
from nearl_kernels import policy  # noqa: E402
from nearl_kernels import runtime  # noqa: E402

SHARED_LIMIT = CL.SHARED_LIMIT  # opt-in dynamic shared memory per block
REGISTER_FILE = CL.REGISTER_FILE  # 32-bit registers per SM (and per block) on sm_80 and sm_90
KERNELS = CL.KERNELS

LAYER_COVER = [  # (d, M, D, heads, x dtype, orth, masked): the fused layer's launches
    (768, 16, 128, 4, torch.bfloat16, "hard", False),  # ViT-B/16 vision: the default
    (512, 16, 128, 4, torch.bfloat16, "soft", True),   # text tower, key mask
    (512, 16, 128, 4, torch.float32, "none", True),    # IEEE products
    (80, 5, 32, 4, torch.float16, "hard", True),       # small d: 16-column chunks
    (48, 8, 128, 4, torch.bfloat16, "soft", False),    # H*M = 32, a masked last chunk
    (256, 64, 64, 1, torch.bfloat16, "soft", True),    # M = 64 at H = 1: the split path
    (768, 8, 128, 4, torch.bfloat16, "hard", False),   # M % 16 != 0: A's masked loads (64-token tiles)
    (768, 64, 128, 4, torch.bfloat16, "hard", True),   # H*M = 256: the split path (OCA kernels only)
]

# (d, x dtype) of the split path's LayerNorm-fork backward: both tower widths, and the widest rows
# (one a program, up to 16 warps)
FORK_CASES = [(768, torch.bfloat16), (512, torch.float32), (80, torch.float16), (2048, torch.bfloat16),
              (8192, torch.float32)]

COVER = [  # (d, M, x dtype, a/c/gate dtype, orth)
    (768, 16, torch.bfloat16, torch.float32, "hard"),   # ViT-B/16 vision, tf32x3
    (768, 16, torch.bfloat16, torch.bfloat16, "soft"),  # tf32
    (512, 16, torch.float16, torch.float16, "none"),
    (768, 64, torch.bfloat16, torch.float32, "soft"),   # heaviest: BLOCK_M 64, 64-column chunks
    (768, 64, torch.float32, torch.float32, "hard"),
    (96, 33, torch.bfloat16, torch.float32, "none"),    # 32-column chunks, BLOCK_M 64
    (80, 5, torch.float32, torch.float32, "soft"),      # 16-column chunks, dA/dC chunk 128
    (48, 17, torch.bfloat16, torch.bfloat16, "hard"),   # BLOCK_M 32, dA/dC chunk 64
    (32, 32, torch.float16, torch.float16, "soft"),     # dA/dC chunk 32
    (16, 1, torch.float32, torch.float32, "none"),      # dA/dC chunk 16
]


def full_cases():
    dts = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),  # tf32
           (torch.float32, torch.float32), (torch.float16, torch.float16)]    # tf32x3
    for d, M, (xd, pd), orth in itertools.product((16, 32, 48, 64, 80, 96, 768), (16, 32, 64), dts,
                                                 ("none", "hard", "soft")):
        yield d, M, xd, pd, orth


def full_layer_cases():
    """Every layer configuration the launcher can choose, up to the tile sizes: the column chunk
    (d < 32: 16; d % 32 != 0: masked), BLOCK_HM (H*M of 16, 32, 64 at D = 128; larger H*M or D takes
    the split path), the dot precision (tf32 for half x, IEEE for fp32), every orth mode, masked or not."""
    for d, M, xd, orth, masked in itertools.product((16, 48, 768), (4, 8, 16), (torch.bfloat16, torch.float32),
                                                   ("none", "hard", "soft"), (False, True)):
        yield d, M, 128, 4, xd, orth, masked


FULL_GPU_BATCH = 132  # one sample per SM: no launcher splits a sample


@contextlib.contextmanager
def _restored_precision():
    saved = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def capture(cases, cc=90, B=8, N=197, layer_cases=LAYER_COVER):
    """Run the launchers with a launch hook (`CL.capturing`), as on a GPU of compute capability `cc` (the
    configuration depends on it); return the distinct launches as compile specs."""
    with CL.capturing(device_info=(132, cc)) as launches, _restored_precision():
        # float32 x at both of PyTorch's switches (policy.fp32_accurate_products): "highest" takes
        # float32-accurate products, "high" TF32 ones; B and a batch that fills the GPU: the
        # launchers split a sample's work only while the batch is small, and the one-split
        # configurations differ (the attention kernel's FINAL)
        for precision, batch in itertools.product(("highest", "high"), (B, FULL_GPU_BATCH)):
            torch.set_float32_matmul_precision(precision)
            for d, M, xd, pd, orth in cases:
                x = torch.empty(batch, N, d, dtype=xd)
                a = torch.empty(batch, d, M, dtype=pd)
                c = torch.empty(batch, M, d, dtype=pd)
                gate = torch.empty((), dtype=pd)
                dcos2 = torch.empty(batch, N) if orth == "soft" else None
                K.oca_fwd(x, a, c, gate, orth)
                K.oca_bwd(torch.empty_like(x), dcos2, x, a, c, gate, orth)
                # the split layer's: x_out and LN(x_out), with A the (d, B, M) view oca_factors makes
                a_s = torch.empty(d, batch, M, dtype=pd).permute(1, 0, 2)
                K.oca_norm_fwd(x, a_s, c, gate, orth)
                K.oca_bwd(torch.empty_like(x), dcos2, x, a_s, c, gate, orth)
            for d, xd in FORK_CASES:  # the split path's join of x_out's two gradients
                x = torch.empty(batch, N, d, dtype=xd)
                LNF.ln_fork_bwd(torch.empty_like(x), x, torch.empty_like(x))
            for d, M, D, H, xd, orth, masked in layer_cases:
                x = torch.empty(batch, N, d, dtype=xd)
                if not L.fused_supported(H * M, D, xd, x.device, M):  # the split path: OCA kernels, then torch
                    a, c, gate = torch.empty(d, batch, M).permute(1, 0, 2), torch.empty(batch, M, d), torch.empty(())
                    K.oca_norm_fwd(x, a, c, gate, orth)
                    K.oca_bwd(torch.empty_like(x), torch.empty(batch, N) if orth == "soft" else None, x, a, c, gate, orth)
                    continue
                low = policy.operand_dtype(xd)  # A, KABS and W_v as nearl.ops.fused_layer.layer_operands holds them
                a, c, cbar = torch.empty(batch, d, M, dtype=low), torch.empty(batch, M, d), torch.empty(batch, M)
                kabs = torch.empty(batch, H * M, d, dtype=low).transpose(1, 2)  # as absorbed_keys makes it
                w_v, gate = torch.empty(d, D, dtype=low), torch.empty(())
                mask = torch.ones(batch, N, dtype=torch.bool) if masked else None
                ops = L.LayerOperands(a, c, cbar, gate, kabs, w_v, L.small_products(a.float(), c, kabs.float(), w_v.float()))
                _, _, saved = L.layer_fwd(x, ops, mask, orth)
                L.layer_bwd(x, ops, mask, orth, saved, dout=torch.empty_like(x),
                            dcos2=torch.empty(batch, N) if orth == "soft" else None, du_all=saved.u_all)
    specs = {}  # distinct launches, in the order first seen
    for launch in launches:
        specs.setdefault(launch.key, launch.spec)
    return list(specs.values())


def compile_one(job):
    spec, cc, cap = job  # cap: None = as launched, else a lower ceiling
    name, sig, consts, attrs, opts = spec
    opts = dict(opts, maxnreg=cap or opts["maxnreg"])
    row = {"cc": cc, "kernel": name, **{k: (v if isinstance(v, (int, str)) else str(v))
                                         for k, v in consts.items() if k.isupper()}, **opts}
    try:
        compiled, text, seconds = CL.compile_spec(spec, cc, cap)
    except Exception as err:  # a compile failure is a result to report, not a crash
        row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:2000]}")
        return row
    n_regs, stores, loads = CL.ptxas_usage(text)
    if n_regs is None and torch.cuda.is_available() and cc == 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]:
        try:  # no ptxas log (older triton): load the module, the driver reports both
            compiled._init_handles()
            n_regs, stores = compiled.n_regs, compiled.n_spills
        except Exception:
            pass
    row.update(ok=True, seconds=round(seconds, 1), shared=compiled.metadata.shared,
               n_regs=n_regs, spill_stores=stores, spill_loads=loads,
               sig={k: v for k, v in sig.items() if v != "constexpr" and not v.startswith("*")})
    row["shared_ok"] = compiled.metadata.shared <= SHARED_LIMIT[cc]
    # a block's registers must fit the SM's 64K register file, or the launch fails on the GPU
    row["regs_ok"] = n_regs is None or n_regs * 32 * opts["num_warps"] <= REGISTER_FILE
    return row


# Register headroom. Every launch names a ceiling of 255 registers per thread (the hardware's;
# nearl_kernels.runtime.MAX_REGISTERS), and ptxas tends to use what it is given, so the register count of
# a compile says little about how close a kernel is to spilling. Each launch is therefore compiled
# twice: as the launcher makes it (it must not spill a byte), and with ptxas capped at REG_BUDGET
# registers (it must not spill there either). A configuration that fits in 224 registers keeps 31
# (12%) in reserve for the next ptxas: triton 3.6 -> 3.8 moved two configurations by 8 to 56 bytes
# of spill at the 255 cap, about 2-14 registers' worth.
REG_BUDGET = 224


def headroom_cap(spec, budget: int = REG_BUDGET) -> int:
    """The headroom compile's ceiling: `budget` of the hardware's 255 registers, and the same share
    of a lower ceiling that a launch names for occupancy (128 for 16 warps per SM -> 112)."""
    launched = spec[4]["maxnreg"]
    return min(budget, launched * budget // runtime.MAX_REGISTERS)


def spilled(row) -> bool:
    return bool(row.get("spill_stores"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--targets", default="90,80")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--budget", type=int, default=REG_BUDGET, help="register cap of the headroom compile")
    args = ap.parse_args(argv)
    t0 = time.time()
    # --full keeps the covering set too: its shapes (d = 512, for one) specialise launches the grid lacks
    cases = COVER + list(full_cases()) if args.full else COVER
    layer_cases = LAYER_COVER + list(full_layer_cases()) if args.full else LAYER_COVER
    jobs = [(spec, int(cc), cap) for cc in args.targets.split(",")
            for spec in capture(cases, int(cc), layer_cases=layer_cases) for cap in (None, headroom_cap(spec, args.budget))]
    print(json.dumps({"cases": len(cases) + len(layer_cases), "compiles": len(jobs),
                      "budget": args.budget}), flush=True)
    bad = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(compile_one, jobs):
            if row["ok"]:
                row["spilled"] = spilled(row)
            if not row["ok"] or not row["shared_ok"] or not row["regs_ok"] or row["spilled"]:
                bad += 1
            print(json.dumps(row), flush=True)
    print(json.dumps({"failed": bad, "total_seconds": round(time.time() - t0, 1)}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
