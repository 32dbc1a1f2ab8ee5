"""Every kernel launch runs on its tensors' GPU, not on whichever is current (no GPU needed: the
CUDA device calls are stood in for)."""
import contextlib

import torch

from nearl_kernels import runtime


class OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on `cuda:<index>`."""
    index = 1

    @property
    def device(self):
        return torch.device("cuda", self.index)


class Kernel:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("launch", grid))


def run(monkeypatch, current: int, index: int):
    log = []

    @contextlib.contextmanager
    def device(i):
        log.append(("enter", i))
        yield
        log.append(("exit", i))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    x = torch.zeros(3).as_subclass(OnGpu)
    x.index = index
    runtime.launch(Kernel(log), (2, 1), 7, x, torch.zeros(1))
    return log


def test_a_launch_on_another_gpu_than_the_current_one_makes_it_current(monkeypatch):
    assert run(monkeypatch, current=0, index=1) == [("enter", 1), ("launch", (2, 1)), ("exit", 1)]


def test_a_launch_on_the_current_gpu_changes_nothing(monkeypatch):
    assert run(monkeypatch, current=1, index=1) == [("launch", (2, 1))]
