"""Readers given broken files: every error is a UserError naming the file (and the line where
there is one), never a bare UnicodeDecodeError / JSONDecodeError / FileNotFoundError."""
import json

import pytest

from data_fixtures import write_lines, write_png
from nearl.data.labelled import read_coop_split, read_image_folder
from nearl.data.manifests import read_image_text, read_manifest, read_roco
from nearl.errors import UserError


def _latin1_csv(path, bad_line=5):
    """A CSV whose line `bad_line` holds a Latin-1 'é' (byte 0xe9), as Excel on Windows saves it."""
    write_png(path.parent / "a.png")
    lines = [b"image,caption"] + [b"a.png,chest x-ray"] * (bad_line - 2) + [b"a.png,caf\xe9 au lait"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("reader", [read_manifest, read_image_text])
def test_non_utf8_csv_names_file_line_and_column(tmp_path, reader):
    path = _latin1_csv(tmp_path / "m.csv", bad_line=7)
    with pytest.raises(UserError, match=r"m\.csv: line 7, column 10: byte 0xe9 is not UTF-8") as e:
        reader(path)
    assert "position" not in str(e.value)


def test_non_utf8_jsonl_and_roco_text(tmp_path):
    write_png(tmp_path / "a.png")
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "\xff"}\n')
    with pytest.raises(UserError, match=r"m\.jsonl: line 2, column 32: byte 0xff"):
        read_manifest(path)
    roco = tmp_path / "roco"
    write_lines(roco / "dlinks.txt", ["ROCO_1\twget x PMC1.tar.gz\ta.png"])
    (roco / "captions.txt").write_bytes(b"ROCO_1\tfine\nROCO_2\tbad \x80\n")
    with pytest.raises(UserError, match=r"captions\.txt: line 2, column 12: byte 0x80"):
        read_roco(roco)


def test_truncated_coop_json_names_file_and_line(tmp_path):
    write_png(tmp_path / "a.png")
    text = json.dumps({"train": [["a.png", 0, "x"]] * 8, "test": [["a.png", 0, "x"]]}, indent=1)
    path = tmp_path / "split.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match=r"split\.json: not valid JSON at line \d+, column \d+ "
                                        r"\(Expecting .*\); is the file complete\?"):
        read_coop_split(path, root=tmp_path)
    path.write_bytes(b'{"train": [["a.png", 0, "caf\xe9"]]}')
    with pytest.raises(UserError, match=r"split\.json: line 1, column 29: byte 0xe9"):
        read_coop_split(path, root=tmp_path)


def test_coop_json_of_the_wrong_shape(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": {"a.png": 0}}))
    with pytest.raises(UserError, match=r"split\.json: split 'train' must be a list"):
        read_coop_split(path, root=tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"split\.json: expected an object"):
        read_coop_split(path, root=tmp_path)


def test_missing_files_and_empty_sets_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"manifest not found: .*nope\.csv"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(UserError, match=r"image folder not found: .*nodir"):
        read_image_folder(tmp_path / "nodir")
    with pytest.raises(UserError, match=r"split file not found: .*nope\.json"):
        read_coop_split(tmp_path / "nope.json", root=tmp_path)
    write_lines(tmp_path / "m.csv", ["image,caption", "missing.png,x"])
    with pytest.raises(UserError, match=r"m\.csv: kept 0 records"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(UserError, match=r"unknown manifest format '\.pt'"):
        read_image_text(write_lines(tmp_path / "ckpt.pt", ["hello"]))
