r"""CP-Flow as Pyro transforms.

A convex potential flow is the gradient map :math:`f = \nabla F` of a strongly
convex potential (:class:`~pyro_cpflow.potential.ConvexPotential`). The forward
direction ``f(x)`` is one gradient evaluation; the inverse solves a convex problem
(:mod:`pyro_cpflow.solvers`). The Jacobian is the Hessian :math:`H = \nabla^2 F
\succ 0`, so :math:`\log|\det J_f(x)| = \log\det H(x)`, computed in one of three modes:

* ``"exact"``: the dense Hessian by forward Jacobian propagation
  (:meth:`~pyro_cpflow.derivatives.PotentialTrace.hessian`) and a Cholesky factorisation;
  exact value and gradient.
* ``"stochastic"``: one preconditioned CG solve per probe gives both the value (Lanczos
  quadrature from CG's own coefficients) and an unbiased gradient surrogate
  (:func:`~pyro_cpflow.linalg.stochastic_logdet`), combined as
  ``value + (surrogate - surrogate.detach())``. Memory does not grow with the number of
  CG iterations; gradients reach the parameters and the input ``x``.
* ``"auto"``: ``"exact"`` in eval mode (up to ``d = 256``; beyond, the densities are
  estimates and a :class:`~pyro_cpflow.options.StochasticDensityWarning` says so), wherever no
  gradient is taken (scoring samples, up to ``d = 64``) and where it is measured to be no
  slower, else ``"stochastic"`` (:meth:`~pyro_cpflow.options.FlowOptions.resolve_logdet`).

The potential is evaluated once per input: ``f(x)`` keeps the evaluated potential
(a :class:`~pyro_cpflow.derivatives.PotentialTrace`) beside the cached pair, and
``log_abs_det_jacobian(x, y)`` reuses it, as zuko's ``call_and_ladj`` does.

Nothing fails silently: an inverse that misses its tolerance warns or raises by the
``on_failure`` option and is not cached; a stochastic log-det whose CG misses its
tolerance says so (once per setting, the reports keep the rest); and where a
factorisation or a solve fails because the input, the context or the parameters hold NaN
or Inf (possible with Pyro's validation off), the error says that, not something about
positive definiteness or iteration caps.

Following Pyro's pattern, :class:`ConditionedCPFlow` holds the maths for a fixed
potential, context and :class:`~pyro_cpflow.options.FlowOptions` value, :class:`CPFlow`
owns the parameters, and :class:`ConditionalCPFlow` returns a :class:`ConditionedCPFlow`
from ``condition``. Options are read and set as attributes of the owners
(``flow.logdet = "exact"``); the last solver reports are in ``flow.diagnostics``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform

from .checks import check_finite, check_like, check_not_tracing, check_rows, count_nonfinite
from .derivatives import PotentialTrace
from .linalg import CGResult, cholesky_logdet, stochastic_logdet
from .options import EXACT_EVAL_MAX_DIM, FlowOptions, StochasticDensityWarning, add_option_properties
from .potential import ConvexPotential
from .precision import float64_twin
from .pyro_glue import ModuleInverseMixin, VersionedCacheMixin, module_parameters_and_buffers, module_repr
from .reports import Diagnostics, InverseReport, Linearization
from .solvers import gradient_linearization, invert_gradient_map, with_implicit_gradients

__all__ = ["CPFlow", "ConditionalCPFlow", "ConditionedCPFlow"]


class _OptionAttributes:
    """Each :class:`~pyro_cpflow.options.FlowOptions` field as a validated attribute, and the reports."""

    options: FlowOptions
    diagnostics: Diagnostics

    potential: ConvexPotential
    training: bool

    def resolve_logdet(self, dim: int | None = None, batch: int = 1, gradient: bool = True) -> str:
        """The log-det mode used now (train/eval state) for ``batch`` rows of dimension ``dim``
        (by default the flow's own), with or without a ``gradient`` to take."""
        dim = self.potential.input_dim if dim is None else dim
        return self.options.resolve_logdet(dim, batch, self.training, gradient)

    @property
    def last_cg(self) -> CGResult | None:
        """``diagnostics.cg``: the CG statistics of the last stochastic log-det."""
        return self.diagnostics.cg

    @property
    def last_inverse(self) -> InverseReport | None:
        """``diagnostics.inverse``: the report of the last inverse."""
        return self.diagnostics.inverse


add_option_properties(_OptionAttributes, FlowOptions)


def _options_repr(input_dim: int, options: FlowOptions) -> str:
    """``input_dim=..`` and the options that differ from their defaults."""
    fields = {"input_dim": input_dim, **options.changed()}
    return ", ".join(f"{name}={value!r}" for name, value in fields.items())


class ConditionedCPFlow(_OptionAttributes, VersionedCacheMixin, Transform):
    r"""The gradient map :math:`x \mapsto \nabla_x F(x; c)` of a fixed potential and context.

    Inputs may have any leading batch dimensions; the context broadcasts against
    them from the right. Usually obtained from :meth:`ConditionalCPFlow.condition`.

    :param potential: the :class:`~pyro_cpflow.potential.ConvexPotential`.
    :param context: ``(..., context_dim)`` or ``None``.
    :param options: a :class:`~pyro_cpflow.options.FlowOptions` value.
    :param diagnostics: where the solver reports go (shared with the owner).
    :param training: whether the owner is in training mode (for ``logdet="auto"``).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self,
        potential: ConvexPotential,
        context: Tensor | None = None,
        options: FlowOptions | None = None,
        diagnostics: Diagnostics | None = None,
        training: bool = True,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.potential = potential
        self.context = context
        self.options = FlowOptions() if options is None else options
        self.diagnostics = Diagnostics() if diagnostics is None else diagnostics
        self.training = training  # for a CPFlow, nn.Module's own flag (train() / eval() set it)

    @property
    def input_dim(self) -> int:
        return self.potential.input_dim

    def _cache_parameters(self) -> Iterable[Tensor]:
        return module_parameters_and_buffers(self.potential)

    def _cache_key_extra(self) -> tuple:
        options = self.options  # a cached inverse must follow the solver's settings
        return options.inverse_method, options.inverse_tol, options.inverse_max_iter, options.on_failure

    def _needs_graph(self, rows: Tensor, context: Tensor | None) -> bool:
        """Whether the result must be differentiable: grad mode and something requiring grad."""
        if not torch.is_grad_enabled():
            return False
        if rows.requires_grad or (context is not None and context.requires_grad):
            return True
        return any(t.requires_grad for t in module_parameters_and_buffers(self.potential))

    def _flatten(self, x: Tensor, name: str) -> tuple[Tensor, Tensor | None, torch.Size]:
        """Rows ``(N, d)``, matching context rows ``(N, c)`` and the batch shape."""
        check_not_tracing()
        d = self.input_dim
        reference = self.potential.packed
        check_like(x, name, reference)
        check_rows(x, name, d)
        check_finite(x, name)
        context = self.context
        if context is None:
            return x.reshape(-1, d), None, x.shape[:-1]
        check_like(context, "context", reference)
        try:
            batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"context of shape {tuple(context.shape)} does not broadcast with {name} of "
                f"shape {tuple(x.shape)} (batch dimensions are matched from the right)"
            ) from None
        rows = x.expand(*batch, d).reshape(-1, d)
        context_rows = context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])
        return rows, context_rows, batch

    def _evaluate(self, rows: Tensor, context: Tensor | None) -> PotentialTrace:
        """The potential at the rows, with a graph only when the result must be differentiable."""
        if self._needs_graph(rows, context):
            return self.potential.evaluate(rows, context)
        with torch.no_grad():
            return self.potential.evaluate(rows, context)

    def _trace(self, x: Tensor) -> tuple[PotentialTrace, torch.Size]:
        """The evaluated potential at ``x``: the one kept by the last call if it was at ``x``."""
        kept = self._side_lookup(x)
        if kept is not None:
            return kept
        rows, context, batch = self._flatten(x, "x")
        return self._evaluate(rows, context), batch

    def _call(self, x: Tensor) -> Tensor:
        rows, context, batch = self._flatten(x, "x")
        trace = self._evaluate(rows, context)
        self._side_store(x, (trace, batch))
        return trace.gradient.reshape(*batch, self.input_dim)

    def _inverse(self, y: Tensor) -> Tensor:
        rows, context, batch = self._flatten(y, "y")
        x = self._solve(rows, context, self.options.on_failure)
        return x.reshape(*batch, self.input_dim)

    def _solve(self, rows: Tensor, context: Tensor | None, on_failure: str) -> Tensor:
        """The rows of :math:`(\\nabla F)^{-1}`, differentiable where grad mode asks for it;
        the report goes to ``diagnostics.inverse``, and a miss is not cached."""
        options = self.options
        factor = self.potential.factorize()
        x, report = invert_gradient_map(
            self.potential,
            rows,
            initial=self.potential.initial_inverse_guess(rows, factor),
            context=context,
            preconditioner=factor.solve,
            method=options.inverse_method,
            tol=options.inverse_tol,
            max_iter=options.inverse_max_iter,
            on_failure=on_failure,
        )
        self.diagnostics.inverse = report
        if not report.all_converged:
            self._mark_unconverged()
        return x

    # What a stack needs to invert the composition (pyro_cpflow.stack): no graphs, no policy.

    def _solve_inverse(self, y: Tensor) -> tuple[Tensor, InverseReport]:
        """The inverse at ``y`` without gradients or failure policy, and its report."""
        rows, context, batch = self._flatten(y, "y")
        with torch.no_grad():
            x = self._solve(rows, context, "ignore")
        return x.reshape(*batch, self.input_dim), self.diagnostics.inverse  # type: ignore[return-value]

    def _linearize(self, x: Tensor) -> Linearization:
        """The map at ``x`` with products and CG solves (preconditioned by :math:`Q`) with the
        Hessian there, on tensors of shape ``batch + (d,)`` (no graphs)."""
        rows, context, batch = self._flatten(x, "x")
        d = self.input_dim
        with torch.no_grad():
            at = gradient_linearization(
                self.potential.evaluate, rows, context, self.potential.factorize().solve
            )

        def solve(v: Tensor, rtol: Tensor) -> tuple[Tensor, int]:
            with torch.no_grad():
                solution, products = at.solve(v.reshape(-1, d), rtol.reshape(-1))
            return solution.reshape(v.shape), products

        def multiply(v: Tensor) -> Tensor:
            with torch.no_grad():
                return at.multiply(v.reshape(-1, d)).reshape(v.shape)

        return Linearization(at.value.reshape(*batch, d), solve, multiply)

    def _float64_twin(self) -> ConditionedCPFlow:
        """This map in float64, with the same parameter values (:mod:`pyro_cpflow.precision`)."""
        context = None if self.context is None else self.context.double()
        return ConditionedCPFlow(
            float64_twin(self.potential), context, self.options, Diagnostics(), self.training, 0
        )

    def _attach(self, value: Tensor, y: Tensor) -> Tensor:
        """``value``, a detached root of :math:`\\nabla F(x) = y`, carrying the implicit
        gradients to ``y``, the context and the parameters."""
        rows, context, batch = self._flatten(y, "y")
        x = with_implicit_gradients(
            self.potential, value.reshape(-1, self.input_dim), rows, context, self.potential.factorize().solve
        )
        return x.reshape(*batch, self.input_dim)

    def hessian(self, x: Tensor) -> Tensor:
        r"""The Jacobian of the map, :math:`\nabla^2 F(x)`, shape ``batch + (d, d)``.

        Differentiable when grad mode is on and something requires grad.
        """
        trace, batch = self._trace(x)
        return trace.hessian().reshape(*batch, self.input_dim, self.input_dim)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\log\det \nabla^2 F(x)`, shape ``batch``, in the mode the options resolve to."""
        trace, batch = self._trace(x)
        logdet = self._logdet(trace).reshape(batch)
        self._forget_after_backward(logdet, x)
        return logdet

    def _logdet(self, trace: PotentialTrace) -> Tensor:
        options = self.options
        rows = trace.x.shape[0]
        gradient = trace.gradient.requires_grad
        mode = options.resolve_logdet(self.input_dim, rows, self.training, gradient)
        if mode == "exact":
            try:
                return cholesky_logdet(trace.hessian())
            except ValueError:  # not positive definite: only NaN or Inf can do that to F
                self._raise_if_nonfinite(trace.x)
                raise
        if not self.training and options.logdet == "auto":
            self._warn_stochastic_density()
        estimate = stochastic_logdet(
            trace,
            self.potential.factorize(trace.quadratic),
            num_probes=options.num_probes,
            rtol=options.cg_rtol,
            max_iter=options.cg_max_iter,
            check_every=options.cg_check_every,
            gradient=gradient,
        )
        self.diagnostics.cg, self.diagnostics.condition = estimate.cg, estimate.condition
        if options.on_failure != "ignore" and not bool(estimate.cg.converged.all()):
            self._report_cg_miss(trace.x, estimate.cg, estimate.condition)
        return estimate.combined()

    def _warn_stochastic_density(self) -> None:
        if self.diagnostics.first_time(("stochastic density in eval mode", self.input_dim)):
            warnings.warn(
                f"logdet='auto' in eval mode at d={self.input_dim} > {EXACT_EVAL_MAX_DIM}: the exact "
                "log-det would form a d x d Hessian per sample, so log-densities are unbiased "
                "stochastic estimates; set logdet='exact' for exact values (warned once)",
                StochasticDensityWarning,
                stacklevel=5,
            )

    def _nonfinite_inputs(self, rows: Tensor) -> str | None:
        """What holds NaN or Inf among the rows, the context and the parameters, if anything."""
        unchecked = "(Pyro's validation is off, so nothing rejected it earlier)"
        bad = count_nonfinite(rows)
        if bad:
            return f"x contains NaN or Inf in {bad} of {rows.shape[0]} samples {unchecked}"
        if self.context is not None and count_nonfinite(self.context.reshape(1, -1)):
            return f"the context contains NaN or Inf {unchecked}"
        names = [name for name, p in self.potential.named_parameters() if count_nonfinite(p.reshape(1, -1))]
        if names:
            return f"the flow's parameters {names[:4]} contain NaN or Inf"
        return None

    def _raise_if_nonfinite(self, rows: Tensor) -> None:
        culprit = self._nonfinite_inputs(rows)
        if culprit is not None:
            raise ValueError(f"{culprit}: the log-det is undefined")

    def _report_cg_miss(self, rows: Tensor, cg: CGResult, condition: Tensor) -> None:
        options = self.options
        culprit = self._nonfinite_inputs(rows)
        if culprit is not None:
            situation: tuple = ("non-finite log-det input",)
            message = f"{culprit}: the stochastic log-det of those samples is NaN"
        else:
            situation = ("stochastic log-det CG", options.cg_rtol, options.cg_max_iter, options.num_probes)
            message = (
                f"CG of the stochastic log-det missed rtol={options.cg_rtol:g} for "
                f"{int((~cg.converged).sum())} of {cg.converged.numel()} samples (worst residual "
                f"{float(cg.residual_norm.max()):.3e}; condition number of Q^-1 H at least "
                f"{float(condition.max()):.1e}): their log-det values and gradients are "
                f"biased; raise cg_max_iter (now {options.cg_max_iter or 'the default, 2 d'}) or "
                "cg_rtol, or use logdet='exact'"
            )
        self.diagnostics.handle_failure_once(options.on_failure, situation, message, stacklevel=4)

    def with_cache(self, cache_size: int = 1) -> ConditionedCPFlow:
        """``self``, or a parameter-sharing view with another cache size."""
        if cache_size == self._cache_size:
            return self
        return ConditionedCPFlow(
            self.potential, self.context, self.options, self.diagnostics, self.training, cache_size
        )


class CPFlow(ModuleInverseMixin, ConditionedCPFlow, TransformModule):
    r"""Convex potential flow :math:`f = \nabla F`, a Pyro :class:`TransformModule`.

    Forward (sampling direction) is the cheap gradient map; the inverse runs the convex
    solver. ``flow.inv`` is itself an ``nn.Module`` sharing the parameters, so the
    density direction ``TransformedDistribution(base, [flow.inv])`` trains and
    registers with ``pyro.module``. The cache (``cache_size=1``) is invalidated by
    any parameter update.

    :param potential: a :class:`~pyro_cpflow.potential.ConvexPotential` with an ICNN.
    :param options: keyword options of :class:`~pyro_cpflow.options.FlowOptions`; each is
        also an attribute (``flow.logdet = "exact"``), and ``flow.options`` is the value.

    >>> import pyro.distributions as dist
    >>> from pyro_cpflow import cpflow
    >>> flow = cpflow(2, hidden_dims=(16, 16))
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    >>> z = q.rsample((5,))
    >>> q.log_prob(z).shape
    torch.Size([5])
    """

    def __init__(self, potential: ConvexPotential, cache_size: int = 1, **options) -> None:
        super().__init__(potential, None, FlowOptions().replace(**options), None, True, cache_size)

    __repr__ = module_repr

    def extra_repr(self) -> str:
        return _options_repr(self.potential.input_dim, self.options)


class ConditionalCPFlow(_OptionAttributes, ConditionalTransformModule):
    r"""Conditional convex potential flow :math:`x \mapsto \nabla_x F(x; c)`.

    The potential is convex in :math:`x` for every context :math:`c`
    (:class:`~pyro_cpflow.nn.PICNN`). ``condition(c)`` returns a
    :class:`ConditionedCPFlow` bound to ``c``, which broadcasts from the right over
    any leading batch dimensions of the input. ``.inv`` is an ``nn.Module`` sharing
    the parameters. Options as in :class:`CPFlow`.

    >>> import pyro.distributions as dist
    >>> from pyro_cpflow import conditional_cpflow
    >>> flow = conditional_cpflow(2, context_dim=3, hidden_dims=(16, 16))
    >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    >>> q = dist.ConditionalTransformedDistribution(base, [flow]).condition(torch.randn(4, 3))
    >>> q.log_prob(q.rsample()).shape
    torch.Size([4])
    """

    def __init__(self, potential: ConvexPotential, **options) -> None:
        super().__init__()
        self.potential = potential
        self.options = FlowOptions().replace(**options)
        self.diagnostics = Diagnostics()

    def extra_repr(self) -> str:
        return _options_repr(self.potential.input_dim, self.options)

    def condition(self, context: Tensor) -> ConditionedCPFlow:
        check_like(context, "context", self.potential.packed)
        check_rows(context, "context", self.potential.network.context_dim)  # type: ignore[arg-type]
        check_finite(context, "context")
        return ConditionedCPFlow(self.potential, context, self.options, self.diagnostics, self.training)
