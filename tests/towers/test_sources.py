"""One backbone-source parser (issue 25, item 2): nearl/towers/sources.py reads a model_name /
pretrained string once ('openai', a weights file, 'hf-hub:org/repo', 'local-dir:FOLDER',
'transformers:<repo id or folder>', None), and no other library module parses the prefixes itself.
The places that used to (downloads, the adapter files, the default model) are pinned to what they
answered before."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = "nearl/towers/sources.py"
PREFIXES = ("hf-hub:", "local-dir:", "transformers:")
PREFIX_NAMES = {"SCHEMA", "SCHEMAS", "HF_HUB", "LOCAL_DIR", "TRANSFORMERS", "PREFIXES"}
PARSING_CALLS = {"startswith", "endswith", "removeprefix", "find", "index", "rfind", "replace", "split", "rsplit",
                 "partition"}


@pytest.fixture
def here(tmp_path, monkeypatch):
    """An empty working folder, and a home folder of its own ('~' expands into it)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# ----------------------------------------------------------------------------- the parser
def test_every_kind(here):
    from nearl.towers.sources import Source, parse

    assert parse(None) == Source("random", "", None)
    assert parse("openai") == Source("tag", "openai", "openai")
    assert parse("") == Source("tag", "", "")
    assert parse("weights/vit.safetensors") == Source("file", "weights/vit.safetensors", "weights/vit.safetensors")
    assert parse("VIT.PT").kind == parse("w.bin").kind == parse("w.pth").kind == parse("w.ckpt").kind == "file"
    assert parse("hf-hub:org/repo") == Source("hf-hub", "org/repo", "hf-hub:org/repo")
    assert parse("local-dir:/data/model") == Source("local-dir", "/data/model", "local-dir:/data/model")
    assert parse("transformers:vinid/plip") == Source("transformers", "vinid/plip", "transformers:vinid/plip")
    assert parse("transformers:~/plip") == Source("transformers", "~/plip", "transformers:~/plip")
    assert parse("local-dir:hf-hub:x").kind == "local-dir"  # the first prefix only
    assert parse("my-hf-hub:x").kind == "tag"  # a prefix counts only at the start


def test_schemas_and_prefixes(here):
    from nearl.towers import sources as S

    assert S.SCHEMAS == PREFIXES
    for text in (None, "openai", "w.pt", "a/b"):
        assert not S.parse(text).is_schema and S.parse(text).prefix == ""
    for prefix in PREFIXES:
        source = S.parse(prefix + "x/y")
        assert source.is_schema and source.prefix == prefix and source.renamed("z") == prefix + "z"
    with pytest.raises(Exception):
        S.parse("openai").kind = "file"  # frozen


def test_is_local_and_local_path(here):
    from nearl.towers.sources import parse

    (here / "plip").mkdir()
    (here / "weights.pt").write_bytes(b"")
    (here / "mytag").write_bytes(b"")
    (Path.home() / "plip-home").mkdir()
    assert not parse(None).is_local and parse(None).local_path is None
    assert not parse("openai").is_local and parse("openai").local_path is None
    assert parse("mytag").is_local and parse("mytag").local_path == Path("mytag")  # a tag-like name that is a file
    assert parse("weights.pt").is_local and parse("weights.pt").local_path == Path("weights.pt")
    assert parse("missing/w.pt").is_local and parse("missing/w.pt").local_path is None
    assert parse("hf-hub:org/repo").local_path is None and not parse("hf-hub:org/repo").is_local
    assert parse("local-dir:elsewhere").is_local and parse("local-dir:elsewhere").local_path is None
    assert parse("local-dir:plip").local_path == Path("plip")
    assert parse("transformers:plip").is_local and parse("transformers:plip").local_path == Path("plip")
    assert not parse("transformers:vinid/plip").is_local and parse("transformers:vinid/plip").local_path is None
    for missing in ("transformers:/no/such", "transformers:./no-such", "transformers:~/no-such"):
        assert parse(missing).is_local, missing  # a path, even one not there
    assert parse("transformers:~/plip-home").local_path == Path.home() / "plip-home"


