"""Two gloo processes under torchrun = one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import nearl
from nearl import training as T
from nearl.model.classify import ClassificationLoss, PromptClassifier, tokenize_prompts
from train_helpers import _one_thread, FAST, make_manifest, run, train_losses


def test_torchrun_two_processes_match_one(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=16, n_val=4)
    common = ["--model", "NEARL-Tiny", "--data", str(manifest), "--max-steps", "3", "--lr", "3e-3",
              "--warmup", "1", "--eval-every", "0", "--workers", "0", "--no-progress", "--device", "cpu"]
    run([*common, "--batch-size", 8, "--out", tmp_path / "one"])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        "-m", "nearl.train", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es) x batch 4" in r.stdout and "find_unused_parameters=False" in r.stdout
    one, one_recs = train_losses(tmp_path / "one")
    two, two_recs = train_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    for a, b in zip(one_recs, two_recs):
        assert a["kind"] == b["kind"] and a["step"] == b["step"]
        if a["kind"] == "train":
            assert a["samples"] == b["samples"] == 8
            np.testing.assert_allclose(b["contrastive"], a["contrastive"], rtol=1e-5)
        else:  # the validation after training (rank 0) sees the same adapters
            np.testing.assert_allclose(b["mean_recall"], a["mean_recall"], atol=1e-3)
    written = {p.name for p in (tmp_path / "two").iterdir()}
    assert {"best.pt", "last.pt", "last.prev.pt", "metrics.jsonl", "curves.png", "config.yaml"} == written  # rank 0 only


@pytest.mark.parametrize("task", ["retrieval", "classification"])
def test_unused_parameter_probe(task):
    model = nearl.build("NEARL-Tiny")
    tok = model.tokenizer()
    if task == "retrieval":
        module, loss = model, nearl.NEARLLoss.from_config(model.config)
    else:
        module = PromptClassifier(model, tokenize_prompts(tok, ["a", "b"]), 2)
        loss = ClassificationLoss.from_config(model.config)
    assert T.unused_parameters(module, model, loss, task, "cpu", 32, tok) == []
    assert all(p.grad is None for p in model.parameters())
    # Without the query term and with only the last block adapted, the final query update feeds nothing.
    model = nearl.build("NEARL-Tiny", lambda_q=0.0, vision_layers=[2], text_layers=[2])
    unused = T.unused_parameters(model, model, nearl.NEARLLoss.from_config(model.config), "retrieval",
                                 "cpu", 32, tok)
    assert "useformer.w_q" in unused and "adapters.vision.w_k" in unused


def test_torchrun_nonfinite_stops_every_rank(tmp_path):
    """--lr 1e6 under two processes: every rank takes the same stop decision (no rank is left in a
    collective), the run fails with the one-line message, and no checkpoint holds the broken model."""
    manifest = make_manifest(tmp_path / "data", n_train=16, n_val=4)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "nan"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        "-m", "nearl.train", "--model", "NEARL-Tiny", "--data", str(manifest), "--max-steps", "4",
                        "--lr", "1e6", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "nearl.train: error: " in r.stderr and ("diverged" in r.stderr or "not finite" in r.stderr
                                                   or "is nan" in r.stderr), r.stderr[-3000:]
    assert not (out / "train.lock").exists()
    from nearl.store.checkpoint import load_checkpoint
    from nearl.store.nonfinite import nonfinite_tensors
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            assert not nonfinite_tensors(load_checkpoint(out / name)["model"]), name
