"""Count the operations that would make the host wait for a GPU, on any device.

A CUDA host synchronisation happens whenever Python needs a tensor's value: ``bool(t)``,
``t.item()``, ``float(t)``, ``t.tolist()``, ``nonzero``, indexing with a boolean mask, and
so on. :class:`HostSyncCounter` intercepts these calls through ``__torch_function__``, so a
CPU test can prove that a code path never reads device values, which is what
``torch.cuda.set_sync_debug_mode`` would check on a GPU.

Only calls made (directly or through Pyro or torch.distributions) from code under test are
counted; the optimizer's ``item`` on its CPU step counters is not a device read and is left
out by running ``step()`` outside the counter.
"""

from __future__ import annotations

import collections
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter"]

READS = frozenset(
    {
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "item",
        "tolist",
        "numpy",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
    }
)
"""Tensor functions whose result needs values from the device."""

INDEXING = frozenset({"__getitem__", "__setitem__"})


def _boolean_index(args: tuple[Any, ...]) -> bool:
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


def _caller() -> str:
    """``file:line`` of the innermost frame in this project (for failure messages)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "pyro_cpflow" in frame.filename or "experiments" in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.line}"
    return "outside the project"


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting device reads; ``counts`` maps ``(function, caller)`` to a count.

    >>> with HostSyncCounter() as counter:
    ...     _ = bool(torch.ones(2).sum() > 0)
    >>> counter.total
    1
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name in INDEXING and _boolean_index(args)):
            self.counts[(name, _caller())] += 1
        return func(*args, **(kwargs or {}))
