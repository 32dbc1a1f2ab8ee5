"""`python -m bench.gpu_check`: the dry run end to end on the CPU, the budget, missing packages, the
goals' verdicts, and the kernel path without open_clip."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nearl_bench import check_env, gpu_check
from nearl_bench.goals import GOALS, Goal, evaluate, speedup_over

ROOT = Path(__file__).resolve().parents[2]
VERSION_KEYS = ("device", "driver", "torch", "triton", "cuda", "command", "started", "seconds", "status")


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# The dry run's steps that are skipped on this machine, and why (the sweep needs a GPU; initcheck's
# case is memcheck's, which the dry run runs without the tool).
DRY_SKIPS = {"sweep": "needs a GPU"}
if not gpu_check.shutil.which("compute-sanitizer"):
    DRY_SKIPS["initcheck"] = "compute-sanitizer is not on the PATH"


def test_dry_run_end_to_end(tmp_path):
    """The command as a user runs it on a machine without a GPU: every step runs, tiny, and passes."""
    out = tmp_path / "results"
    flags = ["--dry-run"] if torch.cuda.is_available() else []  # without CUDA the dry run is automatic
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--budget-s", "600", *flags],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert gpu_check.DRY_NOTE in proc.stdout
    summary = (out / "summary.md").read_text()
    assert f"**{gpu_check.DRY_NOTE}.**" in summary.splitlines()[2]  # in bold, at the top
    assert "no GPU figure was measured" in summary
    run = json.loads((out / "gpu_check.json").read_text())
    assert run["dry_run"] is True and run["note"] == gpu_check.DRY_NOTE
    assert len(run["goals"]) == len(GOALS)
    assert all(g["status"] == "not measured" and g["measured"] is None for g in run["goals"])
    assert "**met**" not in summary and "NOT MET" not in summary
    names = [s.name for s in gpu_check.plan(dry_run=True)]
    assert [s["step"] for s in run["steps"]] == names
    for name in names:
        rec = json.loads((out / f"{name}.json").read_text())
        if name in DRY_SKIPS:
            assert rec["status"] == "skipped" and DRY_SKIPS[name] in rec["reason"], rec
            assert f"**{name}**: skipped: {DRY_SKIPS[name]}" in summary
            continue
        for key in VERSION_KEYS:
            assert rec[key] is not None, (name, key)
        assert rec["status"] == "ok", rec
        assert rec["command"][:2] == [sys.executable, "-m"] and rec["dry_run"] is True
        assert (out / rec["log"]).exists()
    env = json.loads((out / "env.json").read_text())["payload"]
    assert env["on_gpu"] is False and env["gpu"] is None and "no GPU" in env["note"] and env["cpu_count"] >= 1
    assert "## Environment (env step)" in summary
    profile = json.loads((out / "profile.json").read_text())["payload"]
    assert [(o["op"], o["shape"]["name"].split()[0]) for o in profile["ops"]] == [
        (op, shape) for shape in ("vit-b16", "text-b16") for op in ("oca", "layer-fused", "layer-split")]
    assert all(o["kernels"] and o["kernels"][0]["calls"] >= 1 and o["total_us"] > 0 for o in profile["ops"])
    assert "## profile: every op once" in summary
    ncu = json.loads((out / "ncu.json").read_text())["payload"]["case"]
    assert ncu["phases"] == [f"{op} {m}" for op in ("oca", "fused", "split") for m in ("fwd", "bwd")]
    tests = json.loads((out / "kernel-tests.json").read_text())["payload"]
    assert tests["tests"] >= 10 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    assert tests["selection"] == dict(tests["selection"], collected=tests["tests"], run=tests["tests"], subset=False)
    oca = json.loads((out / "oca-vit-b16.json").read_text())
    assert "--device" in oca["command"] and oca["payload"]["cpu_only"] is True
    rows = oca["payload"]["rows"]
    assert {r["provider"] for r in rows} >= {"reference", "triton"}
    graph_rows = [r for r in rows if r["graph"]]
    assert graph_rows and all(r["status"] == "skipped" and r["reason"] == "CUDA graphs need a GPU" for r in graph_rows)
    assert json.loads((out / "layer-vit-b16-b32.json").read_text())["payload"]["shape"]["B"] == 1
    model = json.loads((out / "model.json").read_text())["payload"]
    assert model["model"] == "NEARL-Tiny" and model["batch"] == 2


def test_steps_most_valuable_first():
    """Issue 23's order: the GPU, one profile of every op, ncu, the benchmarks (B 256, then B 32),
    the fused / split sweep, the kernel tests sized to what is left, the model, the sanitizers."""
    benches = [f"{k}-{s}" for k, s in gpu_check.BENCH_CASES]
    expected = (["env", "profile", "ncu"] + benches + [b + "-b32" for b in benches]
                + ["sweep", "kernel-tests", "model-tests", "model", "memcheck", "initcheck"])
    assert [s.name for s in gpu_check.plan(dry_run=False)] == expected
    assert [s.name for s in gpu_check.plan(dry_run=True)] == expected
    steps = {s.name: s for s in gpu_check.plan(dry_run=False)}
    assert steps["sweep"].gpu_only and steps["kernel-tests"].sized
    assert (steps["memcheck"].tool, steps["initcheck"].tool) == ("memcheck", "initcheck")
    assert "--cuda-graphs" in steps["oca-vit-b16"].args and "--cuda-graphs" in steps["layer-text-b16-b32"].args


def test_kernel_path_needs_no_open_clip(tmp_path):
    """Where open_clip is absent, `import nearl`, the kernel tests and `bench.run --kernel oca` work."""
    code = (
        "import sys, runpy; sys.modules['open_clip'] = None\n"
        "import nearl, pytest\n"
        "from nearl import ops, reference\n"
        "try:\n"
        "    nearl.build\n"
        "    raise SystemExit('nearl.build imported without open_clip?')\n"
        "except ImportError:\n"
        "    pass\n"
        "assert pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/kernels/test_oca_kernel.py',\n"
        "                    'tests/kernels/test_layer_kernel.py']) == 0\n"
        f"sys.argv = ['bench.run', '--kernel', 'oca', '--B', '1', '--N', '5', '--d', '16', '--M', '2', '--reps', '1',\n"
        f"            '--warmup', '0', '--mode', 'fwd', '--providers', 'reference,triton', '--out', {str(tmp_path / 'o.json')!r}]\n"
        "runpy.run_module('bench.run', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_lazy_names_still_import():
    import nearl
    import nearl.model.losses
    import nearl.model.nearl_clip

    assert nearl.build is nearl.model.nearl_clip.build and nearl.NEARLLoss is nearl.model.losses.NEARLLoss
    assert {"build", "NEARLCLIP", "NEARLLoss", "NEARLOutput", "ops"} <= set(dir(nearl))
    with pytest.raises(AttributeError, match="no_such_thing"):
        nearl.no_such_thing


# ------------------------------------------------------------------------------------ the budget
# A child that takes a second to die after SIGTERM, as a compiler worker cleaning up might.
SLOW_TO_DIE = ("import signal, sys, time; "
               "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), sys.exit(0))); time.sleep(60)")


def sleeper(name, seconds, share=1.0, min_s=1.0, pid_file=None):
    """A step whose command sleeps (and, with pid_file, leaves a child of its own, slow to die)."""
    child = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {SLOW_TO_DIE!r}]); "
             "time.sleep(0.5); "  # its handler is in place before the step can be stopped
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); ") if pid_file else ""
    return gpu_check.Step(name, f"sleep {seconds}", "bench", [child + f"import time; time.sleep({seconds})"],
                          share=share, min_s=min_s)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie waiting for its reaper has ended


def make_check(tmp_path, steps, budget, available=lambda m: True):
    ctx = gpu_check.Context(False, clean_env(), tmp_path / "logs", None, [])
    return gpu_check.Check(steps, tmp_path, budget, False, {"device": "test"}, available, ctx)


def test_budget_stops_a_step_and_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "command_for",
                        lambda step, ctx, *more: ([sys.executable, "-c", step.args[0]], None, ctx.env))
    pid_file = tmp_path / "child.pid"
    steps = [sleeper("quick", 0), sleeper("hang", 60, pid_file=pid_file), sleeper("later", 0, min_s=3)]
    t0 = time.monotonic()
    records = make_check(tmp_path, steps, budget=gpu_check.RESERVE_S + 8).run()
    assert time.monotonic() - t0 < 30
    assert [r["status"] for r in records] == ["ok", "timed out", "skipped"]
    assert "the budget ran out" in records[1]["reason"]
    assert records[2]["reason"].startswith("budget: ") and "needs at least 3 s" in records[2]["reason"]
    assert not alive(int(pid_file.read_text()))  # the step's own child went with it, before run() returned
    for name in ("quick", "hang", "later"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["step"] == name


def test_a_step_is_stopped_at_its_share(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "command_for",
                        lambda step, ctx, *more: ([sys.executable, "-c", step.args[0]], None, ctx.env))
    records = make_check(tmp_path, [sleeper("hang", 60, share=0.05), sleeper("next", 0)], budget=60).run()
    assert [r["status"] for r in records] == ["timed out", "ok"]
    assert "its share of the budget (5%)" in records[0]["reason"]


def test_tiny_budget_skips_every_step_and_says_so(tmp_path, capsys):
    out = tmp_path / "r"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--budget-s", "2"]) == 0
    run = json.loads((out / "gpu_check.json").read_text())
    assert [s["status"] for s in run["steps"]] == ["skipped"] * len(gpu_check.plan(True))
    assert all(s["reason"].startswith("needs a GPU" if s["step"] == "sweep" else "budget: ") for s in run["steps"])
    summary = (out / "summary.md").read_text()
    assert "**oca-vit-b16**: skipped: budget: " in summary
    assert "step skipped: budget" in summary  # the goals say why they were not measured
    assert "skipped: budget" in capsys.readouterr().out


def test_missing_open_clip_is_reported_and_its_steps_skipped(tmp_path, capsys):
    absent = {"open_clip", "ftfy", "wcwidth", "nvtx"}
    out = tmp_path / "r"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--only", "model-tests,model"],
                        available=lambda m: m not in absent)
    assert rc == 0
    text = capsys.readouterr().out
    assert "missing: open_clip_torch (import open_clip)" in text and "missing: nvtx" in text
    assert "pip install --no-index --find-links wheels open_clip_torch nvtx" in text
    run = json.loads((out / "gpu_check.json").read_text())
    assert [(s["step"], s["status"]) for s in run["steps"]] == [("model-tests", "skipped"), ("model", "skipped")]
    assert all("needs open_clip" in s["reason"] for s in run["steps"])
    summary = (out / "summary.md").read_text()
    assert "## Missing packages" in summary
    download = next(line for line in summary.splitlines() if "pip download" in line)
    for name in ("open_clip_torch", "ftfy", "wcwidth", "nvtx"):
        assert name in download
    assert {g["step"] for g in run["goals"]} == {"model"}


def test_missing_packages_lists_requirements():
    assert check_env.missing_packages(lambda m: True) == []
    missing = check_env.missing_packages(lambda m: m not in {"open_clip", "huggingface_hub"})
    assert [m["pip"] for m in missing] == ["open_clip_torch"]
    assert missing[0]["missing_requirements"] == ["huggingface-hub"]


def test_rejects_bad_options(tmp_path, capsys):
    for argv in (["--only", "kernels"], ["--budget-s", "0"], ["--out", __file__]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.main(["--dry-run", *argv])
        assert exc.value.code == 2
    assert "--only takes a comma list of env, profile, ncu" in capsys.readouterr().err


def test_unsupported_sanitizer_device_is_a_skip(tmp_path):
    log = tmp_path / "m.log"
    log.write_text("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n")
    step = next(s for s in gpu_check.plan(False) if s.name == "memcheck")
    ctx = gpu_check.Context(False, {}, tmp_path, "/usr/bin/compute-sanitizer", [])
    status, reason, _ = gpu_check.outcome(step, 1, tmp_path / "none.json", log, ctx)
    assert status == "skipped" and "Device not supported" in reason
    log.write_text("========= ERROR SUMMARY: 2 errors\n")
    status, reason, payload = gpu_check.outcome(step, 3, tmp_path / "none.json", log, ctx)
    assert status == "failed" and "2 errors" in reason
    assert payload["error_summary"] == "========= ERROR SUMMARY: 2 errors"
    initcheck = next(s for s in gpu_check.plan(False) if s.name == "initcheck")
    status, reason, payload = gpu_check.outcome(initcheck, 3, tmp_path / "none.json", log, ctx)
    assert status == "failed" and reason.startswith("initcheck found errors") and payload["tool"] == "initcheck"


def test_missing_tools_are_skips(tmp_path):
    """Without compute-sanitizer a GPU run skips both sanitizer steps; the dry run runs memcheck's
    case without it and skips initcheck (the same case); the sweep is never part of a dry run."""
    steps = {s.name: s for s in gpu_check.plan(False)}
    gpu = make_check(tmp_path, [], budget=600)
    for name in ("memcheck", "initcheck"):
        assert "compute-sanitizer is not on the PATH" in gpu.why_not(steps[name])
    assert gpu.why_not(steps["sweep"]) is None
    ctx = gpu_check.Context(True, clean_env(), tmp_path / "logs", None, [])
    dry = gpu_check.Check([], tmp_path, 600, True, {"device": "test"}, lambda m: True, ctx)
    assert dry.why_not(steps["memcheck"]) is None
    assert "its case ran in the memcheck step" in dry.why_not(steps["initcheck"])
    assert dry.why_not(steps["sweep"]).startswith("needs a GPU")


# ------------------------------------------------------------------------------------- the goals
def kernel_payload(compile_status="ok"):
    def row(provider, mode, ms, pct=None, status="ok"):
        return {"provider": provider, "mode": mode, "status": status, "reason": None if status == "ok" else "why",
                "timing": {"median_ms": ms} if status == "ok" else None, "pct_copy": pct}
    return {"cpu_only": False, "rows": [
        row("reference", "fwd", 0.31), row("reference", "fwd+bwd", 1.00),
        row("compile", "fwd", 0.12, status=compile_status), row("compile", "fwd+bwd", 0.5, status=compile_status),
        row("triton", "fwd", 0.10, pct=61.0), row("triton", "fwd+bwd", 0.50, pct=40.0)]}


def model_payload():
    return {"cpu_only": False,
            "inference": [{"variant": "clip", "status": "ok", "images_per_s": 1000.0},
                          {"variant": "nearl-fused", "status": "ok", "images_per_s": 850.0}],
            "train": [{"variant": "limit", "status": "ok", "timing": {"median_ms": 100.0}},
                      {"variant": "nearl-reference", "status": "ok", "timing": {"median_ms": 150.0}, "peak_mib": 1000.0},
                      {"variant": "nearl-fused", "status": "ok", "timing": {"median_ms": 105.0}, "peak_mib": 700.0}]}


def verdicts(payloads, dry_run=False):
    return {(g["step"], g["goal"]): g for g in evaluate(payloads, {"oca-text-b16": "step skipped: budget"}, dry_run)}


def test_goal_verdicts_from_payloads():
    got = verdicts({"oca-vit-b16": kernel_payload(), "layer-vit-b16": kernel_payload("skipped"),
                    "model": model_payload()})
    oca = {goal: v for (step, goal), v in got.items() if step == "oca-vit-b16"}
    assert oca["triton forward: % of copy bandwidth"]["status"] == "met"
    assert oca["triton forward: % of copy bandwidth"]["shown"] == "61%"
    assert oca["triton forward vs reference"]["status"] == "met"  # 3.1x
    assert oca["triton forward vs compile"]["status"] == "not met"  # 1.2x
    assert oca["triton forward vs compile"]["measured"] == pytest.approx(1.2)
    assert oca["triton fwd+bwd vs reference"]["status"] == "not met"  # 2.0x
    compile_goal = got[("layer-vit-b16", "triton forward vs compile")]
    assert compile_goal["status"] == "not measured" and "compile fwd skipped: why" in compile_goal["why"]
    assert got[("oca-text-b16", "triton forward vs reference")]["why"] == "step skipped: budget"
    model = {goal: v for (step, goal), v in got.items() if step == "model"}
    assert [v["status"] for v in model.values()] == ["met", "met", "not met"]  # 1.05x, 0.70x, 0.85x
    # The same numbers in a dry run are never a verdict.
    dry = verdicts({"oca-vit-b16": kernel_payload(), "model": model_payload()}, dry_run=True)
    assert {v["status"] for v in dry.values()} == {"not measured"}


def test_goals_read_the_eager_rows():
    """--cuda-graphs rows sit beside the eager ones; the goals are set on the eager calls."""
    payload = kernel_payload()
    payload["rows"] = [dict(r, graph=True, timing={"median_ms": 0.01}) for r in payload["rows"]] + payload["rows"]
    got = verdicts({"oca-vit-b16": payload})
    assert got[("oca-vit-b16", "triton forward vs reference")]["measured"] == pytest.approx(3.1)


def test_goal_table_takes_a_new_provider():
    goal = Goal("oca-vit-b16", "triton forward vs split", speedup_over("split", "fwd"), ">=", 1.2)
    payload = kernel_payload()
    payload["rows"].append({"provider": "split", "mode": "fwd", "status": "ok", "timing": {"median_ms": 0.13}})
    (v,) = evaluate({"oca-vit-b16": payload}, {}, False, (goal,))
    assert v["status"] == "met" and v["measured"] == pytest.approx(1.3)


def test_gpu_commands(tmp_path):
    """What a GPU run starts: full-size benchmarks with every provider, all the tests, the sanitizer."""
    ctx = gpu_check.Context(False, {"PATH": "/bin"}, tmp_path, "/cuda/bin/compute-sanitizer", [])
    cmds = {s.name: gpu_check.command_for(s, ctx) for s in gpu_check.plan(dry_run=False)}
    cmd, raw, _ = cmds["oca-vit-b16"]
    assert cmd == [sys.executable, "-m", "bench.run", "--kernel", "oca", "--shape", "vit-b16", "--B", "256", "--dtype",
                   "bf16", "--mode", "all", "--providers", "reference,compile,triton", "--cuda-graphs",
                   "--out", str(raw)]
    cmd, raw, _ = cmds["layer-text-b16-b32"]
    assert cmd[cmd.index("--B") + 1] == "32" and cmd[cmd.index("--providers") + 1] == "reference,compile,split,triton"
    assert cmds["env"][0][2:] == ["bench.check_env", "--out", str(cmds["env"][1])]
    assert cmds["profile"][0][2:] == ["bench.profile_case", "--out", str(cmds["profile"][1])]
    cmd, raw, _ = gpu_check.command_for(next(s for s in gpu_check.plan(False) if s.name == "sweep"), ctx, timeout=200)
    assert cmd[2:] == ["bench.layer_table", "measure", "--budget-s", "120", "--out",
                       str(tmp_path.parent / "layer_table.json")]
    assert cmds["model"][0][2:6] == ["bench.run", "--kernel", "model", "--dtype"]
    cmd, raw, _ = cmds["kernel-tests"]
    assert cmd[2] == "pytest" and "-k" not in cmd and f"--junitxml={raw}" in cmd
    assert cmd[-2:] == ["tests/kernels/test_oca_kernel.py", "tests/kernels/test_layer_kernel.py"]
    cmd, raw, env = cmds["memcheck"]
    assert cmd[:3] == ["/cuda/bin/compute-sanitizer", "--tool", "memcheck"]
    assert cmd[-5:] == [sys.executable, "-m", "bench.memcheck_case", "--out", str(raw)] and "--device" not in cmd
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and "PYTORCH_NO_CUDA_MEMORY_CACHING" not in ctx.env
    cmd, raw, env = cmds["initcheck"]
    assert cmd[:3] == ["/cuda/bin/compute-sanitizer", "--tool", "initcheck"] and cmd[-3] == "bench.memcheck_case"
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"


# ------------------------------------------------------------------------------------------- ncu
NCU_KERNELS = {  # kernel: (DRAM read, DRAM write, L2 sectors read, instructions, ns)
    "layer_fwd_kernel": (90e6, 80e6, 4e6, 1.5e8, 60_000),
    "layer_attn_kernel": (10e6, 1e6, 5e5, 1e7, 8_000),
    "layer_bwd_dout_kernel": (160e6, 1e6, 6e6, 5e7, 50_000),
    "layer_bwd_rows_kernel": (40e6, 30e6, 2e6, 5e7, 30_000),
    "layer_bwd_cols_kernel": (200e6, 80e6, 9e6, 3e8, 120_000),
}


def ncu_csv(kernels=NCU_KERNELS, launches=1):
    """What `ncu --csv --print-units base --log-file F` writes: its own lines, then a row per
    (launch, metric), thousands separated by commas."""
    from nearl_bench.ncu_report import METRICS
    head = ['"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"']
    rows, i = [], 0
    for _ in range(launches):
        for name, values in kernels.items():
            for metric, value in zip(METRICS, values):
                rows.append(f'"{i}","42","python3","127.0.0.1","{name}","1","7","(256, 1, 1)","(2, 256, 1)","0","9.0",'
                            f'"Command line profiler metrics","{metric}","unit","{value:,.0f}"')
            i += 1
    return "\n".join(["==PROF== Connected to process 42 (python3)", *head, *rows, "==PROF== Disconnected"])


def test_ncu_csv_is_read_and_summarised():
    from nearl_bench import ncu_report
    launches = ncu_report.read_csv(ncu_csv(launches=2))
    assert len(launches) == 10 and launches[0]["kernel"] == "layer_fwd_kernel"
    assert launches[0]["dram__bytes_read.sum"] == 90e6  # "90,000,000" read without its commas
    s = ncu_report.summarise(launches, pass_bytes=77_463_552)  # 256 x 197 x 768 bf16
    assert [k["kernel"] for k in s["kernels"]] == list(NCU_KERNELS)
    fwd, bwd = s["ops"]["fwd"], s["ops"]["bwd"]
    assert fwd["dram_passes"] == pytest.approx(181e6 / 77_463_552)
    assert fwd["over_min"] == pytest.approx(fwd["dram_passes"] / 2)
    assert bwd["over_min"] == pytest.approx(511e6 / 77_463_552 / 3)
    assert bwd["time_us"] == pytest.approx(200.0) and bwd["dram_gb_s"] == pytest.approx(511e6 / 200e3)
    cols = s["kernels"][-1]
    assert cols["l2_read_bytes"] == 9e6 * 32 and cols["dram_gb_s"] == pytest.approx(280e6 / 120e3)
    table = "\n".join(ncu_report.markdown(s))
    assert "| layer_bwd_cols_kernel | 120.0 | 200.0 | 80.0 |" in table and "| bwd | 6.60 | 2.20x |" in table
    assert ncu_report.read_csv("==PROF== Connected\n==ERROR== LibraryNotLoaded\n") == []


def fake_ncu(tmp_path, csv_text, to_stdout=False):
    """An `ncu` that writes csv_text to its --log-file (or to stdout) and runs the profiled command."""
    script = tmp_path / "ncu"
    write = "print({0!r})" if to_stdout else "open(args[args.index('--log-file') + 1], 'w').write({0!r})"
    script.write_text(f"#!{sys.executable}\nimport subprocess, sys\nargs = sys.argv[1:]\n"
                      + write.format(csv_text) + "\n"
                      f"sys.exit(subprocess.call(args[args.index({sys.executable!r}):]))\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("csv_text, to_stdout, status, why", [
    (ncu_csv(), False, "ok", ""),
    (ncu_csv(), True, "ok", ""),
    ("==PROF== Connected\n==ERROR== Failed to initialize the profiler: LibraryNotLoaded\n", False, "skipped",
     "cannot read the hardware counters"),
    ("==PROF== Connected\n==PROF== Disconnected\n", False, "failed", "profiled no kernel of the case"),
])
def test_the_ncu_step(tmp_path, csv_text, to_stdout, status, why):
    """Under an ncu, the case runs (here on the interpreter: no CUDA) and ncu's rows become the
    payload and summary.md's tables; where ncu cannot read the counters the step is a skip."""
    from nearl_bench import ncu_report
    step = next(s for s in gpu_check.plan(False) if s.kind == "ncu")
    ctx = gpu_check.Context(False, clean_env(), tmp_path / "logs", None, [], fake_ncu(tmp_path, csv_text, to_stdout))
    cmd, raw, _ = gpu_check.command_for(step, ctx)
    assert cmd[:3] == [ctx.ncu, "--clock-control", "none"] and cmd[cmd.index("--profile-from-start") + 1] == "off"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--section"] == list(ncu_report.SECTIONS)
    assert cmd[-5:] == [sys.executable, "-m", "bench.ncu_case", "--out", str(gpu_check.ncu_case_json(raw))]
    check = gpu_check.Check([step], tmp_path, 600, False, {"device": "test"}, lambda m: True, ctx)
    rec = check.run()[0]
    assert rec["status"] == status and why in rec["reason"], rec
    assert rec["payload"]["case"]["shape"]["name"].startswith("vit-b16")
    if status == "ok":
        assert rec["payload"]["ncu"]["ops"]["bwd"]["kernels"][-1] == "layer_bwd_cols_kernel"
        run = {"dry_run": False, "note": None, "command": ["x"], "started": "now", "seconds": 1.0, "budget_s": 600,
               "missing_packages": [], "carry": [], **{k: "test" for k in ("device", "driver", "torch", "triton",
                                                                            "cuda", "python")}}
        from nearl_bench.check_summary import write_summary
        summary = write_summary(tmp_path, run, [rec]).read_text()
        assert "## ncu: Nsight Compute on oca, layer (fused and split) (vit-b16 [cpu-size], B 2, bf16" in summary
        assert "| layer_fwd_kernel | 60.0 | 90.0 | 80.0 |" in summary


