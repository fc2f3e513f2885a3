"""The numerical options of a CP-Flow (and of a stack of them) as frozen values, and the failure policy.

>>> options = FlowOptions(logdet="stochastic")
>>> options.replace(cg_rtol=1e-8).cg_rtol
1e-08
>>> FlowOptions(on_failure="sometimes")
Traceback (most recent call last):
...
ValueError: on_failure must be one of ('warn', 'raise', 'ignore'), got 'sometimes'
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAILURE_POLICIES",
    "FlowOptions",
    "INVERSE_METHODS",
    "LOGDET_MODES",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "StackOptions",
    "StochasticDensityWarning",
    "add_option_properties",
    "exact_is_cheaper",
    "handle_failure",
]

LOGDET_MODES = ("exact", "stochastic", "auto")
INVERSE_METHODS = ("newton-cg", "lbfgs")
FAILURE_POLICIES = ("warn", "raise", "ignore")

EXACT_MAX_DIM_BY_BATCH = ((1, 64), (4, 48), (8, 32), (16, 16), (32, 12), (None, 8))
"""``logdet="auto"`` while training: ``(largest batch, largest d for exact)`` pairs, in order.

From ``experiments/benchmarks/engine.py``, table (g): the time of a training step with the
exact log-det over that with the stochastic one, per batch size (1 to 256 rows, the sizes
of SVI particles and of minibatches) and dimension (2 to 64), ICNN (64, 64), float64, one
thread, at initialisation, re-measured after the Hessian began to form the terms of the rows
all samples share at once (two runs of 2026-12-03, ``results/engine_row_gram.md`` and
``results/engine_threshold_row_gram.md``). Exact was not slower up to these dimensions in
both runs (the smaller value where they disagreed); beyond d = 64 it was not measured."""


EXACT_SCORING_MAX_DIM = 64
"""``logdet="auto"`` in training mode when no gradient is taken (scoring samples, importance
weights): exact up to this dimension, whatever the batch."""

EXACT_EVAL_MAX_DIM = 256
"""``logdet="auto"`` in eval mode: exact up to this dimension, so that a density a user reads
is exact. Beyond it the exact mode's memory (``N d^2`` for the Hessians, ``N d h`` per hidden
layer of width ``h`` for the forward Jacobians: 16 MB a row for a 32-channel convolution at
d = 256) would not fit a batch, so the mode is stochastic and the flow says once that its
densities are estimates (:class:`StochasticDensityWarning`); set ``logdet="exact"`` to
insist."""


def exact_is_cheaper(dim: int, batch: int) -> bool:
    """Whether the exact log-det step is measured to be no slower than the stochastic one."""
    for largest_batch, largest_dim in EXACT_MAX_DIM_BY_BATCH:
        if largest_batch is None or batch <= largest_batch:
            return dim <= largest_dim
    return False  # pragma: no cover (the table ends with None)


class StochasticDensityWarning(UserWarning):
    """A flow in eval mode with ``logdet="auto"`` above :data:`EXACT_EVAL_MAX_DIM`: its
    log-densities are unbiased stochastic estimates, not exact values."""


class NonConvergenceWarning(RuntimeWarning):
    """A solver stopped before reaching its tolerance."""


class NonConvergenceError(RuntimeError):
    """A solver stopped before reaching its tolerance (``on_failure="raise"``)."""


def handle_failure(policy: str, message: str, stacklevel: int = 3) -> None:
    """Apply ``policy`` to a solver miss: warn (:class:`NonConvergenceWarning`), raise or ignore."""
    if policy == "raise":
        raise NonConvergenceError(message)
    if policy == "warn":
        warnings.warn(message, NonConvergenceWarning, stacklevel=stacklevel + 1)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class FlowOptions:
    """Numerical options of :class:`~pyro_cpflow.CPFlow` and :class:`~pyro_cpflow.ConditionalCPFlow`.

    :param logdet: ``"exact"`` (dense Hessian, Cholesky), ``"stochastic"`` (one
        preconditioned CG solve per probe gives the value and the gradient) or ``"auto"``:
        exact in eval mode up to :data:`EXACT_EVAL_MAX_DIM` (beyond it stochastic, with a
        :class:`StochasticDensityWarning`), wherever no gradient is taken up to
        :data:`EXACT_SCORING_MAX_DIM` (scoring samples), and while training wherever it is
        measured to be no slower (:func:`exact_is_cheaper`, by dimension and batch size) or
        ``d <= exact_max_dim``.
    :param exact_max_dim: if set, replaces the measured rule of ``"auto"`` while training.
    :param num_probes: Rademacher probes of the stochastic log-det.
    :param cg_rtol: relative tolerance of its CG solves; the value's quadrature error and
        the gradient's bias both vanish as CG converges.
    :param cg_max_iter: iteration cap of those solves (default ``2 d``).
    :param cg_check_every: how often CG tests whether every sample has converged, a
        host synchronisation on a GPU (see :func:`~pyro_cpflow.linalg.conjugate_gradient`).
        ``0`` with a small ``cg_max_iter`` and ``on_failure="ignore"`` gives a training
        step that never waits for the device; read ``flow.diagnostics.cg`` when logging.
    :param inverse_method: ``"newton-cg"`` or ``"lbfgs"``.
    :param inverse_tol: relative tolerance of the inverse: a sample has converged once
        :math:`|\\nabla F(x) - y|_\\infty \\le` ``inverse_tol`` :math:`\\cdot \\max(1,
        |y|_\\infty)`. Default by dtype (:func:`~pyro_cpflow.reports.default_tolerance`):
        ``1e-12`` in float64, ``1e-5`` in float32, about 4500 and 80 times the machine
        epsilon, above the rounding of one evaluation of :math:`\\nabla F` unless its terms
        cancel by orders of magnitude. The final residual of a float32 inverse is computed in
        float64 (:mod:`pyro_cpflow.precision`), and a sample whose residual is below its own
        rounding error is reported, not passed (:mod:`pyro_cpflow.reports`).
    :param inverse_max_iter: iteration cap of the inverse solver.
    :param on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when a solver misses its
        tolerance.
    """

    logdet: str = "auto"
    exact_max_dim: int | None = None
    num_probes: int = 1
    cg_rtol: float = 1e-6
    cg_max_iter: int | None = None
    cg_check_every: int = 1
    inverse_method: str = "newton-cg"
    inverse_tol: float | None = None
    inverse_max_iter: int = 100
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        _check_choice("logdet", self.logdet, LOGDET_MODES)
        _check_choice("inverse_method", self.inverse_method, INVERSE_METHODS)
        _check_choice("on_failure", self.on_failure, FAILURE_POLICIES)
        if self.num_probes < 1:
            raise ValueError(f"num_probes must be positive, got {self.num_probes}")
        if self.cg_check_every < 0:
            raise ValueError(f"cg_check_every must be >= 0, got {self.cg_check_every}")
        if not self.cg_rtol >= 0:
            raise ValueError(f"cg_rtol must be >= 0, got {self.cg_rtol}")
        if self.cg_max_iter is not None and self.cg_max_iter < 1:
            raise ValueError(f"cg_max_iter must be positive, got {self.cg_max_iter}")
        if self.inverse_tol is not None and not self.inverse_tol > 0:
            raise ValueError(f"inverse_tol must be positive, got {self.inverse_tol}")
        if self.inverse_max_iter < 1:
            raise ValueError(f"inverse_max_iter must be positive, got {self.inverse_max_iter}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def changed(self) -> dict[str, Any]:
        """The fields that differ from their defaults (for ``repr``)."""
        default = FlowOptions()
        values = {name: getattr(self, name) for name in self.names()}
        return {name: value for name, value in values.items() if value != getattr(default, name)}

    def replace(self, **changes) -> FlowOptions:
        """A copy with ``changes`` applied (and validated)."""
        return _replace(self, changes, "CP-Flow")

    def resolve_logdet(self, dim: int, batch: int, training: bool, gradient: bool = True) -> str:
        """The log-det mode used for ``batch`` rows of dimension ``dim`` in this train/eval
        state, with or without a ``gradient`` to take."""
        if self.logdet != "auto":
            return self.logdet
        if not training:
            return "exact" if dim <= EXACT_EVAL_MAX_DIM else "stochastic"
        if not gradient and dim <= EXACT_SCORING_MAX_DIM:
            return "exact"
        if self.exact_max_dim is not None:
            return "exact" if dim <= self.exact_max_dim else "stochastic"
        return "exact" if exact_is_cheaper(dim, batch) else "stochastic"


@dataclass(frozen=True)
class StackOptions:
    """Options of the inverse of a :class:`~pyro_cpflow.stack.CPFlowStack` as a whole.

    The blocks are first inverted one by one, each with its own options; then Newton
    steps on the whole composition :math:`S = s_K \\circ \\dots \\circ s_1` bring the
    end-to-end residual under the tolerance (see :mod:`pyro_cpflow.stack`).

    :param inverse_tol: relative tolerance on :math:`|S(x) - y|_\\infty \\le` ``inverse_tol``
        :math:`\\cdot \\max(1, |y|_\\infty)` (default by dtype, as for one block).
    :param refine_max_iter: Newton steps on the composition after the block-by-block inverse.
    :param on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when a sample misses the
        end-to-end tolerance (the blocks' own policies do not apply inside a stack).

    >>> StackOptions(refine_max_iter=0)
    Traceback (most recent call last):
    ...
    ValueError: refine_max_iter must be >= 1, got 0
    """

    inverse_tol: float | None = None
    refine_max_iter: int = 10
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        _check_choice("on_failure", self.on_failure, FAILURE_POLICIES)
        if self.inverse_tol is not None and not self.inverse_tol > 0:
            raise ValueError(f"inverse_tol must be positive, got {self.inverse_tol}")
        if self.refine_max_iter < 1:
            raise ValueError(f"refine_max_iter must be >= 1, got {self.refine_max_iter}")

    def replace(self, **changes) -> StackOptions:
        """A copy with ``changes`` applied (and validated)."""
        return _replace(self, changes, "stack")


def _replace(options, changes: dict, kind: str):  # type: ignore[no-untyped-def]
    names = [field.name for field in dataclasses.fields(options)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise TypeError(f"unknown {kind} option(s) {unknown}; the options are {names}")
    return dataclasses.replace(options, **changes)


def add_option_properties(cls: type, options_type: type) -> type:
    """Give ``cls`` one validated attribute per field of ``options_type``, read from and
    written to ``self.options`` (a frozen value, replaced on every change)."""

    def option(name: str) -> property:
        def get(self):  # type: ignore[no-untyped-def]
            return getattr(self.options, name)

        def set_(self, value) -> None:  # type: ignore[no-untyped-def]
            self.options = self.options.replace(**{name: value})

        return property(get, set_, doc=f"The ``{name}`` option (see :class:`{options_type.__name__}`).")

    for field in dataclasses.fields(options_type):
        setattr(cls, field.name, option(field.name))
    return cls
