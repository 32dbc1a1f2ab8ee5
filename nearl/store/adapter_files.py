"""Adapter folders people can share: the learnable weights of a trained run, apart from its backbone.

A folder written by `save_adapter` (or `python -m nearl.export`) holds, in a layout that can be
pushed to the Hugging Face Hub as it is:

    adapter_model.safetensors  the learnable tensors (model.trainable_state_dict()), nothing else (PEFT's
                               name; a folder written before holds adapter.safetensors, which its config
                               names, and still loads)
    adapter_config.json        what rebuilds the model around them (schema below)
    README.md                  a short model card
    train_images.json          the images it was trained on, as hashes of their bytes (never their
                               paths): nearl.evaluate --adapter refuses to score them (nearl/data/overlap.py)

`model.save_pretrained(DIR)` writes one from a model (nearl/store/pretrained.py), and
`nearl.from_pretrained(DIR or Hub repo id)` loads one from a folder or the Hugging Face Hub.
`load_adapter` / `nearl.load` rebuild the method on its backbone through
`nearl.methods.build_method` and load the weights, and refuse, naming the file and what differed,
a backbone other than the one the adapter was trained on, or a config whose model does not take
the weights' names and shapes.

adapter_config.json (format "nearl-adapter", format_version 2):

    format, format_version   "nearl-adapter", 2 (1: written before config_sha256, read with a warning)
    nearl_version            the version of nearl that wrote it
    method, config           a method of nearl/methods/ and its config (every hyper-parameter)
    task, classnames         "retrieval" | "classification" and the trained class names (or null)
    templates                the prompt templates it was trained with (or null: nearl.model.classify's)
    backbone                 model_name, pretrained (tag, hf-hub:, transformers: repo id, or null for
                             random weights; a local file or folder by its name alone, never its path,
                             with pretrained_local / model_local true: loading it needs pretrained= /
                             model= where it is now), seed (rebuilds a random backbone exactly),
                             fingerprint (below), and local_sources: for each local source ("model",
                             "pretrained") the sha256 of the weights files read from it (files,
                             files_sha256) and the Hub id its transformers config names
                             (config_name_or_path), when there are such
    weights                  file (the weights file's name in the folder, read from here), sha256 of
                             that file, tensors, parameters, and config_sha256: the sha256 of every
                             other entry of this file as canonical JSON (keys sorted, no spaces), so a
                             changed setting is refused as a changed weights file is
    train_images             file (train_images.json), its sha256, count and algorithm; null when the
                             checkpoint held no record of its training images' contents
    source                   where it came from (checkpoint file name, step, epoch) and, exported from a
                             checkpoint, its training data and validation by name and number (data,
                             validation: nearl/store/card.py's run_record), for people only (the model card)
    written_with             torch, open_clip_torch and safetensors versions, for people only

Top-level entries other than these (written by a newer nearl) are warned about once and ignored; they
count in config_sha256 as every entry does, so a file edited by hand is still refused.

The backbone fingerprint ("nearl-backbone-v1") is two sha256 digests over the backbone's
floating-point state_dict entries that training leaves frozen (ALTA's trained LayerNorms are the
adapter's, not the backbone's), sorted by name. `architecture` hashes each entry's name, dtype and
shape; `weights` hashes the same and, per entry, the raw bytes of every element of a tensor of up to
65,536 elements, else of every k-th element of the flattened tensor (k = ceil(n / 65,536)). That
reads under 0.3 MB a tensor (milliseconds for ViT-B/16, where hashing all 600 MB takes about a
second), is the same on every machine and device, and tells apart any other architecture and any
other weights (another tag, a fine-tune, another seed); an edit confined to unsampled elements of a
large tensor is, by design, not seen. Integer and bool buffers (position ids, masks) are left out:
they follow from the architecture, and library versions differ in which they keep.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nearl import __version__ as NEARL_VERSION
from nearl.store.checkpoint import describe, load_checkpoint
from nearl.data.overlap import CONTENT_ALGORITHM, has_content, keys_from_hex, keys_to_hex
from nearl.cli_args import check_backbone, user_errors
from nearl.errors import UserError
from nearl.evaluation.run import ModelToEvaluate
from nearl.logging_utils import reporter
from nearl.methods import build_from_checkpoint, build_method, canonical, check_task, method_of, spec
from nearl.store.nonfinite import NonFiniteError, check_finite_state, nonfinite_outputs, nonfinite_tensors
from nearl.towers.sources import WEIGHT_SUFFIXES, names_local_path, parse
from nearl.writes import atomic_write_all, check_writable

logger = logging.getLogger("nearl.adapter")
to_user = reporter("adapter")  # the lines the user reads (nearl.logging_utils.reporter)

FORMAT, FORMAT_VERSION = "nearl-adapter", 2
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "adapter_model.safetensors", "adapter_config.json", "README.md"
FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
LEGACY_WEIGHTS_FILE = "adapter.safetensors"  # the weights' name before PEFT's; such folders still load
KNOWN_ENTRIES = frozenset({"format", "format_version", "nearl_version", "method", "config", "task", "classnames",
                           "templates", "backbone", "weights", "train_images", "source", "written_with"})
TRAIN_IMAGES_FILE, TRAIN_IMAGES_FORMAT = "train_images.json", "nearl-train-images"
FINGERPRINT_ALGORITHM = "nearl-backbone-v1"
SAMPLE = 65536  # elements of a tensor the content hash reads at most
PathLike = Union[str, os.PathLike]


class AdapterError(UserError):
    """An adapter folder that cannot be written or used; the message names the file and why."""


# ----------------------------------------------------------------------------- fingerprint
def _frozen_entries(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The backbone's floating-point state that training never changes, sorted by name."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    entries = [(name, t.detach()) for name, t in backbone.state_dict(keep_vars=True).items()
               if t.is_floating_point() and prefix + name not in trainable]
    return sorted(entries, key=lambda e: e[0])


def _sampled_bytes(t: torch.Tensor) -> bytes:
    flat = t.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[::-(-flat.numel() // SAMPLE)]
    return flat.contiguous().cpu().view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module) -> Dict[str, Any]:
    """The fingerprint of `model.backbone` (or of `model` itself when it has no backbone): see the
    module docstring. Deterministic across machines and devices, cheap for any CLIP size."""
    architecture, weights = hashlib.sha256(), hashlib.sha256()
    entries = _frozen_entries(model)
    for name, t in entries:
        head = f"{name}\0{str(t.dtype).replace('torch.', '')}\0{tuple(t.shape)}\n".encode()
        architecture.update(head)
        weights.update(head)
        weights.update(_sampled_bytes(t))
    return {"algorithm": FINGERPRINT_ALGORITHM, "architecture": architecture.hexdigest(),
            "weights": weights.hexdigest(), "tensors": len(entries),
            "elements": sum(t.numel() for _, t in entries)}


# ----------------------------------------------------------------------------- writing
def _check_target(directory: Path, overwrite: bool) -> None:
    """Found out before any work: the folder must be one, and not already hold an adapter."""
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory} is a file; an adapter is written to a folder")
    present = [name for name in (*FILES, LEGACY_WEIGHTS_FILE) if (directory / name).exists()]
    if present and not overwrite:
        raise AdapterError(f"{directory} already holds {', '.join(present)}; pass --overwrite "
                           "(overwrite=True) to replace them")
    check_writable(directory, "the adapter folder")


def _versions() -> Dict[str, str]:
    import open_clip
    import safetensors

    return {"torch": torch.__version__, "open_clip_torch": open_clip.__version__,
            "safetensors": safetensors.__version__}


def _json_ready(value: Any, what: str) -> Any:
    """`value` as JSON gives it back (tuples become lists); a TypeError names what held it (NaN and
    inf included: JSON has no such numbers)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} cannot be written as JSON: {err}") from err


