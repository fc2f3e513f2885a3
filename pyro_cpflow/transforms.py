r"""CP-Flow as Pyro transforms.

A convex potential flow is the gradient map :math:`f = \nabla F` of a strongly
convex potential (:class:`~pyro_cpflow.potential.ConvexPotential`). The forward
direction ``f(x)`` is one gradient evaluation; the inverse solves a convex problem
(:mod:`pyro_cpflow.inverse`). The Jacobian is the Hessian :math:`H = \nabla^2 F
\succ 0`, so :math:`\log|\det J_f(x)| = \log\det H(x)`, computed in one of three modes:

* ``"exact"``: the dense Hessian from ``d`` Hessian-vector products and a Cholesky
  factorisation; exact value and gradient.
* ``"stochastic"``: the value is a stochastic Lanczos quadrature estimate (detached)
  and the gradient comes from the conjugate-gradient surrogate
  :math:`v^\top H^{-1}(\partial H) v`, combined as
  ``value + (surrogate - surrogate.detach())``. Memory does not grow with the number
  of CG iterations; gradients reach the parameters and the input ``x``.
* ``"auto"``: ``"exact"`` in eval mode or when ``d <= exact_max_dim``, else
  ``"stochastic"``.

Following Pyro's pattern, :class:`ConditionedCPFlow` holds the maths for a fixed
potential (and context), :class:`CPFlow` owns the parameters, and
:class:`ConditionalCPFlow` returns a :class:`ConditionedCPFlow` from ``condition``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from pyro.distributions import constraints, is_validation_enabled
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import Tensor
from torch.distributions import Transform

from .caching import VersionedCacheMixin, module_parameters_and_buffers
from .inverse_module import ModuleInverseMixin
from .inverse import (
    INVERSE_METHODS,
    InverseReport,
    NonConvergenceError,
    NonConvergenceWarning,
    invert_gradient_map,
)
from .linalg import (
    CGResult,
    cholesky_logdet,
    dense_hessian,
    hessian_vector_product,
    logdet_gradient_surrogate,
    stochastic_logdet,
)
from .potential import ConvexPotential

__all__ = [
    "CPFlow",
    "ConditionalCPFlow",
    "ConditionedCPFlow",
    "FlowOptions",
    "CPFlowStack",
    "LOGDET_MODES",
    "DEFAULT_EXACT_MAX_DIM",
]

LOGDET_MODES = ("exact", "stochastic", "auto")

DEFAULT_EXACT_MAX_DIM = 16
"""Largest dimension for which ``logdet="auto"`` uses the exact log-det while training.

Chosen from ``experiments/benchmarks/logdet_step.py`` (see the README)."""


def check_finite(value: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``value`` holds NaN or Inf, while Pyro's validation is on.

    The check reads a flag on the host (a synchronisation on a GPU), so like Pyro's own
    argument checks it follows ``pyro.enable_validation`` (on by default).
    """
    if is_validation_enabled() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")


