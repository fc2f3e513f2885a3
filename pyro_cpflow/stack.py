r"""Stacks of CP-Flow blocks whose inverse meets an end-to-end tolerance.

A stack :math:`S = s_K \circ \dots \circ s_1` of CP-Flow blocks and
:class:`~pyro_cpflow.actnorm.ActNorm` layers is inverted block by block,
:math:`x_K = y,\ x_{k-1} = s_k^{-1}(x_k)`. Each block solve meets its own tolerance, but
its residual :math:`e_k = s_k(x_{k-1}) - x_k` reaches the output through the Jacobians of
the later blocks,

.. math::

    S(x_0) - y \approx \sum_k J_K \cdots J_{k+1}\, e_k ,

and those products amplify it (an ActNorm fitted to data of scale 0.01 multiplies by 100):
every block converged, yet the round trip missed the tolerance by orders of magnitude.
So the block-by-block inverse is only the start of Newton's method on the composition:
with :math:`r = S(x) - y`,

.. math::

    x \leftarrow x - J_1^{-1} \cdots J_K^{-1} r,

each :math:`J_k^{-1}` applied at the block's input, by conjugate gradients with the
block's Hessian-vector products (:math:`J_k = \nabla^2 F_k` is symmetric positive
definite, preconditioned by its quadratic) or exactly for ActNorm, with a per-sample
backtracking on :math:`|r|_\infty`. The test is end to end and relative, as for one block:
:math:`|S(x) - y|_\infty \le \mathrm{tol} \cdot \max(1, |y|_\infty)`. Newton converges
quadratically, so one or two steps usually suffice; where the block-by-block result
already meets the tolerance the whole cost is the check: one evaluation of the stack, one
more per part for the rounding error of the residual (:meth:`_Composition.rounding_noise`),
and for a float32 stack one in float64 (:mod:`pyro_cpflow.precision`). The report,
an :class:`~pyro_cpflow.reports.InverseReport` of the composition, is in
``stack.diagnostics.inverse``; samples that miss the tolerance are reported by the
stack's ``on_failure`` policy (:class:`~pyro_cpflow.options.StackOptions`), and a missed
inverse is not cached.

The returned :math:`x` carries exact implicit gradients: each block's root at the final
points, differentiated by the implicit function theorem
(:func:`~pyro_cpflow.solvers.with_implicit_gradients`), never through the iterations.
Stacks of other transforms compose as Pyro's ``ComposeTransformModule`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor
from torch.distributions import Transform

from .actnorm import ActNorm
from .options import StackOptions, add_option_properties
from .precision import judged_in_float64
from .pyro_glue import InverseTransformModule, VersionedCacheMixin, module_parameters_and_buffers, module_repr
from .reports import (
    Diagnostics,
    InverseReport,
    default_tolerance,
    report_failure,
    residual_scale,
    rounding_noise,
    still_moving,
)
from .transforms import ConditionedCPFlow

__all__ = ["CPFlowStack", "ConditionalCPFlowStack"]

EXPLICIT_PARTS = (ConditionedCPFlow, ActNorm)
"""Transforms whose forward map is explicit and whose Jacobian can be inverted: the parts
of a stack that :class:`CPFlowStack` inverts as a whole."""

BACKTRACKING_STEPS = 8
"""Halvings of a Newton step on the composition before a sample is declared stalled."""


@dataclass
class _Shared:
    """What a stack shares with its inverse and its conditioned copies."""

    options: StackOptions
    diagnostics: Diagnostics


class _StackOptionAttributes:
    _shared: _Shared

    @property
    def options(self) -> StackOptions:
        """The :class:`~pyro_cpflow.options.StackOptions` of the stack's inverse."""
        return self._shared.options

    @options.setter
    def options(self, value: StackOptions) -> None:
        self._shared.options = value

    @property
    def diagnostics(self) -> Diagnostics:
        """``diagnostics.inverse``: the end-to-end report of the last inverse."""
        return self._shared.diagnostics


add_option_properties(_StackOptionAttributes, StackOptions)


def _inner(part: Transform) -> Transform:
    return part.transform if isinstance(part, InverseTransformModule) else part