def test_no_ncu_on_the_path_is_a_skip(tmp_path):
    step = next(s for s in gpu_check.plan(False) if s.kind == "ncu")
    rec = make_check(tmp_path, [step], budget=600).run()[0]
    assert rec["status"] == "skipped" and "ncu is not on the PATH" in rec["reason"]


def test_ncu_is_found_beside_the_path(tmp_path, monkeypatch):
    """Nsight Compute's installer puts ncu in /opt/nvidia/nsight-compute/<version>/, off the PATH."""
    for version in ("2025.10.0", "2024.1.0", "2025.3.1"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "ncu").write_text("")
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    real_glob = gpu_check.glob.glob
    monkeypatch.setattr(gpu_check.glob, "glob", lambda pattern: real_glob(str(tmp_path / "*" / "ncu"))
                        if pattern.startswith("/opt/nvidia/nsight-compute") else [])
    assert gpu_check.find_ncu() == str(tmp_path / "2025.10.0" / "ncu")  # the newest, not the last in text order
    monkeypatch.setattr(gpu_check.glob, "glob", lambda pattern: [])
    assert gpu_check.find_ncu() is None
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/ncu" if name == "ncu" else None)
    assert gpu_check.find_ncu() == "/usr/bin/ncu"


def test_ncu_phases_and_sections():
    """With the case's markers, launches fall into its phases (oca fwd ... split bwd), a kernel
    launched twice in one phase is one row of 2 calls, and the sections' figures are read."""
    from nearl_bench import ncu_report
    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
            '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name"')

    def rows(i, name, ns, dram, extra=()):
        base = f'"{i}","1","python","h","{name}","1","7","(128, 1, 1)","(9, 1, 1)","0","9.0",'
        out = [base + f'"Command line profiler metrics","{m}","unit","{v:,.0f}",""' for m, v in
               zip(ncu_report.METRICS, (dram, 0, 10, 1000, ns))]
        return out + [base + f'"{s}","{m}","{u}","{v}",""' for s, m, u, v in extra]

    sol = (("GPU Speed Of Light Throughput", "Memory Throughput", "%", "81.5"),
           ("GPU Speed Of Light Throughput", "Duration", "nsecond", "60,000"),
           ("Occupancy", "Achieved Occupancy", "%", "45.2"), ("Launch Statistics", "Registers Per Thread",
                                                                 "register/thread", "128"),
           ("Memory Workload Analysis", "Memory Throughput", "byte/second", "2,500,000,000,000"))
    text = "\n".join(["==PROF== Connected", head, *rows(0, "spin_kernel", 1000, 0),
                      *rows(1, "_oca_fwd_kernel", 60_000, 100e6, sol),
                      *rows(2, "spin_kernel", 1000, 0), *rows(3, "_oca_bwd_rows_kernel", 20_000, 50e6),
                      *rows(4, "vectorized_elementwise_kernel", 200, 1e5),
                      *rows(5, "vectorized_elementwise_kernel", 200, 1e5),
                      '"5","1","python","h","x","1","7","","","0","9.0","Occupancy","","","","SomeRule"'])
    launches = ncu_report.read_csv(text)
    assert [r["kernel"] for r in launches][:2] == ["spin_kernel", "_oca_fwd_kernel"]
    s = ncu_report.summarise(launches, pass_bytes=50_000_000, phases=["oca fwd", "oca bwd"], marker="spin_kernel")
    assert s["phases"] == ["oca fwd", "oca bwd"]
    fwd = s["kernels"][0]
    assert (fwd["phase"], fwd["kernel"], fwd["calls"]) == ("oca fwd", "_oca_fwd_kernel", 1)
    assert fwd["figures"] == {"memory %": 81.5, "occupancy %": 45.2, "registers": 128.0}  # the SOL's %, not bytes/s
    elementwise = s["kernels"][-1]
    assert (elementwise["phase"], elementwise["calls"], elementwise["time_us"]) == ("oca bwd", 2, 0.4)
    assert s["ops"]["oca fwd"]["over_min"] == pytest.approx(2.0 / 2) and s["ops"]["oca bwd"]["launches"] == 3
    table = "\n".join(ncu_report.markdown(s))
    assert "| oca fwd | _oca_fwd_kernel | 1 | 60.0 |" in table
    assert "| oca bwd | (1 other kernels) | 2 | 0.4 |" in table  # under 3% of its phase: folded
    assert "| oca fwd | _oca_fwd_kernel | - | 81.5 | - | 45.2 | - | 128 |" in table  # SM %, memory %, DRAM %, ...