class FlowOptions:
    """Numerical options shared by :class:`CPFlow` and :class:`ConditionalCPFlow`.

    :param logdet: ``"exact"``, ``"stochastic"`` or ``"auto"``.
    :param exact_max_dim: threshold of ``"auto"``.
    :param num_probes: Rademacher probes for the stochastic value and gradient.
    :param lanczos_steps: Lanczos iterations of the stochastic log-det value.
    :param cg_rtol: relative tolerance of the CG solves of the stochastic gradient.
    :param cg_max_iter: iteration cap of those solves (default ``2 d``).
    :param cg_check_every: how often CG tests whether every sample has converged, a
        host synchronisation on a GPU (see :func:`~pyro_cpflow.linalg.conjugate_gradient`).
        ``0`` with a small ``cg_max_iter`` and ``on_failure="ignore"`` gives a training
        step that never waits for the device; read ``last_cg`` when logging instead.
    :param inverse_method: ``"newton-cg"`` or ``"lbfgs"``.
    :param inverse_tol: tolerance on :math:`|\\nabla F(x) - y|_\\infty` (default by dtype).
    :param inverse_max_iter: iteration cap of the inverse solver.
    :param on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when a solver misses its
        tolerance.

    After each call, ``last_cg`` (:class:`~pyro_cpflow.linalg.CGResult` of the
    stochastic gradient) and ``last_inverse``
    (:class:`~pyro_cpflow.inverse.InverseReport`) hold the solvers' statistics.
    """

    training: bool

    def _set_options(
        self,
        logdet: str = "auto",
        exact_max_dim: int = DEFAULT_EXACT_MAX_DIM,
        num_probes: int = 1,
        lanczos_steps: int = 10,
        cg_rtol: float = 1e-6,
        cg_max_iter: int | None = None,
        cg_check_every: int = 1,
        inverse_method: str = "newton-cg",
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
        on_failure: str = "warn",
    ) -> None:
        if num_probes < 1 or lanczos_steps < 1:
            raise ValueError("num_probes and lanczos_steps must be positive")
        if cg_check_every < 0:
            raise ValueError(f"cg_check_every must be >= 0, got {cg_check_every}")
        if on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
        if inverse_method not in INVERSE_METHODS:
            raise ValueError(f"inverse_method must be one of {INVERSE_METHODS}, got {inverse_method!r}")
        self.logdet = logdet
        self.exact_max_dim = exact_max_dim
        self.num_probes = num_probes
        self.lanczos_steps = lanczos_steps
        self.cg_rtol = cg_rtol
        self.cg_max_iter = cg_max_iter
        self.cg_check_every = cg_check_every
        self.inverse_method = inverse_method
        self.inverse_tol = inverse_tol
        self.inverse_max_iter = inverse_max_iter
        self.on_failure = on_failure
        self.last_cg: CGResult | None = None
        self.last_inverse: InverseReport | None = None

    @property
    def logdet(self) -> str:
        return self._logdet_mode

    @logdet.setter
    def logdet(self, mode: str) -> None:
        if mode not in LOGDET_MODES:
            raise ValueError(f"logdet must be one of {LOGDET_MODES}, got {mode!r}")
        self._logdet_mode = mode

    def resolve_logdet(self, dim: int | None = None) -> str:
        """The mode used now (train/eval state) for dimension ``dim``, by default the flow's own."""
        if self.logdet != "auto":
            return self.logdet
        if dim is None:
            dim = self.potential.input_dim  # type: ignore[attr-defined]
        return "exact" if (not self.training or dim <= self.exact_max_dim) else "stochastic"

    def _warn_cg(self, result: CGResult) -> None:
        if self.on_failure == "ignore" or bool(result.converged.all()):
            return
        message = (
            f"CG of the stochastic log-det gradient missed rtol={self.cg_rtol:g} for "
            f"{int((~result.converged).sum())} samples (worst residual "
            f"{float(result.residual_norm.max()):.3e}); raise cg_max_iter"
        )
        if self.on_failure == "raise":
            raise NonConvergenceError(message)
        warnings.warn(message, NonConvergenceWarning, stacklevel=4)


