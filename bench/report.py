"""Reporting: the environment, an aligned terminal table, and the JSON file of `--out`."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from typing import List, Optional, Sequence, Union

import torch

CPU_NOTE = ("NO GPU: these are CPU timings of tiny problems (the Triton provider runs on the "
            "TRITON_INTERPRET=1 interpreter); they are correctness runs and say NOTHING about the "
            "kernels' GPU performance. GB/s and % of copy bandwidth are n/a.")


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device.type == "cuda"
    env = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or platform.machine()}, "
                                                                    f"{os.cpu_count()} cores)",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "cpu_threads": torch.get_num_threads(),
        "command": list(sys.argv),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        env["sm_count"] = props.multi_processor_count
    return env


Row = Union[Sequence[str], tuple]


def span(lead: Sequence[str], text: str) -> tuple:
    """A row whose first cells are `lead` and whose remaining columns hold one free text."""
    return ("span", list(lead), text)


def format_table(headers: Sequence[str], rows: List[Row], right: Optional[Sequence[bool]] = None,
                 max_text: int = 110) -> str:
    """Columns aligned on the widest cell; numbers right-aligned (`right`), text left-aligned."""
    right = list(right) if right is not None else [False] * len(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        if isinstance(row, tuple) and row and row[0] == "span":
            for i, cell in enumerate(row[1]):
                widths[i] = max(widths[i], len(cell))
            continue
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    for row in rows:
        if isinstance(row, tuple) and row and row[0] == "span":
            lead = [c.ljust(w) for c, w in zip(row[1], widths)]
            text = row[2] if len(row[2]) <= max_text else row[2][: max_text - 3] + "..."
            lines.append("  ".join(lead + [text]))
        else:
            lines.append(fmt(row))
    return "\n".join(lines)


def num(value: Optional[float], fmt: str = ".3g", missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def sci(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


def write_json(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")


def _jsonable(obj):
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, torch.device):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
