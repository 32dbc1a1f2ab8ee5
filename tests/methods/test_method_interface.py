"""Every method, NEARL-CLIP included, behind one interface (issue 25, item 3): the hooks a method may
override are declared, with their defaults, on the base every model derives from; what callers
decide about a method is an attribute of its MethodSpec; no method name is compared outside
nearl/methods/ (an AST walk over the library, so a new comparison of any form shows)."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nearl.store import checkpoint as C
from nearl.evaluation import run as EV
from nearl import methods as MT
from nearl.model.classify import tokenize_prompts
from nearl.errors import UserError
from nearl.model.frozen import FrozenCLIPWrapper
from nearl.methods.options import DECLARED
from nearl.methods.base import MethodModel
from nearl.model.nearl_clip import NEARLCLIP

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ("class_prompt_tokens", "prompt_tower", "class_logits", "classification_logits", "decays", "num_views")
NAMES = frozenset(DECLARED)  # canonical names: what a default falls back to
ANY_NAME = NAMES | {a for d in DECLARED.values() for a in d.aliases}  # canonical() ignores case


def _strings(node):
    """The string constants of an expression, or of the tuple / list / set literal it is."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def name_tests(source: str, *, declares: bool = False):
    """(line, name) where `source` decides by a method's name: a comparison with one (==, !=, in,
    not in, a match case), a dict literal keyed by one, a fallback `x or "name"`. declares: the file
    declaring the methods (nearl/methods/options.py), whose DECLARED dict is no decision."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            values, names = [s for side in (node.left, *node.comparators) for s in _strings(side)], ANY_NAME
        elif isinstance(node, ast.MatchValue):
            values, names = _strings(node.value), ANY_NAME
        elif isinstance(node, ast.Dict) and not declares:
            values, names = [s for k in node.keys if k is not None for s in _strings(k)], ANY_NAME
        elif isinstance(node, ast.BoolOp):  # not aliases: the wandb project "nearl-clip" is no method
            values, names = [s for v in node.values for s in _strings(v)], NAMES
        else:
            continue
        found += [(node.lineno, v) for v in values if v.strip().lower() in names]
    return sorted(found)


def _library(*, methods: bool = False):
    return [p for p in sorted((ROOT / "nearl").rglob("*.py")) if methods or ROOT / "nearl" / "methods" not in p.parents]


def test_the_name_check_sees_every_form_of_comparison():
    source = ('a = m == "nearl"\n'
              'b = m in ("alta", "x")\n'
              'c = "Zero-Shot" != m\n'
              'd = {"coop": 1}.get(m)\n'
              'e = m or "linear-probe"\n'
              'match m:\n'
              '    case "clip_adapter": pass\n'
              'f = m == "nearl-tiny"\n'
              'g = project or "nearl-clip"\n'
              'h = "NEARL-CLIP" if m else m\n')
    assert name_tests(source) == [(1, "nearl"), (2, "alta"), (3, "Zero-Shot"), (4, "coop"), (5, "linear-probe"),
                                  (7, "clip_adapter")]
    assert name_tests('D = {"nearl": 1}\nt = o == "nearl"\n', declares=True) == [(2, "nearl")]


def test_no_method_name_is_compared_outside_nearl_methods():
    declaring = ROOT / "nearl" / "methods" / "options.py"
    bad = [f"{p.relative_to(ROOT)}:{line} {name!r}" for p in _library()
           for line, name in name_tests(p.read_text(), declares=p == declaring)]
    assert not bad, "decide by a MethodSpec attribute (nearl/methods/registry.py), not by name: " + ", ".join(bad)


def test_the_optional_hooks_are_declared_on_the_common_base_and_never_looked_up():
    assert issubclass(NEARLCLIP, FrozenCLIPWrapper) and issubclass(MethodModel, FrozenCLIPWrapper)
    for hook in HOOKS:
        declared = FrozenCLIPWrapper.__dict__.get(hook)
        assert declared is not None, f"FrozenCLIPWrapper declares no {hook}"
        assert (declared.__doc__ or "").strip(), f"FrozenCLIPWrapper.{hook} says nothing of what it means"
    looked_up = []
    for path in _library(methods=True):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and len(node.args) > 1 and set(_strings(node.args[1])) & {*HOOKS, "grad_checkpointing"}
                    and not (isinstance(node.args[0], ast.Name) and node.args[0].id == "args")):  # options
                looked_up.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not looked_up, looked_up


def test_the_hook_defaults_do_what_callers_did_without_a_hook():
    model = MT.build_method("clip-adapter", "NEARL-Tiny")
    templates = ["a {} image.", "an x-ray of {}."]
    tokens = model.class_prompt_tokens(["red", "blue"], templates)
    assert torch.equal(tokens, tokenize_prompts(model.tokenizer(), ["red", "blue"], templates))
    with torch.no_grad():
        assert torch.equal(model.prompt_tower(tokens).features, model.encode_text(tokens))
    assert model.num_views == 1 and MT.build_method("nearl", "NEARL-Tiny").num_views == 1
    assert MT.build_method("alta", "NEARL-Tiny", multiview=True).num_views == 4


def test_nearl_decay_rule_lives_with_nearl_and_param_groups_asks_the_model():
    from nearl.training.loop import param_groups
    assert "decays" in NEARLCLIP.__dict__ and "queries" not in inspect.getsource(param_groups)
    model = MT.build_method("nearl", "NEARL-Tiny")
    named = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    decayed = {named[id(p)] for p in param_groups(model, 0.1)[0]["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2
                       and not n.startswith("queries.")}
    assert any(named[id(p)].startswith("queries.") and p.ndim >= 2 for p in model.parameters() if id(p) in named)
    model.decays = lambda name, p: name.startswith("useformer.")  # whatever the model says
    assert {named[id(p)] for p in param_groups(model, 0.1)[0]["params"]} == {n for n in named.values()
                                                                             if n.startswith("useformer.")}


def test_what_callers_decide_about_a_method_is_in_its_spec():
    steps = "training 5 steps"
    want = {  # title, scores unseen classes, untrained is zero-shot, named in messages, the line before a run
        "nearl": ("NEARL-CLIP", True, True, False, steps),
        "alta": ("alta", True, False, True, steps),
        "clip-adapter": ("clip-adapter", True, False, True, steps),
        "coop": ("coop", True, False, True, steps),
        "biomedcoop": ("BiomedCoOp", True, False, True, steps),
        "linear-probe": ("linear-probe", False, False, True,
                         "fitting, 5 L-BFGS iterations per weight-decay candidate"),
        "zeroshot": ("zeroshot", True, True, True, "no training"),
        "tip-adapter": ("Tip-Adapter", False, True, True, "building the cache, no training"),
        "tip-adapter-f": ("Tip-Adapter-F", False, False, True, "building the cache, then training 5 steps"),
        "clip-lora": ("CLIP-LoRA", True, True, True, steps),
    }
    assert set(want) == set(MT.METHODS) and MT.DEFAULT_METHOD == "nearl"
    for name, row in want.items():
        s = MT.spec(name)
        assert (s.display_name, s.scores_unseen_classes, s.untrained_is_zero_shot, s.named_in_messages,
                s.training_note.format(steps=5)) == row, name


@pytest.mark.parametrize("method", ["nearl", "alta", "linear-probe", "zeroshot"])
def test_evaluating_without_a_checkpoint_says_what_it_did(method, capsys):
    chosen = EV.model_to_evaluate(None, method=method, model_name="NEARL-Tiny", task="classification")
    out = capsys.readouterr().out
    untrained = method in ("alta", "linear-probe")
    assert chosen.method == method
    assert chosen.label == (f"{method} NEARL-Tiny (untrained)" if untrained else "zero-shot NEARL-Tiny")
    assert ("UNTRAINED" in out) == untrained


@pytest.mark.parametrize("method", [None, "nearl", "alta"])
def test_evaluating_a_checkpoint_names_its_method_unless_nearl(method, tmp_path, capsys):
    model = MT.build_method(method or "nearl", "NEARL-Tiny", seed=3)
    state = C.training_state(model_name="NEARL-Tiny", pretrained=None, backbone_seed=3, method=method or "nearl",
                             config=model.config.to_dict(), task="retrieval", classnames=None, templates=None,
                             model=model.trainable_state_dict(), optimizer=None, scheduler=None, scaler=None,
                             step=1, epoch=0, batch_in_epoch=1, rng=C.rng_state(), data={}, best=None, args={},
                             metrics={}, train_images=None)
    if method is None:
        del state["method"]  # written before checkpoints named their method: NEARL-CLIP
    C.save_checkpoint(state, tmp_path)
    chosen = EV.model_to_evaluate(str(tmp_path), task="retrieval")
    first = capsys.readouterr().out.splitlines()[0]
    name = method or "nearl"
    assert chosen.method == name and MT.method_of(chosen.model) == name
    assert chosen.label.startswith(f"{'NEARL-CLIP' if name == 'nearl' else name} (")
    assert first.endswith(", method alta") == (name == "alta") and ", method" not in first.replace(", method alta", "")


def test_a_linear_probe_scores_its_own_classes_only():
    from nearl.evaluation.prediction import resolve_classes
    from nearl.comparison.protocols import check
    args = SimpleNamespace(protocol="base2novel", task="classification", k_shot=None)
    assert check(args, ["nearl", "linear-probe", "coop"], False) == ["nearl", "coop"]
    with pytest.raises(UserError, match="linear-probe's classifier cannot score them"):
        check(args, ["nearl", "linear-probe"], True)
    for method in MT.METHODS:
        if not MT.spec(method).scores_unseen_classes:  # linear-probe's head, Tip-Adapter's cache
            with pytest.raises(UserError, match="scores the classes it was trained on, in their order"):
                resolve_classes(["b", "a"], ["a", "b"], method)
        else:
            assert resolve_classes(["b", "a"], ["a", "b"], method) == ["b", "a"]


def test_classifier_output_is_defined_once():
    tree = ast.parse((ROOT / "nearl" / "model" / "classify.py").read_text())
    assert sum(isinstance(n, ast.ClassDef) and n.name == "ClassifierOutput" for n in ast.walk(tree)) == 1
