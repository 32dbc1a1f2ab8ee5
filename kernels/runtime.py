"""Small runtime facts the launchers share: interpreter mode, SM count, output allocation."""
import functools
import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on the CPU, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    return _sm_count(device.index or 0) if device.type == "cuda" else 1


def empty(shape, *, device, dtype) -> torch.Tensor:
    """torch.empty for kernel outputs; tests swap in a NaN-filled allocation so an element the
    kernel forgets to write shows up as NaN."""
    return torch.empty(shape, device=device, dtype=dtype)
