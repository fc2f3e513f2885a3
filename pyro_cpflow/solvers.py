r"""Inverting the gradient map of a strongly convex potential.

:math:`x = (\nabla F)^{-1}(y)` is the unique minimiser of the strongly convex
:math:`\phi_y(x) = F(x) - y^\top x`, i.e. the root of :math:`\nabla F(x) - y`.

* ``method="newton-cg"`` (default): a Hessian-free Newton method per sample. The
  Newton system :math:`H p = -(\nabla F(x) - y)` is solved inexactly by
  :func:`~pyro_cpflow.linalg.conjugate_gradient` (forcing term :math:`\min(1/2, |r|)`,
  for quadratic convergence: at the usual tolerances one Newton step fewer than
  :math:`\sqrt{|r|}` for one CG iteration more), and a per-sample backtracking line search on
  :math:`\phi_y` guarantees descent. Convergence is quadratic near the solution.
* ``method="lbfgs"``: one batch-wide :class:`torch.optim.LBFGS` with strong-Wolfe line
  search on :math:`\sum_i \phi_{y_i}(x_i)`, the approach of the CP-Flow reference code.
  Its line search compares summed objective values, so it stalls once the per-sample
  improvements fall below the resolution of the sum (residuals around ``1e-6`` in
  float64 for a batch of a thousand); use it with a loose ``tol``.

Solvers are small objects (:class:`NewtonCG`, :class:`LBFGS`) whose ``solve`` returns the
solution and an :class:`InverseReport`. They evaluate the potential through one engine,
:meth:`~pyro_cpflow.potential.ConvexPotential.evaluate` (analytic gradient and
Hessian-vector products; any other callable is evaluated by autograd,
:class:`~pyro_cpflow.derivatives.AutogradTrace`). Both stop when every sample satisfies
:math:`|\nabla F(x) - y|_\infty \le \mathrm{tol} \cdot \max(1, |y|_\infty)`, a tolerance
relative to the target with an absolute floor, and the report also checks that the
residual is above its own rounding error (:mod:`pyro_cpflow.reports`).
:func:`invert_gradient_map` makes the result differentiable by the implicit function
theorem: :math:`\partial x/\partial y = H^{-1}` and
:math:`\partial x/\partial\theta = -H^{-1}\,\partial_\theta \nabla F(x)`, applied in the
backward pass by conjugate gradients, never by backpropagating through iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .derivatives import AutogradTrace, PotentialTrace
from .linalg import MatVec, conjugate_gradient
from .options import FAILURE_POLICIES, INVERSE_METHODS, NonConvergenceError, NonConvergenceWarning
from .precision import float64_twin, judged_in_float64
from .reports import (
    Diagnostics,
    InverseReport,
    Linearization,
    default_tolerance,
    report_failure,
    residual_scale,
    rounding_noise,
    still_moving,
)

__all__ = [
    "Diagnostics",
    "INVERSE_METHODS",
    "InverseReport",
    "InverseSolver",
    "LBFGS",
    "NewtonCG",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "default_tolerance",
    "evaluator",
    "gradient_linearization",
    "invert_gradient_map",
    "make_solver",
    "solve_gradient_equation",
    "with_implicit_gradients",
]

Potential = Callable[..., Tensor]
"""A batched potential ``(N, d) -> (N,)``, convex in each row (optionally with a context)."""

Evaluate = Callable[..., "PotentialTrace | AutogradTrace"]
"""``(x, context, derivatives=True) -> trace`` with ``value``, ``gradient``, ``hvp`` and
``detach``; ``derivatives=False`` promises that only the value will be read."""


def evaluator(potential: Potential) -> Evaluate:
    """The engine of ``potential``: its ``evaluate`` method, or autograd for a plain callable."""
    evaluate = getattr(potential, "evaluate", None)
    if evaluate is not None:
        return evaluate

    def by_autograd(x: Tensor, context: Tensor | None, derivatives: bool = True) -> AutogradTrace:
        return AutogradTrace(lambda z: potential(z) if context is None else potential(z, context), x)

    return by_autograd


def _rows(context: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if context is None else context[rows]


@dataclass(frozen=True)
class InverseSolver:
    """A solver of :math:`\\nabla F(x_i) = y_i`, row by row; ``solve`` returns ``(x, report)``.

    :param tol: relative tolerance: row ``i`` has converged once
        :math:`|\\nabla F(x_i) - y_i|_\\infty \\le` ``tol`` :math:`\\max(1, |y_i|_\\infty)`.
    :param max_iter: outer iterations.
    """

    tol: float
    max_iter: int = 100
    method: ClassVar[str] = ""

    def solve(
        self,
        evaluate: Evaluate,
        y: Tensor,
        x: Tensor,
        context: Tensor | None = None,
        preconditioner: MatVec | None = None,
        judge: Evaluate | None = None,
    ) -> tuple[Tensor, InverseReport]:
        """From starting points ``x``, with the potential's engine ``evaluate``, ``context``
        rows and an optional preconditioner :math:`M^{-1} v` of the Hessian; ``judge``, an
        engine on float64 rows, computes the final residuals of a lower-precision solve
        (:mod:`pyro_cpflow.precision`)."""
        raise NotImplementedError

    def _report(
        self,
        evaluate: Evaluate,
        y: Tensor,
        x: Tensor,
        context: Tensor | None,
        iterations: Tensor,
        products: int,
        judge: Evaluate | None,
    ) -> InverseReport:
        """The report at the final ``x``, from a fresh evaluation there."""
        with torch.no_grad():
            at = gradient_linearization(evaluate, x, context)
            noise = rounding_noise(at, lambda z: gradient_linearization(evaluate, z, context), x)
        return self._judge(y, x, context, at.value, noise.abs().amax(-1), iterations, products, judge)

    def _judge(
        self,
        y: Tensor,
        x: Tensor,
        context: Tensor | None,
        value: Tensor,
        noise: Tensor,
        iterations: Tensor,
        products: int,
        judge: Evaluate | None,
    ) -> InverseReport:
        """The report from :math:`\\nabla F` at the final ``x`` (``value``) and the size of its
        rounding noise per sample; with ``judge`` the residuals are computed in float64."""
        with torch.no_grad():
            if judge is None:
                residual = (value - y).abs().amax(-1)
            else:
                wide = None if context is None else context.double()
                exact = judge(x.double(), wide).gradient
                residual = (exact - y.double()).abs().amax(-1)
                noise = torch.maximum(noise, (value - exact).abs().amax(-1).to(noise.dtype))  # measured
        return InverseReport.judged(
            self.method, iterations, products, residual, noise, self.tol, residual_scale(y), judge is not None
        )


def gradient_linearization(
    evaluate: Evaluate, x: Tensor, context: Tensor | None, preconditioner: MatVec | None = None
) -> Linearization:
    """:math:`\\nabla F` linearised at the rows ``x`` (call without grad mode): its value, and
    products and (preconditioned) CG solves with the Hessian."""
    trace = evaluate(x, context)

    def solve(v: Tensor, rtol: Tensor) -> tuple[Tensor, int]:
        result = conjugate_gradient(trace.hvp, v, rtol=rtol, preconditioner=preconditioner)
        return result.solution, int(result.iterations.max())

    return Linearization(trace.gradient, solve, trace.hvp)


def _stopping_noise(
    evaluate: Evaluate,
    trace: PotentialTrace | AutogradTrace,
    x: Tensor,
    context: Tensor | None,
    stopping: Tensor,
) -> Tensor:
    """:func:`~pyro_cpflow.reports.rounding_noise` (its size per sample) of the ``stopping``
    rows of ``x``, reusing ``trace``, the evaluation at ``x``: one evaluation of those rows."""
    if bool(stopping.all()):
        at = Linearization(trace.gradient, _no_solve, trace.hvp)
        picked, picked_context = x, context
    else:
        at = Linearization(
            trace.gradient[stopping], _no_solve, lambda v: trace.hvp(_scatter(v, stopping))[stopping]
        )
        picked, picked_context = x[stopping], _rows(context, stopping)
    linearize = lambda z: gradient_linearization(evaluate, z, picked_context)  # noqa: E731
    return rounding_noise(at, linearize, picked).abs().amax(-1)


def _scatter(rows: Tensor, where: Tensor) -> Tensor:
    """``rows`` placed at the ``where`` rows of a zero tensor of ``where``'s length."""
    full = rows.new_zeros(where.shape[0], rows.shape[-1])
    full[where] = rows
    return full