def test_hub_repo(here):
    from nearl.towers.sources import parse

    (here / "plip").mkdir()
    (Path.home() / "plip-home").mkdir()
    assert parse("hf-hub:microsoft/BiomedCLIP").hub_repo == "microsoft/BiomedCLIP"
    assert parse("transformers:vinid/plip").hub_repo == "vinid/plip"  # a repo id: downloaded
    assert parse("transformers:plip").hub_repo is None  # a folder here: read from it
    assert parse("transformers:~/plip-home").hub_repo is None  # '~' expanded
    for text in (None, "openai", "w.pt", "local-dir:plip"):
        assert parse(text).hub_repo is None


def test_backbone_name():
    from nearl.towers.sources import backbone_name

    assert backbone_name("ViT-B-16", None) == "ViT-B-16"
    assert backbone_name("ViT-B-16", "openai") == "ViT-B-16"
    assert backbone_name("ViT-B-16", "w/vit.pt") == "ViT-B-16"
    for source in ("hf-hub:org/repo", "local-dir:/d", "transformers:vinid/plip"):
        assert backbone_name("ViT-B-16", source) == source


def test_the_parser_imports_no_heavy_module():
    """The command lines check sources before they import torch (tests/test_cli_light.py)."""
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('sources', {str(ROOT / SOURCES)!r})\n"
            "module = sys.modules['sources'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print(json.dumps([m for m in ('torch', 'open_clip', 'transformers', 'nearl') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# ----------------------------------------------------------------------------- the places that use it, pinned
def test_downloads_name_and_find_the_same_repos(here, monkeypatch):
    from nearl.towers import downloads

    (here / "plip").mkdir()
    assert downloads.describe("ViT-B-16", "openai") == "'openai' of ViT-B-16"
    assert downloads.describe("ViT-B-16", "w/vit.pt") == "'w/vit.pt' of ViT-B-16"
    for source in ("hf-hub:org/repo", "local-dir:/d", "transformers:vinid/plip"):
        assert downloads.describe("ViT-B-16", source) == repr(source)
    assert downloads.describe("hf-hub:org/repo", None) == "'hf-hub:org/repo'"
    hub = downloads._hub_files
    assert hub("ViT-B-16", "hf-hub:org/repo") == ("org/repo", ["open_clip_config.json"])
    assert hub("hf-hub:org/repo", None) == ("org/repo", ["open_clip_config.json"])
    assert hub("transformers:vinid/plip", None) == ("vinid/plip", ["config.json"])
    assert hub("transformers:plip", None) is None
    assert hub("ViT-B-16", "local-dir:/d") is None and hub("ViT-B-16", None) is None
    assert hub("local-dir:/d", None) is None
    tok = downloads._tokenizer_files
    assert tok("transformers:vinid/plip") == ("vinid/plip", downloads.TOKENIZER_FILES)
    assert tok("transformers:plip") is None and tok("local-dir:/d") is None
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: None)
    assert tok("hf-hub:org/repo") == ("org/repo", ["open_clip_config.json"])


def test_the_default_model_and_the_recorded_sources(here):
    from nearl.evaluation.run import default_model_name
    from nearl.store import adapter_files as A

    for source in ("hf-hub:org/repo", "local-dir:/d/model"):
        assert default_model_name(source) == source
    assert default_model_name("openai") == default_model_name("transformers:vinid/plip") == "ViT-B-16"
    (here / "plip").mkdir()
    assert A.portable_source(None) == (None, False)
    assert A.portable_source("openai") == ("openai", False)
    assert A.portable_source("hf-hub:org/repo") == ("hf-hub:org/repo", False)
    assert A.portable_source("/data/vit.safetensors") == ("vit.safetensors", True)
    assert A.portable_source("vit.bin") == ("vit.bin", True)
    assert A.portable_source("local-dir:/data/model") == ("local-dir:model", True)
    assert A.portable_source("transformers:vinid/plip") == ("transformers:vinid/plip", False)
    assert A.portable_source("transformers:plip") == ("transformers:plip", True)
    assert A.portable_source("transformers:/data/plip") == ("transformers:plip", True)
    assert A.portable_model_name("ViT-B-16") == ("ViT-B-16", False)
    assert A.portable_model_name("local-dir:/data/model") == ("local-dir:model", True)
    assert A.portable_model_name("transformers:vinid/plip") == ("transformers:vinid/plip", False)
    assert A._model_name_used(None) and A._model_name_used("openai") and A._model_name_used("w.pt")
    assert not any(A._model_name_used(p + "x") for p in PREFIXES)


