"""Timing: per-repetition times and their median / 20th / 80th percentiles, and copy bandwidth.

On CUDA each repetition is bracketed by CUDA events, after the L2 cache is flushed (a 256 MB write,
as `triton.testing.do_bench` does) and after the per-rep setup (grads set to None); the setup and
the flush stay outside the timed region. On CPU, `time.perf_counter` around the call.
`graph_replay` captures one call in a CUDA graph, whose replay is then timed the same way.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Tuple

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def to_dict(self) -> dict:
        return asdict(self)


def quantile(values: List[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: List[float]) -> Timing:
    return Timing(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8),
                  min(times_ms), max(times_ms), len(times_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times a callable `reps` times after `warmup` untimed calls.

    `setup` runs before every call, untimed (e.g. setting grads to None); `around` is a context
    manager factory entered around every timed call but outside the timed region (NVTX ranges).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._flush = (torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
                       if device.type == "cuda" else None)

    def time(self, fn: Callable[[], object], *, reps: int, warmup: int,
             setup: Optional[Callable[[], None]] = None,
             around: Optional[Callable[[], object]] = None) -> Timing:
        around = around or nullcontext
        for _ in range(warmup):
            if setup:
                setup()
            fn()
        synchronize(self.device)
        if self.device.type == "cuda":
            return self._time_cuda(fn, reps, setup, around)
        times = []
        for _ in range(reps):
            if setup:
                setup()
            with around():
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times)

    def _time_cuda(self, fn, reps, setup, around) -> Timing:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if setup:
                setup()
            self._flush.zero_()
            with around():
                starts[i].record()
                fn()
                ends[i].record()
        torch.cuda.synchronize(self.device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def graph_replay(build: Callable[[], tuple], device: torch.device,
                 warmup: int = 3) -> Tuple[Callable[[], None], object, object]:
    """(replay, inputs, static output) of one call captured in a torch.cuda.CUDAGraph.

    `build()` returns (run, setup, inputs) as kernel_bench.runner_and_inputs does. As PyTorch's
    docs do: `warmup` calls on a side stream first (Triton compiles and cuBLAS picks its kernels
    outside the capture), then the capture on that stream. build() runs there too, so that a
    forward it computes (the bwd mode's) is on the stream whose backward the graph captures.
    setup() (grads to None) runs once before the capture: the replays rewrite the same grads.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run, setup, inputs = build()
        for _ in range(warmup):
            if setup:
                setup()
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    if setup:
        setup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        static = run()
    keep = (graph, run, inputs, static)  # the graph's memory and inputs live as long as replay

    def replay() -> None:
        keep[0].replay()
    return replay, inputs, static


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> Optional[float]:
    """Device-to-device copy bandwidth in GB/s (bytes = 2 x size: one read, one write), CUDA only.

    Falls back to a smaller buffer when memory is short. Returns None on CPU: this benchmark does
    not claim anything about CPU memory.
    """
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(nbytes, max(free // 4, 1 << 20))
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = Timer(device).time(lambda: dst.copy_(src), reps=reps, warmup=3)
    del src, dst
    return 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9