def config_digest(record: Dict[str, Any]) -> str:
    """The sha256 of an adapter_config.json's entries, `weights.config_sha256` left out, as canonical
    JSON (keys sorted, no spaces): re-indenting the file keeps it, changing any value does not."""
    weights = {k: v for k, v in (record.get("weights") or {}).items() if k != "config_sha256"}
    text = json.dumps({**record, "weights": weights}, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal_config(record: Dict[str, Any]) -> Dict[str, Any]:
    """`record` with its `weights.config_sha256` (over its other entries) written in; returns it."""
    record["weights"]["config_sha256"] = config_digest(record)
    return record


def portable_source(pretrained: Optional[str]) -> Tuple[Optional[str], bool]:
    """(what adapter_config.json records for a backbone source, whether it is a local file or folder).
    A tag, an hf-hub: id or a transformers: repo id as given; a local weights file, local-dir: or
    transformers: folder by its name alone: its path means nothing on another machine and may say too
    much about this one (the fingerprint identifies the weights)."""
    source = parse(pretrained)
    if not source.is_local:  # random, a tag, an hf-hub: id, a transformers: repo id
        return pretrained, False
    if source.is_schema:  # a local-dir: or transformers: folder
        return source.renamed(Path(source.value).name), True
    return Path(pretrained).name, True  # a weights file


def portable_model_name(model_name: str) -> Tuple[str, bool]:
    """`portable_source` for a model name: a local-dir: or transformers: folder by its name alone (an
    open_clip architecture is a name, even where a file of that name lies about)."""
    if parse(model_name).kind in ("local-dir", "transformers"):
        return portable_source(model_name)
    return model_name, False


def _model_name_used(source: Optional[str]) -> bool:
    """Whether the backbone is built from its model name: a schema source names its own (nearl.model.nearl_clip)."""
    return not parse(source).is_schema


def _local_path(source: str) -> Optional[Path]:
    """The file or folder of this machine a backbone source names, None for a tag or a Hub id."""
    return parse(source).local_path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_files(source: str) -> Dict[str, str]:
    """{name: sha256} of the weights files of a local source (the file itself, or a folder's *.safetensors,
    *.bin, ...): what a Hub repository lists for its files, so a copy of them can be told by its files."""
    path = _local_path(source)
    if path is None:
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES))
    return {p.name: _sha256_file(p) for p in files}


