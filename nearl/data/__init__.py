"""Data loading for NEARL-CLIP: records, readers for image-text and labelled sets, torch datasets,
and an offline demo set. Readers log to the "nearl.data" logger.

    records.py     ImageTextRecord, LabelledRecord
    manifests.py   image-text readers (manifest CSV/TSV/JSONL, ROCO, MedICaT): READERS, FORMATS
    labelled.py    labelled sets (class folders, CoOp split files), k-shot and base/novel splits
    label_csv.py   label CSVs (image + label + optional split columns)
    selection.py   the one choice of a source and its split; splitting.py the held-out splits it makes
    tabular.py, textfiles.py, skips.py, loadable.py   what the readers share
    images.py      image decoding (DICOM, 16-bit, ...), datasets.py the torch datasets
    demo.py        the offline demo set
    overlap.py     training images by content, so evaluation can refuse them

A new image-text format is a reader in manifests.py (or its own module) named in READERS.
"""
from nearl._lazy import lazy_attributes

# Loaded on first use (PEP 562): the readers' names (manifests.FORMATS) serve the --help texts
# without torch, which the datasets import.
_LAZY = {"ImageTextDataset": "datasets", "LabelledDataset": "datasets", "collate_skip_bad": "datasets",
         "collate_skip_bad_with_count": "datasets", "build_demo_set": "demo", "demo_classnames": "demo",
         "demo_manifest": "demo", "demo_split_json": "demo", "BadImageError": "images", "load_image": "images",
         "report_skips": "loadable", "require_loadable": "loadable", "base_novel_split": "labelled",
         "k_shot": "labelled", "read_coop_split": "labelled", "read_image_folder": "labelled",
         "subset_by_labels": "labelled", "read_image_text": "manifests", "read_manifest": "manifests",
         "read_medicat": "manifests", "read_roco": "manifests", "ImageTextRecord": "records",
         "LabelledRecord": "records", "SkipCounter": "skips"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
