r"""The stochastic log-det training step of the CP-Flow paper's public code, as an algorithm.

Written from a description of that algorithm (not from its code), on any potential
``F`` that maps ``(N, d)`` rows to ``(N,)`` values:

1. ``y = grad F(x)`` by autograd with ``create_graph=True``;
2. Hessian-vector products ``H v`` by a second backward pass through ``y``
   (``torch.autograd.grad(y, x, v, retain_graph=True)``);
3. one Rademacher probe ``v`` per sample and ``w = H^{-1} v`` by *unpreconditioned*
   conjugate gradients, all samples in lock-step, stopped when the largest residual
   2-norm over the batch falls below ``tol`` (1e-3) or after ``d`` iterations;
4. the gradient surrogate ``(w.detach() * H v).sum(-1)``, with ``H v`` recomputed
   with ``create_graph=True`` so that it reaches the parameters;
5. no log-det value: the surrogate stands in for it, and the loss is
   ``-(log p_base(y) + surrogate).mean()``, followed by ``backward()``.

Used by ``engine.py`` as a common yardstick for the old and the new library.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions import Distribution
from torch import Tensor

from pyro_cpflow.linalg import rademacher  # in both libraries the harness drives

__all__ = ["REFERENCE_CG_TOL", "batch_cg", "reference_density_step"]

REFERENCE_CG_TOL = 1e-3
"""Absolute tolerance on the largest residual 2-norm of the batch."""


def batch_cg(
    matvec: Callable[[Tensor], Tensor], rhs: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, int]:
    """Solve ``H_i w_i = rhs_i`` for all rows at once by plain CG from ``w = 0``.

    Every row takes the same number of steps: the loop ends when
    ``max_i |rhs_i - H_i w_i|_2 < tol`` or after ``max_iter`` products. Returns the
    solution and the number of Hessian-vector products done.
    """
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    residual_sq = (residual * residual).sum(-1, keepdim=True)
    iterations = 0
    while iterations < max_iter and float(residual_sq.sqrt().max()) >= tol:
        product = matvec(direction)
        iterations += 1
        step = residual_sq / (direction * product).sum(-1, keepdim=True)
        solution = solution + step * direction
        residual = residual - step * product
        new_sq = (residual * residual).sum(-1, keepdim=True)
        direction = residual + (new_sq / residual_sq) * direction
        residual_sq = new_sq
    return solution, iterations


def reference_density_step(
    potential: Callable[[Tensor], Tensor],
    zero_grad: Callable[[], None],
    x: Tensor,
    base: Distribution,
    tol: float = REFERENCE_CG_TOL,
) -> int:
    """One maximum-likelihood step on data ``x``: loss and ``backward()``.

    :param potential: ``F``, rows ``(N, d)`` to values ``(N,)``.
    :param zero_grad: called first to reset the parameter gradients.
    :param base: the base distribution of ``y = grad F(x)``.
    :returns: the CG iterations of the step.
    """
    zero_grad()
    x = x.detach().clone().requires_grad_(True)
    (y,) = torch.autograd.grad(potential(x).sum(), x, create_graph=True)

    def hvp(v: Tensor) -> Tensor:
        (product,) = torch.autograd.grad(y, x, v, retain_graph=True)
        return product

    probe = rademacher(x.shape, x)
    with torch.no_grad():
        solution, iterations = batch_cg(hvp, probe, tol, max_iter=x.shape[-1])
    (hv,) = torch.autograd.grad(y, x, probe, create_graph=True)
    surrogate = (solution.detach() * hv).sum(-1)
    loss = -(base.log_prob(y) + surrogate).mean()
    loss.backward()
    return iterations
