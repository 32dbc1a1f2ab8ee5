"""DIR/summary.md and DIR/gpu_check.json of `python -m bench.gpu_check`: the goals' verdicts, what
each step did, what was not done and why, and the tails of what failed."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from . import ncu_report
from .goals import GOALS, evaluate
from .report import write_json

STATUS_MARK = {"met": "**met**", "not met": "**NOT MET**", "not measured": "not measured"}


def step_payloads(records: List[dict]) -> Dict[str, Optional[dict]]:
    """The bench payloads (a failed step may still hold rows that ran)."""
    return {r["step"]: r["payload"] for r in records
            if isinstance(r.get("payload"), dict) and ("rows" in r["payload"] or "train" in r["payload"])}


def why_missing(records: List[dict]) -> Dict[str, str]:
    return {r["step"]: f"step {r['status']}" + (f": {r['reason']}" if r["reason"] else "") for r in records}


def test_counts(payload: Optional[dict]) -> str:
    if not payload:
        return ""
    bad = payload["failures"] + payload["errors"]
    passed = payload["tests"] - bad - payload["skipped"]
    return f"{passed} passed, {bad} failed, {payload['skipped']} skipped"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_summary(out: Path, run: dict, records: List[dict]) -> Path:
    dry = run["dry_run"]
    ran = {r["step"] for r in records}
    reasons = why_missing(records)
    goals = evaluate(step_payloads(records), reasons, dry,
                     tuple(g for g in GOALS if g.step in ran) if ran else GOALS)
    lines = ["# NEARL-CLIP GPU check", ""]
    if dry:
        lines += [f"**{run['note']}.**", ""]
    lines += ["| | |", "|---|---|"]
    for key in ("device", "driver", "torch", "triton", "cuda", "python"):
        lines.append(f"| {key} | {cell(run[key])} |")
    lines += [f"| command | `{cell(' '.join(run['command']))}` |", f"| started | {run['started']} |",
              f"| took | {run['seconds']:.0f} s of a {run['budget_s']:.0f} s budget |", ""]

    lines += ["## Performance goals", ""]
    if dry:
        lines += ["Dry run: every goal is *not measured*; the CPU runs only show that the steps work.", ""]
    lines += ["| step | goal | target | measured | verdict |", "|---|---|---|---|---|"]
    for g in goals:
        verdict = STATUS_MARK[g["status"]] + (f" ({cell(g['why'])})" if g["why"] else "")
        lines.append(f"| {g['step']} | {cell(g['goal'])} | {g['target']} | {g.get('shown', '-')} | {verdict} |")
    lines.append("")

    for r in records:
        ncu = (r["payload"] or {}).get("ncu") if isinstance(r["payload"], dict) else None
        if ncu:
            case = r["payload"]["case"]
            shape = case["shape"]
            lines += [f"## {r['step']}: Nsight Compute on the fused layer ({shape['name']}, B {shape['B']}, "
                      f"{case['dtype']}, orth {case['orth']})", "",
                      f"One pass = B N d elements of x = {ncu['pass_bytes'] / 1e6:.1f} MB; caches flushed before "
                      "each kernel; minimum: forward 2 passes, backward 3.", ""]
            lines += ncu_report.markdown(ncu) + [""]

    not_done = [r for r in records if r["status"] != "ok"]
    lines += ["## Not done or not passed", ""]
    lines += [f"- **{r['step']}**: {r['status']}" + (f": {cell(r['reason'])}" if r["reason"] else "")
              for r in not_done] or ["Every step ran and passed."]
    lines.append("")

    if run["missing_packages"]:
        lines += ["## Missing packages", ""]
        lines += [f"- `{m['pip']}` (import `{m['module']}`), needed for {m['needed_for']}"
                  + (f"; its requirements missing too: {', '.join(m['missing_requirements'])}"
                     if m["missing_requirements"] else "") for m in run["missing_packages"]]
        lines += ["", "```"] + run["carry"] + ["```", ""]

    lines += ["## Steps (most valuable first)", "", "| # | step | status | seconds | file | note |",
              "|---|---|---|---|---|---|"]
    for r in records:
        note = test_counts(r["payload"]) if r["step"].endswith("tests") and r["status"] != "skipped" else ""
        note = "; ".join(x for x in (note, r["reason"]) if x)
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['number']} | {r['step']} | {r['status']} | {secs} | [{r['step']}.json]({r['step']}.json) "
                     f"| {cell(note)} |")
    lines.append("")

    for r in records:
        if r["status"] in ("failed", "timed out") and r["output_tail"]:
            lines += [f"## {r['step']}: end of its output ({r['log']})", "", "```", r["output_tail"][-2500:], "```", ""]

    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    write_json(out / "gpu_check.json", dict(run, goals=goals))
    return summary
