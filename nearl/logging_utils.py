"""metrics.jsonl: one JSON object per line ({"kind": "train" | "val" | ..., "step": ..., ...}); the
report logger, through which the library tells its user what it does (`reporter`, below); the
command lines' logging setup."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from nearl.writes import append_line, atomic_write

PathLike = Union[str, os.PathLike]


def json_safe(value: Any) -> Any:
    """JSON-safe: tensors and numpy scalars to floats, NaN/inf to None."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """Every record of a metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class MetricsLog:
    """Appends records to metrics.jsonl, flushing each line (a crash loses at most the line being
    written). `truncate_after(step)` drops records past a resumed checkpoint's step, so the log of a
    resumed run reads exactly like an uninterrupted one."""

    def __init__(self, path: PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(json_safe(record), allow_nan=False))  # reopened each line: cheap

    def records(self) -> Iterator[Dict[str, Any]]:
        return iter(read_metrics(self.path))

    def close(self) -> None:
        """Nothing is held open between writes; kept for symmetry."""


def format_metrics(metrics: Dict[str, Any], digits: int = 2) -> str:
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k}={v:.{digits}f}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def markdown_table(rows: Dict[str, Dict[str, Any]], digits: int = 2, title: Optional[str] = None) -> str:
    """{row name: {column: value}} -> a Markdown table (columns in first-seen order)."""
    columns: List[str] = []
    for r in rows.values():
        for k in r:
            if k not in columns:
                columns.append(k)
    lines = [f"### {title}", ""] if title else []
    lines.append("| | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for name, r in rows.items():
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def setup_logging() -> None:
    """nearl's own INFO lines (reader summaries) on rank 0; other libraries at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.getLogger("nearl").setLevel(logging.INFO if main_rank else logging.WARNING)


# ----------------------------------------------------------------------------- the report logger
REPORT = "nearl.report"


class _CurrentStdout(logging.Handler):
    """The bare message and a newline on the current sys.stdout, flushed."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout
        if stream is None:  # pythonw: print writes nowhere either
            return
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _report_logger() -> logging.Logger:
    """`nearl.report` with its handler, once (a reloaded module adds no second one); a level set before
    is kept."""
    logger = logging.getLogger(REPORT)
    if not any(type(h).__name__ == _CurrentStdout.__name__ for h in logger.handlers):
        logger.addHandler(_CurrentStdout())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


_report_logger()


def reporter(area: str) -> logging.Logger:
    """The report logger of one area of the library, `nearl.report.<area>`.

    Library code logs, the command lines print (issue 25, item 1). The lines a training run, an
    evaluation, an export or a comparison shows its user (what was built, progress, validation, results
    tables, "wrote ...") are logged through `nearl.report` and its children, one per area
    (`reporter("train")` is `nearl.report.train`). Its handler writes each message bare, as `print` did,
    to the `sys.stdout` of the moment (so redirected output, pytest's capsys and a notebook's cell all
    see it), and the logger does not propagate: a root handler (logging.basicConfig, the command lines'
    "LEVEL name: message" lines on stderr) neither repeats nor reformats them. It is at INFO on its own,
    so a notebook calling `nearl.training.fit(TrainConfig(...))` sees the lines without configuring
    logging. Lines that qualify the numbers (training images evaluated, a random backbone, an untrained
    model) are WARNINGs, the rest INFO. To silence them:

        logging.getLogger("nearl.report").setLevel(logging.WARNING)      # all but the warnings
        logging.getLogger("nearl.report.train").setLevel(logging.ERROR)  # one area

    and to have them elsewhere, add a handler to `nearl.report` (or set its `propagate`).
    """
    return logging.getLogger(f"{REPORT}.{area}")