def _no_solve(v: Tensor, rtol: Tensor) -> tuple[Tensor, int]:
    raise AssertionError("rounding_noise multiplies, never solves")


@dataclass(frozen=True)
class NewtonCG(InverseSolver):
    """Per-sample Hessian-free Newton with inexact CG steps and backtracking (see the module docstring)."""

    method: ClassVar[str] = "newton-cg"

    def solve(self, evaluate, y, x, context=None, preconditioner=None, judge=None):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return self._solve(evaluate, y, x.clone(), context, preconditioner, judge)

    def _solve(
        self,
        evaluate: Evaluate,
        y: Tensor,
        x: Tensor,
        context: Tensor | None,
        preconditioner: MatVec | None,
        judge: Evaluate | None,
    ) -> tuple[Tensor, InverseReport]:
        n, d = y.shape
        eps = torch.finfo(y.dtype).eps
        tolerance = self.tol * residual_scale(y)
        previous = torch.full_like(tolerance, torch.inf)  # each sample's residual one step before
        iterations = torch.zeros(n, dtype=torch.long, device=y.device)
        rows = torch.arange(n, device=y.device)  # samples still iterating: the others cost nothing
        products = 0
        final = torch.empty_like(y)  # grad F at each sample's final x, and its rounding noise
        noise = torch.empty_like(tolerance)
        trace = None  # the potential at x[rows], when the last line search already evaluated it
        for newton_step in range(self.max_iter + 1):
            x_rows, y_rows, context_rows = x[rows], y[rows], _rows(context, rows)
            if trace is None:
                trace = evaluate(x_rows, context_rows)
            residual = trace.gradient - y_rows
            size = residual.abs().amax(-1)
            moving = still_moving(size, previous[rows], tolerance[rows])
            previous[rows] = size
            last = newton_step == self.max_iter
            if last:
                moving = torch.zeros_like(moving)
            if not bool(moving.all()):  # the report of the samples stopping here, from this evaluation
                stopping = ~moving
                final[rows[stopping]] = trace.gradient[stopping]
                noise[rows[stopping]] = _stopping_noise(evaluate, trace, x_rows, context_rows, stopping)
            if last or not bool(moving.any()):
                break
            forcing = torch.clamp(residual.norm(dim=-1), max=0.5)
            cg = conjugate_gradient(
                trace.hvp,
                torch.where(moving[:, None], -residual, 0.0),
                rtol=forcing,
                max_iter=2 * d,
                preconditioner=preconditioner,
            )
            products += int(cg.iterations.max())
            direction = cg.solution
            slope = (residual * direction).sum(-1)
            descent = slope < 0
            direction = torch.where(descent[:, None], direction, -residual)
            slope = torch.where(descent, slope, -(residual * residual).sum(-1))
            value = trace.value
            linear = (y_rows * x_rows).sum(-1)
            phi0 = value - linear
            step = torch.ones_like(phi0)
            pending = moving.clone()
            for attempt in range(60):
                trial = x_rows + step[:, None] * direction
                # the full step is usually accepted: evaluate it completely, to reuse it
                trial_trace = evaluate(trial, context_rows, derivatives=attempt == 0)
                trial_value = trial_trace.value
                trial_linear = (y_rows * trial).sum(-1)
                phi = trial_value - trial_linear
                # round-off slack: near the solution phi changes below the rounding error of
                # its terms, F(x) and y^T x, which can be much larger than phi itself
                scale = value.abs() + linear.abs() + trial_value.abs() + trial_linear.abs()
                slack = 64 * eps * scale
                accept = phi <= phi0 + 1e-4 * step * slope + slack
                if attempt == 0:
                    # ... and that error can exceed the slack when large terms of F cancel (a
                    # stiff quadratic): a full step that halves the residual is taken anyway
                    trial_residual = (trial_trace.gradient - y_rows).abs().amax(-1)
                    accept = accept | (trial_residual <= 0.5 * residual.abs().amax(-1))
                pending = pending & ~accept
                if not bool(pending.any()):
                    break
                step = torch.where(pending, 0.5 * step, step)
            every_row_moved_fully = attempt == 0 and bool(moving.all())
            trace = trial_trace if every_row_moved_fully else None
            x[rows] = torch.where(moving[:, None], x_rows + step[:, None] * direction, x_rows)
            iterations[rows] += moving.long()
            rows = rows[moving]
        return x, self._judge(y, x, context, final, noise, iterations, products, judge)


