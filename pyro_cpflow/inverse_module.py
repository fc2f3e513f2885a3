"""Inverses that are modules.

Pyro's generic inverse of a transform (``torch.distributions.transforms._InverseTransform``)
is not an ``nn.Module``: put into a guide or a ``ComposeTransformModule``, the
parameters of the transform it wraps are silently left out of ``parameters()`` and of
``pyro.module``, so they never train. :class:`InverseTransformModule` registers the
wrapped transform as a submodule instead, and :class:`ModuleInverseMixin` makes a
transform's ``inv`` return one.
"""

from __future__ import annotations

from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform

__all__ = ["InverseTransformModule", "ModuleInverseMixin"]


class InverseTransformModule(TransformModule):
    r"""The inverse of a :class:`~pyro.distributions.TransformModule`, itself an ``nn.Module``.

    Pyro's generic inverse is not a module, so its parameters would silently go
    untrained inside a guide or a ``ComposeTransformModule``. This one registers the
    wrapped transform as a submodule and shares its parameters and cache
    (``t.inv.inv is t``). For a CP-Flow its forward runs the convex solver and its
    inverse is the gradient map; use it for the density direction, where training
    evaluates only :math:`\nabla F`:

    >>> import pyro.distributions as dist
    >>> from pyro_cpflow import cpflow
    >>> flow = cpflow(2, hidden_dims=(16, 16))
    >>> p = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow.inv])
    >>> p.log_prob(torch.randn(7, 2)).shape
    torch.Size([7])
    """

    bijective = True

    def __init__(self, transform: TransformModule) -> None:
        super().__init__(cache_size=0)
        self.transform = transform

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return self.transform.codomain

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return self.transform.domain

    @property
    def sign(self) -> int:  # type: ignore[override]
        return self.transform.sign

    @property
    def inv(self) -> TransformModule:
        return self.transform

    def __call__(self, y: Tensor) -> Tensor:
        return self.transform._inv_call(y)

    def _inv_call(self, x: Tensor) -> Tensor:
        return self.transform(x)

    def _call(self, y: Tensor) -> Tensor:
        return self.transform._inverse(y)

    def _inverse(self, x: Tensor) -> Tensor:
        return self.transform._call(x)

    def log_abs_det_jacobian(self, y: Tensor, x: Tensor) -> Tensor:
        return -self.transform.log_abs_det_jacobian(x, y)

    def with_cache(self, cache_size: int = 1) -> Transform:
        return self.transform.with_cache(cache_size).inv

    def clear_cache(self) -> None:
        self.transform.clear_cache()


class ModuleInverseMixin:
    """``inv`` returns one :class:`InverseTransformModule` (kept, but not as a submodule)."""

    @property
    def inv(self) -> InverseTransformModule:
        inverse = self.__dict__.get("_inverse_module")
        if inverse is None:
            inverse = InverseTransformModule(self)  # type: ignore[arg-type]
            self.__dict__["_inverse_module"] = inverse  # not a submodule: no cycle
        return inverse
