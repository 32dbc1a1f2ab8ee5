"""Decode any image file the readers can point at into an 8-bit RGB `PIL.Image`.

Medical images often are not 8-bit RGB: 16-bit PNG/TIFF, float TIFF, DICOM with rescale and window
tags. CLIP's preprocessing expects 8-bit RGB, so everything is mapped there here, in one place.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nearl.data.skips import (CORRUPT_DICOM, EMPTY_IMAGE, MISSING_IMAGE, NO_DICOM_DECODER, NOT_AN_IMAGE,
                    TRUNCATED_IMAGE, UNDECODABLE_IMAGE)

PathLike = Union[str, "os.PathLike[str]"]

# Robust min-max: ignore the extreme 0.5 % at each end (hot pixels, padding values such as -2000 HU).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I", "F"}
_DICOM_MAGIC_OFFSET = 128


class NoFinitePixels(ValueError):
    """Every pixel is NaN or inf (a float image of NaN, a DICOM whose rescale slope is NaN): there is
    no image to show, so it is undecodable, not black."""


class BadImageError(ValueError):
    """An image that cannot be used: missing, empty, or undecodable. Carries `path`, `reason` (the
    details) and `kind`, one of skips.IMAGE_FAILURES, by which the datasets count failures."""

    def __init__(self, path: PathLike, reason: str, kind: str = UNDECODABLE_IMAGE):
        self.path = Path(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")


def failure_kind(err: Exception, dicom: bool) -> str:
    """Sort a decoder's exception into one of skips.IMAGE_FAILURES."""
    if dicom:
        return CORRUPT_DICOM
    if isinstance(err, UnidentifiedImageError):  # PIL found no format it knows: a text file, HTML...
        return NOT_AN_IMAGE
    if "truncated" in str(err).lower() or isinstance(err, EOFError):
        return TRUNCATED_IMAGE
    return UNDECODABLE_IMAGE


def finite_pixels(a: np.ndarray) -> np.ndarray:
    """The finite values of `a`; NoFinitePixels when there is none."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        raise NoFinitePixels(f"no finite pixel value: all {a.size} are NaN or inf")
    return finite


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Robust min-max scaling of any numeric array to uint8 (constant images become all zeros; NaN
    pixels take the lowest value). An array with no finite value raises NoFinitePixels."""
    a = np.asarray(arr, dtype=np.float64)
    finite = finite_pixels(a)
    lo, hi = np.percentile(finite, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:  # percentiles collapse on near-constant images: fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    return np.round(np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def window_to_uint8(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear DICOM VOI window: [center - width/2, center + width/2] -> [0, 255] (NaN pixels: 0). An
    array with no finite value raises NoFinitePixels."""
    lo, hi = center - width / 2.0, center + width / 2.0
    a = np.asarray(arr, dtype=np.float64)
    finite_pixels(a)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    return np.round(np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def array_to_rgb(arr: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, C) array of any dtype -> 8-bit RGB image (non-uint8 data is min-max scaled)."""
    if arr.dtype != np.uint8:
        arr = scale_to_uint8(arr)
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), mode="RGB")
    if arr.ndim == 3 and arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L").convert("RGB")
    raise ValueError(f"cannot make an RGB image from an array of shape {arr.shape}")


def is_dicom(path: PathLike) -> bool:
    """`.dcm` suffix, or the 'DICM' magic at byte 128 (DICOM files often have no suffix at all)."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            f.seek(_DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _first(value) -> float:
    """WindowCenter/Width may be multi-valued (several presets): take the first."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


# The modules pydicom's decoder plugins need, as pip installs them where the names differ.
PIP_NAMES = {"gdcm": "python-gdcm"}


def _pip_install(requirement: str) -> str:
    """pydicom's 'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1' -> 'pip install
    pylibjpeg pylibjpeg-libjpeg' (numpy, which nearl needs anyway, left out)."""
    needs = requirement.split(" - requires ", 1)[-1].split(" and ")
    names = [re.split(r"[<>=!~ ]", n.strip(), maxsplit=1)[0] for n in needs]
    return "pip install " + " ".join(PIP_NAMES.get(n, n) for n in names if n and n != "numpy")


