"""Counting the bytes an op moves: its Triton kernels on the interpreter, its torch operations by
their tensors. Used by `python -m bench.run --traffic` (bench/traffic.py).

Kernels. Under TRITON_INTERPRET=1 every `tl.load` / `tl.store` goes through the interpreter's
builder (`create_load` / `create_store` call `create_masked_load` / `create_masked_store`); while
`KernelTraffic` is active those two are wrapped, and each access counts its active (mask-true)
elements times the element size: the bytes the program requests from global memory, before any
cache. Each address is attributed to the tensor argument of the launch it falls in (launches are
caught through `nearl_kernels.runtime.instrumented(hook=...)`); an address in none of them is an error (an
out-of-bounds access, or an access kind the counter does not know). Atomics, block pointers and
tensor descriptors are not counted: a kernel that uses them makes the counter raise rather than
undercount.

Torch operations. `TorchTraffic` is a TorchDispatchMode that sees every aten operation run outside
the kernels (so also the autograd backward of the op's torch part) and counts the bytes of the
tensors it reads and writes: inputs read, outputs written; views and `torch.empty`-style
allocations move nothing and count nothing; an in-place op writes its destination (and reads it
too, unless it only overwrites it: copy_, fill_, zero_); an expanded (stride-0) operand counts
what the op requests, its logical size.

Token-sized vs small: a tensor with an axis of length N (or B * N): x, the outputs, gradients and
per-token scratch; everything else (per-sample A, C, absorbed keys, partial sums, weights) is small.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nearl_kernels import runtime

CLASSES = ("token", "small")


class Classifier:
    """'token' for a shape with an axis of length N (or B * N), else 'small'."""

    def __init__(self, B: int, N: int):
        self.B, self.N = B, N

    def __call__(self, shape: Sequence[int]) -> str:
        return "token" if (self.N in shape or self.B * self.N in shape) else "small"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------- kernels
class _Span:
    __slots__ = ("start", "end", "label", "cls")

    def __init__(self, start: int, end: int, label: str, cls: str):
        self.start, self.end, self.label, self.cls = start, end, label, cls


def _tensor_span(t: torch.Tensor) -> Tuple[int, int]:
    """[first byte, one past the last byte) that a (possibly strided) tensor can address."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


# Builder methods that touch memory without going through create_masked_load / _store.
_UNCOUNTED = ("create_atomic_cas", "create_atomic_rmw", "create_tensor_pointer_load",
              "create_tensor_pointer_store", "create_descriptor_load", "create_descriptor_store",
              "create_descriptor_gather", "create_descriptor_scatter")


class KernelTraffic:
    """While active: every kernel launch of kernels/ runs on the interpreter (or is skipped, with
    run=False) and its loads and stores are counted per kernel name and tensor argument.

    records[kernel] = {"launches": n, "tensors": {label: {"class", "load", "store"}}}, in bytes.
    `around_launch` (a context manager factory) wraps each launch: TorchTraffic.paused.
    """

    def __init__(self, classify: Classifier, run: bool = True, around_launch: Optional[Callable] = None):
        self.classify = classify
        self.run = run
        self.around_launch = around_launch or contextlib.nullcontext
        self.records: Dict[str, dict] = {}
        self._spans: List[_Span] = []
        self._current: Optional[dict] = None

    # ---------------------------------------------------------------- launches
    def _launch(self, kernel, grid, args, kwargs) -> None:
        name = kernel.__name__
        rec = self.records.setdefault(name, {"launches": 0, "tensors": {}})
        rec["launches"] += 1
        spans: Dict[Tuple[int, int], _Span] = {}
        for arg_name, value in list(zip(kernel.arg_names, args)) + list(kwargs.items()):
            if not isinstance(value, torch.Tensor):
                continue
            key = _tensor_span(value)
            if key in spans:  # one buffer passed twice (a placeholder for an unused pointer)
                spans[key].label += "=" + arg_name
            else:
                spans[key] = _Span(*key, arg_name, self.classify(value.shape))
        self._spans = list(spans.values())
        self._current = rec
        if not self.run:
            return
        try:
            with self.around_launch():
                runtime.run(kernel, grid, args, kwargs)
        finally:
            self._current = None

    def _count(self, ptrs, mask, kind: str) -> None:
        rec = self._current
        if rec is None:  # a kernel launched some other way than runtime.launch
            raise RuntimeError("traffic counter: a kernel ran outside nearl_kernels.runtime.launch")
        addr = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            m = np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data)).reshape(-1)
            addr = addr[m.astype(bool)]
        if addr.size == 0:
            return
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        addr = addr.astype(np.uint64)
        lo, hi = int(addr.min()), int(addr.max())
        for span in self._spans:
            if span.start <= lo and hi + size <= span.end:  # the usual case: one tensor
                self._add(rec, span, kind, addr.size * size)
                return
        left = addr
        for span in self._spans:
            inside = (left >= span.start) & (left + size <= span.end)
            n = int(inside.sum())
            if n:
                self._add(rec, span, kind, n * size)
                left = left[~inside]
            if left.size == 0:
                return
        raise RuntimeError(f"traffic counter: a {kind} of {left.size} element(s) at addresses outside every "
                           f"tensor argument of the launch (e.g. {int(left[0]):#x})")

    @staticmethod
    def _add(rec: dict, span: _Span, kind: str, nbytes: int) -> None:
        t = rec["tensors"].setdefault(span.label, {"class": span.cls, "load": 0, "store": 0})
        t[kind] += nbytes

    # ---------------------------------------------------------------- install / remove
    def __enter__(self):
        if not runtime.interpreting():
            raise RuntimeError("the traffic counter needs the Triton interpreter (TRITON_INTERPRET=1 before "
                               "the kernels are imported)")
        from triton.runtime import interpreter as interp

        builder = interp.interpreter_builder
        cls = type(builder)
        self._builder = builder
        orig_load, orig_store = cls.create_masked_load, cls.create_masked_store

        def masked_load(ptrs, mask, other, *rest):
            self._count(ptrs, mask, "load")
            return orig_load(builder, ptrs, mask, other, *rest)

        def masked_store(ptrs, value, mask, *rest):
            self._count(ptrs, mask, "store")
            return orig_store(builder, ptrs, value, mask, *rest)

        def refuse(name):
            def method(*_args, **_kwargs):
                raise NotImplementedError(f"traffic counter: {name} is not counted; extend bench/traffic_counter.py")
            return method

        builder.create_masked_load = masked_load
        builder.create_masked_store = masked_store
        self._patched = ["create_masked_load", "create_masked_store"]
        for name in _UNCOUNTED:
            if hasattr(cls, name):
                setattr(builder, name, refuse(name))
                self._patched.append(name)
        self._hooked = runtime.instrumented(hook=self._launch)
        self._hooked.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooked.__exit__(*exc)
        for name in self._patched:
            self._builder.__dict__.pop(name, None)

    # ---------------------------------------------------------------- results
    def totals(self) -> Dict[str, Dict[str, int]]:
        """{kernel: {"token_load", "token_store", "small_load", "small_store"}} in bytes."""
        out = {}
        for name, rec in self.records.items():
            tot = {f"{c}_{k}": 0 for c in CLASSES for k in ("load", "store")}
            for t in rec["tensors"].values():
                tot[f"{t['class']}_load"] += t["load"]
                tot[f"{t['class']}_store"] += t["store"]
            out[name] = tot
        return out


