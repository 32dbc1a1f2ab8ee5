"""Image-text readers on fixtures in the published layouts, bad records included."""
import csv
import logging

import pytest

from data_fixtures import write_empty, write_jsonl, write_lines, write_png, write_truncated_png
from nearl.data.manifests import (SkipCounter, detect_format, read_image_text, read_manifest,
                                  read_medicat, read_roco)


def _summary(caplog, name):
    lines = [r.getMessage() for r in caplog.records
             if r.name == "nearl.data" and r.getMessage().split(": kept")[0].endswith(name)]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def manifest_dir(tmp_path):
    d = tmp_path / "set"
    write_png(d / "img" / "a.png")
    write_png(d / "img" / "b.png")
    write_png(d / "img" / "c.png")
    write_empty(d / "img" / "zero.png")
    write_truncated_png(d / "img" / "trunc.png")  # readers only stat: caught later at load time
    return d


def _write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerows(rows)
    return path


CSV_ROWS = [
    ["image", "caption", "caption_2", "split", "label"],
    ["img/a.png", "axial CT of the chest", "chest CT, lung window", "train", "ct"],
    ["img/b.png", '["MRI of the knee", "  sagittal knee MR "]', "", "test", "mri"],
    ["img/c.png", "", "  ", "train", "x"],              # empty caption
    ["img/missing.png", "an x-ray", "", "train", "xr"],  # missing image
    ["img/zero.png", "a 0-byte file", "", "train", "xr"],  # empty image file
    ["img/trunc.png", "a truncated file", "", "val", "xr"],
]


