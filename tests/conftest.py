import os

import torch

# Without a GPU the Triton kernels are tested on the CPU interpreter; it must be on before triton
# decorates any kernel, so set it here, before the test modules import nearl_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nearl  # noqa: E402,F401  (maps nearl_kernels / nearl_bench onto the folders in an uninstalled checkout)
