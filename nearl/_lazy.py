"""Public names that load on first use (PEP 562), for a package whose import must stay light."""
import importlib
import sys
from typing import Callable, Dict, Sequence, Tuple


def lazy_attributes(package: str, names: Dict[str, str], submodules: Sequence[str] = ()
                    ) -> Tuple[Callable[[str], object], Callable[[], list]]:
    """(__getattr__, __dir__) for `package`: `names` maps a public name to the submodule defining it,
    `submodules` are public submodules themselves; each is imported when first asked for, then bound."""
    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f".{name}", package)  # the import binds it on the package too
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list:
        return sorted(set(vars(sys.modules[package])) | set(submodules) | set(names))

    return __getattr__, __dir__