@contextmanager
def _initialisations_undone_on_error(parts: Iterable[Transform]) -> Iterator[None]:
    """If the body raises, ActNorm layers that were not initialised before forget the batch."""
    fresh = [part for part in map(_inner, parts) if isinstance(part, ActNorm) and not part.is_initialized()]
    try:
        yield
    except BaseException:
        for part in fresh:
            part.forget_initialization()
        raise


class CPFlowStack(_StackOptionAttributes, VersionedCacheMixin, ComposeTransformModule):
    """A ``ComposeTransformModule`` whose inverse meets an end-to-end tolerance (module docstring).

    ``stack.inv`` is a ``CPFlowStack`` too (an ``nn.Module`` registering every parameter;
    ``stack.inv.inv is stack``); the two share options and diagnostics. When every part is
    a CP-Flow block or an :class:`~pyro_cpflow.actnorm.ActNorm`, the direction that runs
    the solvers refines the block-by-block inverse by Newton steps on the composition.

    :param parts: the transforms, applied in order.
    :param options: a :class:`~pyro_cpflow.options.StackOptions` value, or its fields as
        keywords; each is also an attribute (``stack.on_failure = "raise"``).

    >>> from pyro_cpflow import cpflow_stack
    >>> stack = cpflow_stack(2, num_blocks=3, hidden_dims=(8, 8))
    >>> x = stack.inv(torch.randn(6, 2))
    >>> report = stack.diagnostics.inverse   # |stack(x) - y|_inf per sample
    >>> report.method, report.all_converged
    ('composition', True)
    """

    def __init__(
        self,
        parts: Sequence[Transform],
        cache_size: int = 1,
        options: StackOptions | None = None,
        *,
        shared: _Shared | None = None,
        **option_values,
    ) -> None:
        super().__init__(list(parts), cache_size=cache_size)
        if shared is None:
            options = (StackOptions() if options is None else options).replace(**option_values)
            shared = _Shared(options, Diagnostics())
        self._shared = shared

    @property
    def explicit(self) -> bool:
        """Whether every part is an explicit map (a CP-Flow block or an ActNorm)."""
        return all(isinstance(part, EXPLICIT_PARTS) for part in self.parts)

    @property
    def inv(self) -> CPFlowStack:
        inverse = self.__dict__.get("_inverse_module")
        if inverse is None:
            parts = [part.inv for part in reversed(self.parts)]
            inverse = CPFlowStack(parts, self._cache_size, shared=self._shared)
            inverse.__dict__["_inverse_module"] = self  # kept outside the module tree: no cycle
            self.__dict__["_inverse_module"] = inverse
        return inverse

    def with_cache(self, cache_size: int = 1) -> CPFlowStack:
        if cache_size == self._cache_size:
            return self
        return CPFlowStack(self.parts, cache_size=cache_size, shared=self._shared)

    def clear_cache(self) -> None:
        """Forget the pairs of both directions and of every part."""
        for stack in (self, self.__dict__.get("_inverse_module")):
            if stack is not None:
                VersionedCacheMixin.clear_cache(stack)
        for part in self.parts:
            part.clear_cache()

    def _cache_parameters(self) -> Iterable[Tensor]:
        tensors: list[Tensor] = []
        for part in map(_inner, self.parts):
            if isinstance(part, VersionedCacheMixin):
                tensors += part._cache_parameters()
            elif isinstance(part, torch.nn.Module):
                tensors += module_parameters_and_buffers(part)
        return tensors

    def _cache_key_extra(self) -> StackOptions:
        return self.options

    __repr__ = module_repr

    def __call__(self, x: Tensor) -> Tensor:
        partner = self.__dict__.get("_inverse_module")  # the two directions share their pairs
        if self._cache_size and partner is not None:
            cached = partner._cache_lookup(x, 1)
            if cached is not None:
                return cached
        return super().__call__(x)

    def _call(self, x: Tensor) -> Tensor:
        with _initialisations_undone_on_error(self.parts):
            if not self.explicit and self.inv.explicit:
                return self._solve(x)
            for part in self.parts:
                x = part(x)
            return x

    def _solve(self, y: Tensor) -> Tensor:
        """:math:`S^{-1}(y)`, with :math:`S` = ``self.inv``, a stack of explicit parts: block by
        block, then Newton on the composition; the report goes to ``diagnostics.inverse``."""
        parts = self.inv.parts
        options = self.options
        x, blocks = y, []
        for part in reversed(parts):
            x, report = part._solve_inverse(x)
            if report is not None:
                blocks.append((report.iterations.reshape(x.shape[:-1]), report.hessian_products))
        tol = options.inverse_tol or default_tolerance(y.dtype)
        points, report = _newton_on_composition(parts, y.expand_as(x), x, tol, options.refine_max_iter)
        for iterations, products in blocks:  # the report counts the blocks' Newton steps too
            report.iterations = report.iterations + iterations.expand(x.shape[:-1]).reshape(-1)
            report.hessian_products += products
        self.diagnostics.inverse = report
        converged = report.all_converged
        if not converged:
            self._mark_unconverged()
            report_failure(
                report,
                options.on_failure,
                residual="stack(x) - y",
                advice="raise refine_max_iter or inverse_tol, or use float64",
                stacklevel=5,
            )
        return _attached(parts, points, y, cache=converged)


