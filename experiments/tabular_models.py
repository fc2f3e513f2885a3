r"""The density models of ``experiments/tabular.py``: CP-Flow and two Pyro baselines of matched size.

Every model is a module ``m`` that maps data to the base :math:`N(0, I_d)`; the density is
``TransformedDistribution(base, [m.inv])``, so ``log_prob`` evaluates ``m`` once (for CP-Flow
the gradient map :math:`\nabla F` and :math:`\log\det\nabla^2 F`, never the inverse solver).

* ``CP-Flow``: :func:`pyro_cpflow.cpflow_stack` of ``blocks`` blocks on input-augmented ICNNs
  (Huang et al. 2021, arXiv:2012.05942), with a data-initialised ActNorm before every block
  and after the last (``actnorm="around"``), ``logdet="auto"``: while training, the
  stochastic log-det (one preconditioned CG solve per probe) wherever the library measured it
  faster than the exact one for the batch size and dimension, and the exact log-det (dense
  Hessian, Cholesky) in evaluation.
* ``MAF``: ActNorm, then ``layers`` :func:`pyro.distributions.transforms.affine_autoregressive`
  layers (Papamakarios et al. 2017, arXiv:1705.07057), each a MADE with its own random
  variable order (Pyro's default).
* ``NSF``: ActNorm, then ``layers`` :func:`pyro.distributions.transforms.spline_coupling`
  layers (rational-quadratic splines, Durkan et al. 2019, arXiv:1906.04032; 4 bins on
  :math:`[-5, 5]`, identity outside) with a fixed random permutation before every layer but
  the first. Four bins rather than Pyro's default 8: a spline has :math:`4K - 1` parameters
  per coordinate, and with 8 bins the output layers alone leave a width of 8-20 at the
  CP-Flow's size.

The baselines' size is matched to the CP-Flow's (:func:`matched_baseline`): the most layers,
up to the requested number, that fit its parameter count at the smallest width allowed
(a MADE needs at least ``d`` hidden units), then the hidden width (two hidden layers each)
that brings the count closest to it.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from experiments.common import count_parameters, standard_normal
from pyro_cpflow import ActNorm, cpflow_stack

__all__ = [
    "BASELINES",
    "MODEL_NAMES",
    "build_cpflow",
    "build_maf",
    "build_nsf",
    "density",
    "matched_baseline",
    "matched_width",
]

SPLINE_BINS = 4
SPLINE_BOUND = 5.0


def build_cpflow(dim: int, blocks: int, hidden: int) -> nn.Module:
    """``blocks`` CP-Flow blocks with ICNN widths ``(hidden, hidden)`` and ActNorm around them."""
    return cpflow_stack(dim, blocks, actnorm="around", hidden_dims=(hidden, hidden), logdet="auto")


def build_maf(dim: int, layers: int, hidden: int) -> nn.Module:
    """ActNorm and ``layers`` affine autoregressive layers with MADEs of widths ``(hidden, hidden)``."""
    parts = [T.affine_autoregressive(dim, hidden_dims=[hidden, hidden]) for _ in range(layers)]
    return T.ComposeTransformModule([ActNorm(dim), *parts])


def build_nsf(dim: int, layers: int, hidden: int) -> nn.Module:
    """ActNorm and ``layers`` spline coupling layers (widths ``(hidden, hidden)``), permuted between."""
    parts: list = [ActNorm(dim)]
    for i in range(layers):
        if i:
            parts.append(T.Permute(torch.randperm(dim)))
        parts.append(
            T.spline_coupling(dim, hidden_dims=[hidden, hidden], count_bins=SPLINE_BINS, bound=SPLINE_BOUND)
        )
    return T.ComposeTransformModule(parts)


BASELINES: dict[str, Callable[[int, int, int], nn.Module]] = {"MAF": build_maf, "NSF": build_nsf}
"""Baseline name -> ``(dim, layers, hidden)`` factory."""

SMALLEST_WIDTH: dict[str, Callable[[int], int]] = {"MAF": lambda dim: max(4, dim), "NSF": lambda dim: 4}
"""Baseline name -> the smallest hidden width it allows for ``dim``."""

MODEL_NAMES = ("CP-Flow", *BASELINES)


def matched_width(
    build: Callable[[int, int, int], nn.Module],
    dim: int,
    layers: int,
    target: int,
    smallest: int = 4,
    largest: int = 4096,
) -> int:
    """The hidden width of ``build(dim, layers, width)`` whose parameter count is closest to
    ``target`` (the count grows with the width, so a bisection finds it).

    >>> width = matched_width(build_maf, 5, 2, target=2000)
    >>> count_parameters(build_maf(5, 2, width)) - 2000 in range(-300, 300)
    True
    """

    def size(width: int) -> int:
        return count_parameters(build(dim, layers, width))

    low, high = smallest, largest
    while high - low > 1:  # invariant: size(low) < target <= size(high), or low is the floor
        middle = (low + high) // 2
        if size(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda width: abs(size(width) - target))


def matched_baseline(name: str, dim: int, max_layers: int, target: int) -> tuple[int, int]:
    """``(layers, width)`` of baseline ``name`` with about ``target`` parameters: the most
    layers up to ``max_layers`` that fit ``target`` at the smallest width, then
    :func:`matched_width` (one layer when even that does not fit).

    >>> matched_baseline("MAF", 64, 5, target=60_000)
    (3, 74)
    """
    build, floor = BASELINES[name], SMALLEST_WIDTH[name](dim)
    layers = next(
        (n for n in range(max_layers, 0, -1) if count_parameters(build(dim, n, floor)) <= target), 1
    )
    return layers, matched_width(build, dim, layers, target, smallest=floor)


def density(module: nn.Module, dim: int) -> dist.TransformedDistribution:
    """The model's density in Pyro: the base pushed through ``module.inv``."""
    parameter = next(module.parameters())
    return dist.TransformedDistribution(standard_normal(dim, parameter.device, parameter.dtype), [module.inv])
