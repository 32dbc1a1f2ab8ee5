"""One place per fact (issue 25, item 2): the metrics' table (nearl/evaluation/metric_table.py) and every list
derived from it, the one --fused fallback (cli_args.use_fused), and the data format names the help
texts show (nearl.data.manifests.FORMATS, derived from its readers' registry).
The expected lists are written out as they were before the table, so the behaviour is pinned."""
from __future__ import annotations

import ast
import math
import types
from pathlib import Path

import pytest
import torch

from nearl.training import distributed as D
from train_helpers import _one_thread, make_image_folder, make_manifest  # noqa: F401  (_one_thread: autouse)

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--workers", "0", "--no-progress", "--device", "cpu"]

# The lists as the four former places held them.
VALIDATION = ("mean_recall", "i2t_R@1", "t2i_R@1", "accuracy", "macro_f1", "macro_auc", "macro_auroc", "macro_ap")
# issue 26 item 3 grew the table: balanced accuracy and the calibration error join the comparison, and
# classification_metrics computes them and the macro sensitivity and specificity.
COMPARED = {"retrieval": ("mean_recall", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"),
            "classification": ("accuracy", "macro_f1", "macro_auc", "balanced_accuracy", "ece"),
            # issue 26 item 1: multi-label, per-class AUROC its main metric
            # issue 26 item 1: the calibration error of the per-class probabilities joins both lists
            "multilabel": ("macro_auroc", "macro_ap", "macro_f1_at_50", "label_ece")}
MAIN = {"retrieval": "mean_recall", "classification": "accuracy", "multilabel": "macro_auroc"}
COMPUTED = {"retrieval": ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall"),
            "classification": ("accuracy", "macro_f1", "macro_auc", "balanced_accuracy", "macro_sensitivity",
                               "macro_specificity", "ece"),
            "multilabel": ("macro_auroc", "macro_ap", "macro_f1_at_50", "label_ece")}
FALLBACK = "--fused: the Triton kernels need a CUDA GPU; none here, so the reference PyTorch path runs."


def library_sources():
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "nearl").rglob("*.py"))}


# ----------------------------------------------------------------------------- (a) the metrics' table
def test_the_lists_derived_from_the_table_are_as_before():
    from nearl.comparison import report as comparison_report
    from nearl.training import plots
    from nearl.evaluation import metric_table as MT
    from nearl.evaluation.run import headline

    assert plots.VAL_KEYS == MT.VALIDATION_SHOWN == VALIDATION
    assert comparison_report.SHOWN == MT.COMPARISON_SHOWN == COMPARED
    assert comparison_report.MAIN_METRIC == MT.MAIN_METRIC == MAIN
    assert MT.TASKS == ("retrieval", "classification", "multilabel")
    for task, names in COMPUTED.items():
        assert sorted(MT.names(task)) == sorted(names)
    results = {"mean_recall": 12.5, "accuracy": 75.0, "i2t_R@1": 99.0, "macro_f1": 98.0}
    assert headline("retrieval", results) == 12.5 and headline("classification", results) == 75.0


def test_the_table_is_consistent():
    from nearl.evaluation import metric_table as MT

    assert len({m.name for m in MT.METRICS}) == len(MT.METRICS)
    for task in MT.TASKS:  # exactly one main metric a task, and it is shown everywhere
        main = [m for m in MT.METRICS if m.task == task and m.main]
        assert len(main) == 1 and main[0].validation and main[0].comparison
    recall = {MT.recall_key(d, k) for d in ("i2t", "t2i") for k in MT.RECALL_KS}
    assert recall == {m.name for m in MT.METRICS if "_R@" in m.name}


