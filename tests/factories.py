"""Random inputs for the ops, shared by the reference, kernel and model tests."""
import torch

from nearl.ops.validation import LAYER_PARAM_SHAPES


def oca_inputs(B, N, d, M, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g) * 2 + 0.5
    a = torch.randn(B, d, M, generator=g) / d ** 0.5 * 3
    c = torch.randn(B, M, d, generator=g)
    gate = torch.tensor(0.7)
    return [t.to(device=device, dtype=dtype) for t in (x, a, c, gate)]


def layer_inputs(B, N, d, M, D=32, r=8, heads=4, dtype=torch.float32, seed=0, batched_q=True, device="cpu"):
    """x, q and a params mapping with every tensor random (W_up non-zero, so OCA does work)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"d": d, "D": D, "r": r, "h": 2 * D}
    params = {}
    for name, shape in LAYER_PARAM_SHAPES.items():
        dims = [sizes[s] for s in shape]
        fan_in = dims[0] if len(dims) == 2 else 1
        t = torch.randn(dims, generator=g) / fan_in ** 0.5
        if name.startswith("ln_") and name.endswith("weight"):
            t = 1 + 0.1 * t
        if name == "gate":
            t = torch.tensor(0.8)
        params[name] = t.to(device=device, dtype=torch.float32)
    params["heads"] = heads
    x = (torch.randn(B, N, d, generator=g) * 2 + 0.3).to(device=device, dtype=dtype)
    q = torch.randn(*((B, M, D) if batched_q else (M, D)), generator=g).to(device=device, dtype=torch.float32)
    return x, q, params


def padding_mask(B, N, seed=0):
    """A text-style mask: each sample valid up to a random end-of-text position (sample 0: one token)."""
    g = torch.Generator().manual_seed(seed)
    ends = torch.randint(0, N, (B,), generator=g)
    ends[0] = 0
    return torch.arange(N)[None, :] <= ends[:, None]
