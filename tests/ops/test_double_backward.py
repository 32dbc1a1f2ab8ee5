"""Double backward (a gradient penalty, a Hessian-vector product) through the ops.

The reference path supports it. The fused kernels' backward is not itself differentiable: it must
say so when differentiated, never hand back a gradient that silently carries no graph (a penalty
term of 0 where the reference gives 1.39 and 257.7). First-order gradients taken with
create_graph=True stay the fused kernels' own.
"""
import pytest
import torch

from nearl import ops
from factories import layer_inputs, oca_inputs


def _oca(impl):
    x, a, c, gate = oca_inputs(2, 7, 32, 3)
    x.requires_grad_(True)
    return x, lambda: ops.oca(x, a, c, gate, impl=impl)


def _layer(impl):
    x, q, params = layer_inputs(2, 7, 32, 3, D=16, r=4, heads=2)
    x.requires_grad_(True)
    return x, lambda: ops.nearl_layer(x, q, params, impl=impl)[0]


@pytest.mark.parametrize("make", [_oca, _layer], ids=["oca", "nearl_layer"])
def test_a_gradient_penalty_through_the_fused_op_raises_a_clear_error(make):
    x, run = make("reference")
    (grad,) = torch.autograd.grad((run() ** 2).sum(), x, create_graph=True)
    penalty = (grad ** 2).sum()
    penalty.backward()
    assert penalty.item() > 0 and x.grad.abs().sum() > 0  # the reference: a real second-order term

    x, run = make("triton")
    (fused,) = torch.autograd.grad((run() ** 2).sum(), x, create_graph=True)
    torch.testing.assert_close(fused.detach(), grad.detach(), rtol=1e-4, atol=1e-4)
    assert fused.requires_grad, "a gradient without a graph makes a penalty silently 0"
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (fused ** 2).sum().backward()
