"""BiomedCoOp's teacher prompts: per class, descriptions an LLM wrote (`--class-descriptions`, a JSON
{class: [description, ...]}), or, without that file, the prompt templates the project ensembles
filled with the class name.

BiomedCoOp's code takes the first N_PROMPTS descriptions of every class (its own file has the same
number for each). A user's file may give fewer for some classes: every class then keeps as many as
the class with the fewest, so the descriptions still line up by index (the outlier rule scores
description i of every class together), and the run says so.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

from nearl.errors import UserError
from nearl.model.classify import build_prompts

FLAG = "--class-descriptions"


def read_descriptions(path: str) -> Dict[str, List[str]]:
    """The file's {class: [description, ...]}; a UserError naming the file for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"{FLAG} {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{FLAG} {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{FLAG} {path}: expected a JSON object {{class: [description, ...]}}, "
                        f"got {type(data).__name__}")
    bad = [str(c) for c, v in data.items()
           if not isinstance(v, list) or not v or not all(isinstance(d, str) and d.strip() for d in v)]
    if bad:
        raise UserError(f"{FLAG} {path}: each class needs a non-empty list of non-empty strings; not so for "
                        f"{', '.join(repr(c) for c in bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return data


def teacher_prompts(classnames: Sequence[str], path: Optional[str], templates: Sequence[str],
                    n_prompts: int) -> Tuple[List[str], int, str]:
    """(the prompts class-major, P a class, the line that says where they came from). P descriptions
    per class: the first n_prompts, or as many as the class with the fewest; without a file, the
    templates filled with each class (build_prompts)."""
    if path is None:
        prompts = build_prompts(classnames, list(templates)[:n_prompts])
        per = len(prompts) // len(classnames)
        return prompts, per, (f"biomedcoop: no {FLAG}: its teacher prompts are the {per} prompt template(s) "
                              "filled with each class name, not LLM-written descriptions")
    data = read_descriptions(path)
    missing = [c for c in classnames if c not in data]
    if missing:
        raise UserError(f"{FLAG} {path}: no descriptions for class(es) {', '.join(repr(c) for c in missing[:10])}"
                        f"{' ...' if len(missing) > 10 else ''} (it has {', '.join(repr(c) for c in list(data)[:10])})")
    per = min(n_prompts, *(len(data[c]) for c in classnames))
    prompts = [d for c in classnames for d in data[c][:per]]
    fewer = min(len(data[c]) for c in classnames) < min(n_prompts, max(len(data[c]) for c in classnames))
    note = " (as many as the class with the fewest)" if fewer else ""
    return prompts, per, f"biomedcoop: {per} descriptions a class from {path}{note}"