def test_an_adapter_without_its_local_folder_says_which_flag(tmp_path):
    from nearl.store import adapter_files as A

    path = tmp_path / "adapter_config.json"
    backbone = {"model_name": "transformers:plip", "model_local": True, "pretrained": None}
    with pytest.raises(A.AdapterError) as err:
        A._backbone_source(backbone, None, None, path)
    assert str(err.value) == (f"{path}: the backbone was built from a local folder, transformers:plip, whose path is "
                              "not recorded (the fingerprint is); pass --model (model=) where it is now, e.g. "
                              "--model transformers:/path/to/plip")
    backbone = {"model_name": "ViT-B-16", "pretrained": "local-dir:model", "pretrained_local": True}
    with pytest.raises(A.AdapterError, match="read from a local folder, local-dir:model, "):
        A._backbone_source(backbone, None, None, path)
    backbone = {"model_name": "ViT-B-16", "pretrained": "vit.pt", "pretrained_local": True}
    with pytest.raises(A.AdapterError, match="read from a local file, vit.pt, "):
        A._backbone_source(backbone, None, None, path)


# ----------------------------------------------------------------------------- one place
def _is_prefix(node: ast.AST) -> bool:
    """A prefix literal ('hf-hub:', ...), or a name bound to the prefixes (SCHEMAS, TRANSFORMERS, ...)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in PREFIXES
    if isinstance(node, ast.Name):
        return node.id in PREFIX_NAMES
    return isinstance(node, ast.Attribute) and node.attr in PREFIX_NAMES


def _mentions_prefix(node: ast.AST) -> bool:
    return any(_is_prefix(n) for n in ast.walk(node))


def prefix_parsing(tree: ast.AST):
    """(line, what) of each place that parses a source by its prefix: a prefix literal anywhere but a
    help text, a startswith / slice / comparison with a prefix (or a name for them), a split at ':'."""
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Constant) and _is_prefix(node):
            what = f"the literal {node.value!r}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PARSING_CALLS:
            args = [*node.args, *(k.value for k in node.keywords)]
            if any(_mentions_prefix(a) for a in args):
                what = f".{node.func.attr}() with a prefix"
            elif node.func.attr in ("split", "rsplit", "partition") and args and \
                    isinstance(args[0], ast.Constant) and args[0].value == ":":
                what = f".{node.func.attr}(':')"
        elif isinstance(node, ast.Subscript) and _mentions_prefix(node.slice):
            what = "a slice by a prefix"
        elif isinstance(node, ast.Compare) and any(_mentions_prefix(n) for n in (node.left, *node.comparators)):
            what = "a comparison with a prefix"
        if what:
            yield node.lineno, what


def test_no_other_module_parses_a_source_prefix():
    found = []
    for path in sorted((ROOT / "nearl").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel != SOURCES:
            places = sorted(set(prefix_parsing(ast.parse(path.read_text()))))
            found += [f"{rel}:{line}: {what}" for line, what in places]
    assert not found, "backbone sources parsed outside nearl/towers/sources.py:\n" + "\n".join(found)


def test_the_one_place_check_sees_each_way_of_parsing():
    code = '''
a = s.startswith("hf-hub:")
b = s.startswith(SCHEMAS)
c = s[len("transformers:"):]
d = schema == "local-dir:"
e = s.split(":", 1)[0]
f = x.SCHEMA
g = s.startswith(tb.SCHEMA)
ok = f"{SCHEMA}{source}: no such folder"
help = "a tag, hf-hub:org/repo or local-dir:path"
'''
    lines = sorted({line for line, _ in prefix_parsing(ast.parse(code))})
    assert lines == [2, 3, 4, 5, 6, 8]


def test_the_prefixes_are_written_once():
    from nearl.towers import sources

    assert os.path.normpath(sources.__file__).endswith(os.path.normpath(SOURCES))
    tree = ast.parse((ROOT / SOURCES).read_text())
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in PREFIXES]
    assert sorted(literals) == sorted(PREFIXES)


def test_the_random_backbone_note_names_weights_that_exist():
    """SigLIP has no 'openai' tag: the note's example comes from open_clip's own list for the model."""
    from nearl.towers.downloads import pretrained_example

    assert pretrained_example("ViT-B-16") == "e.g. openai or laion400m_e31 or laion400m_e32"
    assert pretrained_example("ViT-B-16-SigLIP") == "e.g. webli"
    assert pretrained_example("transformers:vinid/plip") == "e.g. transformers:vinid/plip"
    assert "no tag for NEARL-Tiny" in pretrained_example("NEARL-Tiny")
