"""Fused Triton kernels of NEARL-CLIP (torch and triton only), installed as `nearl_kernels`.

The folder is named kernels/, but `kernels` on PyPI is Hugging Face's kernel loader, which
transformers 5.x imports. A process whose path holds the checkout's root (`python -m ...` run
there) finds this folder under that name first. Imported as `kernels`, it therefore hands the name
over: where Hugging Face's package is installed anywhere else on the path, that package is loaded
in this module's place (the import system returns what `sys.modules` holds once this file has run).
Where it is not installed, this stays an empty package whose every attribute says how to import
the kernels, rather than a second copy of these modules, whose instrumentation (runtime.instrumented)
the first copy would not see; transformers' version probe then reads no version.
"""


def _load_hugging_face_kernels(name: str) -> bool:
    """Load the package `name` from the path without the checkout's root into sys.modules[name]."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return True


if __name__ != "nearl_kernels" and not (__name__ == "kernels" and _load_hugging_face_kernels(__name__)):
    def __getattr__(name):
        raise AttributeError(f"{__name__}.{name}: this is NEARL-CLIP's kernels/ folder, found under the name "
                             f"{__name__!r} because the checkout's root is on the path; import it as nearl_kernels "
                             "(pip install -e . from the checkout, or import nearl first in an uninstalled one). "
                             "Hugging Face's `kernels` package is not installed in this environment")