class ConditionedCPFlow(VersionedCacheMixin, Transform):
    r"""The gradient map :math:`x \mapsto \nabla_x F(x; c)` of a fixed potential and context.

    Inputs may have any leading batch dimensions; the context broadcasts against
    them from the right. Usually obtained from :meth:`ConditionalCPFlow.condition`.

    :param potential: the :class:`~pyro_cpflow.potential.ConvexPotential`.
    :param context: ``(..., context_dim)`` or ``None``.
    :param options: the :class:`FlowOptions` owner (its options, train/eval state and
        parameters are used).
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
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.potential = potential
        self.context = context
        self._options = options

    @property
    def options(self) -> FlowOptions:
        return self if self._options is None else self._options  # type: ignore[return-value]

    @property
    def input_dim(self) -> int:
        return self.potential.input_dim

    def _cache_parameters(self) -> Iterable[Tensor]:
        return module_parameters_and_buffers(self.potential)

    def _cache_key_extra(self) -> tuple:
        options = self.options  # a cached inverse must follow the solver's settings
        return options.inverse_method, options.inverse_tol, options.inverse_max_iter

    def _needs_graph(self, rows: Tensor, context: Tensor | None) -> bool:
        """Whether the result must be differentiable: grad mode and something requiring grad."""
        if not torch.is_grad_enabled():
            return False
        if rows.requires_grad or (context is not None and context.requires_grad):
            return True
        return any(p.requires_grad for p in self.potential.parameters())

    def _flatten(self, x: Tensor, name: str) -> tuple[Tensor, Tensor | None, torch.Size]:
        """Rows ``(N, d)``, matching context rows ``(N, c)`` and the batch shape."""
        d = self.input_dim
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != d:
            raise ValueError(f"{name} must have shape (..., {d}), got {tuple(x.shape)}")
        reference = self.potential.factor
        if x.dtype != reference.dtype or x.device != reference.device:
            raise ValueError(
                f"{name} has dtype {x.dtype} on {x.device} but the flow's parameters have "
                f"dtype {reference.dtype} on {reference.device}; convert one of them"
            )
        check_finite(x, name)
        context = self.context
        if context is None:
            return x.reshape(-1, d), None, x.shape[:-1]
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

    def _call(self, x: Tensor) -> Tensor:
        rows, context, batch = self._flatten(x, "x")
        y = self.potential.gradient(rows, context, create_graph=self._needs_graph(rows, context))
        return y.reshape(*batch, self.input_dim)

    def _inverse(self, y: Tensor) -> Tensor:
        rows, context, batch = self._flatten(y, "y")
        options = self.options
        x, report = invert_gradient_map(
            self.potential,
            rows,
            initial=self.potential.initial_inverse_guess(rows),
            context=context,
            preconditioner=self.potential.quadratic_preconditioner(),
            method=options.inverse_method,
            tol=options.inverse_tol,
            max_iter=options.inverse_max_iter,
            on_failure=options.on_failure,
        )
        options.last_inverse = report
        return x.reshape(*batch, self.input_dim)

    def _gradient_graph(self, rows: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(leaf, grad F(leaf))`` with a graph for Hessian-vector products in ``leaf``."""
        with torch.enable_grad():
            leaf = rows if rows.requires_grad else rows.detach().requires_grad_(True)
            return leaf, self.potential.gradient(leaf, context, create_graph=True)

    def hessian(self, x: Tensor) -> Tensor:
        r"""The Jacobian of the map, :math:`\nabla^2 F(x)`, shape ``batch + (d, d)``.

        Differentiable when grad mode is on and something requires grad.
        """
        rows, context, batch = self._flatten(x, "x")
        leaf, grad = self._gradient_graph(rows, context)
        hessian = dense_hessian(grad, leaf, create_graph=self._needs_graph(rows, context))
        return hessian.reshape(*batch, self.input_dim, self.input_dim)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\log\det \nabla^2 F(x)`, shape ``batch``, by the mode of ``options``."""
        if self.options.resolve_logdet(self.input_dim) == "exact":
            return cholesky_logdet(self.hessian(x))
        rows, context, batch = self._flatten(x, "x")
        track = self._needs_graph(rows, context)  # decided outside enable_grad below
        leaf, grad = self._gradient_graph(rows, context)
        with torch.enable_grad():
            logdet = self._stochastic_logdet(grad, leaf, track)
        return logdet.reshape(batch)

    def _stochastic_logdet(self, grad: Tensor, leaf: Tensor, track: bool) -> Tensor:
        options = self.options

        def matvec(v: Tensor) -> Tensor:
            return hessian_vector_product(grad, leaf, v)

        value = stochastic_logdet(matvec, leaf, options.num_probes, options.lanczos_steps)
        if not track:
            return value
        surrogate, cg = logdet_gradient_surrogate(
            matvec,
            lambda v: hessian_vector_product(grad, leaf, v, create_graph=True),
            leaf,
            num_probes=options.num_probes,
            rtol=options.cg_rtol,
            max_iter=options.cg_max_iter,
            preconditioner=self.potential.quadratic_preconditioner(),
            check_every=options.cg_check_every,
        )
        options.last_cg = cg
        options._warn_cg(cg)
        return value + (surrogate - surrogate.detach())

    def with_cache(self, cache_size: int = 1) -> "ConditionedCPFlow":
        if cache_size == self._cache_size:
            return self
        return ConditionedCPFlow(self.potential, self.context, self.options, cache_size)


class CPFlowStack(ComposeTransformModule):
    """A ``ComposeTransformModule`` whose ``inv`` is one too (see :func:`~pyro_cpflow.cpflow_stack`).

    The inverse composes the parts' inverses in reverse order; with parts whose ``inv``
    is an ``nn.Module`` it registers every parameter, and ``stack.inv.inv is stack``.
    """

    @property
    def inv(self) -> "CPFlowStack":
        inverse = self.__dict__.get("_inverse_module")
        if inverse is None:
            inverse = CPFlowStack([part.inv for part in reversed(self.parts)], self._cache_size)
            inverse.__dict__["_inverse_module"] = self  # kept outside the module tree: no cycle
            self.__dict__["_inverse_module"] = inverse
        return inverse

    def with_cache(self, cache_size: int = 1) -> "CPFlowStack":
        if cache_size == self._cache_size:
            return self
        return CPFlowStack(self.parts, cache_size=cache_size)


class CPFlow(ModuleInverseMixin, ConditionedCPFlow, TransformModule, FlowOptions):
    r"""Convex potential flow :math:`f = \nabla F`, a Pyro :class:`TransformModule`.

    Forward (sampling direction) is the cheap gradient map; the inverse runs the convex
    solver. ``flow.inv`` is itself an ``nn.Module`` sharing the parameters, so the
    density direction ``TransformedDistribution(base, [flow.inv])`` trains and
    registers with ``pyro.module``. The cache (``cache_size=1``) is invalidated by
    any parameter update. See :class:`FlowOptions` for the keyword options.

    :param potential: a :class:`~pyro_cpflow.potential.ConvexPotential` with an ICNN.

    >>> import pyro.distributions as dist
    >>> from pyro_cpflow import cpflow
    >>> flow = cpflow(2, hidden_dims=(16, 16))
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    >>> z = q.rsample((5,))
    >>> q.log_prob(z).shape
    torch.Size([5])
    """

    def __init__(self, potential: ConvexPotential, cache_size: int = 1, **options) -> None:
        super().__init__(potential, None, None, cache_size)
        self._set_options(**options)

    def with_cache(self, cache_size: int = 1) -> ConditionedCPFlow:
        """``self``, or a parameter-sharing view with another cache size."""
        if cache_size == self._cache_size:
            return self
        return ConditionedCPFlow(self.potential, None, self, cache_size)


class ConditionalCPFlow(ConditionalTransformModule, FlowOptions):
    r"""Conditional convex potential flow :math:`x \mapsto \nabla_x F(x; c)`.

    The potential is convex in :math:`x` for every context :math:`c`
    (:class:`~pyro_cpflow.nn.PICNN`). ``condition(c)`` returns a
    :class:`ConditionedCPFlow` bound to ``c``, which broadcasts from the right over
    any leading batch dimensions of the input. ``.inv`` is an ``nn.Module`` sharing
    the parameters. Options as in :class:`FlowOptions`.

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
        self._set_options(**options)

    def condition(self, context: Tensor) -> ConditionedCPFlow:
        expected = getattr(self.potential.network, "context_dim", None)
        if not isinstance(context, Tensor) or context.dim() < 1 or context.shape[-1] != expected:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must have shape (..., {expected}), got {shape}")
        check_finite(context, "context")
        return ConditionedCPFlow(self.potential, context, self, cache_size=1)
