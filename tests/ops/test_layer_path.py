"""Fused or split (nearl/ops/layer_path.py): the rules in their order, the tables, the log line, and the
split path itself (nearl/ops/split_layer.py) against float64 under SPEC 7's bar."""
import json
import logging

import pytest
import torch

from factories import layer_inputs, padding_mask
from nearl.ops import fused_layer, layer_path
from nearl import ops
from precision_bar import bars, err, rounding_sensitivity, run_layer, ulp_sensitivity

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H100 = ("NVIDIA H100 80GB HBM3", 132, 90)


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    monkeypatch.delenv(layer_path.ENV, raising=False)
    layer_path.load_table.cache_clear()
    layer_path._said.clear()
    layer_path._chosen.clear()
    yield
    layer_path.load_table.cache_clear()
    layer_path._chosen.clear()


def vit_x(B=256, dtype=torch.bfloat16):
    """(shape, dtype, device) of a ViT-B/16 layer's x: choose()'s first three arguments."""
    return (B, 197, 768), dtype, torch.device("cpu")


def entry(bucket, fused, split):
    """A table entry: fused and split as (fwd_s, bwd_s)."""
    return {"bucket": bucket.to_dict(), "fused": dict(zip(("fwd_s", "bwd_s"), fused)),
            "split": dict(zip(("fwd_s", "bwd_s"), split))}


def on_a_gpu(monkeypatch, tmp_path, tables):
    """choose() as on an H100 whose table folder holds `tables` ({file name: entries})."""
    monkeypatch.setattr(layer_path, "_gpu", lambda x: H100)
    monkeypatch.setattr(layer_path, "TABLES", tmp_path)
    for name, entries in tables.items():
        source = "MODEL (a test's)" if name.startswith("model-") else "measured"
        (tmp_path / name).write_text(json.dumps({"source": source, "entries": entries}))


# ------------------------------------------------------------------------------------------ the rules
def test_the_environment_overrides_and_bad_values_are_named(monkeypatch):
    x = vit_x()
    for value in ("fused", "split"):
        monkeypatch.setenv(layer_path.ENV, value)
        assert layer_path.choose(*x, 64, 128, 16, grad=True) == (value, f"{layer_path.ENV}={value}")
    monkeypatch.setenv(layer_path.ENV, "fastest")
    with pytest.raises(ValueError, match="NEARL_LAYER_PATH='fastest'.*fused, split, auto"):
        layer_path.choose(*x, 64, 128, 16, grad=True)


def test_a_query_bank_too_large_is_split_even_when_fused_is_asked(monkeypatch):
    monkeypatch.setenv(layer_path.ENV, "fused")
    path, why = layer_path.choose(*vit_x(), 256, 128, 64, grad=True)
    assert path == "split" and why.startswith("NEARL_LAYER_PATH=fused, but") and "256 of 128" in why


@pytest.mark.parametrize("forced", [None, "fused"])
def test_a_width_the_fused_kernels_do_not_take_is_split(monkeypatch, forced):
    """d not a multiple of 16 (a tiny ConvNeXt's last stage; tests/towers/test_towers_conv.py runs it in
    a model): the split path, whose OCA kernels take any d, even where fused is asked for."""
    if forced:
        monkeypatch.setenv(layer_path.ENV, forced)
    path, why = layer_path.choose((2, 9, 40), torch.float32, torch.device("cpu"), 64, 128, 16, grad=True)
    assert path == "split" and "d = 40" in why and why.startswith("NEARL_LAYER_PATH=fused, but") == bool(forced)
    x, q, params = layer_inputs(2, 9, 40, 3, D=32, r=8, device=DEV)
    torch.testing.assert_close(ops.nearl_layer(x, q, params, impl="triton"),
                               ops.nearl_layer(x, q, params, impl="reference"), rtol=1e-4, atol=1e-5)


def test_without_a_gpu_the_fused_kernels_run():
    assert layer_path.choose((2, 5, 16), torch.float32, torch.device("cpu"), 64, 128, 16, grad=False)[0] == "fused"


