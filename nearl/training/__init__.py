"""The training library: `fit(TrainConfig(...))`, or `fit(parse_config([...]))`, runs what
`python -m nearl.train ...` runs.

    config.py    TrainConfig: a run's settings, one field per flag (no torch)
    options.py   the command line over it (parser, resume's defaults)
    data.py      its training data
    run.py       fit(): the output folder, the method and backbone, the trainer
    loop.py      the gradient loop (GradientRun)
    features.py  methods fitted on cached features (linear-probe)
    tracking.py  --report-to: metrics.jsonl mirrored to TensorBoard / wandb
"""
from nearl._lazy import lazy_attributes

# Loaded on first use (PEP 562): `nearl.training.options` (the parser) imports no torch, and
# `python -m nearl.train --help` answers before the loop and the run are imported.
_LAZY = {"GradientRun": "loop", "Hooks": "loop", "param_groups": "loop", "unused_parameters": "loop",
         "FIXED_ON_RESUME": "options", "build_parser": "options", "parse_args": "options",
         "parse_config": "options", "given_settings": "options", "check_flags": "options",
         "TrainConfig": "config", "fit": "run"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = ["FIXED_ON_RESUME", "GradientRun", "Hooks", "TrainConfig", "build_parser", "fit", "param_groups",
           "parse_args", "parse_config", "unused_parameters"]
