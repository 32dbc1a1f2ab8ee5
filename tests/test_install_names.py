"""What the project installs collides with nothing, and the kernel layer stands alone.

The kernels/ and bench/ folders install as `nearl_kernels` and `nearl_bench`: `kernels` is Hugging
Face's kernel loader on PyPI (recent transformers import it) and a wheel installing a top-level
`kernels` overwrote it. The kernel layer imports torch and triton only; `from nearl import ops`
imports neither open_clip nor the model.
"""
import importlib.metadata
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


def from_the_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A fresh interpreter started at the checkout's root, as `python -m ...` there starts: the root
    comes first on its path, so the kernels/ folder is found under the name `kernels`."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def hugging_face_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_from_the_root_kernels_is_hugging_faces_package_where_it_is_installed():
    """transformers 5.x imports Hugging Face's `kernels` (`from kernels import CUDAProperties`): run from
    the root, that import found the checkout's folder and stopped every Hugging Face backbone."""
    if not hugging_face_kernels_installed():
        pytest.skip("Hugging Face's kernels package is not installed here (transformers 4.x does not need it)")
    got = from_the_root("-c", "import json, kernels\n"
                              "print(json.dumps({'file': kernels.__file__, 'get_kernel': callable(kernels.get_kernel)}))")
    assert got.returncode == 0, got.stderr[-2000:]
    found = json.loads(got.stdout.strip().splitlines()[-1])
    assert not found["file"].startswith(str(ROOT / "kernels")) and found["get_kernel"], found


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_a_hugging_face_model_builds_from_the_root(tmp_path, how):
    """What failed for `transformers:` backbones and BiomedCLIP's text tower, in both ways a user starts
    Python at the root (`-c` puts '' first on the path, `-m` the root itself)."""
    pytest.importorskip("transformers")
    code = ("from transformers import BertConfig, BertModel\n"
            "BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))\n"
            "print('built')\n")
    if how == "-m":
        module = ROOT / f"_nearl_root_probe_{os.getpid()}.py"  # a module at the root, as nearl.train is one below it
        module.write_text(code)
        try:
            got = from_the_root("-m", module.stem)
        finally:
            module.unlink()
    else:
        got = from_the_root("-c", code)
    assert got.returncode == 0 and got.stdout.strip().endswith("built"), got.stderr[-2000:]


def test_without_hugging_faces_package_the_folder_is_an_empty_package_that_says_why():
    """Where Hugging Face's package is not installed (here: no site-packages at all, `-S`), the folder
    found as `kernels` is an empty package: transformers' version probe passes and any real use says
    how to import the kernels instead (never a second copy of them)."""
    code = ("import sys\n"
            "assert not [p for p in sys.path if 'site-packages' in p], sys.path\n"
            "import kernels\n"
            "assert getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
            "kernels.get_kernel\n")
    got = from_the_root("-S", "-c", code)
    assert got.returncode != 0 and "import it as nearl_kernels" in got.stderr, got.stderr


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
