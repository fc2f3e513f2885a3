r"""CP-Flow inside zuko: a lazy transform for :class:`zuko.lazy.Flow`.

zuko (François Rozet et al., https://github.com/probabilists/zuko; the flow library that
``pyro.contrib.zuko`` wraps for Pyro) has no convex potential flow. This module makes one
CP-Flow block (Huang, Chen, Tsirigotis & Courville, *Convex potential flows*, ICLR 2021,
arXiv:2012.05942) a zuko lazy transform. It needs the optional extra
``pip install pyro-cpflow[zuko]``; ``import pyro_cpflow`` does not import it.

**Direction.** A zuko :class:`~zuko.lazy.Flow` holds a transform :math:`f` from the data
to the base space and scores a point by

.. math::

    \log p(x \mid c) = \log p_Z\big(f(x; c)\big) + \log\left|\det \frac{\partial f(x; c)}{\partial x}\right|,

and samples by :math:`x = f^{-1}(z; c)`, :math:`z \sim p_Z`. Here :math:`f = \nabla_x F(\cdot\,; c)`,
the gradient map of the strongly convex potential, whose Jacobian is the symmetric
positive-definite Hessian, so :math:`\log|\det \partial f / \partial x| = \log\det
\nabla^2_x F(x; c)`. This is the density direction of the Pyro API
(``TransformedDistribution(base, [flow.inv])``): ``log_prob`` evaluates only :math:`\nabla F`
and its Hessian, and ``sample``/``rsample`` run the convex solver (the per-sample Newton-CG
of :mod:`pyro_cpflow.solvers`), whose result carries implicit gradients to the parameters and
the context. The inverse is exact up to the solver's tolerance, and a sample that misses it
is reported by the flow's ``on_failure`` option, as everywhere in the package.

**Pieces.**

* :class:`ConvexPotentialTransform`: a :class:`torch.distributions.Transform` for one
  conditioned map (a :class:`~pyro_cpflow.transforms.CPFlow`, or what
  :meth:`~pyro_cpflow.transforms.ConditionalCPFlow.condition` returns). Its ``call_and_ladj``,
  the method zuko's distributions call, gets :math:`\nabla F(x)` and :math:`\log\det\nabla^2
  F(x)` from one evaluation of the potential: the flow keeps the evaluated potential of its
  last call for the log-det.
* :class:`ZukoCPFlow`: a :class:`zuko.lazy.LazyTransform` owning the parameters (a
  :func:`~pyro_cpflow.factories.cpflow`, or a
  :func:`~pyro_cpflow.factories.conditional_cpflow` when ``context > 0``); ``forward(c)``
  returns the map conditioned on ``c``.
* :class:`CPF`: a :class:`zuko.lazy.Flow` of such blocks on a standard normal base, in the
  manner of zuko's ``MAF`` and ``NSF``.

Blocks in a list are composed by zuko and inverted one after the other, each to its own
tolerance; :class:`~pyro_cpflow.stack.CPFlowStack`'s end-to-end refinement of the composed
inverse is not used here.

>>> import zuko
>>> from pyro_cpflow.zuko_bridge import ZukoCPFlow
>>> base = zuko.lazy.UnconditionalDistribution(
...     zuko.distributions.DiagNormal, torch.zeros(2), torch.ones(2), buffer=True)
>>> flow = zuko.lazy.Flow(ZukoCPFlow(2, hidden_features=(16, 16)), base)
>>> flow().log_prob(torch.randn(5, 2)).shape  # no solver
torch.Size([5])
>>> flow().sample((3,)).shape  # Newton-CG
torch.Size([3, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

try:
    from zuko.distributions import DiagNormal
    from zuko.lazy import Flow, LazyTransform, UnconditionalDistribution
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        "pyro_cpflow.zuko_bridge needs zuko, which is not installed: pip install pyro-cpflow[zuko]"
    ) from error

from .checks import check_like, check_rows
from .factories import conditional_cpflow, cpflow
from .transforms import ConditionalCPFlow, ConditionedCPFlow, CPFlow

__all__ = ["CPF", "ConvexPotentialTransform", "ZukoCPFlow"]


def _check_count(value: object, name: str, minimum: int) -> int:
    """``value`` as an ``int`` at least ``minimum``, else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


class ConvexPotentialTransform(Transform):
    r"""The CP-Flow map :math:`x \mapsto \nabla_x F(x; c)` as a transform for zuko.

    Forward is the gradient map, the inverse the flow's convex solver,
    ``log_abs_det_jacobian(x, y)`` is :math:`\log\det\nabla^2_x F(x; c)` in the mode of the
    flow's ``logdet`` option (shape ``batch``), and :meth:`call_and_ladj` returns the map and
    the log-det from one evaluation of the potential. Caching is the wrapped flow's (keyed on
    the parameters' versions, so an optimizer step cannot leave it stale); this wrapper keeps
    no cache of its own.

    :param flow: a :class:`~pyro_cpflow.transforms.CPFlow` or a
        :class:`~pyro_cpflow.transforms.ConditionedCPFlow`.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, flow: ConditionedCPFlow) -> None:
        if not isinstance(flow, ConditionedCPFlow):
            raise TypeError(
                "flow must be a CPFlow or a ConditionedCPFlow (ConditionalCPFlow.condition(c)), "
                f"got {type(flow).__name__}"
            )
        super().__init__(cache_size=0)
        self.flow = flow.with_cache(1)  # the log-det reuses the potential kept by the call

    def __repr__(self) -> str:
        context = self.flow.context
        shape = None if context is None else tuple(context.shape)
        return f"{type(self).__name__}(features={self.flow.input_dim}, context={shape})"

    def _call(self, x: Tensor) -> Tensor:
        return self.flow(x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.flow.inv(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.flow.log_abs_det_jacobian(x, y)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\big(\nabla F(x),\ \log\det\nabla^2 F(x)\big)`, the potential evaluated once."""
        y = self.flow(x)
        return y, self.flow.log_abs_det_jacobian(x, y)

    def with_cache(self, cache_size: int = 1) -> ConvexPotentialTransform:
        """``self``: the wrapped flow caches, whatever ``cache_size`` asks of the wrapper."""
        return self


