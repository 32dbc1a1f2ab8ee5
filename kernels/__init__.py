"""Fused Triton kernels of NEARL-CLIP (torch and triton only), installed as `nearl_kernels`.

The folder is named kernels/, but `kernels` on PyPI is Hugging Face's kernel loader. A process
whose path holds the checkout's root (`python -m ...` run there) finds this folder under that name
first; transformers then probes it for a version. Imported as `kernels` it therefore stays an
empty package whose every attribute says how to import it, rather than a second copy of these
modules, whose settings (runtime.POISON_OUTPUTS, LAUNCH_HOOK) the first copy would not see.
"""
if __name__ != "nearl_kernels":
    def __getattr__(name):
        raise AttributeError(f"{__name__}.{name}: this is NEARL-CLIP's kernels/ folder, found under the name "
                             f"{__name__!r} because the checkout's root is on the path; import it as nearl_kernels "
                             "(pip install -e . from the checkout, or import nearl first in an uninstalled one). "
                             "Hugging Face's `kernels` package is shadowed in this process")
