"""kernels/runtime.py's instrumentation: switched on for a block, never a module global a test patches."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nearl_kernels import runtime

ROOT = Path(__file__).resolve().parents[2]


def test_the_runtime_holds_no_test_switches():
    """Tests and bench tools switch instrumentation on with `runtime.instrumented`, not by patching globals."""
    for name in ("POISON_OUTPUTS", "TF32_AS_THE_GPU", "LAUNCH_HOOK"):
        assert not hasattr(runtime, name), name
    assert runtime.active() == runtime.Instrumentation()  # all off outside a block


def test_instrumented_switches_on_for_its_block_and_nests():
    def hook(*_):
        pass

    with runtime.instrumented(poison=True) as outer:
        assert outer.poison and not outer.tf32_as_gpu and outer.hook is None
        assert torch.isnan(runtime.empty((3, 5), device="cpu", dtype=torch.bfloat16)).all()
        with runtime.instrumented(tf32_as_gpu=True, hook=hook) as inner:  # the outer block's poison stays
            assert inner == runtime.Instrumentation(poison=True, tf32_as_gpu=True, hook=hook)
            assert runtime.active() is inner
        assert runtime.active() is outer
    assert runtime.active() == runtime.Instrumentation()


def test_instrumented_restores_on_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with runtime.instrumented(poison=True, hook=print):
            raise RuntimeError("boom")
    assert runtime.active() == runtime.Instrumentation()


def test_a_hook_sees_the_launch_instead_of_running_it():
    seen = []
    with runtime.instrumented(hook=lambda kernel, grid, args, kwargs: seen.append((kernel, grid, args, kwargs))):
        runtime.launch("a kernel", (3,), 1, 2, BLOCK=16)
    assert seen == [("a kernel", (3,), (1, 2), {"BLOCK": 16, "maxnreg": runtime.MAX_REGISTERS})]


def test_the_interpreter_shims_load_only_when_a_launch_interprets():
    """Importing and configuring the kernels patches nothing in Triton; the first interpreted launch does."""
    code = ("import os, sys, torch; os.environ['TRITON_INTERPRET'] = '1'; import nearl; "
            "from nearl_kernels import oca, layer, runtime; "
            "print('nearl_kernels.interpreter_shims' in sys.modules); "
            "x = torch.randn(1, 5, 16); a = torch.randn(1, 16, 2); c = torch.randn(1, 2, 16); "
            "oca.oca_fwd(x, a, c, torch.tensor(0.5), 'hard'); "
            "from triton.runtime import interpreter; "
            "print('nearl_kernels.interpreter_shims' in sys.modules, "
            "getattr(interpreter.InterpreterBuilder.create_dot, 'nearl_tf32', False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "True"], out.stdout