class ZukoCPFlow(LazyTransform):
    r"""One CP-Flow block as a zuko lazy transform: ``forward(c)`` returns
    :math:`x \mapsto \nabla_x F(x; c)` (a :class:`ConvexPotentialTransform`).

    With ``context = 0`` the potential is an (input-augmented) ICNN and ``c`` is ignored, as
    by zuko's unconditional transforms, so the block can sit in a conditional flow. With
    ``context > 0`` it is a PICNN, convex in :math:`x` for every context, and ``c`` of shape
    ``(..., context)`` is required; it broadcasts from the right against the input's batch
    dimensions. The parameters are those of :attr:`flow` (a
    :class:`~pyro_cpflow.transforms.CPFlow` or
    :class:`~pyro_cpflow.transforms.ConditionalCPFlow`), whose attributes set the options
    (``lazy.flow.logdet = "exact"``) and hold the solver reports (``lazy.flow.diagnostics``).

    :param features: the event dimension ``d``.
    :param context: the context dimension (0: unconditional).
    :param hidden_features: the widths of the convex network.
    :param kwargs: the other arguments of :func:`~pyro_cpflow.factories.cpflow` or
        :func:`~pyro_cpflow.factories.conditional_cpflow` (``alpha``, ``logdet``,
        ``inverse_tol``, ...).

    References: Huang et al., *Convex potential flows*, ICLR 2021 (arXiv:2012.05942); zuko,
    https://github.com/probabilists/zuko.

    >>> lazy = ZukoCPFlow(3, context=2, hidden_features=(8, 8))
    >>> transform = lazy(torch.randn(2))
    >>> z, ladj = transform.call_and_ladj(torch.randn(4, 3))
    >>> z.shape, ladj.shape
    (torch.Size([4, 3]), torch.Size([4]))
    """

    def __init__(
        self, features: int, context: int = 0, hidden_features: Sequence[int] = (64, 64), **kwargs
    ) -> None:
        super().__init__()
        _check_count(features, "features", 1)
        _check_count(context, "context", 0)
        hidden = tuple(hidden_features)
        if context:
            self.flow = conditional_cpflow(features, context, hidden_dims=hidden, **kwargs)
        else:
            self.flow = cpflow(features, hidden_dims=hidden, **kwargs)

    @classmethod
    def from_flow(cls, flow: CPFlow | ConditionalCPFlow) -> ZukoCPFlow:
        """A lazy transform around an existing block, sharing its parameters."""
        if not isinstance(flow, (CPFlow, ConditionalCPFlow)):
            raise TypeError(f"flow must be a CPFlow or a ConditionalCPFlow, got {type(flow).__name__}")
        lazy = cls.__new__(cls)
        LazyTransform.__init__(lazy)
        lazy.flow = flow
        return lazy

    @property
    def features(self) -> int:
        return self.flow.potential.input_dim

    @property
    def context(self) -> int:
        """The context dimension, 0 for an unconditional block."""
        if isinstance(self.flow, CPFlow):
            return 0
        return self.flow.potential.network.context_dim

    def extra_repr(self) -> str:
        return f"features={self.features}, context={self.context}"

    def forward(self, c: Tensor | None = None) -> ConvexPotentialTransform:
        """The map conditioned on ``c`` (ignored when ``context = 0``)."""
        flow = self.flow
        if isinstance(flow, CPFlow):
            return ConvexPotentialTransform(flow)
        width = self.context
        if c is None:
            raise ValueError(
                f"c is required: this CP-Flow is conditional on a context of {width} features; "
                f"pass c of shape (..., {width})"
            )
        check_like(c, "c", flow.potential.packed)
        check_rows(c, "c", width)
        return ConvexPotentialTransform(flow.condition(c))


class CPF(Flow):
    r"""A convex potential flow in zuko: ``transforms`` :class:`ZukoCPFlow` blocks on a
    standard normal base, like zuko's ``MAF`` or ``NSF``.

    One block is already a universal density model (Huang et al. 2021, arXiv:2012.05942);
    further blocks compose, each inverted on its own.

    :param features: the event dimension ``d``.
    :param context: the context dimension (0: unconditional).
    :param transforms: the number of blocks.
    :param kwargs: passed to each :class:`ZukoCPFlow`.

    >>> flow = CPF(2, context=3, hidden_features=(8, 8))
    >>> c = torch.randn(4, 3)
    >>> flow(c).log_prob(torch.randn(4, 2)).shape
    torch.Size([4])
    """

    def __init__(self, features: int, context: int = 0, transforms: int = 1, **kwargs) -> None:
        _check_count(transforms, "transforms", 1)
        blocks = [ZukoCPFlow(features, context, **kwargs) for _ in range(transforms)]
        base = UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)
        super().__init__(blocks, base)