def test_csv_several_caption_columns_and_json_list(manifest_dir, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    path = _write_csv(manifest_dir / "m.csv", CSV_ROWS)
    recs = read_manifest(path, caption_columns=("caption", "caption_2"))
    assert [r.image for r in recs] == [manifest_dir / "img" / n for n in ("a.png", "b.png", "trunc.png")]
    assert recs[0].captions == ["axial CT of the chest", "chest CT, lung window"]
    assert recs[1].captions == ["MRI of the knee", "sagittal knee MR"]  # JSON list, whitespace cleaned
    assert [r.split for r in recs] == ["train", "test", "val"]
    assert recs[0].meta == {"label": "ct"}
    assert _summary(caplog, "m.csv").endswith(
        "kept 3 records, skipped 3 (empty caption: 1, empty image file: 1, missing image: 1)")


def test_tsv_with_split_filter_and_root(manifest_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    path = _write_csv(tmp_path / "elsewhere.tsv", CSV_ROWS, delimiter="\t")
    recs = read_manifest(path, root=manifest_dir, split="train")
    assert [r.image.name for r in recs] == ["a.png"]
    assert recs[0].captions == ["axial CT of the chest"]  # only the default caption column
    line = _summary(caplog, "elsewhere.tsv")
    assert "kept 1 records, skipped 3" in line and "not selected 2" in line


def test_jsonl_lists_absolute_paths_and_malformed_lines(manifest_dir, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    path = write_jsonl(manifest_dir / "m.jsonl", [
        {"image": str(manifest_dir / "img" / "a.png"), "caption": ["one", "two"], "extra": 3},
        "{not json",
        {"image": "img/b.png", "caption": "three", "alt": "four"},
        {"image": "img/c.png", "caption": None},
        {"caption": "no image key"},
    ])
    recs = read_manifest(path, caption_columns=["caption", "alt"])
    assert [r.captions for r in recs] == [["one", "two"], ["three", "four"]]
    assert recs[0].meta == {"extra": 3} and recs[0].split is None
    assert _summary(caplog, "m.jsonl").endswith(
        "kept 2 records, skipped 3 (empty caption: 1, malformed line: 1, no image path: 1)")


def test_split_filter_without_split_column_warns_and_keeps_all(manifest_dir, caplog):
    path = _write_csv(manifest_dir / "m.csv", [["image", "caption"], ["img/a.png", "x"]])
    assert len(read_manifest(path, split="test")) == 1
    assert any("no 'split' column" in r.getMessage() for r in caplog.records)


def test_manifest_with_nothing_usable_raises_naming_file(manifest_dir):
    path = _write_csv(manifest_dir / "bad.csv", [["image", "caption"], ["img/missing.png", "x"],
                                                 ["img/a.png", ""]])
    with pytest.raises(ValueError, match=r"bad\.csv.*kept 0 records, skipped 2"):
        read_manifest(path)


def test_split_that_selects_nothing_raises(manifest_dir):
    path = _write_csv(manifest_dir / "m.csv", CSV_ROWS)
    with pytest.raises(ValueError, match="m.csv"):
        read_manifest(path, split="nonexistent")


def test_missing_column_and_unknown_suffix(manifest_dir):
    path = _write_csv(manifest_dir / "m.csv", [["path", "caption"], ["img/a.png", "x"]])
    with pytest.raises(ValueError, match=r"missing column.*'image'"):
        read_manifest(path)
    with pytest.raises(ValueError, match="unknown manifest format"):
        read_manifest(write_lines(manifest_dir / "m.txt", ["image,caption"]))


# ---- ROCO -----------------------------------------------------------------------------------

def test_roco_csv_layout(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    d = tmp_path / "test" / "radiology"
    write_png(d / "images" / "PMC1_a.jpg")
    write_png(d / "PMC2_b.jpg")  # directly in root: also accepted
    path = _write_csv(d / "testdata.csv", [
        ["id", "name", "caption"],
        ["ROCO_00001", "PMC1_a.jpg", " Axial MRI (coronal view).\n"],
        ["ROCO_00002", "PMC2_b.jpg", "CT scan showing a large left ovarian cyst"],
        ["ROCO_00003", "PMC3_c.jpg", "missing image"],
        ["ROCO_00004", "PMC1_a.jpg", "   "],
    ])
    recs = read_roco(path)
    assert [r.image for r in recs] == [d / "images" / "PMC1_a.jpg", d / "PMC2_b.jpg"]
    assert recs[0].captions == ["Axial MRI (coronal view)."]
    assert recs[0].meta["roco_id"] == "ROCO_00001" and recs[0].split == "test"
    assert _summary(caplog, "testdata.csv").endswith(
        "kept 2 records, skipped 2 (empty caption: 1, missing image: 1)")
    assert detect_format(path) == "roco"
    assert read_image_text(path) == recs


def _roco_dir(tmp_path):
    d = tmp_path / "data" / "train" / "radiology"
    link = "wget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/{}/PMC{}.tar.gz -P /path/to/Dir"
    write_lines(d / "captions.txt", [
        "ROCO_00001\t Axial MRI (coronal view).",
        "ROCO_00006\t Coronal plain computed tomography image showing tumor masses.",
        "ROCO_00016\t Angiogram showing pseudoaneurysm.",   # image never downloaded
        "ROCO_00025\t ",                                    # empty caption
        "ROCO_00031\t caption without a dlinks entry",
        "a line without tab",
    ])
    write_lines(d / "dlinks.txt", [
        "ROCO_00001\t" + link.format("cb/dd", "4608653") + "\tcro-0008-0385-g01.jpg",
        "ROCO_00006\t" + link.format("b5/0c", "4840839") + "\tol-11-05-3298-g02.jpg",
        "ROCO_00016\t" + link.format("62/b5", "5665693") + "\tcureus-i01.jpg",
        "ROCO_00025\t" + link.format("66/5e", "4813433") + "\tEJD-10-188-g001.jpg",
        "ROCO_00099\t" + link.format("00/00", "1") + "\tonly-in-dlinks.jpg",
    ])
    write_png(d / "images" / "PMC4608653_cro-0008-0385-g01.jpg")  # fetch.py naming
    write_png(d / "images" / "ol-11-05-3298-g02.jpg")              # plain file name
    write_png(d / "images" / "PMC4813433_EJD-10-188-g001.jpg")
    return d


def test_roco_original_layout(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    d = _roco_dir(tmp_path)
    recs = read_roco(d)
    assert [r.meta["roco_id"] for r in recs] == ["ROCO_00001", "ROCO_00006"]
    assert recs[0].image == d / "images" / "PMC4608653_cro-0008-0385-g01.jpg"
    assert recs[1].image == d / "images" / "ol-11-05-3298-g02.jpg"
    assert recs[0].captions == ["Axial MRI (coronal view)."]
    assert recs[0].meta["url"].startswith("ftp://") and recs[0].meta["url"].endswith("PMC4608653.tar.gz")
    assert {r.split for r in recs} == {"train"}
    assert _summary(caplog, "captions.txt").endswith(
        "kept 2 records, skipped 5 (empty caption: 1, malformed line: 1, missing image: 1, "
        "no matching entry: 2)")
    assert read_roco(d, split="validation")[0].split == "validation"
    assert detect_format(d) == "roco" and len(read_image_text(d)) == 2


# ---- MedICaT --------------------------------------------------------------------------------

def test_medicat(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nearl.data")
    root = tmp_path / "release"
    write_png(root / "figures" / "aaa_2-Figure1-1.png")
    write_png(root / "figures" / "bbb_3-Figure2-1.png")
    write_png(root / "explicit.png")
    path = write_jsonl(root / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl", [
        {"pdf_hash": "aaa", "fig_uri": "2-Figure1-1.png", "fig_key": "Figure1",
         "s2_caption": "Figure 1. short", "s2orc_caption": "Figure 1. (A) Barium enema."},
        {"pdf_hash": "bbb", "fig_uri": "3-Figure2-1.png", "s2_caption": "Figure 2. CT scan.",
         "s2orc_caption": "  "},                                    # falls back to s2_caption
        {"pdf_hash": "ccc", "fig_uri": "1-Figure1-1.png", "s2_caption": "no file"},
        {"pdf_hash": "ddd", "fig_uri": "1-Figure1-1.png", "s2_caption": "", "s2orc_caption": None},
        {"pdf_hash": "eee", "fig_uri": "x.png", "image": "explicit.png", "s2orc_caption": "ok"},
    ])
    recs = read_medicat(path)
    assert [r.captions for r in recs] == [["Figure 1. (A) Barium enema."], ["Figure 2. CT scan."],
                                          ["ok"]]
    assert recs[0].image == root / "figures" / "aaa_2-Figure1-1.png"
    assert recs[2].image == root / "explicit.png"
    assert [r.meta["caption_source"] for r in recs] == ["s2orc_caption", "s2_caption", "s2orc_caption"]
    assert _summary(caplog, path.name).endswith(
        "kept 3 records, skipped 2 (empty caption: 1, missing image: 1)")
    assert detect_format(path) == "medicat" and len(read_image_text(path)) == 3


def test_read_image_text_dispatch(manifest_dir):
    path = write_jsonl(manifest_dir / "plain.jsonl", [{"image": "img/a.png", "caption": "x"}])
    assert detect_format(path) == "manifest"
    assert read_image_text(path)[0].captions == ["x"]
    with pytest.raises(ValueError, match="format must be one of"):
        read_image_text(path, format="coco")
    with pytest.raises(ValueError, match="ROCO"):
        read_image_text(manifest_dir)  # a folder without captions.txt


def test_skip_counter_line_and_error():
    c = SkipCounter("f.csv")
    c.skip("missing image", 2)
    c.skip("empty caption")
    assert c.summary() == "f.csv: kept 0 records, skipped 3 (empty caption: 1, missing image: 2)"
    with pytest.raises(ValueError, match="f.csv"):
        c.finish()
    c.keep(4)
    c.finish()  # no raise once something was kept
