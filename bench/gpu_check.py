"""`python -m bench.gpu_check`: everything only a GPU can show, within a time budget, written down.

    python -m bench.gpu_check                    # on a GPU machine: results in bench/results/
    python -m bench.gpu_check --out DIR --budget-s 480
    python -m bench.gpu_check --dry-run          # the same steps, tiny, on the CPU interpreter

Steps, most valuable first (each a subprocess with its own timeout, so a hang cannot eat the budget
and a crash cannot take the rest down); each writes DIR/<step>.json, and its raw result in DIR/logs/:
  env             the GPU: name, SM count, compute capability, clocks now and at most, ECC, power
                  limit, driver (torch.cuda.get_device_properties, nvidia-smi); python -m bench.check_env
  profile         every op once at the real shapes, fwd+bwd, bf16, under torch.profiler: each CUDA
                  kernel's calls and time (ops.oca, the layer's fused and split paths; ViT-B/16 and
                  text-B/16, B 256); python -m bench.profile_case
  ncu             Nsight Compute (when found) on OCA, the fused layer and its split path, fwd and bwd,
                  ViT-B/16, B 256: every kernel's SpeedOfLight, Occupancy, LaunchStats,
                  WarpStateStats and MemoryWorkloadAnalysis sections, DRAM and L2 bytes, instructions,
                  time (bench.ncu_case, bench.ncu_report)
  oca-vit-b16, layer-vit-b16, layer-text-b16, oca-text-b16 (B 256), then the same at B 32 (-b32)
                  python -m bench.run --kernel oca|layer --shape ... --B ... --dtype bf16 --mode all
                  --providers reference,compile[,split],triton --cuda-graphs: each row eager and
                  replayed from a CUDA graph
  sweep           python -m bench.layer_table measure: both layer paths timed per bucket, the table
                  nearl.ops.layer_path reads; copied to nearl/ops/layer_paths/<GPU name>.json to be committed
  kernel-tests    pytest tests/kernels/test_oca_kernel.py tests/kernels/test_layer_kernel.py, sized to what is left:
                  at ~2.5 s of compile a case, a fixed-order subset when they cannot all fit
  model-tests     pytest tests/model/test_model_fused.py (needs open_clip)
  model           python -m bench.run --kernel model --grad-checkpointing (needs open_clip)
  memcheck, initcheck
                  compute-sanitizer --tool memcheck | initcheck python -m bench.memcheck_case
A step is not started when less than its minimum time is left, and is stopped at its share of the
budget or at the budget's end; both are written down as such, and the run goes on. Each record
holds the device, driver, torch, triton and CUDA versions, the exact command and its result;
DIR/summary.md has every performance goal met / not met / not measured, and what was skipped and why.

Without CUDA (or with --dry-run) the steps run at tiny sizes on the Triton interpreter, the kernel
tests on a fast subset, without the `compile` provider (a minute of C++ compilation per kernel on
a CPU); the sweep is skipped (it needs a GPU), and the default DIR is a fresh temporary folder: the
point is that this command keeps working, and it says in bold that no GPU figure was measured.
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
KERNEL_TEST_FILES = ("tests/kernels/test_oca_kernel.py", "tests/kernels/test_layer_kernel.py")
# Sizing the kernel tests: on a GPU their time is the Triton compile of each case's kernels (issue
# 23: 158 specialisations at about 2-3 s each); pytest's start and collection come on top.
PER_TEST_S = 2.5
TEST_OVERHEAD_S = 20.0
# The test functions a subset takes first, most valuable first (one case of each before a second).
KERNEL_TEST_PRIORITY = (
    "test_forward_and_every_gradient_match_float64", "test_matches_float64_reference",
    "test_h100_tiling_matches_float64", "test_gpu_tiling_at_a_full_batch_matches_reference",
    "test_every_output_element_written", "test_masked_tokens_get_their_oca_update_but_never_reach_q_out",
    "test_nan_in_masked_tokens_never_reaches_the_queries", "test_gpu_tiling_matches_reference",
    "test_large_query_banks_take_the_split_path_and_stay_accurate", "test_bf16_with_the_gpus_tf32",
    "test_strided_inputs", "test_rows_with_a_large_mean",
)
BENCH_BATCHES = (256, 32)
BENCH_CASES = (("oca", "vit-b16"), ("layer", "vit-b16"), ("layer", "text-b16"), ("oca", "text-b16"))


@dataclass
class Step:
    name: str  # also the file name: DIR/<name>.json
    title: str
    kind: str  # "env" | "case" | "ncu" | "bench" | "sweep" | "pytest" | "sanitizer"
    args: List[str]  # after `python -m`
    share: float  # the most of the budget one run may take
    min_s: float  # not started with less than this left (a quarter of it in the dry run)
    needs: Tuple[str, ...] = ()  # import names (bench.check_env.OPTIONAL)
    dry_args: List[str] = field(default_factory=list)  # added in the dry run
    tool: str = ""  # the compute-sanitizer tool of a "sanitizer" step
    gpu_only: bool = False  # skipped in the dry run
    sized: bool = False  # a pytest step cut to the cases its time can compile


def bench_step(kernel: str, shape: str, B: int, dry_run: bool) -> Step:
    """bench.run for one kernel, shape and batch, each row eager and CUDA-graph replayed; in the
    dry run at the CPU size, without `compile`, the B 32 steps forward only."""
    providers = ["reference", "compile"] + (["split"] if kernel == "layer" else []) + ["triton"]
    name = f"{kernel}-{shape}" + ("" if B == 256 else f"-b{B}")
    args = ["bench.run", "--kernel", kernel, "--shape", shape]
    if dry_run:
        small = B == 256
        args += ["--device", "cpu", "--reps", "2", "--warmup", "0", "--dtype", "bf16", "--mode",
                 "all" if small else "fwd", "--providers", ",".join(p for p in providers if p != "compile")]
        args += [] if small else ["--B", "1"]
    else:
        args += ["--B", str(B), "--dtype", "bf16", "--mode", "all", "--providers", ",".join(providers)]
    return Step(name, f"bench.run --kernel {kernel} --shape {shape} --B {B}, eager and CUDA graphs", "bench",
                args + ["--cuda-graphs"], share=0.2 if B == 256 else 0.15, min_s=30 if B == 256 else 25)


def plan(dry_run: bool) -> List[Step]:
    benches = [bench_step(k, s, B, dry_run) for B in BENCH_BATCHES for k, s in BENCH_CASES]
    return [
        Step("env", "the GPU: SKU, SMs, clocks, ECC, power, driver", "env", ["bench.check_env"], share=0.05,
             min_s=5, dry_args=["--device", "cpu"]),
        Step("profile", "torch.profiler: every op once, fwd+bwd, per-kernel times", "case", ["bench.profile_case"],
             share=0.2, min_s=30, dry_args=["--device", "cpu"]),
        Step("ncu", "ncu: OCA, the fused layer and its split path, every kernel (ViT-B/16, B 256)", "ncu",
             ["bench.ncu_case"], share=0.25, min_s=45, dry_args=["--device", "cpu"]),
        *benches,
        Step("sweep", "bench.layer_table measure: fused vs split per bucket, this GPU's table", "sweep",
             ["bench.layer_table", "measure"], share=0.3, min_s=60, gpu_only=True),
        Step("kernel-tests", "kernel tests (OCA, layer), sized to the time left", "pytest",
             ["pytest", *KERNEL_TEST_FILES], share=0.45, min_s=60, needs=("pytest",),
             dry_args=["-k", DRY_KERNEL_TESTS], sized=True),
        Step("model-tests", "fused-model tests", "pytest", ["pytest", "tests/model/test_model_fused.py"],
             share=0.2, min_s=40, needs=("pytest", "open_clip"), dry_args=["-k", DRY_MODEL_TESTS]),
        Step("model", "bench.run --kernel model", "bench", ["bench.run", "--kernel", "model", "--dtype", "bf16",
                                                            "--grad-checkpointing"],
             share=0.25, min_s=60, needs=("open_clip",),
             dry_args=["--device", "cpu", "--batch", "2", "--reps", "1", "--warmup", "0"]),
        Step("memcheck", "compute-sanitizer memcheck: one OCA and one layer fwd+bwd", "sanitizer",
             ["bench.memcheck_case"], share=0.15, min_s=30, dry_args=["--device", "cpu"], tool="memcheck"),
        Step("initcheck", "compute-sanitizer initcheck: one OCA and one layer fwd+bwd", "sanitizer",
             ["bench.memcheck_case"], share=0.15, min_s=30, dry_args=["--device", "cpu"], tool="initcheck"),
    ]


# ------------------------------------------------------------------ sizing the kernel tests
def test_capacity(seconds: float) -> int:
    """How many kernel-test cases `seconds` can compile and run (at least one)."""
    return max(1, int((seconds - TEST_OVERHEAD_S) // PER_TEST_S))


def spread(n: int) -> List[int]:
    """0..n-1 in the order a subset takes them: the last (the largest parameters, as the tests
    order them), the first, then the midpoints, so that a few cases span the range."""
    order = [n - 1, 0] + [(k * n) // 2 ** lvl for lvl in range(1, n.bit_length() + 1) for k in range(1, 2 ** lvl, 2)]
    seen: List[int] = []
    for i in order + list(range(n)):
        if 0 <= i < n and i not in seen:
            seen.append(i)
    return seen


def choose_tests(ids: Sequence[str], capacity: int, priority: Sequence[str] = KERNEL_TEST_PRIORITY) -> List[str]:
    """A deterministic subset of the test ids of at most `capacity` (all when they fit): test
    functions in `priority` order (the others after, in collection order), one case of each
    function per round; returned in collection order."""
    if capacity >= len(ids):
        return list(ids)
    groups: Dict[str, List[str]] = {}
    for node in ids:
        groups.setdefault(node.split("[", 1)[0], []).append(node)
    rank = {name: i for i, name in enumerate(priority)}
    order = sorted(groups, key=lambda g: rank.get(g.rsplit("::", 1)[-1], len(rank)))  # stable: collection order
    queues = {g: [groups[g][i] for i in spread(len(groups[g]))] for g in order}
    chosen: List[str] = []
    for depth in range(max(len(q) for q in queues.values())):
        for g in order:
            if depth < len(queues[g]) and len(chosen) < capacity:
                chosen.append(queues[g][depth])
    keep = set(chosen)
    return [node for node in ids if node in keep]


def collect_tests(step: Step, ctx: "Context", timeout: float = 120.0) -> Optional[List[str]]:
    """The test ids the step's pytest command selects, or None when collecting fails."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ctx.pytest_args,
           *step.args[1:], *(step.dry_args if ctx.dry_run else [])]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=ctx.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    ids = [ln.strip() for ln in done.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
    return ids if done.returncode == 0 and ids else None


def size_tests(step: Step, ctx: "Context", seconds: float) -> Tuple[Optional[List[str]], dict]:
    """(the ids to run, or None for the step's own selection; what was chosen and why)."""
    ids = collect_tests(step, ctx, timeout=min(120.0, seconds / 2))  # within the step's own time
    if ids is None:
        return None, {"collected": None, "note": "collecting the tests failed: the whole selection runs"}
    chosen = choose_tests(ids, test_capacity(seconds))
    info = {"collected": len(ids), "run": len(chosen), "per_test_s": PER_TEST_S, "seconds": round(seconds),
            "subset": len(chosen) < len(ids)}
    if not info["subset"]:
        info["note"] = f"all {len(ids)} collected cases fit its {seconds:.0f} s at ~{PER_TEST_S} s of compile a case"
        return None, info
    ids_file = ctx.raw_dir / f"{step.name}.ids"
    ids_file.parent.mkdir(parents=True, exist_ok=True)
    ids_file.write_text("\n".join(chosen) + "\n")
    info["ids_file"] = str(ids_file)
    info["note"] = (f"ran {len(chosen)} of {len(ids)} test cases: a fixed-order subset sized to its {seconds:.0f} s "
                    f"at ~{PER_TEST_S} s of compile a case ({ids_file.name})")
    return chosen, info


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
    device: Optional[str] = None  # torch.cuda.get_device_name: the sweep's table is named after it
    tables: Optional[Path] = None  # where the sweep's table is copied (default nearl/ops/layer_paths/)


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


def raw_path(step: Step, ctx: Context) -> Path:
    """Where the step's machine-readable result goes."""
    if step.kind == "sweep":
        return ctx.raw_dir.parent / "layer_table.json"
    suffix = {"pytest": "junit.xml", "ncu": "csv"}.get(step.kind, "out.json")
    return ctx.raw_dir / f"{step.name}.{suffix}"


def command_for(step: Step, ctx: Context, timeout: Optional[float] = None,
                select: Optional[List[str]] = None) -> Tuple[List[str], Optional[Path], Dict[str, str]]:
    """The exact command, where its machine-readable result will be, and its environment.
    `timeout`: the step's limit (the sweep stops starting entries well before it); `select`: the
    test ids a sized pytest step runs instead of its own selection."""
    args = list(step.args) + (step.dry_args if ctx.dry_run else [])
    env = dict(ctx.env)
    raw = raw_path(step, ctx)
    if step.kind == "pytest":
        body = select if select is not None else args[1:]
        args = args[:1] + ["-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={raw}"] + ctx.pytest_args + body
    elif step.kind == "ncu":  # the case writes its shape; ncu writes its CSV to raw
        args += ["--out", str(ncu_case_json(raw))]
    elif step.kind == "sweep":  # the last entry started may take a while (its compile): stop early
        args += ["--budget-s", str(max(1, int(0.6 * (timeout or 600)))), "--out", str(raw)]
    else:
        args += ["--out", str(raw)]
    cmd = [sys.executable, "-m"] + args
    if step.kind == "ncu" and ctx.ncu and not ctx.dry_run:
        cmd = ncu_report.ncu_command(ctx.ncu, str(raw)) + cmd
    if step.kind == "sanitizer" and ctx.sanitizer and not ctx.dry_run:
        cmd = [ctx.sanitizer, "--tool", step.tool, "--error-exitcode", "3", "--print-limit", "20"] + cmd
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # one allocation per tensor: overruns are visible
    return cmd, raw, env


def read_result(raw: Optional[Path]) -> Tuple[Optional[object], Optional[str]]:
    """(the step's JSON result or None, why it is unreadable or None)."""
    if not raw or not raw.exists():
        return None, None
    try:
        return json.loads(raw.read_text()), None
    except ValueError as err:
        return None, f"unreadable result {raw.name}: {err}"


def pytest_outcome(rc: Optional[int], raw: Optional[Path]) -> Tuple[str, str, object]:
    payload = junit_counts(raw) if raw else None
    if rc == 0:
        return "ok", "", payload
    if rc == 5:
        return "failed", "no test was selected", payload
    if payload:
        return "failed", f"{payload['failures']} failed, {payload['errors']} errors of {payload['tests']}", payload
    return "failed", f"pytest exited with {rc}", payload


def sanitizer_outcome(step: Step, rc: Optional[int], payload, text: str, ctx: Context) -> Tuple[str, str, object]:
    payload = {"tool": step.tool, "sanitizer": None if ctx.dry_run else ctx.sanitizer, "case": payload,
               "error_summary": next((ln.strip() for ln in text.splitlines() if "ERROR SUMMARY" in ln), None)}
    if "Device not supported" in text or "device is not supported" in text.lower():
        return "skipped", "compute-sanitizer cannot use this device here (\"Device not supported\")", payload
    if rc == 0:
        dry = "dry run: the case ran on the interpreter, without compute-sanitizer"
        return "ok", dry if ctx.dry_run else "", payload
    if rc == 3:
        return "failed", f"{step.tool} found errors: {payload['error_summary']}", payload
    return "failed", f"exited with {rc}", payload


def outcome(step: Step, rc: Optional[int], raw: Optional[Path], log: Path, ctx: Context) -> Tuple[str, str, object]:
    """(status, reason, payload) of a step that ran to its end."""
    text = tail(log, 200_000)
    if step.kind == "ncu":
        return ncu_outcome(rc, raw, text, ctx)
    if step.kind == "pytest":
        return pytest_outcome(rc, raw)
    payload, unreadable = read_result(raw)
    if unreadable:
        return "failed", unreadable, None
    if step.kind == "sanitizer":
        return sanitizer_outcome(step, rc, payload, text, ctx)
    if step.kind == "sweep" and rc == 0:
        return sweep_outcome(payload, raw, ctx)
    if rc == 0:
        return "ok", "", payload
    if step.kind == "bench" and rc == 1 and payload:
        rows = payload.get("rows") or (payload.get("inference", []) + payload.get("train", []))
        bad = [f"{r.get('provider', r.get('variant'))}{' (graph)' if r.get('graph') else ''} "
               f"{r.get('mode', '')}".strip() for r in rows if r.get("status") == "failed"]
        return "failed", f"{len(bad)} row(s) failed: {', '.join(bad)}", payload
    return "failed", f"exited with {rc}", payload


def sweep_outcome(table: Optional[dict], raw: Path, ctx: Context) -> Tuple[str, str, object]:
    """The measured table, copied where nearl.ops.layer_path looks for this GPU's (to be committed)."""
    if not table or not table.get("entries"):
        return "failed", "bench.layer_table wrote no entry", {"table": str(raw)}
    from nearl.ops import layer_path

    dest = (ctx.tables or layer_path.TABLES) / layer_path.device_file_name(ctx.device or "unknown GPU")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(raw, dest)
    left = table.get("skipped_for_budget") or []
    payload = {"table": str(raw), "copied_to": str(dest), "entries": len(table["entries"]),
               "skipped_for_budget": left}
    why = (f"{len(table['entries'])} entries, copied to {dest.parent.name}/{dest.name} (commit it)"
           + (f"; {len(left)} buckets not timed for the budget" if left else ""))
    return "ok", why, payload


def ncu_outcome(rc: Optional[int], raw: Path, log_text: str, ctx: Context) -> Tuple[str, str, object]:
    """The ncu step: its case's shape and phases and, profiled, each kernel's figures (bench.ncu_report)."""
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
        return "failed", "ncu profiled no kernel of the case" if case else f"no case result ({case_path.name})", \
            {"case": case}
    summary = ncu_report.summarise(launches, case["pass_bytes"], case.get("phases"), case.get("marker"))
    return "ok", "", {"case": case, "ncu": summary}


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
        """Why a step cannot start (a missing package or tool, no GPU, too little budget), or None."""
        missing = [m for m in step.needs if not self.available(m)]
        if missing:
            return f"needs {', '.join(missing)}, not installed here (see 'Missing packages')"
        if step.gpu_only and self.dry_run:
            return "needs a GPU (the dry run has none)"
        need = step.min_s / 4 if self.dry_run else step.min_s
        if self.left() < need:
            return (f"budget: {max(self.left(), 0):.0f} s left of --budget-s {self.budget:.0f}, "
                    f"the step needs at least {need:.0f} s")
        return self.missing_tool(step)

    def missing_tool(self, step: Step) -> Optional[str]:
        """The profiler or sanitizer a step runs under, where it is not here. The dry run runs the
        cases without their tools; initcheck's case is memcheck's, so it is run once there."""
        if step.kind == "sanitizer" and not self.ctx.sanitizer:
            if not self.dry_run:
                return "compute-sanitizer is not on the PATH (it comes with the CUDA toolkit)"
            if step.tool != "memcheck":
                return ("compute-sanitizer is not on the PATH (it comes with the CUDA toolkit); its case ran "
                        "in the memcheck step")
        if step.kind == "ncu" and not self.dry_run and not self.ctx.ncu:
            return "ncu is not on the PATH nor in /opt/nvidia/nsight-compute (it comes with the CUDA toolkit)"
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
        for i, step in enumerate(self.steps, start=1):
            reason = self.why_not(step)
            if reason:
                print(f"[{i}/{len(self.steps)}] {step.name}: skipped: {reason}", flush=True)
                self.record(step, i, status="skipped", reason=reason)
                continue
            self.run_step(i, step)
        return self.records

    def timeout_for(self, step: Step) -> float:
        return max(1.0, min(self.left(), step.share * self.budget))

    def prepare(self, step: Step) -> Tuple[Optional[List[str]], Optional[dict]]:
        """A sized step's test ids (None: its own selection) and what was chosen; else (None, None)."""
        if not step.sized:
            return None, None
        return size_tests(step, self.ctx, self.timeout_for(step))

    def interrupted(self, i: int, step: Step, **fields) -> None:
        """Ctrl-C: this step and every later one written down as such."""
        self.record(step, i, status="interrupted", reason="stopped by the user (Ctrl-C)", **fields)
        for j, rest in enumerate(self.steps[i:], start=i + 1):
            self.record(rest, j, status="skipped", reason="the run was interrupted")

    def run_step(self, i: int, step: Step) -> None:
        try:
            select, selection = self.prepare(step)
        except KeyboardInterrupt:
            self.interrupted(i, step)
            raise
        timeout = self.timeout_for(step)
        cmd, raw, env = command_for(step, self.ctx, timeout, select)
        results = [raw] if raw is not None else []
        if step.kind == "ncu":
            results.append(ncu_case_json(raw))  # the ncu step's second result: its case's shape
        for old in results:
            if old.exists():
                old.unlink()  # an earlier run's result must not pass for this one's
        log = self.out / "logs" / f"{step.name}.log"
        by_budget = timeout >= self.left()  # else its share of the budget is the limit
        print(f"[{i}/{len(self.steps)}] {step.name}: {step.title} (at most {timeout:.0f} s) ...", flush=True)
        started, t = now(), self.clock()
        try:
            rc, timed_out = run_command(cmd, env, timeout, log)
        except KeyboardInterrupt:
            self.interrupted(i, step, command=cmd, started=started, seconds=round(self.clock() - t, 1),
                             log=str(log.relative_to(self.out)), output_tail=tail(log))
            raise
        seconds = round(self.clock() - t, 1)
        if timed_out:
            cause = "the budget ran out" if by_budget else f"its share of the budget ({step.share:.0%})"
            status, why, payload = "timed out", f"stopped after {timeout:.0f} s: {cause}", None
        else:
            status, why, payload = outcome(step, rc, raw, log, self.ctx)
        if selection is not None:
            payload = dict(payload or {}, selection=selection)
            why = "; ".join(x for x in (why, selection.get("note", "")) if x)
        print(f"[{i}/{len(self.steps)}] {step.name}: {status} in {seconds:.0f} s{': ' + why if why else ''}",
              flush=True)
        self.record(step, i, status=status, reason=why, command=cmd, started=started, seconds=seconds,
                    timeout_s=round(timeout), returncode=rc, log=str(log.relative_to(self.out)),
                    output_tail=tail(log), payload=payload)


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where the JSON files, logs/ and summary.md go (default: bench/results/; "
                        "in the dry run a new temporary folder)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock budget in seconds (default: 480, a 10-minute GPU visit with room to start)")
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
    ctx = Context(dry_run, env, out / "logs", shutil.which("compute-sanitizer"), pytest_args, find_ncu(),
                  device=None if dry_run else header["device"])
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
