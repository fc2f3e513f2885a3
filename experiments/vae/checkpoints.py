"""The training checkpoint of a VAE run: what it holds, writing it, and reading it back checked.

``checkpoint.pt`` is written after every epoch by :func:`pyro_cpflow.save_checkpoint`
(atomic, with its SHA-256) and read back by :func:`pyro_cpflow.load_checkpoint` (hash
checked, ``weights_only=True``: no code in the file runs). It holds the model, the
optimizer, the best model, the early-stopping state, the CG miss counts, the times and every
RNG state (Python, NumPy, torch CPU and CUDA: Pyro draws from torch) of every rank, so that a
resumed run ends bit-identical to an uninterrupted one. :func:`load_training_state` refuses
a checkpoint of another format, of other settings or of another number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from experiments.vae.config import Config
from pyro_cpflow import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["CHECKPOINT_FORMAT", "load_training_state", "save_training_state", "state_dict_equal"]

CHECKPOINT_FORMAT = 2  # 2: RNG states as plain data (pyro_cpflow.checkpoints.rng_state)


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (the entries listed in the module docstring, without ``format``) to
    ``path`` atomically, tagged with :data:`CHECKPOINT_FORMAT`."""
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, **state})


def load_training_state(path: Path, config: Config, world_size: int) -> dict[str, Any]:
    """The checkpoint at ``path``, on the CPU (RNG states must stay CPU tensors;
    ``load_state_dict`` moves the rest), checked against the run's ``config`` and number of
    processes ``world_size``."""
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}. To start this run again instead: drop --resume, pass --overwrite"
        ) from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    changed = config.differences(state["config"])
    if changed:
        raise RuntimeError(
            f"{path} was written with different settings ({', '.join(changed)}); "
            "resume with the original options or use another --out-dir"
        )
    if state["world_size"] != world_size:
        raise RuntimeError(
            f"{path} was written by {state['world_size']} processes, not {world_size}: "
            "resume with the same number of processes"
        )
    return state


def state_dict_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Whether two state dicts hold bit-identical tensors (for tests and checks)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