@dataclass(frozen=True)
class LBFGS(InverseSolver):
    """One batch-wide :class:`torch.optim.LBFGS` with strong-Wolfe line search (the reference
    code's approach); use a loose ``tol`` (see the module docstring)."""

    method: ClassVar[str] = "lbfgs"

    def solve(self, evaluate, y, x, context=None, preconditioner=None, judge=None):  # type: ignore[no-untyped-def]
        del preconditioner  # L-BFGS builds its own curvature model
        scale = residual_scale(y)
        variable = x.detach().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [variable],
            lr=1.0,
            max_iter=self.max_iter,
            max_eval=2 * self.max_iter,
            # its test is batch-wide: stop only when the strictest row's tolerance is met
            tolerance_grad=self.tol * float(scale.min()),
            tolerance_change=0.0,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        evaluations = [0]

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = (evaluate(variable, context).value - (y * variable).sum(-1)).sum()
            loss.backward()
            evaluations[0] += 1
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        x = variable.detach()
        steps = optimizer.state[optimizer._params[0]].get("n_iter", 0)
        iterations = torch.full(y.shape[:1], steps, dtype=torch.long, device=y.device)
        return x, self._report(evaluate, y, x, context, iterations, evaluations[0], judge)


_SOLVERS = {"newton-cg": NewtonCG, "lbfgs": LBFGS}
assert tuple(_SOLVERS) == INVERSE_METHODS


