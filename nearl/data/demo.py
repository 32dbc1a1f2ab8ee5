"""A tiny demo set of real medical images that installed packages ship, built offline.

Sources: scikit-image's bundled sample images (retina, microaneurysms, immunohistochemistry) and
pydicom's bundled test DICOMs (CT, MR, ultrasound). Each source is turned into several samples by
fixed crops / flips / rotations (and cine frames), with captions written for this project, and one
class per imaging modality. The folder serves both tasks:

    manifest.csv   image,caption,label,classname,split   (read_manifest; label is an int)
    split.json     CoOp/Dassl {"train"|"val"|"test": [[relpath, label, classname], ...]}
    images/        PNG samples, plus the original DICOM files copied as .dcm
    SOURCES.md     where each image comes from and its license note

Views of one source image land in several splits: the set exercises the pipeline end to end; it
says nothing about generalisation.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageOps

from nearl.data.images import array_to_rgb, load_image

logger = logging.getLogger("nearl.data")

DEMO_VERSION = "2"  # bump when the content changes, so cached copies get rebuilt
ENV_VAR = "NEARL_DEMO_DIR"
MAX_SIDE = 256  # enough for CLIP's 224 input, keeps the set small
MARKER = ".complete"

CLASSNAMES = ["ct", "fundus green channel", "fundus photograph", "histopathology", "mri",
              "ultrasound"]


@dataclass(frozen=True)
class _Source:
    key: str
    classname: str
    whole: Tuple[str, ...]  # captions true of the whole image (and of flips / rotations)
    part: Tuple[str, ...]  # captions true of any crop
    views: Tuple[str, ...]  # names from _VIEWS; "dicom" copies the original file
    origin: str
    license: str
    skimage_file: Optional[str] = None
    dicom_file: Optional[str] = None
    frames: Tuple[int, ...] = (0,)  # cine frames used (multi-frame DICOM)


_SKIMAGE_LICENSE = "scikit-image is BSD-3-Clause; the image's own note (skimage.data docstring): "
_PYDICOM_LICENSE = ("pydicom test file (pydicom is MIT). pydicom's test_files/README.txt: 'I believe "
                    "there is no restriction on using any of these files in this manner.'")

SOURCES: Tuple[_Source, ...] = (
    _Source(
        "retina", "fundus photograph",
        whole=("colour fundus photograph of a normal left eye showing the optic disc, macula and "
               "retinal vessels",
               "retinal fundus image with the optic disc and branching blood vessels",
               "fundus photography of a healthy human retina"),
        part=("detail of a colour fundus photograph showing retinal blood vessels",
              "crop of a retinal fundus image"),
        views=("full", "flip", "rot90", "rot270", "center", "tl", "tr", "bl", "br"),
        origin="skimage.data.retina() (retina.jpg): 'Fundus photograph of normal left eye', "
               "Wikimedia Commons, Mikael Häggström, Medical gallery of Mikael Häggström 2014, "
               "WikiJournal of Medicine, doi:10.15347/wjm/2014.008",
        license=_SKIMAGE_LICENSE + "Creative Commons CC0 1.0 Universal Public Domain Dedication.",
        skimage_file="retina.jpg"),
    _Source(
        "microaneurysms", "fundus green channel",
        whole=("green channel of a fundus photograph showing microaneurysms in diabetic "
               "retinopathy",
               "grayscale close-up of a diabetic retina with small dark microaneurysms",
               "retinal image detail with microaneurysms, green channel"),
        part=("crop of a green channel fundus image from an eye with diabetic retinopathy",),
        views=("full", "flip", "flipv", "rot90", "rot180", "rot270", "center", "tl"),
        origin="skimage.data.microaneurysms() (microaneurysms.png): green channel crop of image "
               "07_dr.JPG of the High-Resolution Fundus (HRF) Image Database, "
               "https://www5.cs.fau.de/research/data/fundus-images/ (Budai et al. 2013)",
        license=_SKIMAGE_LICENSE + "No copyright restrictions. CC0 given by owner (Andreas Maier).",
        skimage_file="microaneurysms.png"),
    _Source(
        "ihc", "histopathology",
        whole=("immunohistochemistry of colonic glands, brown DAB staining with blue hematoxylin "
               "counterstain",
               "histopathology micrograph of colon tissue with immunohistochemical staining",
               "microscopy image of a stained tissue section showing colonic glands"),
        part=("detail of an immunohistochemistry stained colon tissue section",
              "crop of a histology image with DAB and hematoxylin staining"),
        views=("full", "flip", "rot90", "rot270", "center", "tl", "tr", "bl", "br"),
        origin="skimage.data.immunohistochemistry() (ihc.png): colonic glands, FHL2 protein "
               "revealed with DAB, hematoxylin counterstain; acquired at the Center for Microscopy "
               "And Molecular Imaging (CMMI)",
        license=_SKIMAGE_LICENSE + "No known copyright restrictions.",
        skimage_file="ihc.png"),
    _Source(
        "ct-chest", "ct",
        whole=("axial ct slice of the chest at the level of a thoracic vertebra",
               "computed tomography image showing a vertebral body and the spinal canal",
               "chest ct in axial view centred on the spine"),
        part=("detail of an axial computed tomography slice of the chest",),
        views=("dicom", "full", "flip", "center", "rot90"),
        origin="pydicom test file CT_small.dcm: CT image downsized to 128x128 from 'CT1_UNC', "
               "NEMA WG04 data sets (ftp://medical.nema.org/MEDICAL/Dicom/DataSets/WG04/)",
        license=_PYDICOM_LICENSE, dicom_file="CT_small.dcm"),
    _Source(
        "ct-head", "ct",
        whole=("axial ct slice of the head showing the skull and brain",
               "non-contrast head computed tomography in axial view"),
        part=("detail of an axial head ct slice",),
        views=("dicom", "full", "flip", "center", "tl"),
        origin="pydicom test file J2K_pixelrep_mismatch.dcm (head CT, JPEG 2000 lossless; dataset "
               "from pydicom issue 1149)",
        license=_PYDICOM_LICENSE, dicom_file="J2K_pixelrep_mismatch.dcm"),
    _Source(
        "mr-small", "mri",
        whole=("low resolution magnetic resonance image slice",
               "small mr image with soft tissue contrast"),
        part=("detail of a magnetic resonance image",),
        views=("dicom", "full", "flip", "rot90"),
        origin="pydicom test file MR_small.dcm: MR image downsized to 64x64 from 'MR1_UNC', "
               "NEMA WG04 data sets (ftp://medical.nema.org/MEDICAL/Dicom/DataSets/WG04/)",
        license=_PYDICOM_LICENSE, dicom_file="MR_small.dcm"),
    _Source(
        "mr-abdomen", "mri",
        whole=("axial mr image of the upper abdomen showing the liver, spleen and kidneys",
               "abdominal magnetic resonance imaging slice through a liver with a lesion"),
        part=("detail of an axial abdominal mri slice",),
        views=("dicom", "full", "flip", "center", "tl", "tr"),
        origin="pydicom test file examples_overlay.dcm: MR-SIEMENS-DICOM-WithOverlays.dcm with "
               "cropped pixel data (abdomen, 'liver marked lesion')",
        license=_PYDICOM_LICENSE, dicom_file="examples_overlay.dcm"),
    _Source(
        "us-doppler", "ultrasound",
        whole=("colour doppler ultrasound of a lymph node",
               "ultrasound image with colour flow doppler showing the vessels of a lymph node"),
        part=("detail of a colour doppler ultrasound image",),
        views=("dicom", "full", "flip", "center"),
        origin="pydicom test file examples_rgb_color.dcm: US1_UNCR.dcm with cropped pixel data",
        license=_PYDICOM_LICENSE, dicom_file="examples_rgb_color.dcm"),
    _Source(
        "us-echo", "ultrasound",
        whole=("echocardiogram in parasternal long axis view",
               "cardiac ultrasound image of the heart",
               "transthoracic echocardiography frame showing the heart chambers"),
        part=("detail of an echocardiography frame",),
        views=("dicom", "full", "center", "flip"),
        origin="pydicom test file examples_ybr_color.dcm: color3d_jpeg_baseline.dcm with reduced "
               "frames and rescaled pixel data (multi-frame cardiac ultrasound)",
        license=_PYDICOM_LICENSE, dicom_file="examples_ybr_color.dcm", frames=(0, 10, 20)),
)


def _crop(im: Image.Image, box: Tuple[float, float, float, float]) -> Image.Image:
    w, h = im.size
    return im.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))


# view name -> (caption qualifier, is a crop, transform)
_VIEWS: Dict[str, Tuple[str, bool, Callable[[Image.Image], Image.Image]]] = {
    "full": ("", False, lambda im: im),
    "flip": ("mirrored left to right", False, ImageOps.mirror),
    "flipv": ("flipped upside down", False, ImageOps.flip),
    "rot90": ("rotated by 90 degrees", False, lambda im: im.transpose(Image.Transpose.ROTATE_90)),
    "rot180": ("rotated by 180 degrees", False, lambda im: im.transpose(Image.Transpose.ROTATE_180)),
    "rot270": ("rotated by 270 degrees", False, lambda im: im.transpose(Image.Transpose.ROTATE_270)),
    "center": ("central region", True, lambda im: _crop(im, (0.15, 0.15, 0.85, 0.85))),
    "tl": ("upper left region", True, lambda im: _crop(im, (0.0, 0.0, 0.65, 0.65))),
    "tr": ("upper right region", True, lambda im: _crop(im, (0.35, 0.0, 1.0, 0.65))),
    "bl": ("lower left region", True, lambda im: _crop(im, (0.0, 0.35, 0.65, 1.0))),
    "br": ("lower right region", True, lambda im: _crop(im, (0.35, 0.35, 1.0, 1.0))),
}


def default_demo_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nearl" / "demo"


def _skimage_path(name: str) -> Optional[Path]:
    """The bundled file itself: calling skimage.data.<name>() could try a download on some
    versions, reading the file never does."""
    import skimage.data

    p = Path(skimage.data.__file__).parent / name
    return p if p.is_file() else None


def _dicom_path(name: str) -> Optional[Path]:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)  # download=False: only files inside the wheel
    return Path(p) if p else None


def _dicom_frames(path: Path, frames: Sequence[int]) -> List[Image.Image]:
    if frames == (0,):
        return [load_image(path)]  # the loader's own windowing / first-frame path
    import pydicom

    arr = pydicom.dcmread(str(path)).pixel_array
    return [array_to_rgb(arr[f]) for f in frames]


def _fit(im: Image.Image) -> Image.Image:
    im = im.convert("RGB")
    if max(im.size) > MAX_SIDE:
        im = im.copy()
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return im


def _write_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename, so an interrupted or concurrent build never leaves a half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # fast; the set is small anyway
    return buf.getvalue()


def _samples_of(src: _Source, images_dir: Path) -> List[Tuple[str, str]]:
    """Write the samples of one source; return [(relpath, caption)]. Empty if unavailable."""
    if src.skimage_file:
        path = _skimage_path(src.skimage_file)
    else:
        path = _dicom_path(src.dicom_file)
    if path is None:
        logger.warning("demo set: %s is not bundled with the installed package; skipped", src.key)
        return []
    try:
        bases = ([load_image(path)] if src.skimage_file else _dicom_frames(path, src.frames))
    except Exception as e:  # e.g. a DICOM codec (JPEG 2000) missing on this machine
        logger.warning("demo set: cannot decode %s (%s); skipped", path.name, e)
        return []

    out: List[Tuple[str, str]] = []
    n_whole = n_part = 0
    for f_idx, (frame, base) in enumerate(zip(src.frames, bases)):
        for view in src.views:
            if view == "dicom":
                if f_idx:
                    continue
                rel = f"images/{src.key}.dcm"
                _write_atomic(images_dir.parent / rel, path.read_bytes())
                caption = src.whole[n_whole % len(src.whole)]
                n_whole += 1
            else:
                if f_idx and view not in ("full",):
                    continue  # later cine frames: the whole frame only
                qualifier, is_crop, fn = _VIEWS[view]
                stem = f"{src.key}_f{frame}_{view}" if len(src.frames) > 1 else f"{src.key}_{view}"
                rel = f"images/{stem}.png"
                _write_atomic(images_dir.parent / rel, _png_bytes(_fit(fn(base))))
                if is_crop:
                    caption = f"{src.part[n_part % len(src.part)]}, {qualifier}"
                    n_part += 1
                else:
                    caption = src.whole[n_whole % len(src.whole)]
                    n_whole += 1
                    if qualifier:
                        caption += f", {qualifier}"
                if len(src.frames) > 1:
                    caption += f", frame {frame} of a cine loop"
            out.append((rel, caption))
    return out


def _assign_splits(n: int) -> List[str]:
    """Per class, by position: every 5th sample (from the 3rd) val, every 5th (from the 5th) test.
    Any class with >= 5 samples then has all three splits."""
    return ["val" if i % 5 == 2 else "test" if i % 5 == 4 else "train" for i in range(n)]


def _sources_md(used: List[_Source]) -> str:
    lines = ["# NEARL-CLIP demo set: sources", "",
             "Built offline by `nearl.data.demo.build_demo_set()` from sample data bundled with "
             "installed Python packages. Captions and class labels were written for this project. "
             "Samples are fixed crops, flips, rotations and cine frames of the sources below "
             "(images larger than 256 px are downscaled). Views of one source image appear in "
             "several splits: the set checks the pipeline end to end, not generalisation.", ""]
    for s in used:
        name = s.skimage_file or s.dicom_file
        lines += [f"## {s.key} ({name}) -> class '{s.classname}'", "",
                  f"- Origin: {s.origin}", f"- License: {s.license}", ""]
    return "\n".join(lines)


def build_demo_set(out_dir: Optional[Union[str, Path]] = None) -> Path:
    """Build the demo set into `out_dir` (default: $NEARL_DEMO_DIR or ~/.cache/nearl/demo) and
    return that folder. Idempotent: an up-to-date folder (marker file present) is returned as is."""
    out = Path(out_dir).expanduser() if out_dir is not None else default_demo_dir()
    marker = out / MARKER
    if marker.is_file() and marker.read_text().strip() == DEMO_VERSION:
        return out
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    by_class: Dict[str, List[Tuple[str, str]]] = {c: [] for c in CLASSNAMES}
    used: List[_Source] = []
    for src in SOURCES:
        samples = _samples_of(src, images_dir)
        if samples:
            used.append(src)
            by_class[src.classname].extend(samples)
    thin = [c for c, s in by_class.items() if len(s) < 5]
    if thin:
        raise RuntimeError(f"demo set: too few samples for classes {thin} (bundled data missing?)")

    rows = []
    split_json: Dict[str, list] = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(CLASSNAMES):
        samples = by_class[classname]
        for (rel, caption), split in zip(samples, _assign_splits(len(samples))):
            rows.append({"image": rel, "caption": caption, "label": label,
                         "classname": classname, "split": split})
            split_json[split].append([rel, label, classname])

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "caption", "label", "classname", "split"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "manifest.csv", buf.getvalue().encode("utf-8"))
    _write_atomic(out / "split.json", json.dumps(split_json, indent=1).encode("utf-8"))
    _write_atomic(out / "SOURCES.md", _sources_md(used).encode("utf-8"))
    _write_atomic(marker, DEMO_VERSION.encode())  # last: marks the folder complete
    logger.info("demo set: %d samples in %d classes written to %s", len(rows), len(CLASSNAMES), out)
    return out


def demo_manifest(out_dir: Optional[Union[str, Path]] = None) -> Path:
    """Path of the demo manifest.csv (building the set if needed)."""
    return build_demo_set(out_dir) / "manifest.csv"


def demo_split_json(out_dir: Optional[Union[str, Path]] = None) -> Path:
    """Path of the demo CoOp-style split.json (building the set if needed); image root is its
    folder."""
    return build_demo_set(out_dir) / "split.json"


def demo_classnames() -> List[str]:
    """Class names of the demo set, indexed by label."""
    return list(CLASSNAMES)
