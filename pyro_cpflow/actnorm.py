r"""Activation normalisation with data-dependent initialisation (Kingma & Dhariwal, 2018).

:math:`y = (x - \mu) \odot e^{-s}`, elementwise, with :math:`\log|\det J| = -\sum_i s_i`.
On its first call, in either direction, :math:`\mu` and :math:`s` are set from the
batch so that the output of that call has zero mean and unit variance per
coordinate. The ``initialized`` flag is a buffer, so it survives ``state_dict``; once it
has been seen to be set, a host-side copy answers, so later calls do not wait for a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from .pyro_glue import ModuleInverseMixin, VersionedCacheMixin, module_parameters_and_buffers

__all__ = ["ActNorm"]


class ActNorm(ModuleInverseMixin, VersionedCacheMixin, TransformModule):
    r"""Elementwise affine map :math:`y = (x - \mu) e^{-s}` initialised from the first batch.

    :param input_dim: event dimension.
    :param min_scale: floor on the batch standard deviation used at initialisation.

    >>> norm = ActNorm(2)
    >>> y = norm(3.0 + 5.0 * torch.randn(1000, 2))
    >>> bool((y.mean(0).abs() < 1e-5).all()) and bool(((y.std(0, unbiased=False) - 1).abs() < 1e-5).all())
    True
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
        self._known_initialized = False  # host-side copy of a True ``initialized``

    def _is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # the loaded flag is read on the next call

    def _cache_parameters(self) -> Iterable[Tensor]:
        return module_parameters_and_buffers(self)

    def _check(self, value: Tensor) -> None:
        if value.dim() < 1 or value.shape[-1] != self.input_dim:
            raise ValueError(f"expected shape (..., {self.input_dim}), got {tuple(value.shape)}")

    def _batch_statistics(self, value: Tensor) -> tuple[Tensor, Tensor]:
        rows = value.detach().reshape(-1, self.input_dim)
        if rows.shape[0] < 2:
            raise ValueError("ActNorm initialises from a batch: its first call needs >= 2 samples")
        return rows.mean(0), rows.std(0, unbiased=False).clamp_min(self.min_scale).log()

    def _call(self, x: Tensor) -> Tensor:
        self._check(x)
        if not self._is_initialized():
            mean, log_std = self._batch_statistics(x)
            with torch.no_grad():
                self.loc.copy_(mean)
                self.log_scale.copy_(log_std)
                self.initialized.fill_(True)
        return (x - self.loc) * torch.exp(-self.log_scale)

    def _inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        if not self._is_initialized():
            # x = y e^{s} + mu is standardised when e^{s} = 1/std(y) and mu = -mean(y)/std(y)
            mean, log_std = self._batch_statistics(y)
            with torch.no_grad():
                self.log_scale.copy_(-log_std)
                self.loc.copy_(-mean * torch.exp(-log_std))
                self.initialized.fill_(True)
        return y * torch.exp(self.log_scale) + self.loc

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return (-self.log_scale.sum()).expand(x.shape[:-1])

    def with_cache(self, cache_size: int = 1) -> "ActNorm":
        """``self``, or a copy sharing parameters and buffers with another cache size."""
        if cache_size == self._cache_size:
            return self
        view = copy.copy(self)  # shares the _parameters and _buffers dictionaries
        view._cache_size = cache_size
        view._cached_x_y = None, None
        view.__dict__.pop("_cached_stamp", None)
        return view
