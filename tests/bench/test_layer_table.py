"""`python -m bench.layer_table`: the tables nearl.ops.layer_path reads, written in its format."""

import json

import pytest
import torch

from bench import layer_table
from nearl.ops import layer_path


def fake_payload(fused=(3e-4, 9e-4), split=(2e-4, 8e-4)):
    """The parts of a `bench.run --sass` payload the estimate reads."""
    def op(provider, mode, seconds):
        return {"provider": provider, "mode": mode, "total_s": {"optimistic": seconds / 2, "pessimistic": seconds}}
    ops = [op("triton", "fwd", fused[0]), op("triton", "bwd", fused[1]),
           op("split", "fwd", split[0]), op("split", "bwd", split[1])]
    return {"model": {"ops": ops}, "tiling": {"sm_count": 132}}


def test_an_estimate_table_is_one_the_chooser_reads(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(layer_table, "sass_payload", lambda *args, **kw: runs.append(args) or fake_payload())
    out = tmp_path / "model-sm90.json"
    assert layer_table.main(["estimate", "--shapes", "vit-b16", "--batches", "256,8", "--dtypes", "bf16",
                             "--out", str(out)]) == 0
    assert runs == [("vit-b16", 256, "bf16", 1800), ("vit-b16", 8, "bf16", 1800)]
    table = layer_path.load_table(str(out))
    assert "MODEL" in table["source"] and len(table["entries"]) == 2
    assert table["command"] == "python -m bench.layer_table estimate --shapes vit-b16 --batches 256,8 --dtypes bf16 " \
                               f"--out {out}"
    first = table["entries"][0]
    assert first["bucket"] == layer_path.bucket(256, 197, 768, 64, torch.bfloat16, 132).to_dict()
    assert (first["fused"]["fwd_s"], first["split"]["bwd_s"]) == (3e-4, 8e-4)  # the pessimistic set
    assert first["fused"]["fwd_s_optimistic"] == 1.5e-4
    key = layer_path.bucket(256, 197, 768, 64, torch.bfloat16, 132)
    assert layer_path.from_table(table, key, grad=True, exact=True)[0] == "split"


def test_one_entry_a_bucket(tmp_path, monkeypatch):
    """The text shape at B 8 and 32 fills one bucket (batch in waves, at least 1/8): the second is
    not run, and the table says which bucket took it."""
    runs = []
    monkeypatch.setattr(layer_table, "sass_payload", lambda *args, **kw: runs.append(args) or fake_payload())
    out = tmp_path / "model-sm90.json"
    assert layer_table.main(["estimate", "--shapes", "text-b16", "--batches", "8,32,256", "--dtypes", "bf16",
                             "--out", str(out)]) == 0
    assert [r[1] for r in runs] == [8, 256]
    table = layer_path.load_table(str(out))
    buckets = [json.dumps(e["bucket"], sort_keys=True) for e in table["entries"]]
    assert len(buckets) == len(set(buckets)) == 2
    assert table["same_bucket"] == [["text-b16", 32, "bf16", "text-b16 B=8 bf16"]]


def test_the_committed_tables_hold_one_entry_a_bucket():
    for path in sorted(layer_path.TABLES.glob("*.json")):
        buckets = [json.dumps(e["bucket"], sort_keys=True) for e in layer_path.load_table(str(path))["entries"]]
        assert len(buckets) == len(set(buckets)), path


def test_a_failed_sass_run_is_reported(monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd[2:8])
        return type("Done", (), {"returncode": 2, "stderr": "bad --B"})()
    monkeypatch.setattr(layer_table.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="failed \\(exit 2\\):\nbad --B"):
        layer_table.estimate_entry("vit-b16", 256, "bf16", timeout_s=5)
    assert seen == [["bench.run", "--kernel", "layer", "--sass", "--shape", "vit-b16"]]


def test_a_bad_tiling_is_one_line_with_or_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layer_table, "sass_payload", lambda *args, **kw: pytest.fail("nothing may run"))
    for env, value in (("NEARL_TILING", "b200"), ("NEARL_SM_COUNT", "many")):
        monkeypatch.setenv(env, value)
        for out in ([], ["--out", str(tmp_path / "t.json")]):
            with pytest.raises(SystemExit) as exc:
                layer_table.main(["estimate", "--shapes", "vit-b16", "--batches", "8", *out])
            assert exc.value.code == 2 and f"{env}={value!r}" in capsys.readouterr().err
        monkeypatch.delenv(env)


@pytest.mark.parametrize("argv,message", [
    (["estimate", "--dtypes", "bf17"], "--dtypes: unknown \\['bf17'\\]"),
    (["estimate", "--shapes", "vit-h14"], "unknown --shape 'vit-h14'"),
    (["measure"], "needs a GPU|there is none here"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    if argv == ["measure"] and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as exc:
        layer_table.main(argv)
    assert exc.value.code == 2
    assert len(__import__("re").findall(message, capsys.readouterr().err)) == 1
