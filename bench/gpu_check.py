"""`python -m bench.gpu_check`: everything only a GPU can show, within a time budget, written down.

    python -m bench.gpu_check                    # on a GPU machine: results in bench/results/
    python -m bench.gpu_check --out DIR --budget-s 480
    python -m bench.gpu_check --dry-run          # the same steps, tiny, on the CPU interpreter

Steps, most valuable first (each a subprocess with its own timeout, so a hang cannot eat the budget
and a crash cannot take the rest down):
  kernel-tests    pytest tests/test_oca_kernel.py tests/test_layer_kernel.py (forward and every
                  gradient against float64, fp32 / bf16 / fp16; on CUDA when there is one)
  model-tests     pytest tests/test_model_fused.py (needs open_clip)
  oca-vit-b16, layer-vit-b16, layer-text-b16
                  python -m bench.run --kernel oca|layer --shape ... --dtype bf16 --mode all
  ncu-layer       ncu (Nsight Compute, when on the PATH) on one fused layer forward and backward at
                  ViT-B/16, B 256: each kernel's DRAM and L2 bytes, instructions and time
                  (bench.ncu_case, bench.ncu_report)
  oca-text-b16    as above
  model           python -m bench.run --kernel model --grad-checkpointing (needs open_clip)
  memcheck        compute-sanitizer --tool memcheck python -m bench.memcheck_case (when on the PATH)
A step is not started when less than its minimum time is left, and is stopped at its share of the
budget or at the budget's end; both are written down as such, and the run goes on. Each step writes
DIR/<step>.json (device, driver, torch, triton and CUDA versions, the exact command, its result)
and DIR/logs/<step>.log; DIR/summary.md has every performance goal met / not met / not measured.

Without CUDA (or with --dry-run) the steps run at tiny sizes on the Triton interpreter, the kernel
tests on a fast subset, without the `compile` provider (a minute of C++ compilation per kernel on
a CPU), and the default DIR is a fresh temporary folder: the point is that this command keeps
working, and it says in bold that no GPU figure was measured.
Exit status: 0 when no step failed (skipped and budget-stopped steps are fine), 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import ncu_report
from .report import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DRY_NOTE = ("DRY RUN on the CPU: no GPU figure was measured; times are CPU interpreter times and mean "
            "nothing")
RESERVE_S = 5.0  # kept back at the end for writing the summary
TAIL_CHARS = 4000

# The dry run's kernel tests: forward and gradients in fp32 / fp16 / bf16 at small sizes, plus the
# unwritten-element, zero-update, strided-input, mask and limit checks (about 20 s on 2 cores).
DRY_KERNEL_TESTS = ("every_output_element_written or zero_c or kernel_limits or float64_goes or strided_inputs "
                    "or masked_tokens or B1-N1-d16 or B2-N1-d768 or 2-1-80-1 or 2-50-48")
DRY_MODEL_TESTS = "fresh_fused_model"


@dataclass
class Step:
    name: str  # also the file name: DIR/<name>.json
    title: str
    kind: str  # "pytest" | "bench" | "memcheck" | "ncu"
    args: List[str]  # after `python -m`
    share: float  # the most of the budget one run may take
    min_s: float  # not started with less than this left (a quarter of it in the dry run)
    needs: Tuple[str, ...] = ()  # import names (bench.check_env.OPTIONAL)
    dry_args: List[str] = field(default_factory=list)  # added in the dry run


def plan(dry_run: bool) -> List[Step]:
    from .providers import PROVIDERS

    dry_bench = ["--device", "cpu", "--reps", "2", "--warmup", "0",
                 "--providers", ",".join(p for p in PROVIDERS if p != "compile")]

    def bench(kernel: str, shape: str) -> Step:
        return Step(f"{kernel}-{shape}", f"bench.run --kernel {kernel} --shape {shape}", "bench",
                    ["bench.run", "--kernel", kernel, "--shape", shape, "--dtype", "bf16", "--mode", "all"],
                    share=0.3, min_s=40, dry_args=dry_bench)

    return [
        Step("kernel-tests", "kernel tests (OCA, layer)", "pytest",
             ["pytest", "tests/test_oca_kernel.py", "tests/test_layer_kernel.py"], share=0.45, min_s=60,
             needs=("pytest",), dry_args=["-k", DRY_KERNEL_TESTS]),
        Step("model-tests", "fused-model tests", "pytest", ["pytest", "tests/test_model_fused.py"],
             share=0.3, min_s=40, needs=("pytest", "open_clip"), dry_args=["-k", DRY_MODEL_TESTS]),
        bench("oca", "vit-b16"),
        bench("layer", "vit-b16"),
        bench("layer", "text-b16"),
        Step("ncu-layer", "ncu: the fused layer's kernels, bytes and time (ViT-B/16, B 256)", "ncu",
             ["bench.ncu_case"], share=0.3, min_s=45, dry_args=["--device", "cpu"]),
        bench("oca", "text-b16"),
        Step("model", "bench.run --kernel model", "bench", ["bench.run", "--kernel", "model", "--dtype", "bf16",
                                                            "--grad-checkpointing"],
             share=0.35, min_s=60, needs=("open_clip",),
             dry_args=["--device", "cpu", "--batch", "2", "--reps", "1", "--warmup", "0"]),
        Step("memcheck", "compute-sanitizer memcheck: one OCA and one layer fwd+bwd", "memcheck",
             ["bench.memcheck_case"], share=0.3, min_s=30, dry_args=["--device", "cpu"]),
    ]


# ------------------------------------------------------------------------------ running one step
def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: an orphan reparented to a
    container's PID 1 that never reaps stays a zombie for good."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():  # not Linux: kill(0) is the best there is
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc_root.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def stop(proc: subprocess.Popen) -> None:
    """End the step's whole process group (the step may have started compiler workers of its own)
    and return only once none of it runs: the leader can exit before its children have died."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(proc.pid):
                return
            time.sleep(0.05)
    proc.poll()