def test_metrics_computes_exactly_the_tables_metrics():
    from nearl.evaluation import metric_table as MT
    from nearl.evaluation import metrics as M

    g = torch.Generator().manual_seed(0)
    got = M.retrieval_recall(torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g),
                             torch.tensor([0, 0, 1, 2, 3, 3]))
    assert tuple(got) == COMPUTED["retrieval"]  # order too: it is the order of the validation line
    assert set(got) == set(MT.names("retrieval"))
    got = M.classification_metrics(torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert set(got) - {"auc_classes"} == set(MT.names("classification"))
    got = M.multilabel_metrics(torch.randn(6, 3, generator=g), torch.tensor([[1, 0, 1], [0, 1, 0]] * 3))
    assert set(got) - {"auroc_classes"} == set(MT.names("multilabel"))


@pytest.mark.parametrize("task", ["retrieval", "classification", "multilabel"])
def test_the_validation_line_shows_the_same_metrics(task, capsys):
    from nearl.training.loop import GradientRun

    results = {**{k: 10.0 + i for i, k in enumerate(COMPUTED[task])}, "n_images": 4}
    written = []
    from nearl.training.config import TrainConfig

    run = types.SimpleNamespace(data=types.SimpleNamespace(val=[object()], task=task), last_eval_step=None, step=5,
                                epoch=0, main_rank=True, _evaluate=lambda: dict(results), best=math.inf,
                                log=types.SimpleNamespace(write=written.append), info=D.DistInfo(),
                                config=TrainConfig(task=task))  # --monitor not given: the main metric
    assert GradientRun.validate(run) == results
    shown = " ".join(f"{k}={v:.2f}" for k, v in results.items() if k in VALIDATION)
    assert capsys.readouterr().out == f"validation at step 5: {shown}\n"
    assert written[0]["score"] == results[MAIN[task]]


def test_no_other_module_lists_metric_names():
    """A module naming two metrics is keeping its own list: it takes it from the table instead.
    metrics.py is the one exception: it computes each metric under its name (checked above)."""
    from nearl.evaluation import metric_table as MT

    names = set(MT.names())
    own = {}
    for rel, text in library_sources().items():
        if rel in ("nearl/evaluation/metric_table.py", "nearl/evaluation/metrics.py"):
            continue
        found = {n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and n.value in names}
        if len(found) > 1:
            own[rel] = sorted(found)
    assert not own, f"metric names listed outside nearl/evaluation/metric_table.py: {own}"


# ----------------------------------------------------------------------------- (b) the --fused fallback
def test_the_fused_fallback_is_one_function(capsys):
    from nearl.cli_args import use_fused

    said = []
    assert use_fused(True, torch.device("cpu"), say=said.append) is False and said == [FALLBACK]
    assert use_fused(False, torch.device("cpu"), say=said.append) is False and said == [FALLBACK]
    assert use_fused(True, torch.device("cuda"), say=said.append) is True and said == [FALLBACK]
    assert use_fused(False, torch.device("cuda"), say=said.append) is False and said == [FALLBACK]
    assert use_fused(True, torch.device("cpu")) is False and capsys.readouterr().out == FALLBACK + "\n"
    written = [rel for rel, text in library_sources().items() if "need a CUDA GPU; none here" in text]
    assert written == ["nearl/cli_args.py"]


def test_evaluate_and_predict_say_the_fallback(tmp_path, capsys):
    from nearl import evaluate as E
    from nearl import predict as P

    manifest = make_manifest(tmp_path / "data", n_train=0, n_val=3)
    E.main(["--model", "NEARL-Tiny", "--data", str(manifest), "--split", "val", "--fused", *FAST])
    assert FALLBACK + "\n" in capsys.readouterr().out
    images = make_image_folder(tmp_path / "folder", per_class=(1, 0), classes=("red", "blue"))
    P.main(["--model", "NEARL-Tiny", "--images", str(images), "--classes", "red,blue", "--fused", *FAST])
    assert FALLBACK + "\n" in capsys.readouterr().out


# ----------------------------------------------------------------------------- (c) data format names
def test_the_format_names_are_the_readers_registry():
    """A new reader is one entry in READERS: the --format names derive from it, nowhere else lists them."""
    from nearl import argtypes
    from nearl.data import manifests

    assert manifests.FORMATS == ("auto", *manifests.READERS) == ("auto", "manifest", "roco", "medicat")
    assert not hasattr(argtypes, "DATA_FORMATS")


def test_the_help_texts_take_the_names_from_one_place():
    from nearl import argtypes
    from nearl.evaluate import build_parser
    from nearl.training.options import build_parser as train_parser

    for parser in (build_parser(), train_parser()):
        actions = {a.dest: a for a in parser._actions}
        assert actions["format"].help == "retrieval source format: auto|manifest|roco|medicat"
        assert actions["classes"].choices == argtypes.CLASS_SUBSETS
    sources = library_sources()
    assert [rel for rel, text in sources.items() if "auto|manifest" in text] == []
    assert [rel for rel, text in sources.items() if '"manifest", "roco", "medicat")' in text] == []
    assert [rel for rel, text in sources.items() if '("all", "base", "novel")' in text] == ["nearl/argtypes.py"]