def missing_codec(ds, err: Exception) -> Optional[str]:
    """Why a DICOM's pixel data cannot be decoded here when the fault is the installed decoders, not the
    file: compressed in a transfer syntax that no installed plugin of pydicom reads (JPEG Lossless
    without pylibjpeg-libjpeg or gdcm, or 12-bit JPEG-Extended, which Pillow does not do). The
    transfer syntax by name and UID, and what to install; None when a decoder that has the codec
    failed (the data are damaged)."""
    import pydicom
    from pydicom.pixels import get_decoder

    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None or not uid.is_compressed:
        return None
    codec = f"DICOM pixel data compressed as {uid.name} ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"{codec}, which pydicom {pydicom.__version__} cannot decode"
    refused = [line.strip() for line in str(err).splitlines() if "does not support" in line]
    if decoder.is_available and not refused:
        return None
    needs = sorted(decoder.missing_dependencies, key=lambda r: r.startswith("gdcm"))  # the pip wheels first
    installs = ", or ".join(_pip_install(r) for r in needs)
    why = f" ({refused[0]})" if refused else ""
    return f"{codec}, a codec no installed decoder reads{why}: {installs or 'see pydicom pixel data handlers'}"


def _load_dicom(path: Path) -> Image.Image:
    import pydicom

    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_color_lut

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise BadImageError(path, "DICOM file has no pixel data", CORRUPT_DICOM)
    try:
        arr = ds.pixel_array  # pydicom converts YBR colour to RGB here
    except Exception as err:  # a codec not installed is no corrupt file: say what to install
        missing = missing_codec(ds, err)
        if missing:
            raise BadImageError(path, missing, NO_DICOM_DECODER) from err
        raise
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # multi-frame: the first frame stands for the series
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return array_to_rgb(apply_color_lut(arr, ds))
    if int(ds.get("SamplesPerPixel", 1)) > 1:  # colour (RGB / YBR already converted)
        return array_to_rgb(arr)

    # Modality rescale (e.g. stored values -> Hounsfield units), then the VOI window if one is given.
    values = arr.astype(np.float64)
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None or intercept is not None:
        values = values * float(slope if slope is not None else 1.0) + float(intercept or 0.0)
    center, width = ds.get("WindowCenter", None), ds.get("WindowWidth", None)
    usable = center is not None and width is not None and math.isfinite(_first(center) + _first(width))
    if usable and _first(width) > 0:
        out = window_to_uint8(values, _first(center), _first(width))
    else:
        out = scale_to_uint8(values)
    if photometric == "MONOCHROME1":  # MONOCHROME1 means low values are white
        out = 255 - out
    return array_to_rgb(out)


def _load_pil(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # decode now so truncated files fail here, not later inside a transform
        im = ImageOps.exif_transpose(im)  # camera photos may store rotation in EXIF
        mode = im.mode
        if mode == "RGB":
            return im.copy()
        if mode in _HIGH_BIT_MODES:
            return array_to_rgb(np.asarray(im))
        if mode in ("RGBA", "LA", "PA"):
            # Drop alpha without letting transparent pixels decide the colour of the background.
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            return Image.alpha_composite(background, im).convert("RGB")
        # L, 1, P, CMYK, YCbCr, LAB, HSV, ...: PIL's own conversion is exact for 8-bit modes.
        return im.convert("RGB")


def load_image(path: PathLike) -> Image.Image:
    """Open `path` (PNG/JPEG/TIFF/BMP/... or DICOM) as an 8-bit RGB image.

    Raises BadImageError (a ValueError) for a missing or empty file, or one that cannot be decoded.
    8-bit modes (L, LA, 1, P, RGBA) convert directly; 16/32-bit integer and float images are
    robust min-max scaled (0.5/99.5 percentiles); one with no finite pixel (all NaN or inf) is
    undecodable. DICOM: rescale slope/intercept, first VOI window
    when present (else min-max), MONOCHROME1 inverted, first frame of a multi-frame file.
    """
    p = Path(path)
    if not p.is_file():
        raise BadImageError(p, "file not found", MISSING_IMAGE)
    if p.stat().st_size == 0:
        raise BadImageError(p, "file is empty (0 bytes)", EMPTY_IMAGE)
    dicom = is_dicom(p)
    try:
        return _load_dicom(p) if dicom else _load_pil(p)
    except BadImageError:
        raise
    except NoFinitePixels as e:
        raise BadImageError(p, f"cannot decode image: {e}", UNDECODABLE_IMAGE) from e
    except Exception as e:  # PIL and pydicom raise many types (OSError, SyntaxError, ValueError...)
        raise BadImageError(p, f"cannot decode image: {type(e).__name__}: {e}", failure_kind(e, dicom)) from e
