"""Data loading for NEARL-CLIP: records, readers for image-text and labelled sets, torch datasets,
and an offline demo set. Readers log to the "nearl.data" logger."""
from .datasets import (ImageTextDataset, LabelledDataset, collate_skip_bad,
                       collate_skip_bad_with_count)
from .demo import build_demo_set, demo_classnames, demo_manifest, demo_split_json
from .images import BadImageError, load_image
from .loadable import report_skips, require_loadable
from .labelled import (base_novel_split, k_shot, read_coop_split, read_image_folder,
                       subset_by_labels)
from .manifests import read_image_text, read_manifest, read_medicat, read_roco
from .records import ImageTextRecord, LabelledRecord
from .skips import SkipCounter

__all__ = [
    "ImageTextRecord", "LabelledRecord", "BadImageError", "load_image", "SkipCounter",
    "read_manifest", "read_roco", "read_medicat", "read_image_text",
    "read_image_folder", "read_coop_split", "k_shot", "base_novel_split", "subset_by_labels",
    "ImageTextDataset", "LabelledDataset", "collate_skip_bad", "collate_skip_bad_with_count",
    "require_loadable", "report_skips",
    "build_demo_set", "demo_manifest", "demo_split_json", "demo_classnames",
]
