"""Fused or split: which implementation of the layer `impl="triton"` runs, chosen per shape and said.

Speed is the goal, not the word "fused". The first rule that applies decides:
  1. NEARL_LAYER_PATH=fused|split (unset or "auto": the rules below). "fused" where the fused
     kernels cannot take the query bank or the width still runs split, and the log says why.
  2. A query bank the fused kernels cannot take (`nearl_kernels.layer.fused_supported`), or a token
     width d they cannot (`fused_takes_width`: a multiple of 16; the OCA kernels take any): split.
  3. No GPU (the Triton interpreter): fused, the kernels under test.
  4. The measured table of this GPU, `nearl/ops/layer_paths/<device name>.json` (written by
     `python -m bench.gpu_check`'s sweep, timed on that GPU): its entry for the shape's bucket.
  5. The model's table for the GPU's architecture, `nearl/ops/layer_paths/model-sm<cc>.json` (written by
     `python -m bench.layer_table`, from bench.run --sass's latency / roofline MODEL, not a
     measurement): its nearest entry.
  6. None of these: fused.
From a table, a call that will be differentiated compares forward + backward times, one that
will not (predict, evaluate) forward times. Each choice is logged once (logger "nearl.layer").

A bucket: (d, N rounded up to a power of two, H*M query rows, 16-bit or float32 x (float32 at
"high" matmul precision counts as 16-bit: TF32 products), the batch in waves: B*N tokens over 256
per SM, rounded up to a power of two from 1/8).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from nearl_kernels import layer as L
from nearl_kernels import runtime

PATHS = ("fused", "split")
ENV = "NEARL_LAYER_PATH"
TABLES = Path(__file__).resolve().parent / "layer_paths"
TOKENS_PER_SM = 256  # a wave: one 256-token tile per SM
logger = logging.getLogger("nearl.layer")


@dataclass(frozen=True)
class Bucket:
    d: int
    n: int        # tokens, rounded up to a power of two
    hm: int       # query rows: heads x queries
    dtype: str    # "16bit" or "fp32"
    waves: float  # B*N / (SMs x 256), rounded up to a power of two, at least 1/8

    def to_dict(self) -> dict:
        return asdict(self)


def _pow2_ceil(v: float, floor: float) -> float:
    return max(floor, 2.0 ** math.ceil(math.log2(max(v, 1e-9))))


def bucket(B: int, N: int, d: int, hm: int, dtype: torch.dtype, sm_count: int) -> Bucket:
    # float32 x at "high" / "medium" matmul precision takes the TF32 products of bf16 x
    # (policy.fp32_accurate_products): its costs are the 16-bit bucket's, not float32's
    fp32 = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    kind = "fp32" if fp32 else "16bit"
    return Bucket(d, int(_pow2_ceil(N, 1)), hm, kind, _pow2_ceil(B * N / (sm_count * TOKENS_PER_SM), 0.125))


def device_file_name(name: str) -> str:
    """The measured table's file for a GPU named `name` (torch.cuda.get_device_name)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json"


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> Optional[dict]:
    """A table file, or None when there is none; a broken one is an error naming the file."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            table = json.load(f)
        entries = table["entries"]
        for e in entries:
            Bucket(**e["bucket"]), e["fused"]["fwd_s"], e["split"]["fwd_s"]  # noqa: B018 (shape check)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"layer path table {path} is unreadable ({type(err).__name__}: {err}); delete it or "
                         f"rewrite it with python -m bench.gpu_check") from None
    return table


def _seconds(entry: dict, path: str, grad: bool) -> float:
    t = entry[path]
    return t["fwd_s"] + ((t.get("bwd_s") or 0.0) if grad else 0.0)


def _distance(a: Bucket, b: dict) -> float:
    if a.dtype != b["dtype"]:
        return math.inf
    return sum(abs(math.log2(getattr(a, k) / b[k])) for k in ("d", "n", "hm", "waves"))


def from_table(table: dict, key: Bucket, grad: bool, exact: bool) -> Optional[Tuple[str, str]]:
    """(path, reason) from a table's entry for `key` (exact) or its nearest one, or None."""
    entries = [(e, _distance(key, e["bucket"])) for e in table["entries"]]
    entries = [(e, dist) for e, dist in entries if (dist == 0 if exact else math.isfinite(dist))]
    if not entries:
        return None
    entry, dist = min(entries, key=lambda ed: ed[1])
    fused, split = _seconds(entry, "fused", grad), _seconds(entry, "split", grad)
    path = "fused" if fused <= split else "split"
    what = "forward + backward" if grad else "forward"
    near = "" if dist == 0 else f" (nearest entry, bucket {entry['bucket']})"
    return path, (f"{table.get('source', 'table')}; {what}: fused {fused * 1e6:.0f} us, split {split * 1e6:.0f} us"
                  f"{near}")


