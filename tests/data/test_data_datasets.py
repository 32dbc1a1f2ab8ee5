"""Torch datasets: caption sampling, tokenisation, and bad images dropped rather than fatal."""
import numpy as np
import open_clip
import pytest
import torch
from torch.utils.data import DataLoader

from data_fixtures import write_png, write_truncated_png
from nearl.data.datasets import (ImageTextDataset, LabelledDataset, collate_skip_bad,
                                 collate_skip_bad_with_count)
from nearl.data.records import ImageTextRecord, LabelledRecord

CAPTIONS = [f"caption {i}" for i in range(5)]


def to_tensor(im):
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255.0


def index_tokenizer(text):
    """Stand-in tokenizer whose 'ids' reveal which caption was chosen: (1, 1) like open_clip's."""
    return torch.tensor([[CAPTIONS.index(text)]])


@pytest.fixture
def records(tmp_path):
    return [ImageTextRecord(write_png(tmp_path / f"{i}.png", value=10 * i), list(CAPTIONS))
            for i in range(8)]


def chosen(ds):
    return [int(ds[i][1][0]) for i in range(len(ds))]


def test_train_captions_reproducible_and_change_with_epoch(records):
    a = ImageTextDataset(records, to_tensor, index_tokenizer, seed=3)
    b = ImageTextDataset(records, to_tensor, index_tokenizer, seed=3)
    first = chosen(a)
    assert first == chosen(b) == chosen(a)  # same seed+epoch: same draw, every time
    a.set_epoch(1)
    assert chosen(a) != first
    b.set_epoch(1)
    assert chosen(a) == chosen(b)
    assert chosen(ImageTextDataset(records, to_tensor, index_tokenizer, seed=4)) != first
    seen = set()
    for e in range(20):
        a.set_epoch(e)
        seen.update(chosen(a))
    assert seen == set(range(5))  # every caption gets used


def test_eval_uses_first_caption(records):
    ds = ImageTextDataset(records, to_tensor, index_tokenizer, train=False)
    ds.set_epoch(7)
    assert chosen(ds) == [0] * len(records)


def test_captions_flat_with_owner_index(tmp_path):
    recs = [ImageTextRecord(write_png(tmp_path / "a.png"), ["x", "y"]),
            ImageTextRecord(write_png(tmp_path / "b.png"), ["z"])]
    texts, owners = ImageTextDataset(recs, to_tensor, index_tokenizer).captions()
    assert texts == ["x", "y", "z"] and owners.tolist() == [0, 0, 1]
    assert owners.dtype == torch.long


def test_with_open_clip_transform_and_tokenizer(records):
    ds = ImageTextDataset(records[:2], open_clip.image_transform(224, is_train=False),
                          open_clip.get_tokenizer("ViT-B-32"), train=False)
    image, ids = ds[1]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-32")(CAPTIONS[0])[0])


def test_bad_image_is_dropped_and_counted(tmp_path):
    good = [write_png(tmp_path / f"g{i}.png") for i in range(3)]
    bad = write_truncated_png(tmp_path / "bad.png")
    recs = [LabelledRecord(p, i, f"c{i}") for i, p in enumerate([good[0], bad, good[1], good[2]])]
    ds = LabelledDataset(recs, to_tensor)
    assert ds[1] is None and ds.bad_count == 1 and ds.bad_paths == [str(bad)]
    image, label = ds[2]
    assert image.shape == (3, 8, 8) and label == 2

    loader = DataLoader(ds, batch_size=2, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0], [2, 3]]
    assert ds.bad_count == 1  # a record is counted once, however often it is met


def test_collate_counts_drops_with_workers(tmp_path):
    paths = [write_png(tmp_path / "a.png"), write_truncated_png(tmp_path / "b.png"),
             write_png(tmp_path / "c.png"), tmp_path / "deleted_later.png"]
    recs = [LabelledRecord(p, i, "c") for i, p in enumerate(paths)]
    loader = DataLoader(LabelledDataset(recs, to_tensor), batch_size=2, num_workers=2,
                        collate_fn=collate_skip_bad_with_count)
    out = list(loader)
    assert [n for _, n in out] == [1, 1]
    assert [b[1].tolist() for b, _ in out] == [[0], [2]]


def test_all_bad_batch_is_none(tmp_path):
    assert collate_skip_bad([None, None]) is None
    assert collate_skip_bad_with_count([None]) == (None, 1)
    batch, n = collate_skip_bad_with_count([(torch.zeros(2), 1), None])
    assert n == 1 and batch[0].shape == (1, 2)


def test_record_without_captions_rejected(tmp_path):
    with pytest.raises(ValueError, match="no captions"):
        ImageTextDataset([ImageTextRecord(tmp_path / "a.png", [])], to_tensor, index_tokenizer)
