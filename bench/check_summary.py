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
    if not payload or "tests" not in payload:
        return ""
    bad = payload["failures"] + payload["errors"]
    passed = payload["tests"] - bad - payload["skipped"]
    return f"{passed} passed, {bad} failed, {payload['skipped']} skipped"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def payload_of(records: List[dict], step: str) -> Optional[dict]:
    rec = next((r for r in records if r["step"] == step and r["status"] == "ok"), None)
    return rec["payload"] if rec and isinstance(rec["payload"], dict) else None


# (label, where in the env step's record: a key of nvidia-smi's row, else of the record or its torch
# device properties)
ENV_ROWS = (("GPU", "name"), ("SMs", "multi_processor_count"), ("compute capability", "compute_capability"),
            ("memory (bytes)", "total_memory"), ("L2 (bytes)", "L2_cache_size"), ("SM clock now / max (MHz)",
            ("clocks.sm", "clocks.max.sm")), ("memory clock now / max (MHz)", ("clocks.mem", "clocks.max.mem")),
            ("application clock (MHz)", "clocks.applications.graphics"), ("ECC", "ecc.mode.current"),
            ("power limit / max (W)", ("power.limit", "power.max_limit")), ("performance state", "pstate"),
            ("temperature (C)", "temperature.gpu"), ("MIG", "mig.mode.current"), ("driver", "driver"))


def env_lines(env: Optional[dict]) -> List[str]:
    """The env step's facts as a table (the GPU's SKU, clocks, ECC, power)."""
    if not env:
        return []
    if not env.get("on_gpu"):
        return ["## Environment (env step)", "", f"{env.get('note')}: {env.get('device')}.", ""]
    smi, gpu = env.get("nvidia_smi") or {}, env.get("gpu") or {}

    def look(key):
        return next((src[key] for src in (smi, env, gpu) if src.get(key) not in (None, "")), "-")

    lines = ["## Environment (env step)", "", "| | |", "|---|---|"]
    for label, key in ENV_ROWS:
        value = " / ".join(str(look(k)) for k in key) if isinstance(key, tuple) else look(key)
        lines.append(f"| {label} | {cell(value)} |")
    return lines + [f"| nvidia-smi | {cell(env.get('nvidia_smi_query') or 'not found')} |", ""]


def profile_lines(payload: Optional[dict]) -> List[str]:
    """Per op of the profile step: the kernels, their summed time and the three longest."""
    if not payload or not payload.get("ops"):
        return []
    what = ("its CUDA kernels: launches, their summed time, the three longest" if payload.get("on_gpu") else
            "its CPU ops' self times on the interpreter, which say nothing of a GPU")
    lines = ["## profile: every op once, fwd+bwd, bf16 (torch.profiler)", "", f"Per op: {what}.", "",
             "| op | shape | launches | total (us) | wall (us) | longest (us) |", "|---|---|---|---|---|---|"]
    for o in payload["ops"]:
        top = ", ".join(f"{k['name'][:48]} {k['total_us']:.0f}" for k in o["kernels"][:3])
        lines.append(f"| {o['op']} | {o['shape']['name']} (B {o['shape']['B']}) | {o['kernel_count']} "
                     f"| {o['total_us']:.0f} | {o['wall_us']:.0f} | {cell(top)} |")
    return lines + [""]


def graph_lines(records: List[dict]) -> List[str]:
    """Eager against CUDA-graph replay, per bench step, provider and mode that both timed."""
    lines = []
    for r in records:
        rows = (r["payload"] or {}).get("rows") if isinstance(r["payload"], dict) else None
        ok = {(x["provider"], x["mode"], bool(x.get("graph"))): x["timing"]["median_ms"] for x in rows or []
              if x.get("status") == "ok"}
        for (prov, mode, graph), ms in ok.items():
            if graph and (prov, mode, False) in ok:
                eager = ok[(prov, mode, False)]
                lines.append(f"| {r['step']} | {prov} | {mode} | {eager * 1e3:.1f} | {ms * 1e3:.1f} "
                             f"| {eager / ms:.2f}x |")
    if not lines:
        return []
    return ["## CUDA graphs: eager against replay (median us)", "",
            "| step | provider | mode | eager | graph | eager / graph |", "|---|---|---|---|---|---|", *lines, ""]


def partial(r: dict) -> bool:
    """A step that passed on part of its work (a subset of the kernel tests)."""
    return isinstance(r.get("payload"), dict) and bool((r["payload"].get("selection") or {}).get("subset"))


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

    lines += env_lines(payload_of(records, "env"))
    lines += profile_lines(payload_of(records, "profile"))
    for r in records:
        ncu = (r["payload"] or {}).get("ncu") if isinstance(r["payload"], dict) else None
        if ncu:
            case = r["payload"]["case"]
            shape = case["shape"]
            lines += [f"## {r['step']}: Nsight Compute on {case.get('kernel', 'the fused layer')} ({shape['name']}, "
                      f"B {shape['B']}, {case['dtype']}, orth {case['orth']})", "",
                      f"One pass = B N d elements of x = {ncu['pass_bytes'] / 1e6:.1f} MB; caches flushed before "
                      "each kernel; minimum: forward 2 passes, backward 3.", ""]
            lines += ncu_report.markdown(ncu) + [""]
    lines += graph_lines(records)

    not_done = [r for r in records if r["status"] != "ok" or partial(r)]
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
