"""pyro_cpflow.checkpoints: atomic, hashed checkpoints loaded with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re

import numpy as np
import pytest
import torch

from pyro_cpflow import CheckpointError, load_checkpoint, save_checkpoint
from pyro_cpflow.checkpoints import rng_state, set_rng_state


class CreatesAFile:
    """Unpickling this runs ``open(marker, "w")``: the shape of a code-carrying pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _with_header(payload: bytes) -> bytes:
    """The file layout of save_checkpoint around arbitrary ``torch.save`` bytes."""
    digest = hashlib.sha256(payload).hexdigest()
    return b"pyro-cpflow checkpoint 1 size=%d sha256=%s\n" % (len(payload), digest.encode()) + payload


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 2,
        "best": float("inf"),
        "history": [1.5, None, "text"],
        "rng": rng_state(),
    }


def test_round_trip_of_a_training_state(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _state()
    save_checkpoint(path, state)
    loaded = load_checkpoint(path, map_location="cpu")
    assert loaded.keys() == state.keys() and loaded["epoch"] == 2 and loaded["best"] == float("inf")
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temporary file left


def test_rng_state_restores_python_numpy_and_torch(tmp_path):
    path = tmp_path / "rng.pt"
    save_checkpoint(path, rng_state())
    first = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    set_rng_state(load_checkpoint(path))
    again = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and first[3] == again[3]


@pytest.mark.parametrize("with_header", [True, False], ids=["valid-header", "plain-torch-save"])
def test_a_code_carrying_checkpoint_is_refused_and_its_code_never_runs(tmp_path, with_header):
    marker, path = tmp_path / "payload-ran", tmp_path / "checkpoint.pt"
    payload = _torch_bytes({"model": {}, "trap": CreatesAFile(marker)})
    path.write_bytes(_with_header(payload) if with_header else payload)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_flipped_bit_anywhere_is_detected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state())
    good = path.read_bytes()
    for position in (10, 60, len(good) // 2, len(good) - 1):
        damaged = bytearray(good)
        damaged[position] ^= 1  # the lowest bit
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=re.escape(str(path))) as error:
            load_checkpoint(path)
        assert "backup" in str(error.value) or "save_checkpoint" in str(error.value)
    path.write_bytes(good)
    assert load_checkpoint(path)["epoch"] == 2


@pytest.mark.parametrize("keep, reason", [(0, "is empty"), (30, "header"), (0.5, "is truncated")])
def test_empty_and_truncated_files_are_refused_by_name(tmp_path, keep, reason):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*{reason}"):
        load_checkpoint(path)


def test_missing_and_foreign_files_are_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt is not a checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "future.pt").write_bytes(_with_header(b"x").replace(b"checkpoint 1", b"checkpoint 7"))
    with pytest.raises(CheckpointError, match="future.pt has checkpoint format 7"):
        load_checkpoint(tmp_path / "future.pt")


def test_what_cannot_be_loaded_back_is_not_saved_and_the_old_file_stays(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="not saved"):
        save_checkpoint(path, {"epoch": 2, "numpy": np.zeros(3)})
    assert path.read_bytes() == before


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