def files_digest(files: Dict[str, str]) -> str:
    """One sha256 over the files' digests (their names left out: a renamed copy is the same weights)."""
    return hashlib.sha256("".join(f"{d}\n" for d in sorted(files.values())).encode()).hexdigest()


def _config_hub_id(source: str) -> Optional[str]:
    """The Hub id a transformers folder's config.json names (`_name_or_path`, which transformers wrote
    until 4.x), when it is one; a local path there is not recorded."""
    path = _local_path(source) if parse(source).kind == "transformers" else None
    try:
        value = json.loads((path / "config.json").read_text()).get("_name_or_path") if path else None
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) and not names_local_path(value):
        return value
    return None


def local_source(source: str, weights: bool) -> Dict[str, Any]:
    """What identifies a local backbone source in adapter_config.json, its path left out: the sha256 of the
    weights files read from it (`weights`), the Hub id its config names."""
    entry: Dict[str, Any] = {}
    files = weights_files(source) if weights else {}
    if files:
        entry.update(files=files, files_sha256=files_digest(files))
    hub = _config_hub_id(source)
    if hub:
        entry["config_name_or_path"] = hub
    return entry


def _backbone_entry(model: nn.Module, model_name: str, pretrained: Optional[str], seed: int,
                    read_from: Optional[str]) -> Dict[str, Any]:
    """adapter_config.json's `backbone`: never a local path, since the folder is meant to be shared.
    read_from: where the weights were read (export --pretrained), when not from `pretrained` itself."""
    recorded, local = portable_source(pretrained)
    name, name_local = portable_model_name(model_name)
    actual = read_from if read_from is not None else pretrained
    sources = {}
    if local and actual is not None:
        sources["pretrained"] = local_source(actual, weights=True)
    if name_local and _model_name_used(actual):  # local-dir: reads its weights; transformers: its config alone
        sources["model"] = local_source(model_name, weights=parse(model_name).kind == "local-dir")
    sources = {k: v for k, v in sources.items() if v}
    return {"model_name": name, **({"model_local": True} if name_local else {}),
            "pretrained": recorded, **({"pretrained_local": True} if local else {}),
            "seed": int(seed), "fingerprint": fingerprint(model), **({"local_sources": sources} if sources else {})}


