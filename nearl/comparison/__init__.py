"""Comparison of adaptation methods, the library: `compare(CompareConfig(...))` runs what
`python -m nearl.compare ...` runs.

    config.py      CompareConfig: a comparison's settings (no torch)
    options.py     the command line over it
    protocols.py   the protocols papers report (few-shot, base-to-new, ...) as runs
    run.py         compare(): every method and seed trained and evaluated alike
    report.py      its Markdown table, JSON and plot
"""
from nearl._lazy import lazy_attributes

# Loaded on first use (PEP 562): `nearl.comparison.options` serves `nearl.compare --help` without torch.
_LAZY = {"CompareConfig": "config", "compare": "run"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
