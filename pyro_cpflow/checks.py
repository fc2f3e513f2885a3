"""Argument checks shared by the transforms: clear errors that name the argument.

Type, dtype, device and shape are checked on every call (they cost nothing). Finiteness
reads a flag on the host (a synchronisation on a GPU), so, like Pyro's own argument
checks, :func:`check_finite` follows ``pyro.enable_validation`` (on by default);
:func:`count_nonfinite` is for the slow paths that must explain a failure whatever the
setting (a factorisation or a solve that has already gone wrong).

>>> check_like(torch.zeros(2, dtype=torch.float32), "x", torch.zeros(2, dtype=torch.float64))
... # doctest: +NORMALIZE_WHITESPACE
Traceback (most recent call last):
...
ValueError: x has dtype torch.float32 on cpu but the flow's parameters have dtype torch.float64
on cpu; convert one of them
"""

from __future__ import annotations

import torch
from pyro.distributions import is_validation_enabled
from torch import Tensor

__all__ = ["JIT_MESSAGE", "check_finite", "check_like", "check_not_tracing", "check_rows", "count_nonfinite"]

JIT_MESSAGE = (
    "a CP-Flow cannot be traced by torch.jit (JitTrace_ELBO, JitTraceGraph_ELBO, "
    "JitTraceEnum_ELBO, NUTS/HMC with jit_compile=True): torch.jit.trace is deprecated in torch "
    "2.14, and the flow's caches and solvers are data-dependent Python. Use Trace_ELBO (or "
    "TraceGraph_ELBO / TraceEnum_ELBO) and jit_compile=False"
)


def check_not_tracing() -> None:
    """Raise ``NotImplementedError`` (:data:`JIT_MESSAGE`) inside a ``torch.jit`` trace."""
    if torch.jit.is_tracing():
        raise NotImplementedError(JIT_MESSAGE)


def check_like(value: object, name: str, reference: Tensor) -> None:
    """Raise ``TypeError`` unless ``value`` is a tensor, ``ValueError`` naming ``name`` unless
    it has the dtype and device of ``reference``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype != reference.dtype or value.device != reference.device:
        raise ValueError(
            f"{name} has dtype {value.dtype} on {value.device} but the flow's parameters have "
            f"dtype {reference.dtype} on {reference.device}; convert one of them"
        )


def check_rows(value: Tensor, name: str, dim: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` has shape ``(..., dim)``."""
    if value.dim() < 1 or value.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (..., {dim}), got {tuple(value.shape)}")


def check_finite(value: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``value`` holds NaN or Inf, while Pyro's validation is on."""
    if is_validation_enabled() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def count_nonfinite(rows: Tensor) -> int:
    """How many rows of ``rows`` ``(N, ...)`` hold a NaN or an Inf (reads a flag on the host)."""
    return int((~torch.isfinite(rows.detach().reshape(rows.shape[0], -1))).any(-1).sum())
