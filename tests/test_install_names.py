"""What the project installs collides with nothing, and the kernel layer stands alone.

The kernels/ and bench/ folders install as `nearl_kernels` and `nearl_bench`: `kernels` is Hugging
Face's kernel loader on PyPI (recent transformers import it) and a wheel installing a top-level
`kernels` overwrote it. The kernel layer imports torch and triton only; `from nearl import ops`
imports neither open_clip nor the model.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, cwd: Path, **env) -> dict:
    """Run `code` in a fresh interpreter from `cwd` (never the checkout: its folders would be found
    by name); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and ("No matching distribution" in proc.stderr or "Could not find" in proc.stderr
                                 or "NewConnectionError" in proc.stderr):
        pytest.skip(f"no package index reachable: pip {' '.join(args[:2])}: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_wheel_installs_beside_hugging_face_kernels(tmp_path):
    """A wheel of this project and Hugging Face's `kernels` (with its needs) in one site folder:
    no file claimed by both, both import from there, and this project's fused OCA runs."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip("wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT), cwd=tmp_path)
    (ours,) = wheels.glob("nearl_clip-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(ours).namelist()}
    assert {"nearl", "nearl_kernels", "nearl_bench"} <= tops and not tops & {"kernels", "bench"}, sorted(tops)
    pip("install", "-q", "--no-deps", "--target", str(site), str(ours), cwd=tmp_path)
    pip("install", "-q", "--target", str(site), "kernels", cwd=tmp_path)
    claimed = {}
    for record in site.glob("*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            path = line.split(",")[0]
            assert path not in claimed or path.endswith("__pycache__"), (path, claimed.get(path), record.parent.name)
            claimed[path] = record.parent.name
    got = python(
        "import json, torch, kernels, nearl_kernels\n"
        "from nearl import ops, reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, a = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, 3, generator=g)\n"
        "c = torch.randn(2, 3, 16, generator=g)\n"
        "gate = torch.tensor(0.5)\n"
        "err = (ops.oca(x, a, c, gate, impl='triton') - reference.oca(x, a, c, gate)).abs().max().item()\n"
        "print(json.dumps({'hf': kernels.__file__, 'get_kernel': callable(kernels.get_kernel),\n"
        "                  'ours': nearl_kernels.__file__, 'err': err}))\n",
        cwd=tmp_path, PYTHONPATH=str(site))
    assert got["hf"].startswith(str(site)) and got["get_kernel"], got
    assert got["ours"].startswith(str(site)) and got["err"] < 1e-5, got


def test_kernel_layer_imports_torch_and_triton_only(tmp_path):
    got = python(
        "import json, sys\n"
        "import nearl_kernels.layer, nearl_kernels.oca, nearl_kernels.layer_bwd_kernels\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n", cwd=tmp_path)
    assert not {"nearl", "nearl_bench", "open_clip", "timm", "transformers"} & set(got), got
    assert {"torch", "triton", "nearl_kernels"} <= set(got)


def test_ops_import_neither_open_clip_nor_the_model(tmp_path):
    got = python(
        "import json, sys\n"
        "from nearl import ops\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('nearl', 'open_clip', 'triton'))))\n",
        cwd=tmp_path)
    assert not [m for m in got if m.startswith(("open_clip", "triton", "nearl.model", "nearl.towers"))], got


def test_the_kernels_folder_under_its_folder_name_is_an_empty_package_that_says_why(tmp_path):
    """From the checkout's root (`python -m ...` there) the folder is found as `kernels`. transformers
    probes that name for a version when it loads a model: the probe must pass (it stopped every
    Hugging Face text tower before), and any real use says how to import the kernels instead."""
    code = ("import kernels\n"
            "assert getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
            "kernels.get_kernel\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0 and "import it as nearl_kernels" in proc.stderr, proc.stderr
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, "-c", "import transformers.models.bert.modeling_bert"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_uninstalled_checkout_imports_as_an_installed_one(tmp_path):
    """The GPU machines run the checkout without installing it: `import nearl` maps nearl_kernels and
    nearl_bench onto the folders (nearl/_checkout.py). Here the editable install is hidden first."""
    got = python(
        "import json, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "sys.path[:] = [p for p in sys.path if 'editable' not in p.lower()]\n"
        "import importlib.util\n"
        "hidden = importlib.util.find_spec('nearl_kernels') is None\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import nearl, nearl_kernels.oca, nearl_bench.shapes\n"
        "print(json.dumps({'hidden': hidden, 'kernels': nearl_kernels.__file__, 'bench': nearl_bench.__file__}))\n",
        cwd=tmp_path)
    assert got["hidden"], "the editable install still finds nearl_kernels: this test tests nothing"
    assert got["kernels"] == str(ROOT / "kernels" / "__init__.py") and got["bench"] == str(ROOT / "bench" / "__init__.py")
