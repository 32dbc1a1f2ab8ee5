"""Undecodable images: counted by reason once per data set (workers included), warned about once per
file, reported once in the log and metrics.jsonl, and a set with no loadable image stops before
training (or evaluation) with the files named."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_fixtures import dicom_dataset, write_dicom, write_png, write_truncated_png
from nearl.evaluation import run as EV
from nearl.data.datasets import LabelledDataset, collate_skip_bad
from nearl.data.images import BadImageError, load_image
from nearl.data.loadable import report_skips, require_loadable
from nearl.data.records import LabelledRecord
from nearl.errors import UserError
from nearl.logging_utils import MetricsLog, read_metrics


def to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def text_png(path):
    path.write_text("this is a text file, not a PNG\n")
    return path


def corrupt_dicom(path):
    write_dicom(path, np.arange(64 * 64).reshape(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD = {"t.png": (write_truncated_png, "truncated image"), "t.jpg": (truncated_jpeg, "truncated image"),
       "text.png": (text_png, "not an image"), "c.dcm": (corrupt_dicom, "corrupt DICOM")}


@pytest.mark.parametrize("name", sorted(BAD))
def test_load_image_says_why_by_kind(tmp_path, name):
    make, kind = BAD[name]
    with pytest.raises(BadImageError) as e:
        load_image(make(tmp_path / name))
    assert e.value.kind == kind
    with pytest.raises(BadImageError) as e:
        load_image(tmp_path / "missing.png")
    assert e.value.kind == "missing image"


def mixed_records(tmp_path, n_good=2):
    paths = [write_png(tmp_path / f"g{i}.png") for i in range(n_good)]
    paths += [make(tmp_path / name) for name, (make, _) in sorted(BAD.items())]
    return [LabelledRecord(p, i % 2, f"c{i % 2}") for i, p in enumerate(paths)]


EXPECTED = {"truncated image": 2, "not an image": 1, "corrupt DICOM": 1}


def epochs(ds, n, workers):
    loader = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_skip_bad)
    return [[int(l) for b in loader if b is not None for l in b[1]] for _ in range(n)]


def test_counted_by_reason_across_workers_and_epochs(tmp_path):
    ds = LabelledDataset(mixed_records(tmp_path), to_tensor)
    seen = epochs(ds, 2, workers=2)
    assert seen == [[0, 1], [0, 1]]
    assert ds.skip_counts() == EXPECTED  # once per data set, not once per epoch; workers included
    assert ds.bad_count == 4 and sorted(ds.bad_paths) == sorted(str(r.image) for r in ds.records[2:])


def test_each_bad_file_is_warned_about_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nearl.data")
    ds = LabelledDataset(mixed_records(tmp_path), to_tensor)
    epochs(ds, 3, workers=0)
    warned = [r.getMessage() for r in caplog.records if "skipping bad image" in r.getMessage()]
    assert len(warned) == 4, warned


def test_report_once_in_log_and_metrics(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="nearl.data")
    ds = LabelledDataset(mixed_records(tmp_path), to_tensor)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for epoch in range(3):
        epochs(ds, 1, workers=0)
        report_skips(ds, log, step=epoch + 1, source="train.csv")
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert records == [{"kind": "skipped_images", "set": "training", "source": "train.csv", "step": 1,
                        "images": 6, "skipped": 4, "reasons": EXPECTED}]
    lines = [r.getMessage() for r in caplog.records if "could not be loaded" in r.getMessage()]
    assert lines == ["training data train.csv: 4 of 6 images could not be loaded and are skipped "
                     "(corrupt DICOM: 1, not an image: 1, truncated image: 2)"]


def test_require_loadable_stops_at_the_first_good_image(tmp_path):
    records = mixed_records(tmp_path, n_good=0)
    records.append(LabelledRecord(write_png(tmp_path / "good.png"), 0, "c0"))
    ds = LabelledDataset(records, to_tensor)
    assert require_loadable(ds, "train.csv") == 4
    assert ds.skip_counts() == EXPECTED  # the probed bad ones are counted, and not decoded again


def test_no_loadable_image_names_the_data_file_and_images(tmp_path):
    records = mixed_records(tmp_path, n_good=0)
    for data in (LabelledDataset(records, to_tensor), records):  # a dataset or plain records
        with pytest.raises(UserError) as e:
            require_loadable(data, "/data/train.csv")
        msg = str(e.value)
        assert msg.startswith("/data/train.csv: none of the 4 training images could be loaded "
                              "(corrupt DICOM: 1, not an image: 1, truncated image: 2)"), msg
        assert str(records[0].image) in msg and "nothing to train on" in msg and "\n" not in msg


def test_evaluation_with_no_loadable_image_names_the_files(tmp_path):
    records = mixed_records(tmp_path, n_good=0)
    ds = LabelledDataset(records, to_tensor)

    class Model:
        def encode_image(self, x):
            return x.flatten(1)

    with pytest.raises(UserError, match=r"^val\.json: none of the 4 evaluation images could be loaded "
                                        r"\(corrupt DICOM: 1.*c\.dcm \(corrupt DICOM\)"):
        EV.encode_images(Model(), ds, device="cpu", batch_size=2, progress=False, source="val.json")


def nan_tiff(path):
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(path)
    return path


def nan_slope_dicom(path, **window):
    return write_dicom(path, np.arange(64).reshape(8, 8), slope=float("nan"), **window)


def test_all_nan_pixels_are_undecodable_not_black(tmp_path, recwarn, caplog):
    """A float TIFF of NaN, a DICOM whose RescaleSlope is NaN (with and without a VOI window): no
    image to show, so each is skipped, warned about once and counted like any other bad image, and
    no numpy warning leaks; a NaN among finite pixels still loads."""
    caplog.set_level(logging.WARNING, logger="nearl.data")
    bad = [nan_tiff(tmp_path / "nan.tif"), nan_slope_dicom(tmp_path / "nan.dcm"),
           nan_slope_dicom(tmp_path / "nan_window.dcm", center=30, width=60)]
    for path in bad:
        with pytest.raises(BadImageError, match="no finite pixel value") as e:
            load_image(path)
        assert e.value.kind == "undecodable image"
    records = [LabelledRecord(write_png(tmp_path / "g.png"), 0, "c0")] + [LabelledRecord(p, 1, "c1") for p in bad]
    ds = LabelledDataset(records, to_tensor)
    assert epochs(ds, 2, workers=0) == [[0], [0]]
    assert ds.skip_counts() == {"undecodable image": 3}
    assert len([r for r in caplog.records if "skipping bad image" in r.getMessage()]) == 3
    some = np.arange(64, dtype=np.float32).reshape(8, 8)
    some[0, 0] = np.nan
    Image.fromarray(some, mode="F").save(tmp_path / "some.tif")
    assert np.asarray(load_image(tmp_path / "some.tif"))[0, 0].tolist() == [0, 0, 0]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]


# ----------------------------------------------------------------------------- issue 24.18: codecs
def compressed_dicom(path, transfer_syntax):
    """A valid DICOM whose pixel data are encapsulated in `transfer_syntax` (12-bit samples): what a
    scanner writes. The frame's bytes are not a real codestream, so a decoder that had the codec would
    call them damaged; none here has it."""
    from pydicom.encaps import encapsulate

    ds = dicom_dataset(transfer_syntax)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc1" + bytes(60) + b"\xff\xd9"])
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("uid, name", [("1.2.840.10008.1.2.4.51", "JPEG Extended"),  # Pillow: 8-bit only
                                       ("1.2.840.10008.1.2.4.70", "JPEG Lossless")])  # no decoder at all
def test_a_dicom_codec_with_no_decoder_is_named_not_called_corrupt(tmp_path, uid, name):
    """A 12-bit JPEG-Extended (or JPEG Lossless) DICOM is valid; without pylibjpeg-libjpeg or gdcm it
    cannot be decoded here. It was reported as a 'corrupt DICOM'; now the reason names the transfer
    syntax and the packages that decode it, and it is counted apart from damaged files."""
    import importlib.util

    if importlib.util.find_spec("pylibjpeg") or importlib.util.find_spec("gdcm"):
        pytest.skip("a JPEG decoder plugin for pydicom is installed here")
    path = compressed_dicom(tmp_path / "scan.dcm", uid)
    with pytest.raises(BadImageError) as e:
        load_image(path)
    msg = str(e.value)
    assert e.value.kind == "DICOM codec not installed" and "corrupt" not in msg, msg
    assert name in msg and uid in msg and "pylibjpeg-libjpeg" in msg and "python-gdcm" in msg, msg
    ds = LabelledDataset([LabelledRecord(path, 0, "c0"), LabelledRecord(write_png(tmp_path / "g.png"), 1, "c1")],
                         to_tensor)
    assert epochs(ds, 1, workers=0) == [[1]] and ds.skip_counts() == {"DICOM codec not installed": 1}
