"""Mends to Triton's CPU interpreter (TRITON_INTERPRET=1), installed once by `runtime.launch` the
first time it launches under the interpreter, and never on a GPU.

- `numpy_fix`: triton < 3.7's interpreter with numpy >= 2.4.
- `tf32_fix`: TF32 products rounded as the GPU's tensor cores round them, while
  `runtime.instrumented(tf32_as_gpu=True)` is active (tests; otherwise the interpreter's float32
  products are left as they are).

This module must not import triton at import time: `nearl.ops` imports the kernels before a caller
may set TRITON_INTERPRET, and triton decides at import whether its own jit functions are interpreted.
"""
from . import runtime

_installed = False


def install() -> None:
    """Both mends, once per process (each is also idempotent on its own)."""
    global _installed
    if not _installed:
        numpy_fix()
        tf32_fix()
        _installed = True


def numpy_fix() -> None:
    """Make triton < 3.7's interpreter work with numpy >= 2.4.

    The interpreter turns a scalar (a one-element array) into a Python int with `int(array)`, for
    every `range(0, D, ...)` over a kernel argument; numpy 2.4 refuses that for arrays of rank > 0
    ("only 0-dimensional arrays can be converted to Python scalars"). triton 3.7 and later squeeze
    the array first; this does the same for older triton, through the interpreter's own patch
    scope, so it is undone with the rest after every launch. Nothing changes on a GPU.
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


def tf32_fix() -> None:
    """Let the interpreter's TF32 products be what the GPU's are, while
    `runtime.instrumented(tf32_as_gpu=True)` is active.

    `tl.dot(..., input_precision="tf32")` on float32 operands: NVIDIA's tensor cores read the
    operands' top 19 bits and ignore the low 13 mantissa bits (Triton passes the float32 bits as
    they are: triton-lang/triton#4574), a relative rounding of up to 2^-10. The interpreter
    multiplies in full float32, so a test of a TF32 kernel on the CPU measures a precision the GPU
    does not have (the fused layer's bfloat16 path: 1e-7 on the query output where the GPU's TF32
    gives 3e-4). Asked, this truncates both operands of every TF32 product as the GPU does;
    "tf32x3" and "ieee" products are float32-accurate on the GPU and stay as they are.
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
        if runtime.active().tf32_as_gpu and str(input_precision).rsplit(".", 1)[-1].upper() == "TF32":
            a, b = tf32(a), tf32(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.nearl_tf32 = True
    builder.create_dot = create_dot
