"""The files of a run folder, and the rules that keep a run from being overwritten by accident.

* a folder that holds a run (any of :data:`RUN_FILES`) is never started over silently:
  without ``resume`` or ``overwrite`` (which deletes the run's files first) it is refused
  with :class:`RunExistsError`;
* ``metrics.jsonl``: one JSON record per epoch, ``fsync``-ed (before the checkpoint is
  written) and a final record; on resume the records of epochs after the checkpoint are
  dropped, as is a last line cut off by a kill (with a warning); damage elsewhere is an
  error naming the line;
* ``config.json`` and ``results.json`` are written atomically.

Only rank 0 writes (``main``); the others read the same decisions.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from experiments.common import read_jsonl
from pyro_cpflow.checkpoints import atomic_write

__all__ = ["CHECKPOINT", "METRICS", "RESULTS", "RUN_FILES", "RunExistsError", "RunFolder"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CONFIG = "config.json"
RUN_FILES = (CHECKPOINT, METRICS, RESULTS, CONFIG, "samples.png", "reconstructions.png")
"""The files of a run folder: their presence means the folder holds a run."""


class RunExistsError(FileExistsError):
    """The output folder already holds a run, and neither resuming nor overwriting was asked."""


class RunFolder:
    """The output folder ``path`` of a run; ``main``: this process writes the files (rank 0)."""

    def __init__(self, path: Path, main: bool = True) -> None:
        self.path, self.main = Path(path), main

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def found(self) -> list[str]:
        """The run files present in the folder."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def claim(self, found: list[str], resume: bool, overwrite: bool) -> None:
        """Create the folder; refuse one holding a run (``found``: its run files) unless resuming
        or overwriting (which deletes them)."""
        if resume and found and CHECKPOINT not in found:
            raise RunExistsError(
                f"{self.path} holds a run ({', '.join(found)}) but no {CHECKPOINT} to resume "
                "from: pass --overwrite (without --resume) to delete its files and start again, "
                "or choose another --out-dir"
            )
        if found and not (resume or overwrite):
            raise RunExistsError(
                f"{self.path} already holds a run ({', '.join(found)}): pass --resume to continue "
                "it, or --overwrite to delete its files and start again (or choose another "
                "--out-dir)"
            )
        if self.main:
            if overwrite:
                for name in found:
                    (self.path / name).unlink()
            self.path.mkdir(parents=True, exist_ok=True)

    def start(self, config: dict[str, Any]) -> None:
        """A fresh run: an empty ``metrics.jsonl`` and ``config.json``."""
        if self.main:
            (self.path / METRICS).write_text("")
            atomic_write(self.path / CONFIG, (json.dumps(config, indent=2) + "\n").encode())

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl``, on disk before the next checkpoint is."""
        if self.main:
            with (self.path / METRICS).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def truncate_metrics(self, epoch: int) -> None:
        """Drop the records of epochs after ``epoch`` (those a checkpoint does not contain) and
        final records."""
        if not self.main:
            return
        path = self.path / METRICS
        records = read_jsonl(path) if path.is_file() else []
        kept = [r for r in records if r.get("event") == "epoch" and r["epoch"] <= epoch]
        missing = sorted(set(range(1, epoch + 1)) - {r["epoch"] for r in kept})
        if missing:
            warnings.warn(f"{path} lacks the records of epochs {missing} of the checkpoint", stacklevel=2)
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write_results(self, record: dict[str, Any]) -> None:
        if self.main:
            atomic_write(self.path / RESULTS, (json.dumps(record, indent=2) + "\n").encode())