def _train_images_files(train_images: Optional[Dict[str, Any]]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(adapter_config.json's `train_images` entry, train_images.json's text) for a checkpoint's record:
    its content keys alone (the path keys would say nothing elsewhere); (None, None) without them."""
    if not has_content(train_images):
        return None, None
    keys = keys_to_hex(train_images["content"])
    text = json.dumps({"format": TRAIN_IMAGES_FORMAT, "algorithm": CONTENT_ALGORITHM, "count": len(keys),
                       "keys": keys}, separators=(",", ":")) + "\n"
    entry = {"file": TRAIN_IMAGES_FILE, "sha256": hashlib.sha256(text.encode()).hexdigest(), "count": len(keys),
             "algorithm": CONTENT_ALGORITHM}
    return entry, text


def _check_finite_outputs(model: nn.Module, task: str, classnames, templates, source) -> None:
    """Finite weights are not enough: a diverged model's outputs can be NaN (`nonfinite_outputs`)."""
    bad = nonfinite_outputs(model, classnames if task == "classification" else None, templates)
    if bad:
        what = f"checkpoint {source['checkpoint']}" if (source or {}).get("checkpoint") else "the model"
        raise NonFiniteError(f"{what}: its {', '.join(bad)} on a probe batch hold NaN or inf although its weights "
                             "are finite: the run diverged; not exported. Export an earlier checkpoint, or train "
                             "again with a lower --lr")


def save_adapter(model: nn.Module, directory: PathLike, *, model_name: str, pretrained: Optional[str],
                 backbone_seed: int = 0, task: str = "retrieval", classnames: Optional[Sequence[str]] = None,
                 templates: Optional[Sequence[str]] = None, source: Optional[Dict[str, Any]] = None,
                 overwrite: bool = False, train_images: Optional[Dict[str, Any]] = None,
                 read_from: Optional[str] = None, license: Optional[str] = None,
                 hub_repo: Optional[str] = None) -> Path:
    """Write `model`'s learnable weights, adapter_config.json and a model card into `directory`.

    model_name / pretrained / backbone_seed: how the backbone was built (as nearl.methods.build_method
    takes them), so `load_adapter` rebuilds it; local ones are recorded by name (`_backbone_entry`).
    train_images: a checkpoint's record of its training images (nearl.data.overlap.training_images),
    whose content hashes go to train_images.json. license / hub_repo: what the model card states as the
    adapter's license (none: it says none was stated) and names as its Hub repository. A state holding
    NaN or inf, or a model whose outputs on a probe batch do (`nonfinite_outputs`), is refused
    (NonFiniteError) and nothing is written. Returns the folder."""
    from safetensors.torch import save as safetensors_bytes

    directory = Path(directory)
    _check_target(directory, overwrite)
    _check_card_options(license, hub_repo)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.trainable_state_dict().items()}
    check_finite_state(state, f"adapter {directory / WEIGHTS_FILE}")
    _check_finite_outputs(model, task, classnames, templates, source)
    method = method_of(model)
    # One metadata entry: safetensors writes a map's entries in no fixed order, and an export is meant
    # to give the same bytes every time (what the method is, adapter_config.json says).
    data = safetensors_bytes(state, metadata={"format": "pt"})
    provenance = dict(source or {})
    if provenance.get("checkpoint"):
        provenance["checkpoint"] = Path(str(provenance["checkpoint"])).name
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "nearl_version": NEARL_VERSION,
        "method": method, "config": _json_ready(model.config.to_dict(), f"the {method} config"),
        "task": task, "classnames": list(classnames) if classnames else None,
        "templates": list(templates) if templates else None,
        "backbone": _backbone_entry(model, model_name, pretrained, backbone_seed, read_from),
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "tensors": len(state),
                    "parameters": sum(t.numel() for t in state.values())},
        "train_images": None,
        "source": _json_ready(provenance, "the adapter's source"), "written_with": _versions(),
    }
    record["train_images"], images_text = _train_images_files(train_images)
    seal_config(record)
    # All written before any replaces an earlier one: a refused write (full disk, read-only) leaves an
    # earlier adapter whole (WriteError, nearl/writes.py). The weights go first: the config names their sha256.
    files = {directory / WEIGHTS_FILE: data, directory / CONFIG_FILE: json.dumps(record, indent=2,
             allow_nan=False) + "\n", directory / CARD_FILE: model_card(record, license=license, repo_id=hub_repo)}
    if images_text is not None:
        files[directory / TRAIN_IMAGES_FILE] = images_text
    atomic_write_all(files)
    if images_text is None:  # an earlier export's, which the config no longer names
        (directory / TRAIN_IMAGES_FILE).unlink(missing_ok=True)
    (directory / LEGACY_WEIGHTS_FILE).unlink(missing_ok=True)  # an earlier export's weights, by their old name
    return directory


