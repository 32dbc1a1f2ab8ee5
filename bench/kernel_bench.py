"""`--kernel oca | layer`: every provider x mode, timed, with its traffic, speed-up and error.

Per row: median / p20 / p80 time; effective GB/s over the minimum bytes (shapes.Case.min_bytes) and
that as a % of the device's copy bandwidth measured in the same run; speed-up over `reference` in the
same mode; relative error ||out - ref64|| / ||ref64|| of the forward output (and of dx for the
backward modes) against impl="reference" evaluated on float64 copies of the same inputs.

With --cuda-graphs each provider also gets one row per mode whose call is captured in a CUDA graph
(torch.cuda.CUDAGraph, after warm-up calls on a side stream, as PyTorch's docs do) and timed as
graph.replay(): the same work without the Python and launch overhead of the eager call.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import providers as prov
from .nvtx_ranges import Ranges
from .report import CPU_NOTE, environment, format_table, num, sci, span
from .shapes import Case, fmt_bytes, make_case, resolve_shape, split_outputs
from .timing import Timer, copy_bandwidth, graph_replay, synchronize

MODES = ("fwd", "bwd", "fwd+bwd")
GRAPH_NOTE = ("CUDA graph: one call captured after 3 warm-up calls on a side stream, timed as graph.replay() "
              "(L2 flushed before each replay, as for the eager rows)")
NO_GRAPH_COMPILE = ("not captured: torch.compile's own CUDA-graph form is mode='reduce-overhead'; the default mode "
                    "compared here is timed eager only")


def parse_modes(text: str) -> List[str]:
    if text.strip() == "all":
        return list(MODES)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--mode takes a comma list of {', '.join(MODES)} or 'all', got {text!r}")
    return list(dict.fromkeys(modes))


@dataclass
class Row:
    provider: str
    mode: str
    status: str = "ok"  # ok | skipped | failed
    reason: Optional[str] = None
    timing: Optional[dict] = None
    bytes: Optional[int] = None
    gbps: Optional[float] = None
    pct_copy: Optional[float] = None
    speedup: Optional[float] = None
    errors: Dict[str, float] = field(default_factory=dict)
    graph: bool = False  # timed as the replay of a captured CUDA graph (--cuda-graphs)
    note: Optional[str] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (absolute when want is 0)."""
    diff = (got.detach().double() - want.detach().double()).norm().item()
    scale = want.detach().double().norm().item()
    return diff / scale if scale > 0 else diff


def _zero_grads(t: Dict[str, torch.Tensor]) -> Callable[[], None]:
    def setup():
        for v in t.values():
            v.grad = None
    return setup


def differentiable(outs: Tuple[torch.Tensor, ...]) -> List[torch.Tensor]:
    return [o for o in outs if o.requires_grad]


def make_runner(case: Case, fn: Callable, mode: str, douts: List[torch.Tensor]):
    """(run, setup) for one mode, on fresh inputs.

    fwd: inference (inputs without grad). bwd: only the backward, retain_graph=True on a forward
    computed once here; grads set to None before every rep. fwd+bwd: both, grads reset likewise.
    """
    return runner_and_inputs(case, fn, mode, douts)[:2]


def runner_and_inputs(case: Case, fn: Callable, mode: str, douts: List[torch.Tensor]):
    """make_runner's (run, setup) and the inputs they use (whose .grad the backward modes write)."""
    if mode == "fwd":
        t = case.clone(requires_grad=False)
        return (lambda: case.invoke(fn, t)), None, t
    t = case.clone(requires_grad=True)
    if mode == "bwd":
        outs = differentiable(split_outputs(case.invoke(fn, t)))

        def run_bwd():
            torch.autograd.backward(outs, douts[:len(outs)], retain_graph=True)
        return run_bwd, _zero_grads(t), t

    def run_fwd_bwd():
        outs = differentiable(split_outputs(case.invoke(fn, t)))
        torch.autograd.backward(outs, douts[:len(outs)])
    return run_fwd_bwd, _zero_grads(t), t


