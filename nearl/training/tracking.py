"""Experiment tracking as open_clip's users know it (`--report-to tensorboard,wandb`).

metrics.jsonl stays the record of a run; a tracker mirrors every line written to it, the same
scalars at the same step ("<kind>/<name>": train/loss, val/mean_recall, ...), so TensorBoard or
Weights & Biases show what the file holds. Only rank 0 tracks. The packages are optional extras
(`pip install "nearl-clip[tensorboard]"`, `[wandb]`); a missing one stops the run before it trains.
wandb runs offline unless WANDB_MODE says otherwise (`wandb sync` uploads such a run later).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence

from nearl.errors import UserError
from nearl.logging_utils import MetricsLog, PathLike, json_safe

# --report-to name -> (module imported, what to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
TRACKERS = tuple(PACKAGES)


def parse_report_to(text: str) -> List[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'none' -> [] (turns tracking off, e.g. on a
    resume of a run that tracked). A ValueError names the choices."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad or not names:
        raise ValueError(f"takes {', '.join(TRACKERS)} (comma-separated or repeated) or none, got {text!r}")
    return names


def requested(report_to: Optional[Sequence[str]]) -> List[str]:
    """The trackers asked for, each once, in the order given."""
    return list(dict.fromkeys(report_to or ()))


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import that is blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(names: Sequence[str]) -> None:
    """A one-line UserError naming the pip command for the first tracker whose package is missing.
    Every rank checks, so every rank stops alike, before anything trains."""
    for name in names:
        module, package = PACKAGES[name]
        if not _installed(module):
            raise UserError(f"--report-to {name}: the {package} package is not installed; "
                            f"pip install {package}  (or pip install \"nearl-clip[{name}]\")")


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of a metrics.jsonl record as the file holds them (json_safe: NaN and inf are
    null there, so left out here), keyed "<kind>/<name>"; a nested dict (skipped_images' reasons)
    gives "<kind>/<name>/<key>". The step is the x-axis, not a scalar."""
    record = json_safe(record)
    kind = str(record.get("kind", "metrics"))
    out: Dict[str, float] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = value

    for key, value in record.items():
        if key not in ("kind", "step"):
            add(f"{kind}/{key}", value)
    return out


# ----------------------------------------------------------------------------- trackers
class Tracker(Protocol):
    def log(self, step: int, values: Dict[str, float]) -> None:
        """The scalars of one metrics.jsonl record, at its step."""

    def truncate_after(self, step: int) -> None:
        """A resumed run: what a stopped run logged past `step` is void (metrics.jsonl drops it)."""

    def close(self, ok: bool = True) -> None:
        """At the end of the run, or on an error (ok False)."""


class NullTracker:
    def log(self, step: int, values: Dict[str, float]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        pass


class TensorBoardTracker:
    """Event files in `log_dir` (OUT/tensorboard), values in float64. The writer opens on the first
    record with TensorBoard's purge step: events an earlier run in this folder wrote past the resumed
    step (or, on a new run after --overwrite, every earlier event) are hidden, as in metrics.jsonl."""

    def __init__(self, log_dir: PathLike):
        self.log_dir, self.writer, self.purge_step = Path(log_dir), None, 0

    def truncate_after(self, step: int) -> None:
        if self.writer is None:
            self.purge_step = step + 1

    def log(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)
        self.writer.flush()  # like metrics.jsonl: a crash loses nothing already logged

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbTracker:
    """A wandb run named after the run folder, offline unless WANDB_MODE is set, its files in
    OUT/wandb; the run's arguments as its config. A resumed run is a new wandb run of that name."""

    def __init__(self, project: str, name: str, directory: PathLike, config: Dict[str, Any]):
        import wandb
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=project, name=name, dir=str(directory), config=config, mode=self.mode)

    def log(self, step: int, values: Dict[str, float]) -> None:
        self.run.log(values, step=step)

    def truncate_after(self, step: int) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Trackers:
    """Several trackers as one."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def log(self, step: int, values: Dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, values)

    def truncate_after(self, step: int) -> None:
        for t in self.trackers:
            t.truncate_after(step)

    def close(self, ok: bool = True) -> None:
        for t in self.trackers:
            t.close(ok)


@contextmanager
def open_trackers(names: Sequence[str], out: PathLike, *, main: bool, wandb_project: str = "nearl-clip",
                  config: Optional[Dict[str, Any]] = None) -> Iterator[Tracker]:
    """The trackers `names` for the run in `out` (none off rank 0), closed when the block ends,
    with ok=False when it raises."""
    check_installed(names)
    out = Path(out)
    opened: List[Tracker] = []
    try:
        for name in names if main else ():
            if name == "tensorboard":
                opened.append(TensorBoardTracker(out / "tensorboard"))
            else:
                opened.append(WandbTracker(wandb_project, out.resolve().name, out, config or {}))
    except BaseException:
        Trackers(opened).close(ok=False)
        raise
    tracker = Trackers(opened)
    try:
        yield tracker
    except BaseException:
        tracker.close(ok=False)
        raise
    tracker.close(ok=True)


class TrackedLog(MetricsLog):
    """metrics.jsonl whose every record also goes to a tracker (and whose truncation on resume too)."""

    def __init__(self, path: PathLike, tracker: Optional[Tracker] = None, enabled: bool = True):
        super().__init__(path, enabled)
        self.tracker = tracker if tracker is not None else NullTracker()

    def write(self, record: Dict[str, Any]) -> None:
        super().write(record)
        if self.enabled:
            self.tracker.log(int(record.get("step") or 0), scalars(record))

    def truncate_after(self, step: int) -> None:
        super().truncate_after(step)
        if self.enabled:
            self.tracker.truncate_after(step)
