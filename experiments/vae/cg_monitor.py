"""CG misses of the stochastic log-det while training, counted without waiting for the device.

On a GPU the CP-Flow blocks run a fixed number of CG iterations
(:meth:`~experiments.vae.config.Config.cg_options`), so a training step reads nothing from
the device (``tests/test_vae.py`` counts the reads). The misses (solves that stopped before
their tolerance) are summed on the device during an epoch (:class:`EpochCGCount`), read once
at its end, and logged as ``cg_unconverged`` of ``cg_solves``; an epoch with more than
:data:`CG_MISS_SHARE` of them missed warns (the log-det gradient is biased) and is listed
in ``results.json`` (:class:`CGMisses`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from experiments.vae.distributed import Distributed
from pyro_cpflow import NonConvergenceWarning

__all__ = ["CG_MISS_SHARE", "CGMisses", "EpochCGCount"]

CG_MISS_SHARE = 0.01
"""Share of an epoch's CG solves that may stop before their tolerance without a warning."""


class EpochCGCount:
    """The CG solves of one epoch's training steps in ``blocks`` (the CP-Flow blocks), and how
    many of them missed, summed on ``device``."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        self.blocks = list(blocks)
        self.counted = [block.last_cg for block in self.blocks]  # an exact log-det leaves the last CG result
        self.unconverged = torch.zeros((), dtype=torch.long, device=device)
        self.solves = 0

    def update(self) -> None:
        """Count the solves of the step just taken (a block's new ``last_cg``)."""
        for index, block in enumerate(self.blocks):
            cg = block.last_cg
            if cg is not None and cg is not self.counted[index]:
                self.unconverged += (~cg.converged).sum()
                self.solves += cg.converged.numel()
                self.counted[index] = cg

    def record(self, ddp: Distributed) -> dict[str, Any]:
        """``cg_iterations_max``, ``cg_unconverged`` and ``cg_solves`` over every rank (a
        collective: call it on every rank); empty without blocks or solves."""
        if not self.blocks:
            return {}
        unconverged = self.unconverged
        counts = torch.stack([unconverged.double(), unconverged.new_tensor(self.solves).double()])
        misses, solves = (round(v) for v in (ddp.mean(counts) * ddp.world).tolist())
        if not solves:
            return {}
        last = [int(cg.iterations.max()) for cg in self.counted if cg is not None]
        return {"cg_iterations_max": max(last, default=0), "cg_unconverged": misses, "cg_solves": solves}


class CGMisses:
    """The run's CG misses: totals and the epochs that warned (a checkpoint holds :attr:`state`)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state: dict[str, Any] = state or {"unconverged": 0, "solves": 0, "warned_epochs": []}

    def add(self, record: dict[str, Any], cap: int | None, warn: bool) -> None:
        """Count an epoch's record; warn (if ``warn``: rank 0) when more than
        :data:`CG_MISS_SHARE` of its solves missed. ``cap``: the CG iteration cap, for the message."""
        solves = record.get("cg_solves", 0)
        if not solves:
            return
        misses = record["cg_unconverged"]
        self.state["unconverged"] += misses
        self.state["solves"] += solves
        if misses <= CG_MISS_SHARE * solves:
            return
        self.state["warned_epochs"].append(record["epoch"])
        if warn:
            warnings.warn(
                f"epoch {record['epoch']}: the CG solves of the stochastic log-det stopped before "
                f"their tolerance in {misses} of {solves} cases ({misses / solves:.1%}, more than "
                f"{CG_MISS_SHARE:.0%}), so the log-det gradient is biased: raise --cg-max-iter "
                f"(now {cap or '2 x latent dim'}) or use --logdet exact",
                NonConvergenceWarning,
                stacklevel=2,
            )

    def summary(self) -> dict[str, Any]:
        """The entries of ``results.json`` (empty when no CG ran)."""
        if not self.state["solves"]:
            return {}
        return {
            "cg_unconverged": self.state["unconverged"],
            "cg_solves": self.state["solves"],
            "cg_unconverged_share": self.state["unconverged"] / self.state["solves"],
            "cg_warned_epochs": self.state["warned_epochs"],
        }
