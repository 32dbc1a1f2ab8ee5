"""What the launchers of every kernel share: interpreter mode, device facts, output allocation and
the launch itself, and the instrumentation tests and bench tools switch on around them
(`instrumented`: NaN-poisoned outputs, the GPU's TF32 rounding on the interpreter, a launch hook that
captures launches instead of running them)."""
import contextlib
import dataclasses
import os
from typing import Callable, Iterator, Optional, Tuple

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Instrumentation:
    """What `instrumented` switches on. Off by default: production launches see none of it."""
    poison: bool = False  # every buffer `empty` makes starts as NaN: an element a kernel fails to write shows
    tf32_as_gpu: bool = False  # the interpreter's TF32 products truncate their operands as the GPU's do
    # `launch` hands (kernel, grid, args, kwargs) to it instead of running the kernel: the compile
    # check and `bench.run --sass` capture launches with it, the traffic counter counts bytes
    hook: Optional[Callable] = None


_ACTIVE = Instrumentation()


def active() -> Instrumentation:
    """The instrumentation in force now."""
    return _ACTIVE


@contextlib.contextmanager
def instrumented(*, poison: Optional[bool] = None, tf32_as_gpu: Optional[bool] = None,
                 hook: Optional[Callable] = None) -> Iterator[Instrumentation]:
    """Within the block, the given switches of `Instrumentation` (None: as the enclosing block has
    it); on exit, however it exits, what was in force before. Nests."""
    global _ACTIVE
    before = _ACTIVE
    given = {"poison": poison, "tf32_as_gpu": tf32_as_gpu, "hook": hook}
    _ACTIVE = dataclasses.replace(before, **{k: v for k, v in given.items() if v is not None})
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = before


_DEVICE_INFO = {}


def device_info(device: torch.device) -> Tuple[int, int]:
    """(SM count, compute capability as 10 * major + minor); (132, 90), an H100, off CUDA."""
    if device.type != "cuda":
        return 132, 90
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        prop = torch.cuda.get_device_properties(idx)
        _DEVICE_INFO[idx] = (prop.multi_processor_count, 10 * prop.major + prop.minor)
    return _DEVICE_INFO[idx]


# NEARL_TILING: run the configurations the launchers pick for this GPU, on any device (the
# interpreter included), so that a CPU run or test splits and tiles its work exactly as that GPU
# would. Value: (SM count, compute capability).
TILINGS = {"h100": (132, 90), "a100": (108, 80)}


def tiling(device: torch.device) -> Tuple[bool, int, int]:
    """(GPU tiles?, SM count, compute capability) that the launchers choose their configurations for.

    By default: the interpreter's own tiles under TRITON_INTERPRET=1, else the GPU's, with the
    device's SM count and capability. NEARL_TILING=h100 | a100 selects that GPU's tiles and facts on
    any device (the interpreter included); NEARL_SM_COUNT=n then overrides the SM count, so a small
    batch splits its work as a large one does on the full GPU. Only the choice of tiles changes:
    what is interpreter-only (ROUND_BY_HAND) stays keyed on `interpreting()`.
    """
    name = os.environ.get("NEARL_TILING", "").strip()
    if name:
        if name.lower() not in TILINGS:
            raise ValueError(f"NEARL_TILING={name!r}: accepted values are {', '.join(sorted(TILINGS))} "
                             "(or unset / empty for the device's own tiling)")
        gpu_tiles = True
        n_sm, cc = TILINGS[name.lower()]
    else:
        gpu_tiles = not interpreting()
        n_sm, cc = device_info(device)
    count = os.environ.get("NEARL_SM_COUNT", "").strip()
    if count:
        if not (count.isdigit() and int(count) > 0):
            raise ValueError(f"NEARL_SM_COUNT={count!r}: expected a positive integer (the SM count the "
                             "launchers assume), or unset / empty for the device's own")
        n_sm = int(count)
    return gpu_tiles, n_sm, cc


def empty(shape, *, device, dtype) -> torch.Tensor:
    """torch.empty for kernel outputs and scratch (NaN-filled under `instrumented(poison=True)`)."""
    if _ACTIVE.poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Every launch names its register ceiling, the hardware's 255. Left to itself, ptxas may choose
# fewer registers than a kernel needs (for occupancy) and spill: triton 3.8 compiled the fp32 layer
# backward for sm_80 at 64 registers with 16 bytes of spill, and at 122 with none once a ceiling was
# named. tests/kernel_compile_check.py compiles exactly this, and again at a lower cap for headroom.
MAX_REGISTERS = 255


def device_guard(args) -> contextlib.AbstractContextManager:
    """The device of the first tensor argument made current for the launch: Triton launches on the
    current CUDA device, so x on cuda:1 while cuda:0 is current would otherwise run on cuda:0."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is not None and first.device.type == "cuda" and first.device.index is not None \
            and first.device.index != torch.cuda.current_device():
        return torch.cuda.device(first.device.index)
    return contextlib.nullcontext()


def run(kernel, grid, args, kwargs) -> None:
    """Run one launch as `launch` does without a hook (for a hook that records, then runs it)."""
    if interpreting():
        from . import interpreter_shims  # opt-in: only a process that interprets ever loads it
        interpreter_shims.install()
    with device_guard(args):
        kernel[grid](*args, **kwargs)


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with the register ceiling named, on the arguments' device;
    handed to the hook instead while `instrumented(hook=...)` is active."""
    kwargs.setdefault("maxnreg", MAX_REGISTERS)
    if _ACTIVE.hook is not None:
        _ACTIVE.hook(kernel, grid, args, kwargs)
        return
    run(kernel, grid, args, kwargs)
