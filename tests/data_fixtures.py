"""Builders for small on-disk fixtures in the real layouts the readers accept (used by tests)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image


def write_png(path: Path, value: int = 128, size=(8, 8), mode: str = "RGB") -> Path:
    """A small valid image (suffix decides the format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = np.full((size[1], size[0], channels), value, dtype=np.uint8)
    Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode).save(path)
    return path


def write_empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_truncated_png(path: Path) -> Path:
    """A PNG whose header is valid but whose pixel data is cut off: opens, fails on load()."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)  # noise does not compress, so the cut hits the image data
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def dicom_dataset(transfer_syntax):
    """A secondary-capture DICOM dataset with its file meta (its SOP instance, `transfer_syntax`) and
    no image attributes yet."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                slope: Optional[float] = None, intercept: Optional[float] = None,
                center=None, width=None, signed: bool = False) -> Path:
    """A minimal valid 16-bit greyscale DICOM file (multi-frame if `pixels` is 3-D)."""
    from pydicom.uid import ExplicitVRLittleEndian

    path.parent.mkdir(parents=True, exist_ok=True)
    ds = dicom_dataset(ExplicitVRLittleEndian)
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, objects: Sequence) -> Path:
    return write_lines(path, [o if isinstance(o, str) else json.dumps(o) for o in objects])