def make_solver(method: str, tol: float, max_iter: int) -> InverseSolver:
    """The solver object for ``method`` (one of :data:`~pyro_cpflow.options.INVERSE_METHODS`)."""
    if method not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(_SOLVERS)}")
    return _SOLVERS[method](tol, max_iter)


def _check_batch(y: Tensor) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")
    if y.dim() != 2:
        raise ValueError(f"y must be a batch of shape (N, d), got {tuple(y.shape)}")
    if not y.dtype.is_floating_point:
        raise ValueError(f"y must be a floating-point tensor, got dtype {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or Inf: there is no point to invert")


def solve_gradient_equation(
    potential: Potential,
    y: Tensor,
    initial: Tensor | None = None,
    context: Tensor | None = None,
    method: str = "newton-cg",
    tol: float | None = None,
    max_iter: int = 100,
    on_failure: str = "warn",
    preconditioner: MatVec | None = None,
) -> tuple[Tensor, InverseReport]:
    r"""Solve :math:`\nabla F(x_i) = y_i` for every row of ``y`` ``(N, d)``; no gradients.

    :param potential: a :class:`~pyro_cpflow.potential.ConvexPotential` (evaluated by the
        analytic engine) or any batched strongly convex callable ``(N, d) -> (N,)``, called
        as ``potential(x)``, or ``potential(x, context)`` when a context is given.
    :param initial: starting points (default ``y``).
    :param context: optional ``(N, c)`` rows passed to the potential; the solver
        evaluates only the samples that have not converged yet, with their context rows.
    :param method: ``"newton-cg"`` or ``"lbfgs"`` (see the module docstring).
    :param tol: relative tolerance: row ``i`` converges once :math:`|\nabla F(x_i) -
        y_i|_\infty \le` ``tol`` :math:`\cdot \max(1, |y_i|_\infty)` (default
        :func:`default_tolerance`).
    :param max_iter: Newton steps, or L-BFGS iterations.
    :param on_failure: ``"warn"`` (:class:`NonConvergenceWarning`), ``"raise"``
        (:class:`NonConvergenceError`) or ``"ignore"`` when some sample misses ``tol``.
    :param preconditioner: optional :math:`M^{-1} v` (rows) for the CG solves of the
        Newton steps, e.g. ``potential.factorize().solve``.
    :returns: the solutions ``(N, d)`` (detached) and an :class:`InverseReport`. For a
        lower-precision potential that is an ``nn.Module``, the report's residuals are
        computed in float64 (:mod:`pyro_cpflow.precision`); a plain callable is judged by
        the rounding noise of its own dtype.

    >>> potential = lambda x: (x ** 2).sum(-1) + (x ** 4).sum(-1) / 4
    >>> y = torch.randn(10, 3, dtype=torch.float64)
    >>> x, report = solve_gradient_equation(potential, y)
    >>> torch.allclose(2 * x + x ** 3, y) and report.all_converged
    True
    """
    if method not in _SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(_SOLVERS)}")
    if on_failure not in FAILURE_POLICIES:
        raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
    _check_batch(y)
    y = y.detach()
    tol = default_tolerance(y.dtype) if tol is None else tol
    solver = make_solver(method, tol, max_iter)
    start = y.clone() if initial is None else initial.detach().clone()
    if start.shape != y.shape:
        raise ValueError(f"initial has shape {tuple(start.shape)}, expected {tuple(y.shape)}")
    if context is not None and context.shape[0] != y.shape[0]:
        raise ValueError(f"context has {context.shape[0]} rows, expected {y.shape[0]}")
    context_constant = None if context is None else context.detach()
    judge = None
    if isinstance(potential, nn.Module) and judged_in_float64(y.dtype, y.device):
        judge = evaluator(float64_twin(potential))
    x, report = solver.solve(evaluator(potential), y, start, context_constant, preconditioner, judge)
    report_failure(report, on_failure)
    return x, report