def test_measured_entry_beats_the_model_and_training_weighs_the_backward(monkeypatch, tmp_path):
    key = layer_path.bucket(256, 197, 768, 64, torch.bfloat16, 132)
    on_a_gpu(monkeypatch, tmp_path, {
        layer_path.device_file_name(H100[0]): [entry(key, (1.0, 5.0), (2.0, 3.0))],  # fused fwd, split fwd+bwd
        "model-sm90.json": [entry(key, (9.0, 9.0), (1.0, 1.0))]})
    assert layer_path.choose(*vit_x(), 64, 128, 16, grad=False)[0] == "fused"
    path, why = layer_path.choose(*vit_x(), 64, 128, 16, grad=True)
    assert path == "split" and why.startswith("NVIDIA_H100_80GB_HBM3.json: measured")
    # another batch: no measured entry, so the model's nearest one
    path, why = layer_path.choose(*vit_x(B=8), 64, 128, 16, grad=True)
    assert path == "split" and why.startswith("model-sm90.json") and "nearest entry" in why


def test_the_model_never_answers_across_dtypes_and_no_table_means_fused(monkeypatch, tmp_path):
    key = layer_path.bucket(256, 197, 768, 64, torch.bfloat16, 132)
    on_a_gpu(monkeypatch, tmp_path, {"model-sm90.json": [entry(key, (9.0, 9.0), (1.0, 1.0))]})
    path, why = layer_path.choose(*vit_x(dtype=torch.float32), 64, 128, 16, grad=True)
    assert path == "fused" and "no table entry" in why


def test_a_broken_table_is_an_error_naming_it(monkeypatch, tmp_path):
    on_a_gpu(monkeypatch, tmp_path, {})
    (tmp_path / "model-sm90.json").write_text('{"entries": [{"bucket": {}}]}')
    with pytest.raises(ValueError, match="model-sm90.json is unreadable"):
        layer_path.choose(*vit_x(), 64, 128, 16, grad=True)


def test_buckets():
    b = layer_path.bucket(256, 197, 768, 64, torch.bfloat16, 132)
    assert (b.n, b.dtype, b.waves) == (256, "16bit", 2.0)  # 50,432 tokens / (132 x 256) = 1.49 waves
    assert layer_path.bucket(8, 77, 512, 64, torch.float32, 132).waves == 0.125
    assert layer_path.bucket(8, 77, 512, 64, torch.float16, 132).dtype == "16bit"


def test_the_committed_model_table_picks_split_where_the_model_says_so(monkeypatch):
    """The model (bench.run --sass) puts the split path ahead at ViT-B/16 and the text shape, bf16,
    B = 256 (kernels/README.md, "Fused or split"): on an H100 without a measured table, that is the default."""
    monkeypatch.setattr(layer_path, "_gpu", lambda x: ("A GPU without a measured table", 132, 90))
    table = layer_path.load_table(str(layer_path.TABLES / "model-sm90.json"))
    assert table is not None and "MODEL" in table["source"]
    text = ((256, 77, 512), torch.bfloat16, torch.device("cpu"))
    for x, want in ((vit_x(), "split"), (text, "split")):
        path, why = layer_path.choose(*x, 64, 128, 16, grad=True)
        assert path == want and why.startswith("model-sm90.json: MODEL"), why


def test_the_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setenv(layer_path.ENV, "split")
    x, q, params = layer_inputs(2, 5, 16, 3, D=8, r=4)
    with caplog.at_level(logging.INFO, logger="nearl.layer"):
        for _ in range(3):
            ops.nearl_layer(x, q, params, impl="triton")
    assert [r.getMessage() for r in caplog.records].count(
        "NEARL layer on x (2, 5, 16) float32, 12 query rows: split path (NEARL_LAYER_PATH=split)") == 1