def _attached(parts: Sequence[Transform], points: list[Tensor], y: Tensor, cache: bool = False) -> Tensor:
    """The input point ``points[0]``, carrying each block's implicit gradient; with ``cache``,
    every part keeps its pair ``(x_{k-1}, x_k)``, so the stack's log-det reuses them."""
    x = y
    for part, point in zip(reversed(parts), reversed(points[:-1]), strict=True):
        below = part._attach(point, x) if torch.is_grad_enabled() else point
        if cache and part._cache_size:
            part._cache_store(below, x, output=below)
        x = below
    return x


class _Composition:
    """The stack linearised at ``x`` (no graphs): the points :math:`x, s_1(x), \\dots, S(x)`,
    each part's :class:`~pyro_cpflow.reports.Linearization` at its input, and from them
    :math:`J^{-1} v = J_1^{-1} \\cdots J_K^{-1} v` and the rounding error of :math:`S(x)`."""

    def __init__(self, parts: Sequence[Transform], x: Tensor) -> None:
        self.parts = parts
        self.points, self.blocks = [x], []
        for part in parts:
            block = part._linearize(self.points[-1])
            self.points.append(block.value)
            self.blocks.append(block)

    @property
    def x(self) -> Tensor:
        return self.points[0]

    @property
    def value(self) -> Tensor:
        return self.points[-1]

    def solve(self, v: Tensor, rtol: Tensor) -> tuple[Tensor, int]:
        """:math:`J^{-1} v` block by block, and the Hessian-vector products it took."""
        total = 0
        for block in reversed(self.blocks):
            v, products = block.solve(v, rtol)
            total += products
        return v, total

    def rounding_noise(self) -> Tensor:
        """Per sample, :math:`\\sum_k |J_K \\cdots J_{k+1} e_k|_\\infty` for a sample
        :math:`e_k` of each part's rounding error at its own input
        (:func:`~pyro_cpflow.reports.rounding_noise`): a perturbation of ``x`` alone can
        vanish in the rounding of later points, so every part is probed where it is
        evaluated, and its error carried to the output."""
        carried: list[Tensor] = []
        for part, block, point in zip(self.parts, self.blocks, self.points[:-1], strict=True):
            carried = [block.multiply(error) for error in carried]
            carried.append(rounding_noise(block, part._linearize, point))
        return sum(error.abs().amax(-1) for error in carried)


