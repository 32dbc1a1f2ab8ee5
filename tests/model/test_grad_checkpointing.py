"""Gradient checkpointing of the frozen blocks (`model.set_grad_checkpointing`, `--grad-checkpointing`):
the same gradients as the plain run, fewer saved activations, only while training with grad on,
for every model and method that steps blocks itself (NEARL-CLIP, fused too, alta, coop)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import nearl
import nearl.model.frozen
from nearl.store import checkpoint as C
from nearl.methods import build_method

from train_helpers import FAST, make_manifest, run, train_losses
from train_helpers import _one_thread  # noqa: F401 (autouse: one intra-op thread)


def perturbed(model):
    """Adapters off their zero init, so every learnable tensor gets a gradient that means something."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def inputs(model, n=2):
    g = torch.Generator().manual_seed(1)
    tokens = model.tokenizer()(["chest x-ray", "axial ct of the abdomen with contrast"][:n])
    return torch.randn(n, 3, 32, 32, generator=g), tokens


def retrieval_loss(model, images, tokens):
    return nearl.NEARLLoss.from_config(model.config)(model(images, tokens))["loss"]


def coop_loss(model, images, tokens):
    prompts = model.class_prompt_tokens(["cardiomegaly", "effusion"])
    return model.prompt_tower(prompts).features.square().sum()


def grads(model, loss_fn, on: bool):
    """(loss, every trainable gradient) of one backward with checkpointing on or off."""
    model.set_grad_checkpointing(on)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, *inputs(model))
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.set_grad_checkpointing(False)
    return loss.detach(), out


def assert_same_gradients(model, loss_fn):
    loss0, plain = grads(model, loss_fn, on=False)
    loss1, ckpt = grads(model, loss_fn, on=True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)  # the forward is the same computation
    assert set(ckpt) == set(plain) and plain
    for n, g in plain.items():
        assert g.abs().sum() > 0 or n.endswith(("bias", "b")), n  # (a learnable tensor left at zero)
        torch.testing.assert_close(ckpt[n], g, rtol=1e-5, atol=1e-7, msg=n)


class CountCheckpoints:
    """How many blocks go through torch.utils.checkpoint (nearl.model.frozen's name for it, patched)."""

    def __init__(self, monkeypatch):
        self.calls = 0

        def counted(*a, **kw):
            self.calls += 1
            return torch_checkpoint(*a, **kw)
        monkeypatch.setattr(nearl.model.frozen, "checkpoint", counted)


def saved_activation_bytes(model, loss_fn) -> int:
    """Bytes of the distinct tensors autograd saves for the backward, parameters left out (what a
    checkpointed block saves inside itself goes to its own hooks, so it is not counted here)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, *inputs(model))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


# ----------------------------------------------------------------------------- gradients
def test_nearl_reference_gradients_equal_with_checkpointing(monkeypatch):
    torch.manual_seed(0)
    model = perturbed(nearl.build("NEARL-Tiny"))
    count = CountCheckpoints(monkeypatch)
    assert_same_gradients(model, retrieval_loss)
    depth = model.tower("vision").depth + model.tower("text").depth
    assert count.calls == depth  # every block of both towers, once (the plain run: none)


def test_nearl_fused_gradients_equal_with_checkpointing():
    """The fused layers (on the interpreter without a GPU) sit between checkpointed blocks."""
    torch.manual_seed(0)
    model = perturbed(nearl.build("NEARL-Tiny", orth="soft"))
    model.fused = True
    assert_same_gradients(model, retrieval_loss)


def test_alta_gradients_equal_with_checkpointing(monkeypatch):
    """ALTA's adapters (and the unfrozen LayerNorms) live inside the checkpointed blocks."""
    model = perturbed(build_method("alta", "NEARL-Tiny"))
    count = CountCheckpoints(monkeypatch)
    assert_same_gradients(model, retrieval_loss)
    assert count.calls == model.tower("vision").depth + model.tower("text").depth


def test_coop_gradients_equal_with_checkpointing(monkeypatch):
    model = perturbed(build_method("coop", "NEARL-Tiny"))
    count = CountCheckpoints(monkeypatch)
    assert_same_gradients(model, coop_loss)
    assert count.calls == model.tower("text").depth


