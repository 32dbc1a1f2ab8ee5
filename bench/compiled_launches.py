"""The launches the real launchers make, captured and compiled for a GPU target without a GPU.

Shared by tests/kernel_compile_check.py (does every launch compile, fit and not spill?) and
`python -m bench.run --sass` (bench/sass_worker.py: what will the GPU wait on?).

The launchers in kernels/ run on CPU tensors under `nearl_kernels.runtime.instrumented(hook=...)`, so each
launch is captured instead of run (`capturing`). Each argument is specialised exactly as the Triton
JIT would (`specialize`: pointer dtypes, 16-divisibility, integers equal to 1 as constexprs), and
`compile_spec` compiles one launch with `triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))`, returning the CompiledKernel (metadata, `asm["sass"]`) and ptxas's report, printed
because the caller set TRITON_DUMP_PTXAS_LOG=1.

Import this module only without TRITON_INTERPRET (under it the kernels are interpreter objects,
which cannot be compiled), and with TRITON_CACHE_DIR / TRITON_DUMP_PTXAS_LOG already set: the
callers set their environment before anything imports triton.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise ImportError("compiled_launches compiles for a GPU target: import it without TRITON_INTERPRET "
                      "(run it in a subprocess, as tests/kernel_compile_check.py and bench.run --sass do)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:  # the JIT's own argument specialisation (triton >= 3.4)
    from triton._C.libtriton import native_specialize_impl  # noqa: E402

    def specialize(val):
        return native_specialize_impl(BaseBackend, val, False, True, True)
except ImportError:  # older triton: the same rules, written out
    _PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}

    def specialize(val):
        if isinstance(val, torch.Tensor):
            return _PTR[val.dtype], ("D" if val.data_ptr() % 16 == 0 else "")
        if isinstance(val, bool):
            return "i1", ""
        if isinstance(val, int):
            if val == 1:
                return "constexpr", 1
            return ("i32" if -2 ** 31 <= val < 2 ** 31 else "i64"), ("D" if val % 16 == 0 else "")
        raise TypeError(f"cannot specialise {type(val).__name__}")

import nearl  # noqa: E402,F401  (in an uninstalled checkout, maps nearl_kernels onto kernels/)
from nearl_kernels import layer_bwd_kernels as LKB  # noqa: E402
from nearl_kernels import layer_kernels as LK  # noqa: E402
from nearl_kernels import layer_norm_fork as LNF  # noqa: E402
from nearl_kernels import oca as K  # noqa: E402
from nearl_kernels import runtime  # noqa: E402

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in dynamic shared memory per block
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM (and per block) on sm_80 and sm_90
KERNELS = {k.__name__: k for k in (K._oca_fwd_kernel, K._oca_bwd_rows_kernel, K._oca_bwd_cols_kernel,
                                   LK.layer_fwd_kernel, LK.layer_attn_kernel, LKB.layer_bwd_dout_kernel,
                                   LKB.layer_bwd_rows_kernel,
                                   LKB.layer_bwd_cols_kernel, LNF._ln_fork_bwd_kernel)}

# (kernel name, signature, constexprs, specialisation attributes, options): picklable, one compile
Spec = Tuple[str, Dict[str, str], Dict[str, object], Dict[int, str], Dict[str, int]]


class Launch(NamedTuple):
    """One captured launch: its compile spec (and `key`, equal for launches that compile alike),
    the grid, and the launch's integer arguments by name (sizes, strides: for trip counts)."""
    key: str
    spec: Spec
    grid: Tuple[int, ...]
    ints: Dict[str, int]


def spec_of(kernel, args, kwargs) -> Tuple[str, Spec, Dict[str, int]]:
    """(key, spec, integer arguments) of one launch, specialised as the JIT specialises it."""
    names = kernel.arg_names
    sig, consts, attrs, ints = {}, {}, {}, {}
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg")}
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in opts})
    for i, (name, param) in enumerate(zip(names, kernel.params)):
        val = bound[name]
        if isinstance(val, int) and not isinstance(val, bool):
            ints[name] = val
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = val
            continue
        ty, attr = specialize(val)
        sig[name] = ty
        if ty == "constexpr":
            consts[name] = attr if attr is not None else val
        elif attr:
            attrs[i] = attr
    key = json.dumps([kernel.__name__, sig, {k: str(v) for k, v in consts.items()}, attrs, opts], sort_keys=True)
    return key, (kernel.__name__, sig, consts, attrs, opts), ints


@contextlib.contextmanager
def capturing(device_info: Optional[Tuple[int, int]] = None):
    """While active, every `runtime.launch` is captured, not run: yields the list of `Launch`es,
    in launch order. device_info (SM count, cc): what `runtime.device_info` answers meanwhile
    (the launchers' configuration depends on it when NEARL_TILING is unset)."""
    launches: List[Launch] = []

    def hook(kernel, grid, args, kwargs):
        key, spec, ints = spec_of(kernel, args, kwargs)
        launches.append(Launch(key, spec, tuple(int(g) for g in grid), ints))

    saved_info = runtime.device_info
    if device_info is not None:
        runtime.device_info = lambda device: device_info
    try:
        with runtime.instrumented(hook=hook):
            yield launches
    finally:
        runtime.device_info = saved_info


def compile_spec(spec: Spec, cc: int, cap: Optional[int] = None):
    """(CompiledKernel, ptxas log, seconds) of one launch for sm_`cc`; `cap`: a lower register
    ceiling than the launch names (None: as launched). Raises what triton.compile raises."""
    name, sig, consts, attrs, opts = spec
    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options(dict(opts, maxnreg=cap or opts["maxnreg"]))
    parse = getattr(backend, "parse_attr", lambda v: [["tt.divisibility", 16]] if "D" in v else [])
    attrs = {(i,): parse(v) for i, v in attrs.items()}
    log = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(log):  # ptxas -v prints its report here
        compiled = triton.compile(ASTSource(fn=KERNELS[name], signature=sig, constexprs=consts, attrs=attrs),
                                  target=target, options=options.__dict__)
    return compiled, log.getvalue(), time.time() - t0


def ptxas_usage(log: str) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(registers, spill store bytes, spill load bytes) from ptxas's report (None: no report)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None,
            int(spill.group(2)) if spill else None)


__all__ = ["specialize", "spec_of", "capturing", "compile_spec", "ptxas_usage", "Launch", "Spec", "KERNELS",
           "SHARED_LIMIT", "REGISTER_FILE"]