class _ImplicitCorrection(torch.autograd.Function):
    r"""Zero in the forward pass; in the backward pass, multiplies by :math:`-H^{-1}`.

    Added to the solution :math:`x^*` together with the residual
    :math:`R = \nabla F(x^*) - y` (which carries the graph to :math:`y` and
    :math:`\theta`), it yields the implicit-function-theorem gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        residual: Tensor,
        solution: Tensor,
        evaluate: Evaluate,
        context: Tensor | None,
        preconditioner: MatVec | None,
        cg_rtol: float,
    ) -> Tensor:
        ctx.save_for_backward(solution)
        ctx.evaluate = evaluate
        ctx.preconditioner = preconditioner
        ctx.context = None if context is None else context.detach()
        ctx.cg_rtol = cg_rtol
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (solution,) = ctx.saved_tensors
        with torch.no_grad():
            trace = ctx.evaluate(solution, ctx.context).detach()
            result = conjugate_gradient(
                trace.hvp,
                grad_output,
                rtol=ctx.cg_rtol,
                max_iter=4 * solution.shape[-1],
                preconditioner=ctx.preconditioner,
            )
        return -result.solution, None, None, None, None, None


def invert_gradient_map(
    potential: Potential,
    y: Tensor,
    initial: Tensor | None = None,
    context: Tensor | None = None,
    **solver_options,
) -> tuple[Tensor, InverseReport]:
    r"""Like :func:`solve_gradient_equation`, but differentiable in ``y``, the context and the parameters.

    The returned :math:`x` carries the implicit gradients :math:`\partial x/\partial y =
    H^{-1}` and :math:`\partial x / \partial \theta = -H^{-1} \partial_\theta
    \nabla F(x)` (likewise for the context), computed in the backward pass by conjugate gradients with
    Hessian-vector products at :math:`x`. Memory does not depend on the number of
    solver iterations.

    >>> weight = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    >>> potential = lambda x: weight * (x ** 2).sum(-1) / 2
    >>> y = torch.ones(1, 2, dtype=torch.float64)
    >>> x, _ = invert_gradient_map(potential, y)         # x = y / weight
    >>> x.sum().backward()
    >>> round(weight.grad.item(), 6)                     # d/dw (2 / w) = -2 / w^2
    -0.5
    """
    solution, report = solve_gradient_equation(potential, y, initial, context, **solver_options)
    preconditioner = solver_options.get("preconditioner")
    return with_implicit_gradients(potential, solution, y, context, preconditioner), report


def with_implicit_gradients(
    potential: Potential,
    solution: Tensor,
    y: Tensor,
    context: Tensor | None = None,
    preconditioner: MatVec | None = None,
) -> Tensor:
    r"""``solution`` (a detached root of :math:`\nabla F(x) = y`), carrying the implicit
    gradients of :func:`invert_gradient_map` to ``y``, the context and the parameters.

    The value is ``solution`` itself; the gradients are those of the exact root at that
    point. Without grad mode, or when nothing requires grad, ``solution`` is returned as is.
    """
    if not torch.is_grad_enabled():
        return solution
    evaluate = evaluator(potential)
    residual = evaluate(solution, context).gradient - y
    if not residual.requires_grad:
        return solution
    cg_rtol = 1e-12 if y.dtype == torch.float64 else 1e-6
    correction = _ImplicitCorrection.apply(residual, solution, evaluate, context, preconditioner, cg_rtol)
    return solution + correction