class KernelBench:
    def __init__(self, kernel: str, args, device: torch.device, ranges: Ranges):
        self.kernel, self.args, self.device, self.ranges = kernel, args, device, ranges
        self.on_gpu = device.type == "cuda"
        overrides = {k: getattr(args, k, None) for k in ("B", "N", "d", "M", "D", "H", "r")}
        if kernel == "oca":
            overrides.update(D=None, H=None, r=None)
        self.shape = resolve_shape(args.shape, overrides, self.on_gpu)
        self.dtype = args.torch_dtype
        self.modes = parse_modes(args.mode)
        self.need_bwd = any(m != "fwd" for m in self.modes)
        self.case = make_case(kernel, self.shape, self.dtype, args.orth, device, seed=args.seed)
        self.reps, self.warmup = args.reps, args.warmup
        self.graphs = bool(getattr(args, "cuda_graphs", False))
        self.rows: List[Row] = []
        self.timer = Timer(device)

    # ------------------------------------------------------------------ float64 reference
    def _reference64(self):
        case = self.case
        t64 = case.clone(requires_grad=self.need_bwd, dtype=torch.float64)
        ref = prov.make_provider("reference", self.kernel, self.args.orth, self.device)
        outs = split_outputs(case.invoke(ref, t64))
        g = torch.Generator(device="cpu").manual_seed(self.args.seed + 1)
        # Cotangents in each output's benchmark dtype: x_out / q_out in the input dtype, cos2 float32.
        douts = []
        for i, o in enumerate(outs):
            dt = torch.float32 if (self.args.orth == "soft" and i == len(outs) - 1) else self.dtype
            douts.append(torch.randn(o.shape, generator=g).to(device=self.device, dtype=dt))
        grads = {}
        if self.need_bwd:
            torch.autograd.backward(list(outs), [d.double() for d in douts])
            grads = {"x": t64["x"].grad.detach()}
        return t64, [o.detach() for o in outs], douts, grads

    # ------------------------------------------------------------------ one provider
    def _check(self, name: str, fn: Callable, t64, outs64, douts, grads64) -> Dict[str, float]:
        case = self.case
        t = case.clone(requires_grad=self.need_bwd)
        outs = split_outputs(case.invoke(fn, t))
        errors = {"out": rel_err(outs[0], outs64[0]),
                  # The update alone: the residual x dominates ||out||, and would hide an error in it.
                  "update": rel_err(outs[0].double() - t["x"].double(), outs64[0] - t64["x"].detach())}
        if self.kernel == "layer":
            errors["q"] = rel_err(outs[1], outs64[1])
        if self.args.orth == "soft":
            errors["cos2"] = rel_err(outs[-1], outs64[-1])
        if self.need_bwd:
            diff = differentiable(outs)
            torch.autograd.backward(diff, douts[:len(diff)])
            errors["dx"] = rel_err(t["x"].grad, grads64["x"])
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        return errors

    def _run_provider(self, name: str, ref64) -> Optional[Callable]:
        """The provider's eager rows; returns its callable when it ran (for the graph rows)."""
        args = self.args
        try:
            fn = prov.make_provider(name, self.kernel, args.orth, self.device)
        except prov.Skip as skip:
            self.rows += [Row(name, m, "skipped", str(skip)) for m in self.modes]
            return None
        try:
            errors = self._check(name, fn, *ref64)
        except Exception as err:  # noqa: BLE001 - reported in the table, the run goes on
            reason = prov.skip_reason(name, err)
            status = "skipped" if reason else "failed"
            self.rows += [Row(name, m, status, reason or f"{type(err).__name__}: {err}") for m in self.modes]
            self._free()
            return None
        for mode in self.modes:
            row = Row(name, mode, errors={k: v for k, v in errors.items() if k != "dx" or mode != "fwd"})
            try:
                run, setup = make_runner(self.case, fn, mode, ref64[2])
                self._time_row(row, run, setup)
            except Exception as err:  # noqa: BLE001
                reason = prov.skip_reason(name, err)
                row.status = "skipped" if reason else "failed"
                row.reason = reason or f"{type(err).__name__}: {err}"
            self.rows.append(row)
            run = setup = None
            self._free()
        return fn

    def _time_row(self, row: Row, run: Callable, setup: Optional[Callable]) -> None:
        label = f"{self.kernel}/{row.provider}{'-graph' if row.graph else ''}/{row.mode}"
        timing = self.timer.time(run, reps=self.reps, warmup=self.warmup, setup=setup,
                                 around=self.ranges.factory(label))
        row.timing = timing.to_dict()
        row.bytes = self.case.min_bytes(row.mode)
        if self.on_gpu:
            row.gbps = row.bytes / (timing.median_ms * 1e-3) / 1e9
            if self.copy_gbps:
                row.pct_copy = 100.0 * row.gbps / self.copy_gbps

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_rows(self, name: str, fn: Optional[Callable], ref64) -> None:
        """One row per mode timed as a CUDA graph's replay; a provider that cannot be captured is a
        skipped row with the reason, never a crash."""
        why = self._no_graph_reason(name, fn)
        if why:
            self.rows += [Row(name, m, "skipped", why, graph=True) for m in self.modes]
            return
        for mode in self.modes:
            row = Row(name, mode, graph=True, note=GRAPH_NOTE)
            try:
                replay, inputs, static = graph_replay(
                    lambda: runner_and_inputs(self.case, fn, mode, ref64[2]), self.device)
                self._time_row(row, replay, None)
                row.errors = self._graph_errors(mode, inputs, static, ref64)
            except Exception as err:  # noqa: BLE001 - a capture failure is a skipped row
                row.status, row.reason = "skipped", f"CUDA graph capture failed: {type(err).__name__}: {err}"
                try:
                    synchronize(self.device)
                except Exception:  # noqa: BLE001 - a broken context: the next rows say so themselves
                    pass
            self.rows.append(row)
            replay = inputs = static = None
            self._free()

    def _no_graph_reason(self, name: str, fn: Optional[Callable]) -> Optional[str]:
        if not self.on_gpu:
            return "CUDA graphs need a GPU"
        if name == "compile":
            return NO_GRAPH_COMPILE
        if fn is None:  # the provider could not run eagerly: the same reason
            eager = next((r for r in self.rows if r.provider == name and not r.graph and r.status != "ok"), None)
            return f"eager {eager.status}: {eager.reason}" if eager else "its eager rows did not run"
        return None

    def _graph_errors(self, mode: str, inputs, static, ref64) -> Dict[str, float]:
        """What the replayed graph left behind against float64: its output (fwd) or dx."""
        synchronize(self.device)
        _, outs64, _, grads64 = ref64
        if mode == "fwd":
            return {"out": rel_err(split_outputs(static)[0], outs64[0])}
        return {"dx": rel_err(inputs["x"].grad, grads64["x"])}

    def _free(self) -> None:
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the whole run
    def run(self) -> dict:
        self.copy_gbps = copy_bandwidth(self.device)
        ref64 = self._reference64()
        for name in self.args.provider_list:
            fn = self._run_provider(name, ref64)
            if self.graphs:
                self._graph_rows(name, fn, ref64)
        # graph rows against the graph-replayed reference, eager rows against the eager one
        base = {(r.mode, r.graph): r.timing["median_ms"] for r in self.rows
                if r.provider == "reference" and r.status == "ok"}
        for r in self.rows:
            if r.status == "ok" and (r.mode, r.graph) in base:
                r.speedup = base[(r.mode, r.graph)] / r.timing["median_ms"]
        if self.args.profile:
            self.profile(self.args.profile, ref64[2])
        return self.payload()

    def profile(self, path: str, douts) -> None:
        """A torch profiler (chrome) trace: 3 reps of every row that ran, each in a record_function."""
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
        with profile(activities=activities) as prof:
            for row in self.rows:
                if row.status != "ok" or row.graph:  # the profiler traces the eager calls
                    continue
                fn = prov.make_provider(row.provider, self.kernel, self.args.orth, self.device)
                run, setup = make_runner(self.case, fn, row.mode, douts)
                for _ in range(3):
                    if setup:
                        setup()
                    with record_function(f"{self.kernel}/{row.provider}/{row.mode}"):
                        run()
                if self.on_gpu:
                    torch.cuda.synchronize(self.device)
        prof.export_chrome_trace(path)
        print(f"torch profiler trace written to {path} (open in chrome://tracing or https://ui.perfetto.dev)")

    def payload(self) -> dict:
        env = environment(self.device)
        return {
            "benchmark": f"nearl.ops.{'oca' if self.kernel == 'oca' else 'nearl_layer'}",
            "kernel": self.kernel,
            **env,
            "cpu_only": not self.on_gpu,
            "note": None if self.on_gpu else CPU_NOTE,
            "shape": self.shape.to_dict(),
            "dtype": self.args.dtype,
            "orth": self.args.orth,
            "modes": self.modes,
            "providers": self.args.provider_list,
            "cuda_graphs": self.graphs,
            "graph_note": GRAPH_NOTE if self.graphs else None,
            "reps": self.reps,
            "warmup": self.warmup,
            "copy_bandwidth_gbps": self.copy_gbps,
            "copy_bandwidth_method": "median of 20 torch.Tensor.copy_ of a 1 GiB float32 buffer, bytes = 2 x size"
                                     if self.on_gpu else None,
            "min_bytes": {m: self.case.min_bytes(m) for m in MODES},
            "min_bytes_formula": Case.BYTES_FORMULA,
            "error_definition": "||out - ref64|| / ||ref64||, ref64 = impl='reference' on float64 copies of the "
                                "inputs; 'update' is the same on out - x; 'dx' on the input gradient for "
                                "the same random cotangent",
            "rows": [r.to_dict() for r in self.rows],
        }


