"""The benchmark command (`python -m bench.run`) end to end on CPU, and its building blocks.

Sizes are tiny and reps few: the point is that every provider row is present (or skipped with a
reason), the JSON is complete and the error columns are small, not the timings.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nearl_bench import cli, providers
from nearl_bench.kernel_bench import parse_modes, rel_err
from nearl_bench.nvtx_ranges import Ranges
from nearl_bench.shapes import make_case, resolve_shape
from nearl import ops
from nearl.ops import reference

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--B", "2", "--N", "9", "--d", "32", "--M", "4", "--reps", "2", "--warmup", "0", "--dtype", "fp32"]
ENV_KEYS = ("device", "torch", "triton", "python", "cuda", "command", "timestamp")


def check_rows(payload, providers_wanted, modes, tol, kernel):
    rows = payload["rows"]
    seen = {(r["provider"], r["mode"]) for r in rows}
    assert seen == {(p, m) for p in providers_wanted for m in modes}
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r  # nothing may *fail*
        if r["status"] == "skipped":
            assert r["reason"], r
            continue
        t = r["timing"]
        assert t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] and t["reps"] == 2
        assert r["bytes"] > 0 and r["gbps"] is None and r["pct_copy"] is None  # CPU: n/a
        if r["provider"] in ("reference", "sdpa", "split", "triton"):
            assert r["errors"]["out"] < tol and r["errors"]["update"] < 10 * tol, r
            if kernel == "layer":
                assert r["errors"]["q"] < tol, r
            if r["mode"] != "fwd":
                assert r["errors"]["dx"] < tol, r
    ref = [r for r in rows if r["provider"] == "reference"]
    assert all(r["status"] == "ok" and r["speedup"] == pytest.approx(1.0) for r in ref)


def test_cli_oca_end_to_end(tmp_path):
    """The headline command as a user runs it: a subprocess that sets TRITON_INTERPRET itself."""
    out = tmp_path / "oca.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--kernel", "oca", *TINY, "--mode", "all",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "say NOTHING about the kernels' GPU performance" in text
    for name in providers.PROVIDERS:
        assert name in text
    payload = json.loads(out.read_text())
    for key in ENV_KEYS:
        assert key in payload
    assert payload["cpu_only"] is True and "NOTHING" in payload["note"]
    assert "--kernel" in payload["command"] and "--out" in payload["command"]
    assert payload["shape"]["B"] == 2 and payload["shape"]["d"] == 32
    assert payload["copy_bandwidth_gbps"] is None
    if torch.cuda.is_available():
        assert payload["triton_interpret"] is None
    else:
        assert payload["triton_interpret"] == "1"
    check_rows(payload, providers.PROVIDERS, ["fwd", "bwd", "fwd+bwd"], 1e-5, "oca")
    xf = [r for r in payload["rows"] if r["provider"] == "xformers"]
    try:
        import xformers  # noqa: F401
    except ImportError:
        assert all(r["reason"] == "not installed" for r in xf)


def test_cli_layer_text_mask_soft(tmp_path, capsys):
    out = tmp_path / "layer.json"
    names = ["reference", "xformers", "sdpa", "split", "triton"]
    argv = ["--kernel", "layer", "--shape", "text-b16", *TINY, "--D", "32", "--H", "2", "--r", "8",
            "--mode", "fwd,bwd", "--orth", "soft", "--providers", ",".join(names), "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "err(q)" in text and "CPU median ms" in text
    payload = json.loads(out.read_text())
    assert payload["shape"]["masked"] is True and payload["orth"] == "soft"
    check_rows(payload, names, ["fwd", "bwd"], 1e-5, "layer")
    assert all("cos2" in r["errors"] for r in payload["rows"] if r["status"] == "ok")


def test_cli_model_profile_nvtx(tmp_path, capsys):
    out, trace = tmp_path / "model.json", tmp_path / "trace.json"
    argv = ["--kernel", "model", "--batch", "2", "--reps", "1", "--warmup", "0", "--nvtx",
            "--profile", str(trace), "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "(1) encode_image" in text and "(2) train step" in text and "NOTHING" in text
    payload = json.loads(out.read_text())
    assert payload["model"] == "NEARL-Tiny" and payload["cpu_only"] is True
    assert [r["variant"] for r in payload["inference"]] == ["clip", "nearl-reference", "nearl-fused"]
    assert [r["variant"] for r in payload["train"]] == ["limit", "nearl-reference", "nearl-fused"]
    for r in payload["inference"] + payload["train"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["timing"]["median_ms"] > 0 and r["x_limit"] > 0
        else:
            assert r["reason"].startswith("skipped: ")
    if payload["feature_rel_err_fused_vs_reference"] is not None:
        assert payload["feature_rel_err_fused_vs_reference"]["fp32"] < 1e-4
    assert trace.stat().st_size > 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "model/nearl-reference/train" for e in events)


def test_cli_model_grad_checkpointing(tmp_path, capsys):
    """--grad-checkpointing adds the checkpointed training rows and compares them with the plain ones;
    on the CPU it says that peak memory needs CUDA."""
    out = tmp_path / "model.json"
    argv = ["--kernel", "model", "--batch", "2", "--reps", "1", "--warmup", "0", "--grad-checkpointing",
            "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert [r["variant"] for r in payload["train"]] == ["limit", "nearl-reference", "nearl-fused",
                                                        "nearl-reference+ckpt", "nearl-fused+ckpt"]
    summary = payload["grad_checkpointing"]
    assert "nearl-reference" in summary and summary["nearl-reference"]["time_ratio"] > 0
    if not torch.cuda.is_available():
        assert summary["nearl-reference"]["peak_ratio"] is None
        assert "grad checkpointing, nearl-reference: peak memory needs CUDA" in text


def test_checkpointing_report_with_gpu_rows():
    from nearl_bench.model_bench import checkpointing_summary, format_checkpointing
    row = lambda v, ms, mib: {"variant": v, "status": "ok", "timing": {"median_ms": ms},
                              "peak_above_resident_mib": mib}
    train = [row("nearl-reference", 10.0, 800.0), row("nearl-reference+ckpt", 13.0, 200.0),
             {"variant": "nearl-fused", "status": "skipped"}, {"variant": "nearl-fused+ckpt", "status": "skipped"}]
    summary = checkpointing_summary(train, on_gpu=True)
    assert list(summary) == ["nearl-reference"]
    assert summary["nearl-reference"]["peak_ratio"] == 0.25 and summary["nearl-reference"]["time_ratio"] == 1.3
    assert format_checkpointing(summary) == [
        "grad checkpointing, nearl-reference: peak above resident 800 -> 200 MiB (0.25x); step time 1.30x"]
    assert format_checkpointing(None) == []


def test_cli_cuda_graphs_on_cpu_are_skipped_rows(tmp_path, capsys):
    """--cuda-graphs adds a graph-replayed row per provider and mode; without a GPU each is skipped
    with the reason, the eager rows run as before, and the exit status is 0."""
    out = tmp_path / "oca.json"
    argv = ["--kernel", "oca", *TINY, "--mode", "fwd,bwd", "--providers", "reference,triton",
            "--cuda-graphs", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert any(line.split()[:3] == ["triton", "(graph)", "fwd"] and line.endswith("skipped: CUDA graphs need a GPU")
               for line in text.splitlines())
    payload = json.loads(out.read_text())
    assert payload["cuda_graphs"] is True
    graph = [(r["provider"], r["mode"], r["status"], r["reason"]) for r in payload["rows"] if r["graph"]]
    assert graph == [(p, m, "skipped", "CUDA graphs need a GPU") for p in ("reference", "triton")
                     for m in ("fwd", "bwd")]
    eager = [r for r in payload["rows"] if not r["graph"]]
    assert len(eager) == 4 and {r["status"] for r in eager} == {"ok"}


def fake_replay(build, device):
    """graph_replay's contract without a GPU: the call itself stands for the replay."""
    run, setup, inputs = build()

    def replay():
        if setup:
            setup()
        return run()
    return replay, inputs, replay()


