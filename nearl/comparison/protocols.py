"""The protocols adaptation papers report, as runs of a comparison (nearl/comparison/run.py):

- standard: every method trained on --data, evaluated on --split;
- base2novel (CoOp / CoCoOp's, the one BiomedCoOp and MaPLe tables use): trained on the base classes
  (the first half, `base_novel_split`), evaluated on the base and on the novel classes of --split;
  reported as base and novel accuracy and their harmonic mean (HM);
- few-shot: trained on K images per class for each K of --shots, accuracy against K.

This module says which runs a protocol needs (`plan`), what each is evaluated on (`eval_sets`), how
a run's results become its metrics (`run_metrics`); comparison_report.py renders each protocol.
`config` below is the comparison's CompareConfig (nearl/comparison/config.py)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from nearl.errors import UserError

PROTOCOLS = ("standard", "base2novel", "few-shot")
NEEDS_CLASSES = ("base2novel", "few-shot")  # protocols of classification only
B2N_KEYS = ("base", "novel", "hm")


class Run(NamedTuple):
    """One training run of a protocol: its method, seed, folder, its own TrainConfig settings ((name,
    value) pairs: base2novel's classes, few-shot's K), and for few-shot its K."""
    method: str
    seed: int
    folder: Path
    train: Tuple[Tuple[str, Any], ...] = ()
    shots: Optional[int] = None


def comma_ints(text: str, flag: str) -> List[int]:
    """'0,1,2' -> [0, 1, 2]; a UserError naming `flag` otherwise."""
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None


def parse_shots(text: str) -> List[int]:
    shots = comma_ints(text, "--shots")
    if not shots or min(shots) < 1 or len(set(shots)) != len(shots):
        raise UserError(f"--shots needs distinct positive integers, got {text!r}")
    return sorted(shots)


def check(config, methods: List[str], chosen_by_user: bool) -> List[str]:
    """The methods the protocol runs; a UserError for a protocol that does not fit the arguments."""
    protocol = config.protocol
    if protocol in NEEDS_CLASSES and config.task != "classification":
        raise UserError(f"--protocol {protocol} is a classification protocol; add --task classification")
    if protocol == "few-shot" and config.k_shot:
        raise UserError("--protocol few-shot sets K itself from --shots; drop --k-shot")
    if protocol != "base2novel":
        return methods
    from nearl.methods import spec  # here: nearl.compare --help reads this module without torch
    blind = [m for m in methods if not spec(m).scores_unseen_classes]  # a fixed classifier (linear-probe's)
    if blind and chosen_by_user:
        raise UserError(f"--protocol base2novel evaluates on classes the model never saw; {' and '.join(blind)}'s "
                        f"classifier cannot score them: drop {'it' if len(blind) == 1 else 'them'} from --methods")
    return [m for m in methods if m not in blind]


def check_shots(shots: Sequence[int], records: Sequence[Any], classnames: Sequence[str]) -> None:
    """Every K of --shots must be drawable from every class of the training records (few-shot): a class
    with fewer images would give all it has, and the report would name a K that never ran."""
    counts = Counter(r.label for r in records)
    per_class = sorted((counts.get(label, 0), name) for label, name in enumerate(classnames))
    k, fewest = max(shots), per_class[0][0]
    short = [f"{name!r} {n}" for n, name in per_class if n < k]
    if short:
        raise UserError(f"--shots {','.join(map(str, shots))}: K = {k} needs {k} training images of each class, and "
                        f"{len(short)} of the {len(classnames)} classes have fewer ({', '.join(short[:4])}"
                        f"{', ...' if len(short) > 4 else ''}): those runs would train on fewer than K images a class. "
                        f"The largest K every class allows is {fewest}")


def plan(config, methods: Sequence[str], seeds: Sequence[int], out: Path) -> List[Run]:
    """Every run of the comparison, each in its folder: <out>/<method>/[k<K>/]seed<s>."""
    runs = out
    if config.protocol == "few-shot":
        return [Run(m, s, runs / m / f"k{k}" / f"seed{s}", (("k_shot", k),), k)
                for m in methods for k in parse_shots(config.shots) for s in seeds]
    extra = (("classes", "base"),) if config.protocol == "base2novel" else ()
    return [Run(m, s, runs / m / f"seed{s}", extra) for m in methods for s in seeds]


def eval_sets(config) -> Dict[str, tuple]:
    """{name: load_eval_data(...)} each run is evaluated on."""
    from nearl.evaluation import run as EV  # torch: imported here, so PROTOCOLS serves nearl.compare --help

    from nearl.data.tabular import Columns

    columns = Columns(label=config.label_column, label_columns=config.label_columns,
                      label_separator=config.label_separator,
                      uncertain=config.uncertain_labels)  # a multi-label CSV's (--task multilabel)
    kw = dict(fmt=config.format, root=config.root, split=config.split, columns=columns if columns.given() else None)
    data = config.test_data or config.data
    if config.protocol == "base2novel":
        return {c: EV.load_eval_data(config.task, data, classes=c, **kw) for c in ("base", "novel")}
    return {"test": EV.load_eval_data(config.task, data, **kw)}


def harmonic_mean(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def run_metrics(protocol: str, results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """A run's metrics from its evaluations: base2novel's accuracy on base, on novel, and their HM."""
    if protocol != "base2novel":
        return results["test"]
    base, novel = results["base"]["accuracy"], results["novel"]["accuracy"]
    return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