# ----------------------------------------------------------------------------- memory, and when it applies
# NEARL-CLIP with small queries: at NEARL-Tiny's default D = 128, M = 16 the NEARL layers' own
# activations (not checkpointed: only the frozen blocks are) outweigh its two tiny blocks per tower.
SMALL_QUERIES = dict(num_queries=4, query_dim=16, heads=2, rank=4)


@pytest.mark.parametrize("method, loss_fn, at_most", [("nearl", retrieval_loss, 0.75), ("alta", retrieval_loss, 0.3),
                                                      ("coop", coop_loss, 0.3)])
def test_checkpointing_saves_fewer_activations(method, loss_fn, at_most):
    torch.manual_seed(0)
    model = perturbed(build_method(method, "NEARL-Tiny", **(SMALL_QUERIES if method == "nearl" else {})))
    plain = saved_activation_bytes(model, loss_fn)
    model.set_grad_checkpointing(True)
    ckpt = saved_activation_bytes(model, loss_fn)
    print(f"{method} on NEARL-Tiny, batch 2: saved activations {plain} bytes plain, {ckpt} with grad checkpointing")
    assert ckpt < at_most * plain, (plain, ckpt)


def test_only_in_training_with_grad(monkeypatch):
    torch.manual_seed(0)
    model = nearl.build("NEARL-Tiny")
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    count = CountCheckpoints(monkeypatch)
    images, tokens = inputs(model)
    model.eval()
    with torch.no_grad():
        expected = model(images, tokens).image_features
    model(images, tokens)  # eval mode with grad on: plain blocks
    assert count.calls == 0
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens).image_features, expected, rtol=0, atol=0)
    assert count.calls == 0
    model(images, tokens)
    assert count.calls > 0
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


def test_every_block_is_stepped_through_run_block():
    """No model or method calls a tower's block itself (checkpointing would miss it): only
    FrozenCLIPWrapper.run_block does, besides the towers and alta's standalone `adapted_block`."""
    root = Path(__file__).resolve().parents[2]
    allowed = {("nearl/model/frozen.py", "run_block"), ("nearl/methods/alta.py", "adapted_block")}
    found = set()
    for path in (root / "nearl").rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("nearl/towers/"):
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr in ("block", "adapted_block")):
                        found.add((rel, fn.name))
    stray = {(rel, name) for rel, name in found - allowed if rel != "nearl/model/frozen.py"}  # (run_block's inner step)
    assert not stray, stray
    assert ("nearl/model/frozen.py", "run_block") in found


# ----------------------------------------------------------------------------- the command line
def test_train_flag_same_losses_recorded_and_free_on_resume(tmp_path, capsys):
    """A run with --grad-checkpointing, resumed with --no-grad-checkpointing, has the plain run's losses;
    the checkpoint records the flag, and changing it on --resume warns of nothing."""
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=2)
    common = ["--model", "NEARL-Tiny", "--data", manifest, "--batch-size", 2, "--lr", 3e-3, "--warmup", 1,
              "--eval-every", 0, *FAST]
    run([*common, "--max-steps", 2, "--out", tmp_path / "plain"])
    run([*common, "--max-steps", 1, "--out", tmp_path / "ckpt", "--grad-checkpointing"])
    assert "grad checkpointing" in capsys.readouterr().out
    assert C.load_checkpoint(tmp_path / "ckpt")["args"]["grad_checkpointing"] is True
    run(["--resume", tmp_path / "ckpt", "--max-steps", 2, "--no-grad-checkpointing", "--no-progress"])
    printed = capsys.readouterr().out
    assert "warning: --resume keeps" not in printed  # not a setting that fixes the model
    assert not any(line.endswith(", grad checkpointing") for line in printed.splitlines())
    assert C.load_checkpoint(tmp_path / "ckpt")["args"]["grad_checkpointing"] is False
    plain, _ = train_losses(tmp_path / "plain")
    resumed, _ = train_losses(tmp_path / "ckpt")
    assert resumed == pytest.approx(plain, rel=1e-6)