def graph_bench(monkeypatch, replay):
    from nearl_bench import kernel_bench
    args = cli.build_parser().parse_args(["--kernel", "oca", *TINY, "--mode", "fwd,bwd", "--cuda-graphs"])
    cli.finish_args(args, torch.device("cpu"))
    bench = kernel_bench.KernelBench("oca", args, torch.device("cpu"), Ranges(False))
    bench.copy_gbps = None
    ref64 = bench._reference64()
    fn = bench._run_provider("reference", ref64)
    monkeypatch.setattr(kernel_bench, "graph_replay", replay)
    bench.on_gpu = True  # past the CPU's skip: the capture itself is faked
    bench._graph_rows("reference", fn, ref64)
    bench._graph_rows("compile", None, ref64)
    return [r for r in bench.rows if r.graph]


def test_graph_rows_time_the_replay_and_check_its_results(monkeypatch):
    rows = graph_bench(monkeypatch, fake_replay)
    ref = [r for r in rows if r.provider == "reference"]
    assert [(r.mode, r.status, r.note) for r in ref] == [(m, "ok", "CUDA graph: one call captured after 3 warm-up "
                                                         "calls on a side stream, timed as graph.replay() (L2 flushed "
                                                         "before each replay, as for the eager rows)")
                                                        for m in ("fwd", "bwd")]
    assert ref[0].errors["out"] < 1e-5 and ref[1].errors["dx"] < 1e-5 and ref[0].timing["reps"] == 2
    compiled = [r for r in rows if r.provider == "compile"]
    assert [r.status for r in compiled] == ["skipped"] * 2 and "reduce-overhead" in compiled[0].reason