def run_command(cmd: List[str], env: Dict[str, str], timeout: float, log_path: Path) -> Tuple[Optional[int], bool]:
    """(exit status, timed out); output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            stop(proc)
            return proc.returncode, True
        except KeyboardInterrupt:
            stop(proc)
            raise


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def junit_counts(path: Path) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        node = case.find("skipped")
        if node is not None:
            skipped.append(f"{name}: {node.get('message')}")
    return dict(counts, failed=failed, skipped_tests=skipped)


@dataclass
class Context:
    dry_run: bool
    env: Dict[str, str]
    raw_dir: Path  # the steps' own result files (junit XML, bench.run --out JSON), beside their logs
    sanitizer: Optional[str]
    pytest_args: List[str]
    ncu: Optional[str] = None


# what ncu prints where it cannot read the hardware counters (KINDS.md: gVisor; a driver that
# restricts them to root)
NCU_NO_COUNTERS = ("LibraryNotLoaded", "ERR_NVGPUCTRPERM", "Failed to initialize the profiler")


def find_ncu() -> Optional[str]:
    """Nsight Compute's CLI: on the PATH, else where the CUDA toolkit and Nsight Compute's own
    installer put it (the newest version)."""
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu"):
        hits = sorted(glob.glob(pattern), key=lambda path: [int(n) for n in re.findall(r"\d+", path)])
        if hits:
            return hits[-1]  # the newest: 2025.10 after 2025.3
    return None


def ncu_case_json(raw: Path) -> Path:
    return raw.with_name(raw.name.replace(".csv", ".case.json"))


def command_for(step: Step, ctx: Context) -> Tuple[List[str], Optional[Path], Dict[str, str]]:
    """The exact command, where its machine-readable result will be, and its environment."""
    args = list(step.args) + (step.dry_args if ctx.dry_run else [])
    env = dict(ctx.env)
    suffix = {"pytest": "junit.xml", "ncu": "csv"}.get(step.kind, "out.json")
    raw = ctx.raw_dir / f"{step.name}.{suffix}"
    if step.kind == "pytest":
        args = args[:1] + ["-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={raw}"] + ctx.pytest_args + args[1:]
    elif step.kind == "ncu":  # the case writes its shape; ncu writes its CSV to raw
        args += ["--out", str(ncu_case_json(raw))]
    else:
        args += ["--out", str(raw)]
    cmd = [sys.executable, "-m"] + args
    if step.kind == "ncu" and ctx.ncu and not ctx.dry_run:
        cmd = ncu_report.ncu_command(ctx.ncu, str(raw)) + cmd
    if step.kind == "memcheck" and ctx.sanitizer and not ctx.dry_run:
        cmd = [ctx.sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20"] + cmd
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # one allocation per tensor: overruns are visible
    return cmd, raw, env


def outcome(step: Step, rc: Optional[int], raw: Optional[Path], log: Path, ctx: Context) -> Tuple[str, str, object]:
    """(status, reason, payload) of a step that ran to its end."""
    text = tail(log, 200_000)
    if step.kind == "ncu":
        return ncu_outcome(rc, raw, text, ctx)
    if step.kind == "pytest":
        payload = junit_counts(raw) if raw else None
        if rc == 0:
            return "ok", "", payload
        if rc == 5:
            return "failed", "no test was selected", payload
        if payload:
            return "failed", f"{payload['failures']} failed, {payload['errors']} errors of {payload['tests']}", payload
        return "failed", f"pytest exited with {rc}", payload
    payload = None
    if raw and raw.exists():
        try:
            payload = json.loads(raw.read_text())
        except ValueError as err:
            return "failed", f"unreadable result {raw.name}: {err}", None
    if step.kind == "memcheck":
        payload = {"sanitizer": None if ctx.dry_run else ctx.sanitizer, "case": payload,
                   "error_summary": next((ln.strip() for ln in text.splitlines() if "ERROR SUMMARY" in ln), None)}
        if "Device not supported" in text or "device is not supported" in text.lower():
            return "skipped", "compute-sanitizer cannot use this device here (\"Device not supported\")", payload
    if rc == 0:
        dry = step.kind == "memcheck" and ctx.dry_run
        return "ok", "dry run: the case ran on the interpreter, without compute-sanitizer" if dry else "", payload
    if step.kind == "bench" and rc == 1 and payload:
        rows = payload.get("rows") or (payload.get("inference", []) + payload.get("train", []))
        bad = [f"{r.get('provider', r.get('variant'))} {r.get('mode', '')}".strip() for r in rows
               if r.get("status") == "failed"]
        return "failed", f"{len(bad)} row(s) failed: {', '.join(bad)}", payload
    if step.kind == "memcheck" and rc == 3:
        return "failed", f"memcheck found errors: {payload['error_summary']}", payload
    return "failed", f"exited with {rc}", payload


def ncu_outcome(rc: Optional[int], raw: Path, log_text: str, ctx: Context) -> Tuple[str, str, object]:
    """The ncu step: its case's shape and, profiled, each layer kernel's figures (bench.ncu_report)."""
    case_path = ncu_case_json(raw)
    try:
        case = json.loads(case_path.read_text())
    except (OSError, ValueError):
        case = None
    if ctx.dry_run:
        if rc == 0:
            return "ok", "dry run: the case ran on the interpreter, without ncu", {"case": case}
        return "failed", f"exited with {rc}", {"case": case}
    ncu_text = tail(raw, 2_000_000)
    seen = next((s for s in NCU_NO_COUNTERS if s in ncu_text or s in log_text), None)
    if seen:
        return "skipped", f"ncu cannot read the hardware counters on this machine (\"{seen}\")", {"case": case}
    if rc != 0:
        return "failed", f"exited with {rc}", {"case": case}
    # the CSV goes to --log-file; should an ncu version print it to stdout instead, it is in the log
    launches = ncu_report.read_csv(ncu_text) or ncu_report.read_csv(log_text)
    if not launches or case is None:
        return "failed", "ncu profiled no fused-layer kernel" if case else f"no case result ({case_path.name})", \
            {"case": case}
    return "ok", "", {"case": case, "ncu": ncu_report.summarise(launches, case["pass_bytes"])}


# --------------------------------------------------------------------------------- the whole run
def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Check:
    def __init__(self, steps: List[Step], out: Path, budget_s: float, dry_run: bool, header: dict,
                 available: Callable[[str], bool], ctx: Context, clock: Callable[[], float] = time.monotonic):
        self.steps, self.out, self.budget, self.dry_run = steps, out, budget_s, dry_run
        self.header, self.available, self.ctx, self.clock = header, available, ctx, clock
        self.t0 = clock()
        self.records: List[dict] = []

    def left(self) -> float:
        return self.budget - (self.clock() - self.t0) - RESERVE_S

    def why_not(self, step: Step) -> Optional[str]:
        """Why a step cannot start (a missing package or tool, too little budget), or None."""
        missing = [m for m in step.needs if not self.available(m)]
        if missing:
            return f"needs {', '.join(missing)}, not installed here (see 'Missing packages')"
        need = step.min_s / 4 if self.dry_run else step.min_s
        if self.left() < need:
            return (f"budget: {max(self.left(), 0):.0f} s left of --budget-s {self.budget:.0f}, "
                    f"the step needs at least {need:.0f} s")
        return None

    def record(self, step: Step, number: int, **fields) -> dict:
        rec = {"step": step.name, "title": step.title, "number": number, **self.header,
               "dry_run": self.dry_run, "note": DRY_NOTE if self.dry_run else None,
               "command": None, "started": None, "seconds": None, "timeout_s": None, "returncode": None,
               "status": None, "reason": "", "log": None, "output_tail": None, "payload": None}
        rec.update(fields)
        write_json(self.out / f"{step.name}.json", rec)
        self.records.append(rec)
        return rec

    def run(self) -> List[dict]:
        total = len(self.steps)
        for i, step in enumerate(self.steps, start=1):
            reason = self.why_not(step)
            if step.kind == "memcheck" and reason is None and not self.dry_run and not self.ctx.sanitizer:
                reason = "compute-sanitizer is not on the PATH (it comes with the CUDA toolkit)"
            if step.kind == "ncu" and reason is None and not self.dry_run and not self.ctx.ncu:
                reason = "ncu is not on the PATH nor in /opt/nvidia/nsight-compute (it comes with the CUDA toolkit)"
            if reason:
                print(f"[{i}/{total}] {step.name}: skipped: {reason}", flush=True)
                self.record(step, i, status="skipped", reason=reason)
                continue
            timeout = max(1.0, min(self.left(), step.share * self.budget))
            cmd, raw, env = command_for(step, self.ctx)
            results = [raw] if raw is not None else []
            if step.kind == "ncu":
                results.append(ncu_case_json(raw))  # the ncu step's second result: its case's shape
            for old in results:
                if old.exists():
                    old.unlink()  # an earlier run's result must not pass for this one's
            log = self.out / "logs" / f"{step.name}.log"
            by_budget = timeout >= self.left()  # else its share of the budget is the limit
            print(f"[{i}/{total}] {step.name}: {step.title} (at most {timeout:.0f} s) ...", flush=True)
            started, t = now(), self.clock()
            try:
                rc, timed_out = run_command(cmd, env, timeout, log)
            except KeyboardInterrupt:
                self.record(step, i, status="interrupted", reason="stopped by the user (Ctrl-C)", command=cmd,
                            started=started, seconds=round(self.clock() - t, 1), log=str(log.relative_to(self.out)),
                            output_tail=tail(log))
                for j, rest in enumerate(self.steps[i:], start=i + 1):
                    self.record(rest, j, status="skipped", reason="the run was interrupted")
                raise
            seconds = round(self.clock() - t, 1)
            if timed_out:
                cause = "the budget ran out" if by_budget else f"its share of the budget ({step.share:.0%})"
                status, why, payload = "timed out", f"stopped after {timeout:.0f} s: {cause}", None
            else:
                status, why, payload = outcome(step, rc, raw, log, self.ctx)
            print(f"[{i}/{total}] {step.name}: {status} in {seconds:.0f} s{': ' + why if why else ''}", flush=True)
            self.record(step, i, status=status, reason=why, command=cmd, started=started, seconds=seconds,
                        timeout_s=round(timeout), returncode=rc, log=str(log.relative_to(self.out)),
                        output_tail=tail(log), payload=payload)
        return self.records


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where the JSON files, logs/ and summary.md go (default: bench/results/; "
                        "in the dry run a new temporary folder)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default: 480)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU interpreter (the default when there is no CUDA device)")
    p.add_argument("--only", metavar="STEPS", default=None, help="comma list of steps to run (default: all)")
    return p


def main(argv: Optional[Sequence[str]] = None, available: Optional[Callable[[str], bool]] = None) -> int:
    from . import check_env
    from .check_summary import write_summary

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s:g}")
    import torch

    cuda = torch.cuda.is_available()
    dry_run = args.dry_run or not cuda
    steps = plan(dry_run)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        known = [s.name for s in steps]
        bad = [n for n in names if n not in known]
        if bad or not names:
            parser.error(f"--only takes a comma list of {', '.join(known)}; got {args.only!r}")
        steps = [s for s in steps if s.name in names]
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            parser.error(f"--out {args.out}: exists and is not a folder")
    else:
        out = Path(tempfile.mkdtemp(prefix="nearl-gpu-check-dry-run-")) if dry_run else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    available = available or check_env.importable
    missing = check_env.missing_packages(available)
    header = check_env.versions(on_gpu=not dry_run)
    command = [sys.executable, "-m", "bench.gpu_check"] + list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    else:
        env.pop("TRITON_INTERPRET", None)  # real kernels, not the interpreter
    print(f"NEARL-CLIP GPU check: {header['device']}, torch {header['torch']}, triton {header['triton']}, "
          f"CUDA {header['cuda']}, driver {header['driver']}; budget {args.budget_s:.0f} s; results in {out}")
    if dry_run:
        why = "--dry-run" if args.dry_run else "no CUDA device"
        print(f"!! {DRY_NOTE} ({why}).")
    for m in missing:
        print(f"missing: {m['pip']} (import {m['module']}), needed for {m['needed_for']}")
    for line in check_env.carry_advice(missing):
        print(line)
    pytest_args = [] if available("pytest_benchmark") else ["-o", "addopts=-ra"]  # pytest.ini names its flag
    started = now()
    ctx = Context(dry_run, env, out / "logs", shutil.which("compute-sanitizer"), pytest_args, find_ncu())
    check = Check(steps, out, args.budget_s, dry_run, header, available, ctx)
    interrupted = False
    try:
        records = check.run()
    except KeyboardInterrupt:
        records, interrupted = check.records, True
    run = {"command": command, "started": started, "seconds": round(time.monotonic() - check.t0, 1),
           "budget_s": args.budget_s, "dry_run": dry_run, "note": DRY_NOTE if dry_run else None, **header,
           "missing_packages": missing, "carry": check_env.carry_advice(missing),
           "steps": [{k: r[k] for k in ("step", "status", "reason", "seconds")} for r in records]}
    summary = write_summary(out, run, records)
    print(f"summary: {summary}")
    if interrupted:
        return 130
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