def export_checkpoint(checkpoint: PathLike, directory: PathLike, *, pretrained: Optional[str] = "checkpoint",
                      overwrite: bool = False, license: Optional[str] = None, hub_repo: Optional[str] = None) -> Path:
    """The adapter of a checkpoint (file or run folder): its model is rebuilt on its backbone (so the
    fingerprint is of the real backbone, and the weights are known to fit), then `save_adapter`.
    pretrained: where to read the backbone weights for that, when the recorded source is not at hand
    here (a local copy of the same weights); the adapter still records the checkpoint's source. Its
    `source` also records the run's data and validation by name and number (nearl/store/card.py's
    run_record), which the model card reports; license / hub_repo: save_adapter's."""
    from nearl.store.card import run_record

    directory = Path(directory)
    _check_target(directory, overwrite)
    _check_card_options(license, hub_repo)
    ckpt = load_checkpoint(checkpoint)
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise NonFiniteError(f"checkpoint {ckpt['path']}: {len(bad)} of {len(ckpt['model'])} learnable tensors hold "
                             f"NaN or inf ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); not exported")
    recorded = ckpt.get("pretrained")
    source = recorded if pretrained == "checkpoint" else pretrained
    _check_source(ckpt["model_name"], source, f"checkpoint {ckpt['path']}")
    with user_errors(f"checkpoint {ckpt['path']}: "):
        model = build_from_checkpoint(ckpt, pretrained=pretrained)
    to_user.info(f"exporting {describe(ckpt)}")
    provenance = {"checkpoint": ckpt["path"], "step": ckpt.get("step"), "epoch": ckpt.get("epoch"), **run_record(ckpt)}
    return save_adapter(model, directory, model_name=ckpt["model_name"], pretrained=recorded,
                        backbone_seed=int(ckpt.get("backbone_seed", 0)), task=ckpt.get("task") or "retrieval",
                        classnames=ckpt.get("classnames"), templates=ckpt.get("templates"), source=provenance,
                        overwrite=overwrite, train_images=ckpt.get("train_images"),
                        read_from=None if pretrained == "checkpoint" else pretrained, license=license,
                        hub_repo=hub_repo)


def _check_card_options(license: Optional[str], hub_repo: Optional[str]) -> None:
    """Before any work: a license the card can state (one line), a Hub repo id its examples can name."""
    if license is not None and (not license.strip() or "\n" in license or "\r" in license):
        raise AdapterError(f"license {license!r}: one line, e.g. apache-2.0, cc-by-4.0 or other")
    if hub_repo is not None:
        from nearl.store.pretrained import hub_repo_id  # it imports this module

        hub_repo_id(hub_repo, "--push-to-hub")


def model_card(record: Dict[str, Any], *, license: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """README.md for the Hub (nearl/store/card.py): metadata header, what the adapter is, its data and
    validation, how to load it, intended use and limitations."""
    from nearl.store.card import model_card as card  # it imports this module

    return card(record, license=license, repo_id=repo_id)


# ----------------------------------------------------------------------------- reading
def _folder(directory: PathLike) -> Path:
    if isinstance(directory, str) and parse(directory).kind == "hf-hub":  # a Hub repository, downloaded
        from nearl.store.pretrained import adapter_folder  # it imports this module

        return adapter_folder(directory)
    path = Path(directory)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        return path.parent
    if not path.exists():
        raise AdapterError(f"adapter folder {path} not found")
    if not path.is_dir():
        raise AdapterError(f"{path} is a file; an adapter is a folder holding {CONFIG_FILE} and {WEIGHTS_FILE} "
                           "(written by python -m nearl.export)")
    return path


def _entry(record: Dict[str, Any], dotted: str, path: Path) -> Any:
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise AdapterError(f"{path}: no {dotted!r} entry; not an adapter written by python -m nearl.export")
        value = value[key]
    return value


REQUIRED = ("method", "config", "task", "backbone.model_name", "backbone.pretrained", "backbone.seed",
            "backbone.fingerprint.algorithm", "backbone.fingerprint.architecture", "backbone.fingerprint.weights",
            "weights.sha256")


def read_adapter_config(directory: PathLike) -> Tuple[Path, Dict[str, Any]]:
    """(the folder, its adapter_config.json), checked for the entries loading needs."""
    folder = _folder(directory)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: {folder} is not an adapter folder (python -m nearl.export writes "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a NEARL adapter config (no format={FORMAT!r} entry)")
    if not isinstance(record.get("format_version"), int) or record["format_version"] > FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {record.get('format_version')!r}; this nearl "
                           f"({NEARL_VERSION}) reads <= {FORMAT_VERSION}")
    for dotted in REQUIRED:
        _entry(record, dotted, path)
    if not isinstance(record["config"], dict):
        raise AdapterError(f"{path}: 'config' must be an object of the method's hyper-parameters")
    _check_config_digest(record, path)
    _warn_unknown_entries(record, path)
    return folder, record


