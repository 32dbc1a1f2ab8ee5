"""Fused Triton kernels of NEARL-CLIP (torch and triton only), installed as `nearl_kernels`.

The folder is named kernels/, but `kernels` on PyPI is Hugging Face's kernel loader: importing this
folder under that name would shadow it and load a second copy of these modules, whose settings
(runtime.POISON_OUTPUTS, LAUNCH_HOOK) the first copy would not see.
"""
if __name__ != "nearl_kernels":
    raise ImportError(f"the NEARL-CLIP kernels were imported as {__name__!r}: import them as nearl_kernels "
                      "(pip install -e . from the checkout, or import nearl first in an uninstalled one)")
