"""What `python -m bench.gpu_check` records about the machine: versions, and the optional packages
that are missing there, with the commands that carry them over from a connected machine."""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch


def nvidia_smi_driver() -> Optional[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def driver_version(on_gpu: bool) -> str:
    """nvidia-smi's driver version; else the CUDA driver API version torch sees; else why not."""
    smi = nvidia_smi_driver()
    if smi:
        return smi
    if not on_gpu:
        return "n/a (no GPU used)"
    try:
        api = torch._C._cuda_getDriverVersion()  # e.g. 12040: the driver's CUDA API, not its release
        return f"CUDA driver API {api // 1000}.{api % 1000 // 10} (nvidia-smi not found)"
    except (AttributeError, RuntimeError):
        return "unknown (no nvidia-smi; torch does not say)"


def versions(on_gpu: bool) -> Dict[str, Optional[str]]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if on_gpu:
        device = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "driver": driver_version(on_gpu), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------- packages
@dataclass(frozen=True)
class Package:
    module: str  # the import name
    pip: str  # the distribution to download
    needed_for: str
    requires: Tuple[str, ...] = ()  # import names of its own requirements (first level)


OPTIONAL = (
    Package("open_clip", "open_clip_torch", "the fused-model tests and `bench.run --kernel model`",
            requires=("torchvision", "regex", "ftfy", "tqdm", "huggingface_hub", "safetensors", "timm")),
    Package("nvtx", "nvtx", "`bench.run --nvtx` ranges for nsys / ncu (no step of this check needs them)"),
    Package("pytest", "pytest", "the kernel and fused-model tests"),
)
# Import name -> distribution name, where they differ (for the download command).
PIP_NAMES = {"huggingface_hub": "huggingface-hub", "yaml": "pyyaml"}
# Requirements of requirements that a GPU image tends to lack (ftfy needs wcwidth).
SECOND_LEVEL = {"ftfy": ("wcwidth",)}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(available=importable) -> List[dict]:
    """One entry per optional package that cannot be imported, with its missing requirements."""
    missing = []
    for pkg in OPTIONAL:
        if available(pkg.module):
            continue
        reqs = [r for r in pkg.requires if not available(r)]
        reqs += [s for r in reqs for s in SECOND_LEVEL.get(r, ()) if not available(s)]
        missing.append({"module": pkg.module, "pip": pkg.pip, "needed_for": pkg.needed_for,
                        "missing_requirements": [PIP_NAMES.get(r, r) for r in reqs]})
    return missing


def carry_advice(missing: List[dict]) -> List[str]:
    """The commands that download the missing wheels elsewhere and install them here, offline."""
    if not missing:
        return []
    names = []
    for m in missing:
        names += [m["pip"]] + m["missing_requirements"]
    names = list(dict.fromkeys(names))
    tops = " ".join(m["pip"] for m in missing)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [
        "On a machine with network access (any OS), fetch the wheels for this one (Python "
        f"{py}, {platform.machine()}):",
        f"    pip download --no-deps --only-binary=:all: --python-version {py} --implementation cp "
        f"--platform manylinux2014_{platform.machine()} -d wheels {' '.join(names)}",
        "copy wheels/ here (e.g. into the repository, ignored by git), then:",
        f"    pip install --no-index --find-links wheels {tops}",
        "pip names any further requirement still missing; add it to the download and repeat. "
        "(Without --no-deps pip download also fetches torch and its CUDA libraries, several GB.)",
    ]
