"""NVTX ranges for Nsight Systems / Nsight Compute (`--nvtx`), with the `nvtx` package imported lazily.

A label such as "oca/triton/fwd" is emitted as *nested* push/pop ranges "oca" > "triton" > "fwd" in
the default domain. That is exactly what Nsight Compute's NVTX filter syntax denotes by
`--nvtx-include "oca/triton/fwd/"`: '/' separates nested push/pop ranges and the trailing '/' marks
push/pop (not start/end) ranges. A single range *named* "oca/triton/fwd" would not be matchable by
that expression, since '/' inside a name reads as nesting. Nsight Systems shows the three levels
stacked on the timeline.

Ranges wrap each timed repetition (outside its CUDA events), never the warm-up, the L2 flush or the
error checks, so `ncu --nvtx-include "oca/triton/fwd/"` profiles only the provider's own kernels.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

MISSING = ("--nvtx needs the `nvtx` package (pip install nvtx); continuing WITHOUT NVTX ranges, "
           "so nsys/ncu will not see them")


class Ranges:
    def __init__(self, enabled: bool):
        self._nvtx = None
        if enabled:
            try:
                import nvtx
                self._nvtx = nvtx
            except ImportError:
                print(f"warning: {MISSING}", file=sys.stderr)

    @property
    def enabled(self) -> bool:
        return self._nvtx is not None

    def push(self, label: str) -> int:
        """Push one nested range per '/'-separated part; returns how many were pushed."""
        if self._nvtx is None:
            return 0
        parts = [p for p in label.split("/") if p]
        for part in parts:
            self._nvtx.push_range(message=part)
        return len(parts)

    def pop(self, count: int) -> None:
        for _ in range(count):
            self._nvtx.pop_range()

    @contextmanager
    def range(self, label: str) -> Iterator[None]:
        pushed = self.push(label)
        try:
            yield
        finally:
            if pushed:
                self.pop(pushed)

    def factory(self, label: str):
        """A context-manager factory for Timer(around=...), or None when ranges are off."""
        return (lambda: self.range(label)) if self.enabled else None


NO_RANGES = Ranges(False)


def maybe(ranges: Optional[Ranges]) -> Ranges:
    return ranges if ranges is not None else NO_RANGES
