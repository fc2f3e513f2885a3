r"""What an inverse solve reports, and how its convergence is judged.

A sample :math:`i` of a solve of :math:`f(x) = y` has converged when

.. math::

    |f(x_i) - y_i|_\infty \le \mathrm{tol} \cdot \max(1, |y_i|_\infty)

(:func:`residual_scale`): a tolerance relative to the target with an absolute floor,
since a floating-point :math:`y` is known only to a relative precision, and an absolute
tolerance would ask float32 for digits it does not hold once :math:`|y|` is large
(:func:`default_tolerance`). A residual below the rounding error of its own evaluation
certifies nothing, so the sample must also have that error, estimated by
:func:`rounding_noise`, below the tolerance; elsewhere the dtype cannot resolve the
tolerance, and the sample is reported as *unresolved*. :class:`InverseReport` holds the
verdicts of one solve, :class:`Diagnostics` the last reports of a flow, and
:func:`report_failure` applies the failure policy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .linalg import CGResult
from .options import handle_failure

__all__ = [
    "Diagnostics",
    "InverseReport",
    "Linearization",
    "default_tolerance",
    "report_failure",
    "residual_scale",
    "rounding_noise",
    "still_moving",
]


@dataclass
class InverseReport:
    """What the inverse solver did, one entry per sample where it applies.

    :ivar method: ``"newton-cg"`` or ``"lbfgs"``.
    :ivar iterations: ``(N,)`` outer iterations (Newton steps; for L-BFGS the batch count).
    :ivar hessian_products: total Hessian-vector products (Newton-CG) or gradient
        evaluations (L-BFGS) for the whole batch.
    :ivar residual: ``(N,)`` final :math:`|\\nabla F(x) - y|_\\infty`, computed in float64 for
        a lower-precision flow (:mod:`pyro_cpflow.precision`).
    :ivar converged: ``(N,)`` whether ``residual <= tol * scale``, and, unless the residual
        was computed in float64 for a lower-precision flow, ``noise <= tol * scale``.
    :ivar tol: the (relative) tolerance used.
    :ivar scale: ``(N,)`` :math:`\\max(1, |y|_\\infty)`, the scale of the tolerance
        (:func:`residual_scale`).
    :ivar noise: ``(N,)`` the rounding error of an evaluation in the flow's own dtype:
        estimated (:func:`rounding_noise`), and for a lower-precision flow at least the
        measured difference to the float64 evaluation.
    """

    method: str
    iterations: Tensor
    hessian_products: int
    residual: Tensor
    converged: Tensor
    tol: float
    scale: Tensor
    noise: Tensor

    @classmethod
    def judged(
        cls,
        method: str,
        iterations: Tensor,
        hessian_products: int,
        residual: Tensor,
        noise: Tensor,
        tol: float,
        scale: Tensor,
        in_float64: bool = False,
    ) -> InverseReport:
        """The report of a solve whose final residuals and rounding noise are given;
        ``in_float64``: the residuals were computed in float64 for a lower-precision flow,
        so the flow's rounding does not bear on them."""
        converged = residual <= tol * scale
        if not in_float64:
            converged = converged & (noise <= tol * scale)
        return cls(method, iterations, hessian_products, residual, converged, tol, scale, noise)

    @property
    def unresolved(self) -> Tensor:
        """``(N,)`` samples that missed the tolerance where the flow's own rounding exceeds
        it: its dtype cannot resolve the tolerance there."""
        return ~self.converged & (self.noise > self.tol * self.scale)

    @property
    def relative_residual(self) -> Tensor:
        """``(N,)`` ``residual / scale``, the quantity compared with ``tol``."""
        return self.residual / self.scale

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass
class Diagnostics:
    """The last solver reports of a flow, kept in one place (``flow.diagnostics``).

    :ivar cg: :class:`~pyro_cpflow.linalg.CGResult` of the last stochastic log-det.
    :ivar condition: ``(N,)`` its Ritz estimate of the condition number of :math:`Q^{-1} H`
        per sample (a lower bound; see :class:`~pyro_cpflow.linalg.StochasticLogdet`).
    :ivar inverse: :class:`InverseReport` of the last inverse.
    :ivar warned: the situations already warned about (see :meth:`handle_failure_once`).
    """

    cg: CGResult | None = None
    condition: Tensor | None = None
    inverse: InverseReport | None = None
    warned: set[Hashable] = field(default_factory=set)

    def first_time(self, situation: Hashable) -> bool:
        """Whether ``situation`` is met for the first time (it is then recorded in :attr:`warned`)."""
        if situation in self.warned:
            return False
        self.warned.add(situation)
        return True

    def handle_failure_once(
        self, policy: str, situation: Hashable, message: str, stacklevel: int = 3
    ) -> None:
        """:func:`~pyro_cpflow.options.handle_failure`, but with ``policy="warn"`` only the first
        time a ``situation`` (e.g. the options in force) is met: a miss that repeats every
        training step warns once, and the reports keep the rest. ``"raise"`` always raises.

        >>> import warnings
        >>> diagnostics = Diagnostics()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for step in range(3):
        ...         diagnostics.handle_failure_once("warn", ("cg", 1e-6), f"missed at step {step}")
        >>> [str(w.message) for w in caught]
        ['missed at step 0 (warned once for these settings; later misses are kept in flow.diagnostics)']
        """
        if policy == "warn":
            if not self.first_time(situation):
                return
            message += " (warned once for these settings; later misses are kept in flow.diagnostics)"
        handle_failure(policy, message, stacklevel=stacklevel + 1)


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative residual tolerance of the solvers: ``1e-12`` in float64, ``1e-5`` in float32.

    About 4500 and 80 times the machine epsilon (``2.2e-16`` and ``1.2e-7``): room above the
    rounding error of one evaluation of :math:`\\nabla F`, relative to
    :math:`\\max(1, |y|_\\infty)`, unless its terms cancel by orders of magnitude (which
    :func:`rounding_noise` detects).
    """
    return 1e-12 if dtype == torch.float64 else 1e-5


class Linearization(NamedTuple):
    """A map linearised at a point (no graphs): its ``value`` there, ``solve(v, rtol) ->
    (J^{-1} v, products)`` to relative accuracy ``rtol`` (one value per sample) with the
    matrix-vector products it took, and ``multiply(v) = J v``; ``v`` has the shape of the
    value, batch dimensions first."""

    value: Tensor
    solve: Callable[[Tensor, Tensor], tuple[Tensor, int]]
    multiply: Callable[[Tensor], Tensor]


NOISE_ULPS = 8
"""Size of the perturbation of :func:`rounding_noise`, in units of the last place."""


def rounding_noise(at: Linearization, linearize: Callable[[Tensor], Linearization], x: Tensor) -> Tensor:
    r"""A sample of the rounding error in evaluating a map :math:`f` at ``x``, shaped like ``f(x)``.

    With a perturbation :math:`d` of a few units in the last place of ``x`` (exactly
    representable), :math:`f(x + d) - f(x) - J d` is, up to :math:`O(|d|^2)`, the difference
    of the rounding errors of the two evaluations: the part of a computed residual that
    says nothing about the solution. ``at`` is the linearisation at ``x`` and ``linearize``
    evaluates the map elsewhere. A report keeps its size :math:`|\cdot|_\infty` per sample.

    >>> matrix = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> def linearize(x):
    ...     solve = lambda v, rtol: (torch.linalg.solve(matrix, v.T).T, 1)
    ...     return Linearization(x @ matrix, solve, lambda v: v @ matrix)
    >>> x = torch.randn(4, 2, dtype=torch.float64)
    >>> bool((rounding_noise(linearize(x), linearize, x).abs() < 1e-14).all())
    True
    """
    eps = torch.finfo(x.dtype).eps
    shifted = x * (1 + NOISE_ULPS * eps)
    return linearize(shifted).value - at.value - at.multiply(shifted - x)


AIM = 0.5
"""Solvers iterate towards ``AIM * tol``, so that a residual judged afresh (in float64, for
a float32 flow) still meets ``tol``; see :func:`still_moving`."""


def still_moving(size: Tensor, previous: Tensor, tolerance: Tensor) -> Tensor:
    """The samples a solver should keep iterating: residual ``size`` above ``AIM *
    tolerance``, unless it is within ``tolerance`` already and the last step (from
    ``previous``) did not halve it, which is where rounding stops the progress. A NaN size
    stops (and is reported).

    >>> still_moving(torch.tensor([0.9, 0.9, 0.4, 2.0]), torch.tensor([9.0, 1.0, 9.0, 2.1]), torch.ones(4))
    tensor([ True, False, False,  True])
    """
    return (size > AIM * tolerance) & ~((size <= tolerance) & (size > AIM * previous))


def residual_scale(y: Tensor) -> Tensor:
    """``(N,)`` :math:`\\max(1, |y_i|_\\infty)`: the residual of row ``i`` is judged by
    ``tol * scale_i``, relative to the target with an absolute floor.

    >>> residual_scale(torch.tensor([[0.5, -0.1], [300.0, 2.0]]))
    tensor([  1., 300.])
    """
    return y.abs().amax(-1).clamp_min(1.0)


def report_failure(
    report: InverseReport,
    on_failure: str,
    residual: str = "grad F(x) - y",
    advice: str = "raise max_iter or tol, or check that the potential is finite",
    stacklevel: int = 3,
) -> None:
    """Apply the failure policy to an :class:`InverseReport` that missed its tolerance;
    ``residual`` names what the report measures and ``advice`` says what to change."""
    if on_failure == "ignore" or report.all_converged:
        return
    failed = ~report.converged
    unresolved = int(report.unresolved.sum())
    message = (
        f"{report.method} inverse did not converge for {int(failed.sum())} of {failed.numel()} "
        f"samples: worst |{residual}|_inf / max(1, |y|_inf) = "
        f"{float(report.relative_residual[failed].max()):.3e} (tol = {report.tol:.1e}) after "
        f"{int(report.iterations.max())} iterations; {advice}"
    )
    if unresolved:
        noise = float((report.noise / report.scale)[failed].max())
        remedy = "a looser tolerance"
        if report.noise.dtype != torch.float64:
            remedy = "float64 or " + remedy
        message += (
            f". For {unresolved} of them the rounding error of the residual itself (up to "
            f"{noise:.1e}) exceeds tol: {report.noise.dtype} cannot resolve it there; use {remedy}"
        )
    handle_failure(on_failure, message, stacklevel=stacklevel)
