"""A run's settings as a file a person can read and reuse: config.yaml.

Every run writes its resolved settings (every flag, the method's options, --model and --method as
the run chose them) to `<out>/config.yaml`; `python -m nearl.train --config FILE --out NEW` runs
them again (flags given on the command line win), and `--print-config` shows what a command line
resolves to without running it. The one-shot actions (--resume, --overwrite, --force-unlock) are
never written: a file says what to train, not what to do to a folder. No torch here (--help).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping

import yaml

from nearl.errors import UserError
from nearl.writes import atomic_write

FILE = "config.yaml"
ONE_SHOT = ("resume", "overwrite", "force_unlock")  # what a command does to --out, not a setting of the run
HEADER = ("# The resolved settings of a nearl.train run (written by the run; see docs/training.md).\n"
          "# Run them again: python -m nearl.train --config {file} --out NEW_FOLDER (flags given win)\n")


def as_yaml(settings: Mapping[str, Any], *, file: str = FILE) -> str:
    """The text of a config file: `settings` (TrainConfig.to_dict()) less the one-shot actions."""
    kept = {k: v for k, v in settings.items() if k not in ONE_SHOT}
    return HEADER.format(file=file) + yaml.safe_dump(kept, sort_keys=False, default_flow_style=False)


def write(settings: Mapping[str, Any], out: Path) -> Path:
    """<out>/config.yaml, written whole or not at all."""
    return atomic_write(out / FILE, as_yaml(settings, file=str(out / FILE)).encode())


def read(path: str) -> Dict[str, Any]:
    """The settings a config file holds (a YAML mapping of setting names to values), or a UserError
    naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot be read ({e})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: holds a {type(values).__name__}, not a mapping of settings to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def checked(values: Mapping[str, Any], actions: Iterable[argparse.Action], path: str) -> Dict[str, Any]:
    """The file's values as the command line would have parsed them: each through its flag's type and
    choices (YAML has typed them already; a string goes through the type as typed on a command line).
    A setting no flag has, or a value its flag refuses, is a UserError naming the file and the setting."""
    by_dest = {a.dest: a for a in actions if a.option_strings and a.dest != "help"}
    unknown = sorted(k for k in values if k not in by_dest or k in ONE_SHOT)
    if unknown:
        raise UserError(f"--config {path}: no such setting: {', '.join(unknown)}"
                        + (" (one-shot actions go on the command line)" if set(unknown) & set(ONE_SHOT) else ""))
    return {k: _value(by_dest[k], v, path) for k, v in values.items()}


def _value(action: argparse.Action, value: Any, path: str) -> Any:
    flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
    if value is None or isinstance(value, bool) or action.type is None:
        out = value
    elif isinstance(value, list):
        out = [_convert(action, flag, v, path) for v in value]
        if action.type is not None and out and all(isinstance(v, list) for v in out):
            out = [x for v in out for x in v]  # types that parse a comma list (--report-to)
    else:
        out = _convert(action, flag, value, path)
    if action.choices is not None and out is not None and out not in action.choices:
        raise UserError(f"--config {path}: {action.dest}: {out!r} is not one of {list(action.choices)}")
    return out


def _convert(action: argparse.Action, flag: str, value: Any, path: str) -> Any:
    try:
        return action.type(str(value))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise UserError(f"--config {path}: {action.dest} ({flag}): {e}") from None
