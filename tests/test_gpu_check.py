"""`python -m bench.gpu_check`: the dry run end to end on the CPU, the budget, missing packages, the
goals' verdicts, and the kernel path without open_clip."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_kernel_path_needs_no_open_clip(tmp_path):
    """Where open_clip is absent, `import nearl`, the kernel tests and `bench.run --kernel oca` work."""
    code = (
        "import sys, runpy; sys.modules['open_clip'] = None\n"
        "import nearl, pytest\n"
        "from nearl import ops, reference\n"
        "try:\n"
        "    nearl.build\n"
        "    raise SystemExit('nearl.build imported without open_clip?')\n"
        "except ImportError:\n"
        "    pass\n"
        "assert pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/test_oca_kernel.py',\n"
        "                    'tests/test_layer_kernel.py']) == 0\n"
        f"sys.argv = ['bench.run', '--kernel', 'oca', '--B', '1', '--N', '5', '--d', '16', '--M', '2', '--reps', '1',\n"
        f"            '--warmup', '0', '--mode', 'fwd', '--providers', 'reference,triton', '--out', {str(tmp_path / 'o.json')!r}]\n"
        "runpy.run_module('bench.run', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_lazy_names_still_import():
    import nearl
    import nearl.losses
    import nearl.model

    assert nearl.build is nearl.model.build and nearl.NEARLLoss is nearl.losses.NEARLLoss
    assert {"build", "NEARLCLIP", "NEARLLoss", "NEARLOutput", "ops"} <= set(dir(nearl))
    with pytest.raises(AttributeError, match="no_such_thing"):
        nearl.no_such_thing