def _env_path() -> Optional[str]:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise ValueError(f"{ENV}={value!r}: accepted values are fused, split, auto (or unset)")
    return value


def _gpu(device: torch.device) -> Optional[Tuple[str, int, int]]:
    """(device name, SM count, compute capability) of the GPU, or None: no GPU (the interpreter)."""
    if runtime.interpreting() or device.type != "cuda":
        return None
    _, sm_count, cc = runtime.tiling(device)
    return torch.cuda.get_device_name(device), sm_count, cc


def choose(shape: Tuple[int, int, int], dtype: torch.dtype, device: torch.device, hm: int, D: int, M: int,
           grad: bool) -> Tuple[str, str]:
    """(path, reason) for the layer on x of `shape` (B, N, d) with hm = H*M query rows (M per head) of
    width D; `grad`: whether the call will be differentiated."""
    forced = _env_path()
    if not L.fused_supported(hm, D, dtype, device, M):
        why = f"the fused kernels take at most {L.MAX_FUSED_HM} query rows of width {L.MAX_FUSED_D}, at most " \
              f"{L.MAX_FUSED_M} per head (here {hm} of {D}, {M} per head) in {dtype} on this GPU"
        return "split", (f"{ENV}=fused, but " if forced == "fused" else "") + why
    if not L.fused_takes_width(shape[2]):
        why = f"the fused kernels take d a multiple of 16 (here d = {shape[2]}); the split path's kernels take any"
        return "split", (f"{ENV}=fused, but " if forced == "fused" else "") + why
    if forced:
        return forced, f"{ENV}={forced}"
    gpu = _gpu(device)
    if gpu is None:
        return "fused", "no GPU: the Triton interpreter runs the fused kernels"
    name, sm_count, cc = gpu
    key = bucket(*shape, hm, dtype, sm_count)
    tables = ((TABLES / device_file_name(name), True), (TABLES / f"model-sm{cc}.json", False))
    for file, exact in tables:
        table = load_table(str(file))
        picked = table and from_table(table, key, grad, exact)
        if picked:
            return picked[0], f"{file.name}: {picked[1]}"
    return "fused", f"no table entry for {name} (sm_{cc}) and this shape"


# decide()'s answers, by its arguments and what else choose() reads (the environment switches and
# float32's matmul precision): a layer call then costs a dict lookup, where choose() takes ~20 us
# (its table walk), every adapted layer, every step. Tables are read once (load_table).
_chosen = {}
_said = set()


def _switches() -> tuple:
    return (*(os.environ.get(k, "") for k in (ENV, "NEARL_TILING", "NEARL_SM_COUNT", "TRITON_INTERPRET")),
            torch.get_float32_matmul_precision())


@torch._dynamo.assume_constant_result
def decide(shape: Tuple[int, int, int], dtype: torch.dtype, device: torch.device, hm: int, D: int, M: int,
           grad: bool) -> str:
    """`choose`'s path, its reason logged the first time (torch.compile calls this while tracing and
    keeps the answer, so the choice costs a compiled layer nothing)."""
    key = (tuple(shape), dtype, device, hm, D, M, grad, _switches())
    if key in _chosen:
        return _chosen[key]
    path, reason = choose(shape, dtype, device, hm, D, M, grad)
    _chosen[key] = path
    said = (path, reason, tuple(shape[1:]), dtype, hm)
    if said not in _said:
        _said.add(said)
        logger.info("NEARL layer on x %s %s, %d query rows: %s path (%s)", tuple(shape),
                    str(dtype).replace("torch.", ""), hm, path, reason)
    return path


__all__ = ["choose", "decide", "bucket", "Bucket", "device_file_name", "load_table", "from_table", "PATHS",
           "ENV", "TABLES"]