# ------------------------------------------------------------------------------ sizing the kernel tests
def test_choose_tests_takes_a_subset_when_the_share_is_small():
    ids = ([f"tests/kernels/test_oca_kernel.py::test_zero_c_returns_x_exactly[{i}]" for i in range(3)]
           + [f"tests/kernels/test_oca_kernel.py::test_matches_float64_reference[{i}]" for i in range(10)]
           + ["tests/kernels/test_layer_kernel.py::test_strided_inputs"]
           + [f"tests/kernels/test_layer_kernel.py::test_forward_and_every_gradient_match_float64[{i}]" for i in range(9)])
    assert gpu_check.choose_tests(ids, 100) == ids
    three = gpu_check.choose_tests(ids, 3)  # the three most valuable functions, one case each (their largest)
    assert three == ["tests/kernels/test_oca_kernel.py::test_matches_float64_reference[9]",
                     "tests/kernels/test_layer_kernel.py::test_strided_inputs",
                     "tests/kernels/test_layer_kernel.py::test_forward_and_every_gradient_match_float64[8]"]
    six = gpu_check.choose_tests(ids, 6)
    assert set(three) < set(six) and len(six) == 6 and six == [i for i in ids if i in six]  # collection order
    assert "tests/kernels/test_oca_kernel.py::test_zero_c_returns_x_exactly[2]" in six  # every function before a second case
    assert gpu_check.choose_tests(ids, 6) == six  # deterministic
    assert gpu_check.test_capacity(gpu_check.TEST_OVERHEAD_S + 10 * gpu_check.PER_TEST_S) == 10
    assert gpu_check.test_capacity(1) == 1


