"""argparse value types that refuse what would silently mean something else.

argparse prints a type's `ArgumentTypeError` as "argument --flag: <message>" and exits 2, so every
message here names the value seen and the flag is named by argparse. `allow_negative_numbers`
lets "--lr -1e-3" reach its type (and its clear message) instead of failing as "expected one
argument": argparse only recognises "-1" and "-.5" as numbers, not "-1e-3".
"""
from __future__ import annotations

import argparse
import math
import re
from typing import List, Optional


def _number(text: str, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# Upper bounds of what a run can use: past them a value is a typo, and used to fail deep inside (a seed
# torch cannot take: "Overflow when unpacking long long"), be silently altered (1e23 steps through a
# float), or run for ever (100,000 queries).
MAX_SEED = 2 ** 63 - 1  # torch's and numpy's generators take 64-bit seeds (the data order mixes them)
MAX_STEPS = 10 ** 9  # optimizer steps or epochs of one run
MAX_QUERIES = 1024  # NEARL-CLIP's query bank (SPEC's M is 16)

# --classes: all, or CoOp's base-to-novel halves of the class list (nearl.data.labelled reads them)
CLASS_SUBSETS = ("all", "base", "novel")
UNCERTAIN_LABELS = ("zeros", "ones")  # --uncertain-labels: how a label column's -1 (uncertain) is read

def seed(text: str) -> int:
    """A generator seed: an integer in [0, 2**63 - 1]."""
    value = non_negative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1 = {MAX_SEED} (a 64-bit generator seed), "
                                         f"got {value}")
    return value


def bounded_int(high: int, why: str):
    """A positive integer of at most `high`; `why` says what the bound is."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,} ({why}), got {value:,}")
        return value
    parse.__name__ = f"positive_int_at_most_{high}"
    return parse


steps = bounded_int(MAX_STEPS, "a run of more steps or epochs never ends")
queries = bounded_int(MAX_QUERIES, "the paper uses 16; every query is attended to by every token of every block")


def _finite(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def unit_interval(text: str) -> float:
    """A fraction in [0, 1]."""
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


def adam_beta(text: str) -> float:
    """An Adam moment decay in [0, 1) (1 would never forget the first gradient)."""
    value = _finite(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|auto)$")


def device(text: str) -> str:
    """cpu, cuda, cuda:N or auto (anything else used to run on the CPU without a word)."""
    if not _DEVICE.match(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or auto, got {text!r}")
    return text.strip().lower()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse's default prints the whole usage first,
    which for a command with forty options buries the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# Numbers argparse must take as values, not options: 5, -5, -.5, -1e-3, -1.5E+2.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def allow_negative_numbers(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let values such as -1e-3 reach their type (argparse's own matcher misses scientific notation).
    Safe while the parser has no option that itself looks like a negative number."""
    parser._negative_number_matcher = _NEGATIVE_NUMBER
    return parser


def block_numbers(text: str) -> Optional[List[int]]:
    """'all' -> None (every block), 'none' -> [], '1,2,12' or '9-12' -> indices (1-based)."""
    text = text.strip().lower()
    if text == "all":
        return None
    if text in ("none", ""):
        return []
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise argparse.ArgumentTypeError(f"the range {part!r} is empty ({a} > {b}); write {b}-{a}")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'all', 'none' or 1-based block numbers and ranges "
                                             f"such as '1,2,12' or '9-12', got {text!r}") from None
    if any(k < 1 for k in out):
        raise argparse.ArgumentTypeError(f"block numbers are 1-based (>= 1), got {text!r}")
    return out
