"""What the launchers of every kernel share: interpreter mode, device facts, output allocation and
the launch itself (with a hook that lets the compile check capture launches instead of running them)."""
import contextlib
import os
from typing import Tuple

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_numpy_fix() -> None:
    """Make triton < 3.7's interpreter work with numpy >= 2.4 (called by `launch` under the
    interpreter; cheap and idempotent).

    The interpreter turns a scalar (a one-element array) into a Python int with `int(array)`, for
    every `range(0, D, ...)` over a kernel argument; numpy 2.4 refuses that for arrays of rank > 0
    ("only 0-dimensional arrays can be converted to Python scalars"). triton 3.7 and later squeeze
    the array first; this does the same for older triton, through the interpreter's own patch
    scope, so it is undone with the rest after every launch. Nothing changes on a GPU.
    This module must not import triton at import time: `nearl.ops` imports it before a caller may
    set TRITON_INTERPRET, and triton decides at import whether its own jit functions are
    interpreted.
    """
    import triton
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "nearl_fixed", False):
        return
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7):
        original.nearl_fixed = True  # nothing to mend; remember that
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.nearl_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


# Tests set this to True to have the interpreter round TF32 products as the GPU does (below).
TF32_AS_THE_GPU = False


def _interpreter_tf32_fix() -> None:
    """Let the interpreter's TF32 products be what the GPU's are, while TF32_AS_THE_GPU is set
    (called by `launch` under the interpreter; cheap and idempotent).

    `tl.dot(..., input_precision="tf32")` on float32 operands: NVIDIA's tensor cores read the
    operands' top 19 bits and ignore the low 13 mantissa bits (Triton passes the float32 bits as
    they are: triton-lang/triton#4574), a relative rounding of up to 2^-10. The interpreter
    multiplies in full float32, so a test of a TF32 kernel on the CPU measures a precision the GPU
    does not have (the fused layer's bfloat16 path: 1e-7 on the query output where the GPU's TF32
    gives 3e-4). With the flag set this truncates both operands of every TF32 product as the GPU
    does; "tf32x3" and "ieee" products are float32-accurate on the GPU and stay as they are.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "nearl_tf32", False):
        return

    def tf32(handle):
        if handle.data.dtype != np.float32:
            return handle
        bits = handle.data.view(np.uint32) & np.uint32(0xFFFFE000)
        return interpreter.TensorHandle(bits.view(np.float32), handle.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if TF32_AS_THE_GPU and str(input_precision).rsplit(".", 1)[-1].upper() == "TF32":
            a, b = tf32(a), tf32(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.nearl_tf32 = True
    builder.create_dot = create_dot


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


# Tests set this to True so that every buffer starts as NaN: an element a kernel fails to write
# then shows up as a NaN in the result.
POISON_OUTPUTS = False


def empty(shape, *, device, dtype) -> torch.Tensor:
    """torch.empty for kernel outputs and scratch (NaN-filled while POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# When set, `launch` hands (kernel, grid, args, kwargs) to it instead of running the kernel.
# tests/kernel_compile_check.py uses it to compile, for a GPU target, exactly the launches
# (constexprs, argument types and specialisations) the launchers make.
LAUNCH_HOOK = None

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


def launch(kernel, grid, *args, **kwargs) -> None:
    kwargs.setdefault("maxnreg", MAX_REGISTERS)
    if LAUNCH_HOOK is not None:
        LAUNCH_HOOK(kernel, grid, args, kwargs)
        return
    if interpreting():
        _interpreter_numpy_fix()
        _interpreter_tf32_fix()
    with device_guard(args):
        kernel[grid](*args, **kwargs)
