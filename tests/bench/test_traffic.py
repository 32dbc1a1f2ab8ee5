"""The traffic count: `python -m bench.run --traffic`, bench/traffic.py and bench/traffic_counter.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from nearl_bench import cli
from nearl_bench.shapes import resolve_shape
from nearl_bench.traffic import REFERENCE_B, _goal_cell, launch_configs, matching_sm_count
from nearl_bench.traffic_counter import Classifier, KernelTraffic, TorchTraffic, batch_part
from nearl_kernels import runtime
from nearl import ops

pytestmark = pytest.mark.skipif(not runtime.interpreting(), reason="counts on the Triton interpreter")
ROOT = Path(__file__).resolve().parents[2]


@triton.jit
def _copy_kernel(X, Y, S, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(X + offs, mask=offs < n, other=0.0)
    s = tl.load(S)  # unmasked scalar load
    tl.store(Y + offs, (v * s).to(Y.dtype.element_ty), mask=offs < n)


@triton.jit
def _past_the_end_kernel(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.load(X + offs, mask=offs < n + 1)


def test_counter_counts_active_elements_per_tensor_exactly():
    x, y, s = torch.randn(2, 10), torch.empty(2, 10, dtype=torch.float16), torch.tensor(2.0)
    with KernelTraffic(Classifier(B=2, N=10)) as kern:
        runtime.launch(_copy_kernel, (1,), x, y, s, 13, BLOCK=16)  # 13 of 16 lanes active
        runtime.launch(_copy_kernel, (1,), x, y, s, 7, BLOCK=16)
    rec = kern.records["_copy_kernel"]
    assert rec["launches"] == 2
    assert rec["tensors"]["X"] == {"class": "token", "load": (13 + 7) * 4, "store": 0}
    assert rec["tensors"]["Y"] == {"class": "token", "load": 0, "store": (13 + 7) * 2}
    assert rec["tensors"]["S"] == {"class": "small", "load": 2 * 4, "store": 0}
    assert kern.totals()["_copy_kernel"] == {"token_load": 80, "token_store": 40, "small_load": 8, "small_store": 0}
    assert torch.equal(y[0, :7], (2 * x[0, :7]).half())  # the kernel really ran
    assert runtime.active().hook is None  # removed on exit


def test_counter_refuses_an_access_outside_every_tensor():
    x = torch.randn(4)
    with KernelTraffic(Classifier(B=1, N=4)), pytest.raises(Exception, match="outside every tensor argument"):
        runtime.launch(_past_the_end_kernel, (1,), x, 4, BLOCK=8)


@pytest.mark.parametrize("d", [32, 96])
def test_oca_forward_count_equals_the_hand_count(d, monkeypatch):
    """H100 tiling, B 1, N 20, M 4: one program of 128 tokens (20 valid), one 32-column chunk or
    three. x is read in two passes (the statistics with the scores, then the output: the first
    chunk, which gives the shift, is not requested twice), A once, C twice (x C^T, then P C), the
    gate once; out is written once. One SM: a batch this small would otherwise have its tiles
    halved to fill the GPU (policy.tokens_to_fill)."""
    monkeypatch.setenv("NEARL_TILING", "h100")
    monkeypatch.setenv("NEARL_SM_COUNT", "1")
    B, N, M = 1, 20, 4
    x = torch.randn(B, N, d).bfloat16()
    a, c, gate = torch.randn(B, d, M), torch.randn(B, M, d), torch.tensor(0.5)
    with KernelTraffic(Classifier(B, N)) as kern:
        ops.oca(x, a, c, gate, orth="hard", impl="triton")
    tot = kern.totals()["_oca_fwd_kernel"]
    assert tot["token_load"] == 2 * N * d * 2 and tot["token_store"] == N * d * 2
    assert tot["small_load"] == d * M * 4 + 2 * M * d * 4 + 4 and tot["small_store"] == 0
    assert tot["token_load"] + tot["token_store"] >= 2 * N * d * 2  # never below the minimum


def test_torch_counter_reads_inputs_writes_outputs_and_skips_views():
    x, buf = torch.randn(2, 5, 3), torch.empty(2, 5, 3)
    w = torch.randn(3, 4)
    with TorchTraffic(Classifier(B=2, N=5)) as mode:
        xt = x.transpose(1, 2)  # view: nothing
        y = torch.empty(2, 5, 4)  # allocation: nothing
        buf.copy_(x)  # reads x, writes buf (not read)
        buf.add_(1.0)  # reads and writes buf
        buf.zero_()  # writes buf
        y = x @ w  # counted as CPU dispatches it: a view to (10, 3), mm, a view back
    del xt, y
    n = x.numel() * 4
    ops = mode.ops()
    assert set(ops) == {"copy_", "add_", "zero_", "mm"}
    assert ops["copy_"]["token_load"] == n and ops["copy_"]["token_store"] == n
    assert ops["add_"]["token_load"] == n and ops["add_"]["token_store"] == n
    assert ops["zero_"]["token_load"] == 0 and ops["zero_"]["token_store"] == n
    mm = ops["mm"]  # x as (B * N, 3) is token-sized, w small
    assert mm["token_load"] == n and mm["small_load"] == w.numel() * 4 and mm["token_store"] == 10 * 4 * 4


def test_batch_part_keeps_what_grows_with_the_batch_call_by_call():
    def rec(tl_, ts, sl, ss):
        return {"token_load": tl_, "token_store": ts, "small_load": sl, "small_store": ss}
    at_b = [("mm", rec(100, 10, 7, 0)), ("sum", rec(0, 0, 5, 1)), ("mm", rec(0, 0, 9, 9))]
    at_2b = [("mm", rec(200, 20, 7, 0)), ("sum", rec(0, 0, 5, 1)), ("mm", rec(0, 0, 9, 9))]
    assert batch_part(at_b, at_2b) == {"mm": {"calls": 1, **rec(100, 10, 0, 0)}}
    with pytest.raises(RuntimeError, match="differ"):
        batch_part(at_b, at_2b[:2])


@pytest.mark.parametrize("kernel,want", [("oca", 1), ("layer", 1)])
def test_small_batch_gets_the_launch_configurations_of_b256(kernel, want, monkeypatch):
    """B 2 on `want` SMs splits ViT-B/16's work as B 256 does on an H100's 132 (one token split
    per sample in every kernel)."""
    shape = resolve_shape("vit-b16", {"B": 2}, on_gpu=True)
    n = matching_sm_count(kernel, shape, torch.bfloat16, 2, "h100")
    assert n == want
    monkeypatch.setenv("NEARL_TILING", "h100")
    monkeypatch.setenv("NEARL_SM_COUNT", str(n))
    small = launch_configs(kernel, shape, torch.bfloat16, 2)
    monkeypatch.setenv("NEARL_SM_COUNT", "132")
    assert small == launch_configs(kernel, shape, torch.bfloat16, REFERENCE_B)
    if kernel == "layer":  # B 2 on all 132 SMs would split each sample much further
        assert small != launch_configs(kernel, shape, torch.bfloat16, 2)


def test_launch_configs_follow_orth(monkeypatch):
    """The layer forward's token tile depends on orth (soft: 64 tokens on sm_90), so the count must
    pick the SM count from the configurations of the orth it runs."""
    monkeypatch.setenv("NEARL_TILING", "h100")
    shape = resolve_shape("vit-b16", {"B": 2}, on_gpu=True)
    hard = launch_configs("layer", shape, torch.bfloat16, REFERENCE_B, "hard")
    soft = launch_configs("layer", shape, torch.bfloat16, REFERENCE_B, "soft")
    assert (hard[1].block_n, soft[1].block_n) == (128, 64)


# ------------------------------------------------------------------------------------------- command
TINY = ["--B", "2", "--N", "19", "--d", "32", "--M", "4", "--dtype", "bf16"]


def test_traffic_command_end_to_end_oca(tmp_path):
    """As a user runs it: a subprocess, TRITON_INTERPRET and NEARL_TILING set by the command."""
    out = tmp_path / "oca.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NEARL_TILING", "NEARL_SM_COUNT")}
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--kernel", "oca", "--traffic", *TINY, "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NEARL_TILING=h100" in proc.stdout and "equal those of B=256" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["tiling"]["tiling"] == "h100" and payload["tiling"]["matches_reference"]
    rows = {r["mode"]: r for r in payload["rows"]}
    assert set(rows) == {"fwd", "bwd"}
    fwd, bwd = rows["fwd"], rows["bwd"]
    assert set(fwd["kernels"]) == {"_oca_fwd_kernel"}
    assert set(bwd["kernels"]) == {"_oca_bwd_rows_kernel", "_oca_bwd_cols_kernel"}
    # x is read twice and out written once, exactly, whatever the tiles
    assert fwd["token_passes"] == pytest.approx(3.0)
    assert fwd["ratio"] == pytest.approx((fwd["token_passes"] + fwd["small_passes"]) / 2)
    assert bwd["ratio"] >= 1 and fwd["goal"] is None and bwd["goal"] is None  # goals are set at the named shapes


def test_traffic_command_layer_and_split_provider(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NEARL_TILING", raising=False)
    monkeypatch.delenv("NEARL_SM_COUNT", raising=False)
    out = tmp_path / "layer.json"
    argv = ["--kernel", "layer", "--traffic", "--shape", "text-b16", *TINY, "--D", "32", "--H", "2", "--r", "8",
            "--mode", "fwd", "--providers", "triton,split,compile", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "layer_fwd_kernel" in text and "torch ops (batch part)" in text
    payload = json.loads(out.read_text())
    rows = {r["provider"]: r for r in payload["rows"]}
    assert rows["compile"]["status"] == "skipped" and rows["compile"]["reason"]
    fused, split = rows["triton"], rows["split"]
    assert set(fused["kernels"]) == {"layer_fwd_kernel", "layer_attn_kernel"}
    assert set(split["kernels"]) == {"_oca_fwd_kernel"}
    assert fused["torch"]["ops"] and fused["ratio"] > 1
    # the split layer's torch part handles token-sized tensors (LN(x_out) and its key/value product)
    assert split["torch"]["token_load"] > 0 and split["torch"]["token_store"] > 0
    assert "NEARL_TILING" not in os.environ and "NEARL_SM_COUNT" not in os.environ  # restored


def test_traffic_command_rejects_bad_environment_and_model(monkeypatch, capsys):
    monkeypatch.setenv("NEARL_TILING", "tpu")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--kernel", "oca", "--traffic", *TINY])
    assert exc.value.code == 2 and "NEARL_TILING='tpu'" in capsys.readouterr().err
    monkeypatch.delenv("NEARL_TILING")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--kernel", "model", "--traffic"])
    assert exc.value.code == 2 and "--traffic" in capsys.readouterr().err


def test_the_report_says_whether_a_goal_is_met():
    """2.03x printed at one decimal is "2.0x", which beside "<= 2.0x" reads as met."""
    assert _goal_cell(2.03, 2.0) == "<= 2.0x, not met"
    assert _goal_cell(2.0, 2.0) == "<= 2.0x, met"
    assert _goal_cell(1.2, None) == "-"
