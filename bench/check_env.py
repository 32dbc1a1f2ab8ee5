"""What `python -m bench.gpu_check` records about the machine: versions, the GPU (its `env` step:
`python -m bench.check_env --out FILE`), and the optional packages that are missing there, with the
commands that carry them over from a connected machine."""
from __future__ import annotations

import argparse
import importlib.util
import json
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


# ------------------------------------------------------------------------------- the env step
# What nvidia-smi says of the GPU: SKU, clocks now and at most, ECC, power. A field this driver does
# not know makes nvidia-smi refuse the whole query, so they are asked one by one after a refusal.
SMI_FIELDS = ("name", "pci.bus_id", "driver_version", "compute_cap", "pstate", "clocks.sm", "clocks.max.sm",
              "clocks.mem", "clocks.max.mem", "clocks.applications.graphics", "ecc.mode.current",
              "power.limit", "power.max_limit", "power.draw", "temperature.gpu", "memory.total",
              "persistence_mode", "mig.mode.current", "clocks_event_reasons.active")
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "NEARL_TILING", "NEARL_SM_COUNT", "NEARL_LAYER_PATH",
            "PYTORCH_CUDA_ALLOC_CONF")


def _smi(exe: str, fields) -> Optional[List[List[str]]]:
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def nvidia_smi_gpus(fields=SMI_FIELDS) -> Tuple[Optional[List[dict]], str]:
    """(one dict per GPU of the fields nvidia-smi answers, or None; how it went)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi is not on the PATH"
    rows = _smi(exe, fields)
    if rows is not None and all(len(r) == len(fields) for r in rows):
        return [dict(zip(fields, r)) for r in rows], "one query"
    gpus: List[dict] = []
    for name in fields:  # the slow way: what this driver knows, and what it refuses
        one = _smi(exe, [name]) or []
        for i, r in enumerate(one):
            while len(gpus) <= i:
                gpus.append({})
            gpus[i][name] = r[0] if r else None
    refused = [f for f in fields if not any(f in g for g in gpus)]
    for g in gpus:
        g.update({f: None for f in refused})
    return gpus or None, "field by field" + (f"; not known here: {', '.join(refused)}" if refused else "")


def _plain(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def device_properties() -> dict:
    """Every public attribute of torch.cuda.get_device_properties (SM count, capability, memory,
    L2 size, ...: whatever this torch exposes)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {k: _plain(getattr(props, k)) for k in dir(props) if not k.startswith("_")
            and not callable(getattr(props, k))}


def environment_facts(on_gpu: bool) -> dict:
    """The env step's record: versions, the GPU's SKU, clocks, ECC and power, or the CPU's."""
    facts = {**versions(on_gpu), "on_gpu": on_gpu, "cpu": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "env": {k: os.environ.get(k) for k in ENV_VARS}}
    if not on_gpu:
        return dict(facts, gpu=None, nvidia_smi=None, note="no GPU: the CPU only (dry run)")
    props = device_properties()
    gpus, how = nvidia_smi_gpus()
    mine = next((g for g in gpus or [] if g.get("name") == props.get("name")), (gpus or [None])[0])
    return dict(facts, gpu=props, nvidia_smi=mine, nvidia_smi_all=gpus, nvidia_smi_query=how,
                sm_count=props.get("multi_processor_count"),
                compute_capability=f"{props.get('major')}.{props.get('minor')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check_env", description="the GPU and versions, as JSON")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--out", metavar="FILE.json", default=None)
    args = p.parse_args(argv)
    facts = environment_facts(on_gpu=args.device == "auto" and torch.cuda.is_available())
    text = json.dumps(facts, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
