import os
import sys

import torch

# The shared helpers (factories, precision_bar, tiny_*) live here; the tests, in folders that mirror
# the package's wings, import them by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU the Triton kernels are tested on the CPU interpreter; it must be on before triton
# decorates any kernel, so set it here, before the test modules import nearl_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nearl  # noqa: E402,F401  (maps nearl_kernels / nearl_bench onto the folders in an uninstalled checkout)


import pytest  # noqa: E402


@pytest.fixture
def poisoned_outputs():
    """Every buffer a kernel launcher allocates starts as NaN, so an element a kernel fails to write shows."""
    from nearl_kernels import runtime
    with runtime.instrumented(poison=True):
        yield


@pytest.fixture
def gpu_tf32():
    """The interpreter's TF32 products truncate their operands as an NVIDIA GPU's tensor cores do."""
    from nearl_kernels import runtime
    with runtime.instrumented(tf32_as_gpu=True):
        yield
