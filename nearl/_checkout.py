"""A source checkout run without `pip install` (the GPU machines, PYTHONPATH users).

setup.py installs the kernels/ and bench/ folders as `nearl_kernels` and `nearl_bench` (their own
folder names are other projects' on PyPI). Where those names are not installed, they are mapped
onto the folders beside nearl/, so a checkout imports exactly as an installed copy does.
"""
import importlib.util
import sys
from pathlib import Path

FOLDERS = {"nearl_kernels": "kernels", "nearl_bench": "bench"}


def map_uninstalled_folders() -> None:
    root = Path(__file__).resolve().parent.parent
    for name, folder in FOLDERS.items():
        init = root / folder / "__init__.py"
        if name in sys.modules or not init.is_file() or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
