"""Benchmarks of NEARL-CLIP: `python -m bench.run --kernel oca | layer | model` (see bench/README.md)."""

import nearl  # noqa: E402,F401  (in an uninstalled checkout, maps nearl_kernels onto kernels/ first)
