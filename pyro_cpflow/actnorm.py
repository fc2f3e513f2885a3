r"""Activation normalisation with data-dependent initialisation (Kingma & Dhariwal, 2018).

:math:`y = (x - \mu) \odot e^{-s}`, elementwise, with :math:`\log|\det J| = -\sum_i s_i`.

**Initialisation.** On its first call, in either direction, :math:`\mu` and :math:`s` are set
from the batch so that the output of that call has zero mean and unit variance per
coordinate. The standard deviation needs two rows: from a single row (the first call of
a Pyro guide, one sample) only the location is set, and the scale stays 1. A batch with
NaN or Inf is rejected *before* anything is set (whatever Pyro's validation setting: a
state derived from it would poison every later call), and a
:class:`~pyro_cpflow.stack.CPFlowStack` call that fails later on forgets the
initialisations it made, so no state derived from a rejected batch survives.

**Which state counts as initialised.** The ``initialized`` buffer (in ``state_dict``), or
parameters set from outside: replaced (as ``pyro.module(..., update_module_params=True)``
does after ``pyro.get_param_store().load``) or changed in place (``copy_``) since
construction. So a trained layer reloaded through Pyro's param store, which holds
parameters but no buffers, is not re-initialised over its loaded values. Once seen to be
initialised, a host-side flag answers, so later calls do not wait for a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from .checks import check_finite, check_like, check_rows, count_nonfinite
from .precision import float64_twin
from .pyro_glue import ModuleInverseMixin, VersionedCacheMixin, module_parameters_and_buffers, module_repr
from .reports import Linearization

__all__ = ["ActNorm"]


class ActNorm(ModuleInverseMixin, VersionedCacheMixin, TransformModule):
    r"""Elementwise affine map :math:`y = (x - \mu) e^{-s}` initialised from the first batch.

    :param input_dim: event dimension.
    :param min_scale: floor on the batch standard deviation used at initialisation.

    >>> norm = ActNorm(2)
    >>> y = norm(3.0 + 5.0 * torch.randn(1000, 2))
    >>> bool((y.mean(0).abs() < 1e-5).all()) and bool(((y.std(0, unbiased=False) - 1).abs() < 1e-5).all())
    True
    >>> single = ActNorm(2)
    >>> single(torch.tensor([[3.0, -1.0]])).tolist(), single.log_scale.tolist()  # one row: location only
    ([[0.0, 0.0]], [0.0, 0.0])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, input_dim: int, min_scale: float = 1e-4, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.input_dim = input_dim
        self.min_scale = min_scale
        self.loc = nn.Parameter(torch.zeros(input_dim))
        self.log_scale = nn.Parameter(torch.zeros(input_dim))
        self.register_buffer("initialized", torch.tensor(False))
        # shared with the views of with_cache: a host-side copy of a True ``initialized``, and
        # the parameters with their versions while unset
        self.__dict__["_init_state"] = {"known": False, "unset": ()}
        self._remember_unset()

    __repr__ = module_repr

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"

    def _remember_unset(self) -> None:
        """Note the parameters as they are: replacing or changing them later means setting them."""
        self._init_state["unset"] = tuple((p, p._version) for p in (self.loc, self.log_scale))

    def _set_from_outside(self) -> bool:
        current = (self.loc, self.log_scale)
        unset = self._init_state["unset"]
        return any(
            p is not old or p._version != version for p, (old, version) in zip(current, unset, strict=True)
        )

    def is_initialized(self) -> bool:
        """Whether the layer is initialised (see the module docstring); marks it so if its
        parameters were set from outside."""
        state = self._init_state
        if not state["known"]:
            if self._set_from_outside():
                with torch.no_grad():
                    self.initialized.fill_(True)
            state["known"] = bool(self.initialized)
        return state["known"]

    def forget_initialization(self) -> None:
        """Back to the state of a new layer: the next call initialises from its batch."""
        with torch.no_grad():
            self.loc.zero_()
            self.log_scale.zero_()
            self.initialized.fill_(False)
        self._init_state["known"] = False
        self._remember_unset()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._init_state["known"] = False  # the loaded flag decides, read on the next call
        self._remember_unset()

    def _cache_parameters(self) -> Iterable[Tensor]:
        return module_parameters_and_buffers(self)

    def _check(self, value: Tensor, name: str) -> None:
        check_like(value, name, self.loc)
        check_rows(value, name, self.input_dim)
        check_finite(value, name)

    def _batch_statistics(self, value: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """Mean and log standard deviation per coordinate (log 1 from a single row)."""
        rows = value.detach().reshape(-1, self.input_dim)
        if rows.shape[0] == 0:
            raise ValueError(f"ActNorm initialises from its first batch, but {name} has no rows")
        bad = count_nonfinite(rows)
        if bad:
            raise ValueError(
                f"ActNorm initialises from its first batch, but {name} contains NaN or Inf in "
                f"{bad} of {rows.shape[0]} rows; nothing was initialised"
            )
        if rows.shape[0] == 1:
            return rows[0], torch.zeros_like(rows[0])
        return rows.mean(0), rows.std(0, unbiased=False).clamp_min(self.min_scale).log()

    def _call(self, x: Tensor) -> Tensor:
        self._check(x, "x")
        if not self.is_initialized():
            mean, log_std = self._batch_statistics(x, "x")
            self._initialize(mean, log_std)
        return (x - self.loc) * torch.exp(-self.log_scale)

    def _inverse(self, y: Tensor) -> Tensor:
        self._check(y, "y")
        if not self.is_initialized():
            # x = y e^{s} + mu is standardised when e^{s} = 1/std(y) and mu = -mean(y)/std(y)
            mean, log_std = self._batch_statistics(y, "y")
            self._initialize(-mean * torch.exp(-log_std), -log_std)
        return y * torch.exp(self.log_scale) + self.loc

    def _initialize(self, loc: Tensor, log_scale: Tensor) -> None:
        with torch.no_grad():
            self.loc.copy_(loc)
            self.log_scale.copy_(log_scale)
            self.initialized.fill_(True)
        self._init_state["known"] = True

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return (-self.log_scale.sum()).expand(x.shape[:-1])

    # What a stack needs to invert the composition (pyro_cpflow.stack)

    def _solve_inverse(self, y: Tensor) -> tuple[Tensor, None]:
        with torch.no_grad():
            return self._inverse(y), None

    def _linearize(self, x: Tensor) -> Linearization:
        """The map at ``x`` with its exact Jacobian :math:`e^{-s}` (no graphs)."""
        with torch.no_grad():
            y = self._call(x)
            scale = torch.exp(self.log_scale)
        return Linearization(y, lambda v, rtol: (v * scale, 0), lambda v: v / scale)

    def _float64_twin(self) -> ActNorm:
        """This layer in float64, with the same parameter values (:mod:`pyro_cpflow.precision`)."""
        return float64_twin(self)  # type: ignore[return-value]

    def _attach(self, value: Tensor, y: Tensor) -> Tensor:
        """``value`` (the inverse at ``y``, detached) with the gradients of the exact inverse."""
        inverse = y * torch.exp(self.log_scale) + self.loc
        return value + (inverse - inverse.detach())

    def with_cache(self, cache_size: int = 1) -> ActNorm:
        """``self``, or a copy sharing parameters and buffers with another cache size."""
        if cache_size == self._cache_size:
            return self
        view = copy.copy(self)  # shares the _parameters and _buffers dictionaries
        view._cache_size = cache_size
        view._cached_x_y = None, None
        view.__dict__.pop("_cached_stamp", None)
        return view