_WARNED: set = set()  # (config file, its unknown entries) already warned about in this process


def _warn_unknown_entries(record: Dict[str, Any], path: Path) -> None:
    """Entries this nearl does not know (a newer one wrote them; the digest, over every entry as written,
    has been checked) are ignored, said once a file."""
    unknown = tuple(sorted(set(record) - KNOWN_ENTRIES))
    key = (str(path.resolve()), unknown)
    if unknown and key not in _WARNED:
        _WARNED.add(key)
        logger.warning("%s: ignored entries unknown to this nearl (%s): %s (written by a newer nearl?)", path,
                       NEARL_VERSION, ", ".join(unknown))


def weights_file_name(record: Dict[str, Any], path: Path) -> str:
    """The name of the adapter's weights file in its folder: the config's `weights.file` (adapter.safetensors
    when it names none, as before PEFT's name); a path, or not a .safetensors file, is refused."""
    name = (record.get("weights") or {}).get("file", LEGACY_WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name or "\\" in name or not name.endswith(".safetensors"):
        raise AdapterError(f"{path}: weights.file {name!r} is not the name of a .safetensors file in the adapter folder")
    return name


def _check_config_digest(record: Dict[str, Any], path: Path) -> None:
    """The entries must be those the export wrote (`config_digest`); a version-1 file has no digest."""
    if record["format_version"] < 2:
        logger.warning("%s was written by an older nearl (format_version %s) without a config_sha256: "
                       "its settings cannot be checked against the export", path, record["format_version"])
        return
    recorded = _entry(record, "weights.config_sha256", path)
    try:
        found = config_digest(record)
    except ValueError as err:  # NaN or inf written into the file: JSON has no such numbers
        raise AdapterError(f"{path}: {err}; not a file python -m nearl.export wrote") from None
    if found != recorded:
        raise AdapterError(f"{path} has changed since the export (config_sha256 differs): a setting edited by "
                           "hand would change what the weights compute; export the checkpoint again instead")


def _read_weights(path: Path, record: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The adapter's tensors; the file must be the one its config names (sha256) and finite."""
    from safetensors.torch import load as safetensors_load

    if not path.is_file():
        raise AdapterError(f"{path} not found: the adapter's weights ({CONFIG_FILE} names them)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["weights"]["sha256"]:
        raise AdapterError(f"{path} is not the file its {CONFIG_FILE} was written with (sha256 differs): "
                           "changed or damaged since the export")
    try:
        state = safetensors_load(data)
    except Exception as err:  # safetensors raises its own SafetensorError for a bad header
        raise AdapterError(f"{path}: not a readable safetensors file ({err})") from None
    bad = nonfinite_tensors(state)
    if bad:
        raise AdapterError(f"{path}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:4])}); refused")
    return state


def _check_source(model_name: str, source: Optional[str], where: str) -> None:
    """A weights file that is not here, or a backbone open_clip does not know, in one line (open_clip's
    own errors are a page long)."""
    looks_like_file = parse(source).kind == "file"
    if looks_like_file and not Path(source).expanduser().is_file():
        raise AdapterError(f"{where}: backbone weights file {source} not found here; pass --pretrained "
                           "(pretrained=) a local copy of the same weights")
    try:
        check_backbone(model_name, source)
    except UserError as err:
        raise AdapterError(f"{where}: its backbone cannot be built here: {err}") from None


def _files_note(backbone: Dict[str, Any], model_name: str, source: Optional[str]) -> str:
    """For a refusal: how the weights files of the local source given differ from those exported, if
    they were recorded ("" otherwise; hashed only once the backbone is known to differ)."""
    role, given = ("pretrained", source) if source is not None and _local_path(source) else ("model", model_name)
    want = ((backbone.get("local_sources") or {}).get(role) or {}).get("files_sha256")
    found = files_digest(weights_files(given)) if want and given and _local_path(given) else None
    return f", weights files {found[:16]} != recorded {want[:16]} (sha256)" if found and found != want else ""


def _check_fingerprint(model: nn.Module, backbone: Dict[str, Any], model_name: str, source: Optional[str],
                       path: Path) -> None:
    """The backbone built must be the one the adapter was trained on (see the module docstring)."""
    want, found = backbone["fingerprint"], fingerprint(model)
    built = f"model_name={model_name!r}, pretrained={source!r}, seed {backbone['seed']}"
    if want["algorithm"] != found["algorithm"]:
        raise AdapterError(f"{path}: fingerprint algorithm {want['algorithm']!r} is not known to this nearl "
                           f"({NEARL_VERSION}, which computes {found['algorithm']!r})")
    if want["architecture"] != found["architecture"]:
        raise AdapterError(
            f"{path}: the backbone built from {built} is not the one this adapter was trained on: its "
            f"architecture differs ({found['tensors']} frozen tensors, {found['elements']:,} values; the adapter's "
            f"had {want.get('tensors')}, {want.get('elements')}; architecture fingerprint {found['architecture'][:16]} "
            f"!= recorded {want['architecture'][:16]})")
    if want["weights"] != found["weights"]:
        raise AdapterError(
            f"{path}: the backbone built from {built} is not the one this adapter was trained on: same "
            f"architecture, different weights (fingerprint {found['weights'][:16]} != recorded "
            f"{want['weights'][:16]}){_files_note(backbone, model_name, source)}; give --pretrained (pretrained=) "
            "the weights it was trained on")


def _check_weights(model: nn.Module, state: Dict[str, torch.Tensor], weights: Path, config: Path) -> None:
    """The weights' names and shapes must be those of the model the config describes."""
    expected = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [f"{k} {got[k]} in the file, {expected[k]} in the model" for k in sorted(set(got) & set(expected))
              if got[k] != expected[k]]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "",
                 f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}" if unexpected else "",
                 f"shapes differ: {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}" if shapes else ""]
        raise AdapterError(f"{weights} does not fit the {method_of(model)} model that {config} describes "
                           f"(method and config): {', '.join(p for p in parts if p)}")


@dataclass
class LoadedAdapter:
    model: nn.Module  # in eval mode
    directory: Path
    record: Dict[str, Any]  # adapter_config.json
    pretrained: Optional[str]  # where the backbone weights were read from (None: random)

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def task(self) -> str:
        return self.record["task"]

    @property
    def classnames(self) -> Optional[List[str]]:
        return self.record.get("classnames")

    @property
    def templates(self) -> Optional[List[str]]:
        return self.record.get("templates")


def _backbone_source(backbone: Dict[str, Any], pretrained: Optional[str], model: Optional[str],
                     path: Path) -> Tuple[str, Optional[str]]:
    """(model name, pretrained source) to build the adapter's backbone from: the recorded ones, or where
    a local folder or file lives now (`model` / `pretrained`). A local one not given, whose path the
    adapter does not hold, is a one-line error naming the keyword (flag) that gives it."""
    model_name = backbone["model_name"] if model is None else model
    source = backbone["pretrained"] if pretrained is None else pretrained
    if pretrained is None and backbone.get("pretrained_local"):
        if model is not None and backbone.get("model_local") and source == backbone["model_name"]:
            return model_name, model  # one folder gave both (--model X --pretrained X): --model says where
        kind = "folder" if parse(source).is_schema else "file"
        raise AdapterError(f"{path}: the backbone weights were read from a local {kind}, {source}, whose path "
                           "is not recorded (the fingerprint is); pass --pretrained (pretrained=) a copy of it")
    if model is None and backbone.get("model_local") and _model_name_used(source):
        named = parse(model_name)
        raise AdapterError(f"{path}: the backbone was built from a local folder, {model_name}, whose path is not "
                           f"recorded (the fingerprint is); pass --model (model=) where it is now, e.g. "
                           f"--model {named.renamed('/path/to/' + named.value)}")
    return model_name, source


def load_adapter(directory: PathLike, pretrained: Optional[str] = None, *, model: Optional[str] = None,
                 fused: bool = False) -> LoadedAdapter:
    """Rebuild an adapter folder's model on its backbone and load its weights.

    pretrained: None reads the backbone weights from the recorded source; another source (a local
    file of the same weights, hf-hub:, ...) overrides it, and its fingerprint must still match.
    model: where a backbone folder recorded by name alone (a local `transformers:` or `local-dir:`
    model name, `model_local`) is now, e.g. "transformers:/data/plip"; the fingerprint must match.
    Refuses (AdapterError, naming the file) missing or damaged files, another backbone, and a
    method / config whose model does not take the weights' names and shapes."""
    folder, record = read_adapter_config(directory)
    config_path = folder / CONFIG_FILE
    weights_path = folder / weights_file_name(record, config_path)
    state = _read_weights(weights_path, record)
    backbone = record["backbone"]
    model_name, source = _backbone_source(backbone, pretrained, model, config_path)
    _check_source(model_name, source, str(config_path))
    with user_errors(f"{config_path}: "):
        built = build_method(record["method"], model_name, source, fused=fused, seed=int(backbone["seed"]),
                             **record["config"])
    _check_fingerprint(built, backbone, model_name, source, config_path)
    _check_weights(built, state, weights_path, config_path)
    built.load_trainable_state_dict(state)
    return LoadedAdapter(built.eval(), folder, record, source)


def load(directory: PathLike, pretrained: Optional[str] = None, *, model: Optional[str] = None,
         fused: bool = False) -> nn.Module:
    """`nearl.load(DIR)`: the model of an adapter folder, on its own backbone, in eval mode (see
    `load_adapter`, which also returns the folder's record: task, class names, templates; `model=` /
    `pretrained=` say where a local backbone folder or weights file is now)."""
    return load_adapter(directory, pretrained, model=model, fused=fused).model


def read_train_images(folder: Path, record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The record of the images an adapter was trained on (train_images.json: content keys, as
    nearl.data.overlap.trained_on takes them), None when its config names none. A missing or changed
    file is refused as the weights are: the config holds its sha256."""
    entry = record.get("train_images")
    if not entry:
        return None
    path = folder / TRAIN_IMAGES_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: {CONFIG_FILE} names it (hashes of the images the adapter was "
                           "trained on, which nearl.evaluate checks against); copy the whole adapter folder")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise AdapterError(f"{path} is not the file its {CONFIG_FILE} was written with (sha256 differs): "
                           "changed or damaged since the export")
    try:
        document = json.loads(data)
        keys = keys_from_hex(document["keys"])
    except (ValueError, KeyError, TypeError) as err:
        raise AdapterError(f"{path}: not a record of training images ({err})") from None
    return {"content_algorithm": document.get("algorithm"), "content": keys, "count": int(keys.numel())}


def adapter_to_evaluate(directory: PathLike, *, method: Optional[str] = None, model_name: Optional[str] = None,
                        pretrained: Optional[str] = None, task: Optional[str] = None,
                        fused: bool = False) -> ModelToEvaluate:
    """What `--adapter DIR` of the command lines evaluates or predicts with: as `model_to_evaluate`
    for a checkpoint. `method` must match the adapter's; `model_name` cannot change its backbone."""
    folder, record = read_adapter_config(directory)
    recorded_name = record["backbone"]["model_name"]
    # A local folder (recorded by name, or by path before 24.17) may have moved: --model says where it is now
    movable = bool(record["backbone"].get("model_local")) or portable_model_name(recorded_name)[1]
    if model_name and model_name != recorded_name and not movable:
        raise AdapterError(f"--model {model_name}: the adapter {folder} is for {recorded_name!r} and cannot be "
                           "moved to another backbone (--pretrained may name another copy of the same weights)")
    if method:
        with user_errors("--method: "):
            wanted = canonical(method)
        if wanted != record["method"]:
            raise AdapterError(f"--method {method} but the adapter {folder} holds method {record['method']!r}")
    loaded = load_adapter(folder, pretrained, model=model_name if movable else None, fused=fused)
    task = task or loaded.task
    with user_errors():
        check_task(loaded.method, task)
    to_user.info(f"adapter {folder}: {loaded.method} on {recorded_name} (pretrained={loaded.pretrained}), "
                 f"trained for {loaded.task}")
    if loaded.pretrained is None:
        to_user.warning(f"NOTE: no pretrained weights: the backbone is RANDOM (seed {record['backbone']['seed']}); "
                        "numbers only check the pipeline.")
    weights = folder / weights_file_name(record, folder / CONFIG_FILE)
    info = {"path": str(weights), "classnames": loaded.classnames, "templates": loaded.templates,
            "step": (record.get("source") or {}).get("step"), "train_images": read_train_images(folder, record),
            "train_images_file": str(folder / CONFIG_FILE)}
    label = f"{spec(loaded.method).display_name} (adapter {folder.name})"
    return ModelToEvaluate(loaded.model, loaded.method, task, loaded.pretrained, label, info)
