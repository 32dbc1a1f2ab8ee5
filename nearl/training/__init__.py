"""The training library: `fit(parse_args([...]))` runs what `python -m nearl.train ...` runs.

    options.py   the options of a run (parser, resume's defaults)
    data.py      its training data
    run.py       fit(): the output folder, the method and backbone, the trainer
    loop.py      the gradient loop (GradientRun)
    features.py  methods fitted on cached features (linear-probe)
    tracking.py  --report-to: metrics.jsonl mirrored to TensorBoard / wandb
"""
from .loop import GradientRun, Hooks, param_groups, unused_parameters
from .options import FIXED_ON_RESUME, build_parser, parse_args
from .run import fit

__all__ = ["FIXED_ON_RESUME", "GradientRun", "Hooks", "build_parser", "fit", "param_groups", "parse_args",
           "unused_parameters"]