def speedup(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def format_kernel_report(payload: dict) -> str:
    on_gpu = not payload["cpu_only"]
    shape = payload["shape"]
    unit, scale = ("us", 1e3) if on_gpu else ("ms", 1.0)
    t = "" if on_gpu else "CPU "
    layer = payload["kernel"] == "layer"
    headers = ["provider", "mode", f"{t}median {unit}", f"p20 {unit}", f"p80 {unit}", "GB/s", "% copy", "speedup",
               "err(out)", "err(upd)"] + (["err(q)"] if layer else []) + ["err(dx)"]
    right = [False, False] + [True] * (len(headers) - 2)
    rows = []
    for r in payload["rows"]:
        label = r["provider"] + (" (graph)" if r.get("graph") else "")
        if r["status"] != "ok":
            rows.append(span([label, r["mode"]], f"{r['status']}: {r['reason']}"))
            continue
        tm, e = r["timing"], r["errors"]
        cells = [label, r["mode"], f"{tm['median_ms'] * scale:.4g}", f"{tm['p20_ms'] * scale:.4g}",
                 f"{tm['p80_ms'] * scale:.4g}", num(r["gbps"], ".0f"), num(r["pct_copy"], ".1f"),
                 speedup(r["speedup"]),
                 sci(e.get("out")), sci(e.get("update"))]
        if layer:
            cells.append(sci(e.get("q")))
        cells.append(sci(e.get("dx")))
        rows.append(cells)
    desc = (f"B={shape['B']} N={shape['N']} d={shape['d']} M={shape['M']}"
            + (f" D={shape['D']} H={shape['H']} r={shape['r']}{' text-mask' if shape['masked'] else ''}"
               if layer else ""))
    head = [f"NEARL-CLIP benchmark: {payload['benchmark']}   shape {shape['name']}: {desc}   "
            f"dtype {payload['dtype']}   orth {payload['orth']}",
            f"device: {payload['device']}   torch {payload['torch']}   triton {payload['triton']}   "
            f"CUDA {payload['cuda']}   python {payload['python']}"]
    if on_gpu:
        head.append(f"copy bandwidth (copy_, 2 x 1 GiB): {num(payload['copy_bandwidth_gbps'], '.0f')} GB/s   "
                    f"reps {payload['reps']} (warmup {payload['warmup']}), L2 flushed before each rep")
    else:
        head.append(f"!! {payload['note']}")
    head.append("minimum bytes: " + ", ".join(f"{m} {fmt_bytes(payload['min_bytes'][m])}" for m in payload["modes"]))
    foot = ["err = ||out - ref64|| / ||ref64|| vs impl='reference' in float64; err(upd) on out - x; "
            "speedup = reference median / provider median (same mode)."]
    if payload.get("cuda_graphs"):
        foot.append(f"(graph) rows: {payload['graph_note']}; their speedup is over the graph-replayed reference, "
                    "their errors those of the replay's own output (fwd) or dx.")
    if not on_gpu:
        foot.append("CPU numbers: correctness only; run on a GPU for performance.")
    return "\n".join(head + ["", format_table(headers, rows, right), ""] + foot)


def run_kernel(kernel: str, args, device: torch.device, ranges: Ranges) -> Tuple[dict, str]:
    bench = KernelBench(kernel, args, device, ranges)
    payload = bench.run()
    return payload, format_kernel_report(payload)


__all__ = ["MODES", "parse_modes", "run_kernel", "rel_err"]
