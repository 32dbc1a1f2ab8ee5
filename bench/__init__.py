"""Benchmarks of NEARL-CLIP: `python -m bench.run --kernel oca | layer | model` (see bench/README.md)."""