def test_sized_kernel_tests_run_the_subset_and_say_so(tmp_path, monkeypatch):
    """A share too small for every case: the step runs the chosen ids, writes them down, and the
    record and summary say how many of how many ran."""
    ids = [f"tests/kernels/test_oca_kernel.py::test_matches_float64_reference[{i}]" for i in range(40)]
    monkeypatch.setattr(gpu_check, "collect_tests", lambda step, ctx, timeout=None: ids)
    seen = {}

    def fake_command(step, ctx, timeout=None, select=None):
        seen["select"] = select
        return [sys.executable, "-c", "pass"], None, ctx.env
    monkeypatch.setattr(gpu_check, "command_for", fake_command)
    step = next(s for s in gpu_check.plan(False) if s.name == "kernel-tests")
    budget = (gpu_check.TEST_OVERHEAD_S + 12 * gpu_check.PER_TEST_S) / step.share + 1  # room for 12 cases
    rec = make_check(tmp_path, [step], budget=budget).run()[0]
    assert len(seen["select"]) == 12 and set(seen["select"]) < set(ids)
    sel = rec["payload"]["selection"]
    assert (sel["collected"], sel["run"], sel["subset"]) == (40, 12, True)
    assert Path(sel["ids_file"]).read_text().split() == seen["select"]
    assert "ran 12 of 40 test cases" in rec["reason"]
    run = {"dry_run": False, "note": None, "command": ["x"], "started": "now", "seconds": 1.0, "budget_s": budget,
           "missing_packages": [], "carry": [], **{k: "test" for k in ("device", "driver", "torch", "triton",
                                                                        "cuda", "python")}}
    from nearl_bench.check_summary import write_summary
    summary = write_summary(tmp_path, run, [rec]).read_text()
    assert "- **kernel-tests**: ok: ran 12 of 40 test cases" in summary  # listed under "not done" too


