"""A file that is not a checkpoint gets one clear message naming it: never torch's advice to load it
with weights_only=False (which would run whatever code a pickle holds)."""
import os

import pytest
import torch

from nearl.store import checkpoint as C
from nearl.errors import UserError


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello world\nthis is a text file\n", b"\x80"])
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"model\.pt is not a NEARL-CLIP checkpoint \(not a file "
                                        r"written by torch\.save\)") as e:
        C.load_checkpoint(path)
    assert isinstance(e.value, C.CheckpointError)
    assert "weights_only" not in str(e.value) and "KeyError" not in str(e.value)


def test_pickled_objects_are_refused_without_weights_only_advice(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(C.CheckpointError, match=r"module\.pt is not a NEARL-CLIP checkpoint \(it holds "
                                                r"pickled Python objects") as e:
        C.load_checkpoint(path)
    assert "weights_only" not in str(e.value)


def test_truncated_checkpoint_names_the_file(tmp_path):
    C.save_checkpoint({"step": 1}, tmp_path, "one.pt")
    data = (tmp_path / "one.pt").read_bytes()
    (tmp_path / "one.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError, match=r"cannot read checkpoint .*one\.pt: the file is "
                                                r"truncated or damaged"):
        C.load_checkpoint(tmp_path / "one.pt")
