"""Every bad input to the public ops raises a ValueError naming the argument and the shapes seen."""
import pytest
import torch

from factories import layer_inputs, oca_inputs
from nearl import ops


def oca_call(**override):
    x, a, c, gate = oca_inputs(2, 5, 16, 3)
    args = dict(x=x, a=a, c=c, gate=gate)
    args.update(override)
    return ops.oca(args["x"], args["a"], args["c"], args["gate"], impl="reference")


@pytest.mark.parametrize("override,pattern", [
    (dict(x=torch.randn(5, 16)), r"x must have 3 dimensions .*\(5, 16\)"),
    (dict(a=torch.randn(2, 16)), r"a must have 3 dimensions"),
    (dict(a=torch.randn(2, 17, 3)), r"a has shape \(2, 17, 3\).*expected d=16"),
    (dict(c=torch.randn(2, 4, 16)), r"c has shape \(2, 4, 16\).*expected M=3"),
    (dict(c=torch.randn(3, 3, 16)), r"c has shape \(3, 3, 16\).*expected B=2"),
    (dict(gate=torch.ones(1)), r"gate must have 0 dimensions"),
    (dict(x=torch.ones(2, 5, 16, dtype=torch.int64)), r"x must be float.*torch.int64.*\(2, 5, 16\)"),
    (dict(gate=torch.tensor(1)), r"gate must be float"),
    (dict(x=torch.randn(2, 0, 16)), r"x must have B >= 1, N >= 1"),
    (dict(a=torch.randn(2, 16, 0), c=torch.randn(2, 0, 16)), r"M >= 1"),
    (dict(x=[[1.0]]), r"x must be a torch.Tensor"),
])
def test_oca_rejects_bad_input(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        oca_call(**override)


def test_oca_rejects_mixed_devices():
    x, a, c, gate = oca_inputs(2, 5, 16, 3)
    with pytest.raises(ValueError, match=r"one device.*x on cpu.*a on meta"):
        ops.oca(x, a.to("meta"), c, gate, impl="reference")


def test_bad_mode_and_impl():
    with pytest.raises(ValueError, match="orth must be one of"):
        ops.oca(*oca_inputs(1, 2, 16, 2), orth="soft-ish")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.oca(*oca_inputs(1, 2, 16, 2), impl="cuda")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        ops.oca(*oca_inputs(1, 2, 16, 2), impl="triton")


def layer_call(mask=None, **override):
    x, q, params = layer_inputs(2, 6, 32, 3, D=16, r=4)
    x, q = override.pop("x", x), override.pop("q", q)
    for k, v in override.items():
        if v is None:
            params.pop(k)
        else:
            params[k] = v
    return ops.nearl_layer(x, q, params, mask=mask, impl="reference")


@pytest.mark.parametrize("override,pattern", [
    (dict(x=torch.randn(6, 32)), r"x must have 3 dimensions \(B, N, d\), got shape \(6, 32\)"),
    (dict(q=torch.randn(3, 3, 16)), r"q has shape \(3, 3, 16\).*expected B=2"),
    (dict(q=torch.randn(2, 3, 16, 1)), r"q must have 3 dimensions"),
    (dict(w_down=torch.randn(31, 4)), r"params\['w_down'\] has shape \(31, 4\).*expected d=32"),
    (dict(w_up=torch.randn(5, 32)), r"params\['w_up'\] has shape \(5, 32\).*expected r=4"),
    (dict(w_q=torch.randn(16, 15)), r"params\['w_q'\] has shape \(16, 15\)"),
    (dict(mlp_b2=torch.randn(8)), r"params\['mlp_b2'\]"),
    (dict(gate=torch.ones(1, 1)), r"params\['gate'\] must have 0 dimensions"),
    (dict(w_k=None), r"params is missing \['w_k'\]"),
    (dict(w_v=torch.ones(32, 16, dtype=torch.int32)), r"params\['w_v'\] must be float.*int32"),
    (dict(heads=3), r"params\['heads'\] must be a positive int dividing the query width D=16, got 3"),
    (dict(heads=torch.tensor(4)), r"params\['heads'\]"),
    (dict(head=8), r"params has unknown key\(s\) \['head'\]; the known ones are .*'heads'"),  # a typo, not ignored
])
def test_layer_rejects_bad_input(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        layer_call(**override)


@pytest.mark.parametrize("mask,pattern", [
    (torch.ones(2, 5, dtype=torch.bool), r"mask must have shape \(B, N\) = \(2, 6\).*got \(2, 5\)"),
    (torch.ones(2, 6, dtype=torch.int64), r"mask must be a bool tensor.*torch.int64"),
    (torch.ones(2, 6), r"mask must be a bool tensor.*torch.float32"),
    (torch.tensor([[True] * 6, [False] * 6]), r"mask of shape \(2, 6\) has rows with no valid position \(samples \[1\]\)"),
    (torch.ones(2, 6, dtype=torch.bool, device="meta"), r"mask is on meta but x is on cpu"),
])
def test_layer_rejects_bad_mask(mask, pattern):
    with pytest.raises(ValueError, match=pattern):
        layer_call(mask=mask)


def test_layer_rejects_params_on_another_device():
    with pytest.raises(ValueError, match=r"one device"):
        layer_call(w_o=torch.randn(16, 16, device="meta"))


def test_params_must_be_a_mapping():
    x, q, _ = layer_inputs(2, 6, 32, 3, D=16, r=4)
    with pytest.raises(ValueError, match="params must be a mapping"):
        ops.nearl_layer(x, q, [1, 2], impl="reference")


def test_a_device_mask_is_row_checked_without_reading_it_on_the_host(monkeypatch):
    """On a GPU, reading the mask stalls the launch queue at every layer. A mask on a device (here
    meta, which cannot be read at all: `nonzero` raises there) is checked by torch._assert_async."""
    from nearl.ops.validation import check_mask
    x = torch.empty(2, 6, 32, device="meta")
    mask = torch.ones(2, 6, dtype=torch.bool, device="meta")
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserted.append((cond.shape, msg)))
    check_mask(mask, x)
    assert asserted == [((), "nearl: mask of shape (2, 6) has a row with no valid position; "
                             "the query update would read nothing")]
    with pytest.raises(NotImplementedError):  # asked for, the host check reads the mask
        check_mask(mask, x, rows=True)
    check_mask(mask, x, rows=False)
    assert len(asserted) == 1


def test_mask_row_check_can_be_skipped_by_callers_that_guarantee_it():
    x, q, params = layer_inputs(2, 6, 32, 3, D=16, r=4)
    mask = torch.tensor([[True] * 6, [True] + [False] * 5])
    a = ops.nearl_layer(x, q, params, mask=mask, impl="reference", check_mask_rows=False)
    b = ops.nearl_layer(x, q, params, mask=mask, impl="reference")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="mask must have shape"):  # shapes are still checked
        ops.nearl_layer(x, q, params, mask=mask[:, :5], impl="reference", check_mask_rows=False)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("sizes,pattern", [
    (dict(M=0), r"q must have M >= 1 queries, got shape \(2, 0, 16\)"),
    (dict(M=0, batched_q=False), r"q must have M >= 1 queries, got shape \(0, 16\)"),
    (dict(B=0), r"x must have B >= 1, N >= 1 and d >= 1, got shape \(0, 6, 32\)"),
    (dict(N=0), r"x must have B >= 1, N >= 1 and d >= 1, got shape \(2, 0, 32\)"),
    (dict(r=0), r"params\['w_down'\] must have r >= 1.*got shape \(32, 0\)"),
    (dict(D=0, heads=1), r"q must have D >= 1.*got shape \(2, 3, 0\)"),
])
def test_layer_rejects_empty_sizes_on_both_paths(impl, sizes, pattern):
    """SPEC: M in 1..64, B, N >= 1. An empty size is a ValueError naming the argument on both
    paths (the Triton kernels used to raise a RuntimeError at M = 0, the reference returned an
    empty q)."""
    kw = dict(B=2, N=6, d=32, M=3, D=16, r=4)
    kw.update(sizes)
    x, q, params = layer_inputs(kw.pop("B"), kw.pop("N"), kw.pop("d"), kw.pop("M"), **kw)
    with pytest.raises(ValueError, match=pattern):
        ops.nearl_layer(x, q, params, impl=impl)


def test_importing_the_ops_leaves_triton_unimported():
    """triton decides at its own import whether its jit functions are interpreted, so `nearl.ops`
    (imported before a caller such as bench.run sets TRITON_INTERPRET) must not import it."""
    import subprocess
    import sys

    code = "import sys\nfrom nearl import ops\nassert 'triton' not in sys.modules, 'triton imported'\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