# ---------------------------------------------------------------------------------- env and sweep
def test_env_reads_nvidia_smi_field_by_field(tmp_path, monkeypatch):
    """A driver that does not know a field refuses the whole query: the fields are then asked one by
    one, and the refused ones named."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!{sys.executable}\nimport sys\n"
                   "fields = sys.argv[1].split('=', 1)[1].split(',')\n"
                   "known = {'name': 'NVIDIA H100 80GB HBM3', 'clocks.sm': '1980', 'clocks.max.sm': '1980',"
                   " 'ecc.mode.current': 'Enabled', 'power.limit': '700.00'}\n"
                   "if any(f not in known for f in fields):\n"
                   "    print('Field is not a valid field to query.'); sys.exit(2)\n"
                   "print(', '.join(known[f] for f in fields))\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    gpus, how = check_env.nvidia_smi_gpus(("name", "clocks.sm", "ecc.mode.current", "clocks.unknown"))
    assert gpus == [{"name": "NVIDIA H100 80GB HBM3", "clocks.sm": "1980", "ecc.mode.current": "Enabled",
                     "clocks.unknown": None}]
    assert how == "field by field; not known here: clocks.unknown"
    gpus, how = check_env.nvidia_smi_gpus(("name", "power.limit"))
    assert gpus == [{"name": "NVIDIA H100 80GB HBM3", "power.limit": "700.00"}] and how == "one query"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert check_env.nvidia_smi_gpus() == (None, "nvidia-smi is not on the PATH")


def test_sweep_copies_its_table_where_nearl_reads_it(tmp_path):
    from nearl.ops import layer_path
    table = tmp_path / "layer_table.json"
    entry = {"bucket": {"d": 768, "n": 256, "hm": 64, "dtype": "16bit", "waves": 1.0},
             "fused": {"fwd_s": 1e-4, "bwd_s": 3e-4}, "split": {"fwd_s": 9e-5, "bwd_s": 2e-4}}
    table.write_text(json.dumps({"source": "measured", "entries": [entry], "skipped_for_budget": [["x", 8, "fp32"]]}))
    ctx = gpu_check.Context(False, {}, tmp_path / "logs", None, [], device="NVIDIA H100 80GB HBM3",
                            tables=tmp_path / "layer_paths")
    step = next(s for s in gpu_check.plan(False) if s.name == "sweep")
    log = tmp_path / "sweep.log"
    log.write_text("")
    status, why, payload = gpu_check.outcome(step, 0, table, log, ctx)
    dest = tmp_path / "layer_paths" / "NVIDIA_H100_80GB_HBM3.json"
    assert status == "ok" and payload["copied_to"] == str(dest) and payload["entries"] == 1
    assert "copied to layer_paths/NVIDIA_H100_80GB_HBM3.json" in why and "1 buckets not timed" in why
    assert layer_path.load_table(str(dest))["entries"][0]["split"]["fwd_s"] == 9e-5  # what nearl reads
    table.write_text(json.dumps({"entries": []}))
    assert gpu_check.outcome(step, 0, table, log, ctx)[:2] == ("failed", "bench.layer_table wrote no entry")