def _newton_on_composition(
    parts: Sequence[Transform], y: Tensor, x: Tensor, tol: float, max_iter: int
) -> tuple[list[Tensor], InverseReport]:
    """Newton steps on :math:`S(x) = y` from ``x`` (no graphs): the final points
    :math:`x, s_1(x), \\dots, S(x)` and the report."""
    with torch.no_grad():
        scale = residual_scale(y)
        tolerance = tol * scale
        steps = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        stalled = torch.zeros_like(steps, dtype=torch.bool)
        products = 0
        at = _Composition(parts, x)
        size = (at.value - y).abs().amax(-1)
        previous = torch.full_like(size, torch.inf)
        for _ in range(max_iter):
            moving = still_moving(size, previous, tolerance) & ~stalled
            if not bool(moving.any()):
                break
            previous = size
            steps = steps + moving.long()
            rtol = (size / scale).clamp(max=1e-2)  # forcing term of a quadratically convergent Newton
            direction, count = at.solve(torch.where(moving[..., None], at.value - y, 0.0), rtol)
            products += count
            x, size, stalled, reached = _backtrack(parts, y, at.x, direction, size, moving, stalled)
            at = reached if reached is not None else _Composition(parts, x)
            size = (at.value - y).abs().amax(-1)
        noise = at.rounding_noise()
        wide = judged_in_float64(y.dtype, y.device)
        if wide:
            exact = _in_float64(parts, at.x)
            size = (exact - y.double()).abs().amax(-1)
            noise = torch.maximum(noise, (at.value - exact).abs().amax(-1).to(noise.dtype))  # measured
        report = InverseReport.judged(
            "composition",
            steps.reshape(-1),
            products,
            size.reshape(-1),
            noise.reshape(-1),
            tol,
            scale.reshape(-1),
            in_float64=wide,
        )
    return at.points, report


def _in_float64(parts: Sequence[Transform], x: Tensor) -> Tensor:
    """:math:`S(x)` evaluated in float64, by twins of the parts holding the same parameter
    values (:mod:`pyro_cpflow.precision`)."""
    value = x.double()
    for part in parts:
        value = part._float64_twin()._call(value)
    return value


def _backtrack(
    parts: Sequence[Transform],
    y: Tensor,
    x: Tensor,
    direction: Tensor,
    size: Tensor,
    moving: Tensor,
    stalled: Tensor,
) -> tuple[Tensor, Tensor, Tensor, _Composition | None]:
    """``x - t * direction`` per sample, with the first ``t`` in 1, 1/2, ... that lowers
    :math:`|S(x) - y|_\\infty`; samples with none are marked stalled. Returns the new points,
    sizes and stalled marks, and the linearisation there when the full step was taken
    everywhere (the usual case: it is then not evaluated again)."""
    accepted = ~moving
    step = 1.0
    for attempt in range(BACKTRACKING_STEPS):
        trial = _Composition(parts, x - step * direction)  # samples that do not move stay put
        trial_size = (trial.value - y).abs().amax(-1)
        better = ~accepted & (trial_size < size)
        if attempt == 0 and bool((better == moving).all()):
            return trial.x, trial_size, stalled, trial
        x = torch.where(better[..., None], trial.x, x)
        size = torch.where(better, trial_size, size)
        accepted = accepted | better
        if bool(accepted.all()):
            return x, size, stalled, None
        step /= 2
    return x, size, stalled | ~accepted, None


class ConditionalCPFlowStack(_StackOptionAttributes, ConditionalComposeTransformModule):
    """Conditional counterpart of :class:`CPFlowStack`: ``condition(c)`` returns a
    ``CPFlowStack`` of the conditioned parts, sharing this stack's options and diagnostics.

    >>> from pyro_cpflow import conditional_cpflow_stack
    >>> stack = conditional_cpflow_stack(2, 3, num_blocks=2, hidden_dims=(8, 8))
    >>> x = stack.condition(torch.randn(3)).inv(torch.randn(5, 2))
    >>> stack.diagnostics.inverse.all_converged
    True
    """

    def __init__(
        self, transforms: Sequence, cache_size: int = 1, options: StackOptions | None = None, **option_values
    ) -> None:
        super().__init__(list(transforms), cache_size=cache_size)
        options = (StackOptions() if options is None else options).replace(**option_values)
        self._shared = _Shared(options, Diagnostics())

    def condition(self, context: Tensor) -> CPFlowStack:
        parts = [transform.condition(context) for transform in self.transforms]
        return CPFlowStack(parts, self._cache_size, shared=self._shared)
