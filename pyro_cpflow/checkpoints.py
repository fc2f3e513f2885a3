r"""Checkpoint files that run no code when loaded and are never silently wrong.

A checkpoint is one header line, then the bytes of ``torch.save``::

    pyro-cpflow checkpoint 1 size=<payload bytes> sha256=<64 hex digits>

* :func:`save_checkpoint` writes it atomically (a temporary file in the same folder,
  ``fsync``, ``os.replace``, ``fsync`` of the folder): a kill leaves the previous file or
  the new one, never a mix. The hash is inside the file, so no moment exists at which the
  data and its hash disagree. An object that could not be loaded back is refused before
  anything is written.
* :func:`load_checkpoint` checks the header, the size and the SHA-256 before it unpickles
  anything, then loads with ``torch.load(weights_only=True)``: tensors and plain data
  (dicts, lists, tuples, strings, numbers, ``None``) only, never code. A missing, empty,
  truncated, damaged, foreign or code-carrying file raises :class:`CheckpointError`, whose
  message names the file and what to do.
* :func:`rng_state` and :func:`set_rng_state` capture and restore Python's, NumPy's and
  torch's (CPU and CUDA) generators as such plain data, for bit-identical resumption.

The hash detects damage (a flipped bit, a cut-off copy), not tampering: anyone can write a
valid header. What keeps a crafted file from running code is ``weights_only=True``.

>>> import pathlib, tempfile
>>> folder = tempfile.TemporaryDirectory()
>>> path = pathlib.Path(folder.name) / "run.pt"
>>> save_checkpoint(path, {"epoch": 3, "weights": torch.ones(2), "rng": rng_state()})
>>> load_checkpoint(path)["epoch"]
3
>>> _ = path.write_bytes(path.read_bytes()[:-10])  # a copy cut short
>>> load_checkpoint(path)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
pyro_cpflow.checkpoints.CheckpointError: .../run.pt is truncated: ...
>>> folder.cleanup()
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = 1
_HEADER = re.compile(rb"pyro-cpflow checkpoint (\d+) size=(\d+) sha256=([0-9a-f]{64})")
_PREFIX = b"pyro-cpflow checkpoint "
_LONGEST_HEADER = 200
_REMEDY = "restore it from a backup, or delete it and start again"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely: missing, damaged, foreign or unsafe."""


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a kill leaves either the old file or the new one.

    A temporary file in the same folder is written, ``fsync``-ed and renamed over ``path``;
    the folder is ``fsync``-ed so that the rename itself survives a power loss.

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     atomic_write(pathlib.Path(folder) / "note.txt", b"done\\n")
    ...     (pathlib.Path(folder) / "note.txt").read_text()
    'done\\n'
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, obj: Any) -> None:
    """Save ``obj`` (tensors and plain data) to ``path`` atomically, with its SHA-256.

    :raises CheckpointError: if ``obj`` holds anything :func:`load_checkpoint` would refuse
        (a NumPy array, a module, a custom class...); nothing is written then, so the
        previous checkpoint stays as it was.

    >>> import pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_checkpoint(pathlib.Path(folder) / "bad.pt", {"array": np.zeros(2)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pyro_cpflow.checkpoints.CheckpointError: .../bad.pt: not saved: the object holds something ...
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    try:  # what cannot be loaded back must not replace a checkpoint that can
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: not saved: the object holds something other than tensors and plain data, "
            f"which load_checkpoint would refuse ({_first_line(error)}); store such values as "
            "tensors, numbers, strings, lists or dicts"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    header = b"%s%d size=%d sha256=%s\n" % (_PREFIX, FORMAT, len(payload), digest.encode())
    atomic_write(path, header + payload)


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> Any:
    """The object :func:`save_checkpoint` saved to ``path``, checked before it is unpickled.

    :param map_location: as for ``torch.load`` (e.g. ``"cpu"``).
    :raises CheckpointError: if the file is missing, empty, truncated, damaged (its SHA-256
        differs from the recorded one), not written by :func:`save_checkpoint`, or holds
        anything but tensors and plain data (refused by ``weights_only=True``, so no code
        in it runs).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror})") from None
    payload = _verified_payload(path, data)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data ({_first_line(error)}); "
            "it was refused without running any of them. Only load checkpoints that "
            f"save_checkpoint wrote from tensors and plain data; {_REMEDY}"
        ) from None


def _verified_payload(path: Path, data: bytes) -> bytes:
    """The ``torch.save`` bytes of a checkpoint file, after checking header, size and hash."""
    if not data:
        raise CheckpointError(f"{path} is empty (a write that never finished?); {_REMEDY}")
    line, newline, _ = data[:_LONGEST_HEADER].partition(b"\n")
    if not data.startswith(_PREFIX):
        if data.startswith(b"PK\x03\x04") or data.startswith(b"\x80"):
            raise CheckpointError(
                f"{path} is a plain torch.save file without the integrity header of "
                "save_checkpoint (written by an older version or another program): it is not "
                "loaded, because its contents cannot be checked and unpickling an unknown file "
                "can run code. If you trust it, load it with torch.load and save it again "
                "with save_checkpoint"
            )
        raise CheckpointError(f"{path} is not a checkpoint written by save_checkpoint; {_REMEDY}")
    match = _HEADER.fullmatch(line) if newline else None
    if match is None:
        raise CheckpointError(f"{path} has a damaged or truncated header; {_REMEDY}")
    version, size, digest = int(match[1]), int(match[2]), match[3].decode()
    if version != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {version}; this version of pyro_cpflow reads format "
            f"{FORMAT}: load it with the version that wrote it"
        )
    payload = data[len(line) + 1 :]
    if len(payload) < size:
        raise CheckpointError(f"{path} is truncated: {len(payload)} of its {size} bytes are there; {_REMEDY}")
    if len(payload) > size or hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(
            f"{path} is damaged: its contents do not match the SHA-256 recorded when it was "
            f"written; {_REMEDY}"
        )
    return payload


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's (global) and torch's (CPU; CUDA once initialised) generator states.

    As tensors and plain data, which :func:`save_checkpoint` stores and ``weights_only``
    loads; :func:`set_rng_state` restores them.

    >>> state = rng_state()
    >>> first = torch.rand(2)
    >>> set_rng_state(state)
    >>> torch.equal(torch.rand(2), first)
    True
    """
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "key": [int(k) for k in key],
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from a :func:`rng_state` record."""
    numpy = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state(
        (
            numpy["bit_generator"],
            np.array(numpy["key"], dtype=np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
