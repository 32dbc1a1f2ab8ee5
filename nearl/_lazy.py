"""Public names that load on first use (PEP 562), for a package whose import must stay light."""
import importlib
import sys
from typing import Callable, Dict, Mapping, Sequence, Tuple, Union


def lazy_attributes(package: str, names: Dict[str, str], submodules: Union[Sequence[str], Mapping[str, str]] = ()
                    ) -> Tuple[Callable[[str], object], Callable[[], list]]:
    """(__getattr__, __dir__) for `package`: `names` maps a public name to the submodule defining it
    (dotted, relative to `package`), `submodules` are public submodules themselves (or a mapping of a
    public name to a deeper submodule); each is imported when first asked for, then bound."""
    paths = dict(submodules) if isinstance(submodules, Mapping) else {s: s for s in submodules}

    def __getattr__(name: str):
        if name in paths:
            module = importlib.import_module(f".{paths[name]}", package)
            setattr(sys.modules[package], name, module)  # a deeper module is not bound by its import
            return module
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list:
        return sorted(set(vars(sys.modules[package])) | set(paths) | set(names))

    return __getattr__, __dir__