def test_a_bad_path_argument_is_named():
    x, q, params = layer_inputs(2, 5, 16, 3, D=8, r=4)
    with pytest.raises(ValueError, match="path must be one of"):
        fused_layer.nearl_layer(x, q, params, heads=4, path="fast")
    x, q, params = layer_inputs(2, 5, 16, 32, D=8, r=4)  # 4 heads x 32 queries: past the fused kernels
    with pytest.raises(ValueError, match="path='fused'.*128 query rows"):
        fused_layer.nearl_layer(x, q, params, heads=4, path="fused")


# ------------------------------------------------------------------------------------- the split path
def split(x, q, p, mask, orth):
    return fused_layer.nearl_layer(x, q, p, mask=mask, orth=orth, heads=p["heads"], path="split")


def upstream(B, N, d, M, D, orth):
    g = torch.Generator().manual_seed(3)
    shapes = [(B, N, d), (B, M, D)] + ([(B, N)] if orth == "soft" else [])
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEV) for s in shapes]


@pytest.mark.parametrize("B,N,d,M,D,masked,orth,dtype", [
    (2, 77, 80, 16, 128, True, "soft", torch.float32),
    (3, 50, 48, 5, 32, False, "hard", torch.float32),
    (2, 77, 64, 16, 128, True, "hard", torch.bfloat16),
    (2, 65, 48, 7, 32, False, "soft", torch.float16),
    (2, 40, 64, 64, 32, True, "none", torch.bfloat16),  # 256 query rows: split whatever is asked
])
def test_split_path_matches_float64(B, N, d, M, D, masked, orth, dtype, poisoned_outputs):
    """float32 at 1e-4 (products at the default "highest" precision); 16-bit under SPEC 7's bar, the
    gate's gradient against its sensitivity: to one-ulp moves of x, plus that of the one rounding to
    x's dtype of the gradient reaching x_out (the OCA backward takes it so; the peer, whose x_out is
    float32, does not round it). Kernel outputs start as NaN."""
    x, q, params = layer_inputs(B, N, d, M, D=D, r=8, dtype=dtype, device=DEV)
    mask = padding_mask(B, N).to(DEV) if masked else None
    up = upstream(B, N, d, M, D, orth)
    want = run_layer("float64", x, q, params, mask, orth, up)
    got = run_layer(split, x, q, params, mask, orth, up)
    assert got[0][0].dtype == dtype and got[1]["x"].dtype == dtype
    if dtype == torch.float32:
        for name, (e, _) in bars(got, got, want).items():
            assert e <= 1e-4, (name, e)
        return
    peer = run_layer("peer", x, q, params, mask, orth, up)
    gate = ulp_sensitivity(x, q, params, mask, orth, up) + rounding_sensitivity(x, q, params, mask, orth, up)
    for name, (e, bar) in bars(got, peer, want, {"gate": gate}).items():
        assert e <= bar, (name, e, bar)


def test_split_path_keeps_padding_out_of_the_queries():
    """NaN in padded tokens: the queries, and the valid tokens, are those of clean padding."""
    x, q, params = layer_inputs(2, 9, 16, 3, D=8, r=4)
    mask = padding_mask(2, 9)
    dirty = x.masked_fill(~mask[..., None], float("nan"))
    clean_x, clean_q = split(x, q, params, mask, "hard")
    x_out, q_out = split(dirty, q, params, mask, "hard")
    torch.testing.assert_close(q_out, clean_q, rtol=0, atol=0)
    torch.testing.assert_close(x_out[mask], clean_x[mask], rtol=0, atol=0)


def test_the_public_op_runs_the_chosen_path(monkeypatch):
    x, q, params = layer_inputs(2, 9, 16, 3, D=8, r=4)
    calls = []
    monkeypatch.setattr(fused_layer, "split_layer", lambda *a: calls.append("split") or (x, q.float(), None))
    monkeypatch.setenv(layer_path.ENV, "split")
    ops.nearl_layer(x, q, params, impl="triton")
    assert calls == ["split"]
    monkeypatch.setenv(layer_path.ENV, "fused")
    out = ops.nearl_layer(x, q, params, impl="triton")
    assert calls == ["split"] and err(out[0], x) > 0