# ------------------------------------------------------------------------------------------- torch
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense"}
_OVERWRITES = {"copy_", "fill_", "zero_", "set_", "resize_", "resize_as_"}  # write without reading the destination


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensors without storage (none in eager CPU runs)
        return -1


def _zero() -> Dict[str, int]:
    return {f"{c}_{k}": 0 for c in CLASSES for k in ("load", "store")}


class TorchTraffic(TorchDispatchMode):
    """While active (and not `paused`): bytes read and written by each aten op call, in order.

    calls = [(op name, {"token_load", "token_store", "small_load", "small_store"}), ...];
    `ops()` sums them per op name, with "calls".
    """

    def __init__(self, classify: Classifier):
        super().__init__()
        self.classify = classify
        self.calls: List[Tuple[str, Dict[str, int]]] = []
        self._paused = 0

    def ops(self) -> Dict[str, dict]:
        return aggregate(self.calls)

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._paused:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        if name in _ALLOCATIONS:
            return
        schema = func._schema
        written = set()
        for arg, value in zip(schema.arguments, args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                written.add(id(value))
        for arg in schema.arguments:
            if arg.name in kwargs and arg.alias_info is not None and arg.alias_info.is_write:
                if isinstance(kwargs[arg.name], torch.Tensor):
                    written.add(id(kwargs[arg.name]))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        in_storages = {_storage(t) for t in inputs}
        if not written and outputs and all(_storage(t) in in_storages for t in outputs):
            return  # a view: nothing moves
        reads_dest = name not in _OVERWRITES and schema.overload_name != "out"
        loads = [t for t in inputs if id(t) not in written or reads_dest]
        stores = [t for t in inputs if id(t) in written]
        stores += [t for t in outputs if id(t) not in written and _storage(t) not in in_storages]
        rec = _zero()
        self.calls.append((name, rec))
        for t in loads:
            rec[f"{self.classify(t.shape)}_load"] += _nbytes(t)
        for t in stores:
            rec[f"{self.classify(t.shape)}_store"] += _nbytes(t)


def aggregate(calls: Sequence[Tuple[str, Dict[str, int]]]) -> Dict[str, dict]:
    """Per op name: the summed bytes and the number of calls."""
    ops: Dict[str, dict] = defaultdict(lambda: dict(_zero(), calls=0))
    for name, rec in calls:
        ops[name]["calls"] += 1
        for k, v in rec.items():
            ops[name][k] += v
    return dict(ops)


def batch_part(at_b: Sequence[Tuple[str, Dict[str, int]]],
               at_2b: Sequence[Tuple[str, Dict[str, int]]]) -> Dict[str, dict]:
    """Per op name: the bytes that grow from batch B to 2B, i.e. the part proportional to B, at B;
    "calls" counts the calls with such bytes. The two runs make the same calls in the same order
    (the same code on other sizes); each call is compared with its twin."""
    names_b, names_2b = [n for n, _ in at_b], [n for n, _ in at_2b]
    if names_b != names_2b:
        raise RuntimeError("the torch operations at B and 2B differ; their batch part cannot be separated: "
                           f"{len(names_b)} vs {len(names_2b)} calls")
    grown = []
    for (name, one), (_, two) in zip(at_b, at_2b):
        diff = {k: two[k] - one[k] for k in one}
        if any(diff.values()):
            grown.append((name, diff))
    return aggregate(grown)


__all__ = ["Classifier", "KernelTraffic", "TorchTraffic", "CLASSES", "aggregate", "batch_part"]