def test_a_failed_capture_is_a_skipped_row(monkeypatch):
    def broken(build, device):
        raise RuntimeError("operation not permitted when stream is capturing")
    rows = [r for r in graph_bench(monkeypatch, broken) if r.provider == "reference"]
    assert [r.status for r in rows] == ["skipped", "skipped"]
    assert rows[0].reason == "CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing"


def test_cli_rejects_bad_options(capsys):
    for argv in (["--mode", "sideways"], ["--providers", "reference,cuda-magic"], ["--B", "0"],
                 ["--kernel", "oca", "--grad-checkpointing"], ["--kernel", "model", "--cuda-graphs"],
                 ["--kernel", "oca", "--traffic", "--cuda-graphs"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    assert "--providers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ parts
def test_parse_modes():
    assert parse_modes("all") == ["fwd", "bwd", "fwd+bwd"]
    assert parse_modes("bwd, fwd") == ["bwd", "fwd"]
    with pytest.raises(ValueError):
        parse_modes("fwd,back")


def test_min_bytes_matches_spec():
    """SPEC 5: a ViT-B-16 vision layer at B 256 in bf16 moves about 155 MB (X read + Xout write)."""
    one = resolve_shape("vit-b16", {"B": 1}, on_gpu=True)  # B 1: same per-sample bytes, less memory
    case = make_case("oca", one, torch.bfloat16, "hard", torch.device("cpu"))
    x_bytes = one.N * one.d * 2
    assert 256 * 2 * x_bytes == pytest.approx(155e6, rel=0.01)
    assert 2 * x_bytes < case.min_bytes("fwd") < 1.1 * 2 * x_bytes  # a, c, gate are small
    assert 3 * x_bytes < case.min_bytes("bwd") < 1.2 * 3 * x_bytes
    assert case.min_bytes("fwd+bwd") == case.min_bytes("fwd") + case.min_bytes("bwd")


@pytest.mark.parametrize("orth", ["hard", "soft", "none"])
def test_attention_providers_match_reference_float64(orth):
    """The sdpa formulation of OCA and of the whole layer (text mask) is the reference's math."""
    shape = resolve_shape("text-b16", {"B": 2, "N": 11, "d": 16, "M": 3, "D": 8, "H": 2, "r": 4}, on_gpu=False)
    case = make_case("layer", shape, torch.float64, orth, torch.device("cpu"), seed=3)
    t = case.clone(requires_grad=False)
    got = case.invoke(providers.make_provider("sdpa", "layer", orth, torch.device("cpu")), t)
    want = case.invoke(providers.make_provider("reference", "layer", orth, torch.device("cpu")), t)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12
    oca_case = make_case("oca", shape, torch.float64, orth, torch.device("cpu"), seed=4)
    t = oca_case.clone(requires_grad=False)
    got = oca_case.invoke(providers.make_provider("sdpa", "oca", orth, torch.device("cpu")), t)
    want = oca_case.invoke(providers.make_provider("reference", "oca", orth, torch.device("cpu")), t)
    for g, w in zip(got if orth == "soft" else (got,), want if orth == "soft" else (want,)):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("orth", ["hard", "soft"])
def test_split_provider_is_the_layer(orth):
    """`split` (fused OCA kernel + torch query update) computes the reference layer: exactly in
    float64 (where the OCA op runs the reference), to float32 rounding through the kernels."""
    shape = resolve_shape("text-b16", {"B": 2, "N": 11, "d": 16, "M": 3, "D": 8, "H": 2, "r": 4}, on_gpu=False)
    cpu = torch.device("cpu")
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        case = make_case("layer", shape, dtype, orth, cpu, seed=5)
        t = case.clone(requires_grad=False)
        got = case.invoke(providers.make_provider("split", "layer", orth, cpu), t)
        want = case.invoke(providers.make_provider("reference", "layer", orth, cpu), case.clone(False, torch.float64))
        assert len(got) == len(want) and got[0].dtype == dtype
        for g, w in zip(got, want):
            assert rel_err(g, w) < tol, (dtype, rel_err(g, w))
    with pytest.raises(providers.Skip, match="--kernel layer only"):
        providers.make_provider("split", "oca", orth, cpu)


def test_layer_case_has_working_oca():
    """W_up is random in the benchmark's params: the OCA really changes x."""
    shape = resolve_shape("vit-b16", {}, on_gpu=False)
    case = make_case("layer", shape, torch.float32, "hard", torch.device("cpu"))
    t = case.clone(requires_grad=False)
    x_out, _ = case.invoke(providers.make_provider("reference", "layer", "hard", torch.device("cpu")), t)
    assert (x_out - t["x"]).norm() > 1e-2 * t["x"].norm()


def test_nvtx_ranges_are_nested_and_balanced(monkeypatch):
    log = []
    fake = types.SimpleNamespace(push_range=lambda message=None, **kw: log.append(("push", message)),
                                 pop_range=lambda **kw: log.append(("pop", None)))
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    ranges = Ranges(True)
    with ranges.range("oca/triton/fwd"):
        log.append(("work", None))
    assert log == [("push", "oca"), ("push", "triton"), ("push", "fwd"), ("work", None),
                   ("pop", None), ("pop", None), ("pop", None)]


def test_nvtx_missing_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # import nvtx -> ImportError
    ranges = Ranges(True)
    assert not ranges.enabled
    assert "pip install nvtx" in capsys.readouterr().err
    with ranges.range("oca/reference/fwd"):
        pass


def test_model_limit_stops_gradient_at_first_adapted_block():
    """The training limit's backward reaches the first adapted block's output and goes no further."""
    import nearl
    from nearl_bench.model_bench import detach_after_first_adapted, random_tokens

    model = nearl.build("NEARL-Tiny", vision_layers=[2], text_layers=[1])
    vision_blocks = list(model.backbone.visual.transformer.resblocks)
    text_blocks = list(model.backbone.transformer.resblocks)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    tokens = random_tokens(2, 16, model.backbone.vocab_size, torch.Generator().manual_seed(0))
    seen = {}
    with detach_after_first_adapted(model):
        # Registered after the detaching hooks, these see the outputs those hooks substituted.
        handles = [vision_blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__("vision", o)),
                   text_blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("text", o))]
        loss = model.backbone.encode_image(images).sum() + model.backbone.encode_text(tokens).sum()
    for h in handles:
        h.remove()
    loss.backward()
    for tower in ("vision", "text"):
        assert seen[tower].is_leaf and seen[tower].grad is not None, tower  # the gradient got there
    assert images.grad is None  # ...and no further
    assert all(p.grad is None for p in model.backbone.parameters())  # no weight gradient at all


def test_random_tokens_pool_at_eot():
    from nearl_bench.model_bench import random_tokens

    tokens = random_tokens(4, 16, 49408, torch.Generator().manual_seed(1))
    assert (tokens[:, 0] == 49406).all()
    assert ((tokens == 49407).sum(dim=1) == 1).all()
    assert (tokens.argmax(dim=1) < 16).all()


# ------------------------------------------------------------------------------------ pytest-benchmark
def test_benchmark_reference_oca_cpu(benchmark):
    """pytest-benchmark of the reference ops.oca on CPU at a small size (regression tracking only)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 77, 64, generator=g)
    a = torch.randn(2, 64, 16, generator=g) / 8
    c = torch.randn(2, 16, 64, generator=g)
    gate = torch.tensor(0.8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny op: more threads only add scheduler noise on a shared machine
    try:
        out = benchmark(ops.oca, x, a, c, gate, orth="hard", impl="reference")
    finally:
        torch.set_num_threads(threads)
    assert out.shape == x.shape
    assert torch.allclose(out, reference.oca(x, a, c, gate, orth="hard"))
