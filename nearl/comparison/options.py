"""The options of a comparison (`python -m nearl.compare`) and their description; `nearl.comparison.run`
is the library that runs it. Imports no torch (the method names come from nearl/methods/options.py,
the protocols from nearl/comparison/protocols.py): --help answers before the training stack is imported."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from nearl.argtypes import Parser
from nearl.comparison.config import CompareConfig, compare_flag_fields
from nearl.training.config import argparse_kwargs, option_string

DESCRIPTION = """Compare adaptation methods fairly: same backbone, data, seeds and step budget, one command.

    python -m nearl.compare --max-steps 2 --seeds 0,1 --out runs/cmp          # embedded demo set, CPU
    python -m nearl.compare --model ViT-B-16 --pretrained openai --task classification \\
        --data split.json --root images/ --k-shot 16 --methods nearl,alta,clip-adapter,coop,linear-probe,zeroshot \\
        --seeds 0,1,2 --max-steps 500 --batch-size 32 --precision bf16 --out runs/cmp
    python -m nearl.compare --protocol base2novel --data split.json --k-shot 16 --seeds 1,2,3 ...
    python -m nearl.compare --protocol few-shot --shots 1,2,4,8,16 --data split.json --seeds 1,2,3 ...

Protocols: standard (above); base2novel (CoOp's): every run trains on the base classes (the first
half of the class list, nearl.train --classes base) and is evaluated on the base and on the novel
classes of --split, each among its own classes, reported as base, novel and their harmonic mean HM
(linear-probe cannot score unseen classes and is left out); few-shot: one run per K of --shots
(nearl.train --k-shot K), accuracy against K as a table and a plot; a K some class of the training
data cannot give is refused. Evaluation images that are among the training images are refused
before any run, unless --allow-train-data.

Every (method, seed) is trained in this process by nearl.train (same data pipeline, loop, optimiser,
schedule and checkpoints; --max-steps optimizer steps, or L-BFGS iterations for linear-probe, none
for zeroshot), then its final checkpoint (last.pt, not the best on validation: equal budgets) is
rebuilt and evaluated by nearl.evaluate on --split (default test; falls back to val). Seeds fix the
data order, the initial weights and, without --pretrained, the random backbone, which is then the
same for every method of one seed.

Outputs in --out: comparison.md and comparison.json (task metrics as mean and standard deviation
over seeds, learnable parameters, training time per step, peak memory, inference images/s),
comparison.png (the main metric with std error bars), and <method>/seed<k>/ (each run's
metrics.jsonl, curves.png and checkpoints).

Measurements: time per step is the median wall time of an optimizer step (data loading included;
the first step, which pays for warm-up, is left out when there are more); peak memory is
torch.cuda.max_memory_allocated over training and evaluation on a GPU, and "n/a" on CPU (the JSON
then gives the process's peak RSS, which only grows over the whole comparison); inference images/s
is encode_image on a fixed batch of random images, after warm-up, for the first seed's model.
"""


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The parser, one flag per CompareConfig field (nearl/comparison/config.py holds their defaults
    and help)."""
    p = Parser(prog="python -m nearl.compare", description=DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in compare_flag_fields():
        p.add_argument(option_string(f), **argparse_kwargs(f))
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> CompareConfig:
    """What `nearl.comparison.compare` takes from a command line."""
    return CompareConfig.from_namespace(build_parser().parse_args(argv))
