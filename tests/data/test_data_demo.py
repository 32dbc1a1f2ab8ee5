"""The embedded demo set builds offline, covers every class in every split, and its images load."""
import csv
import json
import socket
from collections import Counter

import numpy as np
import pytest

from nearl.data import demo
from nearl.data.images import load_image
from nearl.data.labelled import read_coop_split
from nearl.data.manifests import read_manifest


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()

    def no_network(*args, **kwargs):
        raise AssertionError("the demo set must build without network access")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    try:
        yield demo.build_demo_set(tmp_path_factory.mktemp("demo"))
    finally:
        mp.undo()


def test_manifest_covers_every_class_in_every_split(demo_dir):
    with open(demo_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "caption", "label", "classname", "split"]
    assert 40 <= len(rows) <= 60
    seen = Counter((r["classname"], r["split"]) for r in rows)
    for c in demo.CLASSNAMES:
        for s in ("train", "val", "test"):
            assert seen[(c, s)] >= 1, (c, s)
    for r in rows:  # label and classname agree
        assert demo.CLASSNAMES[int(r["label"])] == r["classname"]
    assert len({r["image"] for r in rows}) == len(rows)
    assert any(r["image"].endswith(".dcm") for r in rows)
    assert len({r["caption"] for r in rows}) > len(rows) // 2  # captions vary


def test_split_json_matches_manifest(demo_dir):
    splits, classnames = read_coop_split(demo.demo_split_json(demo_dir), root=demo_dir)
    assert classnames == demo.demo_classnames()
    assert {s: {r.label for r in recs} for s, recs in splits.items()} == {
        s: set(range(len(classnames))) for s in ("train", "val", "test")}
    records = read_manifest(demo.demo_manifest(demo_dir))
    by_image = {r.image: (int(r.meta["label"]), r.split) for r in records}
    assert {r.image: (r.label, r.split) for recs in splits.values() for r in recs} == by_image


def test_every_image_loads_as_rgb(demo_dir):
    for r in read_manifest(demo_dir / "manifest.csv"):
        a = np.asarray(load_image(r.image))
        assert a.dtype == np.uint8 and a.shape[2] == 3 and a.std() > 5, r.image


def test_sources_documented(demo_dir):
    text = (demo_dir / "SOURCES.md").read_text()
    for name in ("retina.jpg", "microaneurysms.png", "ihc.png", "CT_small.dcm", "MR_small.dcm"):
        assert name in text
    assert "CC0" in text and "License" in text


def test_idempotent_and_env_default(demo_dir, monkeypatch, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*")}
    assert demo.build_demo_set(demo_dir) == demo_dir
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*")} == before  # nothing rewritten
    monkeypatch.setenv("NEARL_DEMO_DIR", str(tmp_path / "env"))
    assert demo.default_demo_dir() == tmp_path / "env"
    # an outdated marker triggers a rebuild
    (demo_dir / demo.MARKER).write_text("0")
    demo.build_demo_set(demo_dir)
    assert (demo_dir / demo.MARKER).read_text() == demo.DEMO_VERSION
    assert json.loads((demo_dir / "split.json").read_text())["test"]
