"""Multi-view studies for ALTA: a manifest row may give up to four views of one study.

    image,lateral,prior,prior_lateral,caption,split
    p1/front.png,p1/lat.png,p0/front.png,,"chest x-ray ...",train

The view columns, in slot order (VIEW_SLOTS): frontal/current (`image`, required: it is also the
single image evaluation uses), lateral/current, frontal/prior, lateral/prior. An empty cell, a
missing column or a file that does not exist makes that view absent for the record; the reader
logs how many of each it found. `read_multiview` returns ImageTextRecords (so every other part of
the project reads them as usual) with `meta["views"]`, a list of 4 paths or None.

`MultiViewDataset` yields (views (V, 3, H, W), view_mask (V,) bool, tokens): absent views are zero
images with mask False (the model leaves them out of its mean), a view whose file cannot be
decoded is made absent too, and a record whose frontal image is bad is skipped (None), as in
ImageTextDataset.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from nearl.data.datasets import ImageTextDataset
from nearl.data.images import BadImageError, load_image
from nearl.data.manifests import read_manifest
from nearl.data.records import ImageTextRecord
from nearl.methods.options import VIEW_COLUMNS  # alta's --view-columns default

logger = logging.getLogger("nearl.data")

VIEW_SLOTS = ("frontal/current", "lateral/current", "frontal/prior", "lateral/prior")
PathLike = Union[str, Path]


def read_multiview(path: PathLike, *, root: Optional[PathLike] = None,
                   columns: Sequence[str] = VIEW_COLUMNS, **kw) -> List[ImageTextRecord]:
    """read_manifest + the extra view columns resolved into meta["views"] (4 entries, None = absent).

    columns: the 4 column names in VIEW_SLOTS order (the first is the manifest's image column).
    Other keywords (caption_columns, split_column, split) go to read_manifest.
    """
    columns = list(columns)
    if len(columns) != len(VIEW_SLOTS):
        raise ValueError(f"give {len(VIEW_SLOTS)} view columns ({', '.join(VIEW_SLOTS)}), got {columns}")
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    records = read_manifest(path, root=root, image_column=columns[0], **kw)
    found = [0] * len(columns)
    missing_files = 0
    for r in records:
        views: List[Optional[Path]] = [Path(r.image)]
        for col in columns[1:]:
            value = r.meta.pop(col, None)
            value = "" if value is None else str(value).strip()
            if not value or value.lower() in ("nan", "none", "null"):
                views.append(None)
                continue
            p = Path(value)
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                missing_files += 1
                views.append(None)
                continue
            views.append(p)
        for i, v in enumerate(views):
            found[i] += v is not None
        r.meta["views"] = views
    logger.info("%s: %d studies; views present: %s%s", path, len(records),
                ", ".join(f"{s} {n}" for s, n in zip(VIEW_SLOTS, found)),
                f"; {missing_files} view file(s) not found, treated as absent" if missing_files else "")
    return records


class MultiViewDataset(ImageTextDataset):
    """(views (V, 3, H, W), view_mask (V,) bool, tokens) per study; see the module docstring."""

    def __init__(self, records: Sequence[ImageTextRecord], transform, tokenizer, *, train: bool = True,
                 seed: int = 0, num_views: int = len(VIEW_SLOTS)):
        super().__init__(records, transform, tokenizer, train=train, seed=seed)
        self.num_views = int(num_views)

    def views_of(self, i: int) -> List[Optional[Path]]:
        r = self.records[i]
        views = list(r.meta.get("views") or [r.image])
        views = (views + [None] * self.num_views)[:self.num_views]
        views[0] = Path(r.image)
        return views

    def __getitem__(self, i: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        paths = self.views_of(i)
        frontal = self._load(paths[0], self.transform, i)
        if frontal is None:
            return None
        images = [frontal]
        mask = [True]
        for p in paths[1:]:
            img = None
            if p is not None:
                try:
                    img = self.transform(load_image(p))
                except BadImageError as e:
                    logger.warning("view %s cannot be read (%s); treated as absent", p, e.reason)
            images.append(img if img is not None else torch.zeros_like(frontal))
            mask.append(img is not None)
        caption = self.records[i].captions[self.caption_index(i)]
        return torch.stack(images), torch.tensor(mask), self.tokenize(caption)
