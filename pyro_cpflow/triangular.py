r"""Block-triangular CP-Flows: each group of coordinates a CP-Flow conditioned on the groups before it.

Split :math:`x = (x_1, \dots, x_K)` into groups of sizes :math:`d_1, \dots, d_K`. The map

.. math::

    y_1 = \nabla_{x_1} F_1(x_1), \qquad
    y_k = \nabla_{x_k} F_k(x_k;\, y_1, \dots, y_{k-1}) \quad (k \ge 2),

has the first group's block a CP-Flow and each later one a conditional CP-Flow (a potential
convex in :math:`x_k` for every context, :class:`~pyro_cpflow.nn.PICNN`) whose context is the
*output* of the groups before it. Its Jacobian is block lower triangular with the Hessians
:math:`\nabla^2_{x_k} F_k \succ 0` on the diagonal, so the map is invertible and

.. math::

    \log\det \frac{\partial y}{\partial x} = \sum_k \log\det \nabla^2_{x_k} F_k(x_k; y_{<k}).

The inverse runs group by group: :math:`y_{<k}` is given, so each group is one convex solve
with a known context, and the residual of one group never reaches another.

**Why.** One gradient map of a convex potential cannot scale some coordinates by a factor that
depends on others, :math:`\theta \mapsto s(u)\,\theta`, without also stretching :math:`u`
(its Hessian would need :math:`\partial^2 F/\partial u^2 \ge s'(u)^2 \theta^2 / s(u)`; see
``experiments/RESULTS.md``, "Funnel: capacity or optimisation"). That is the shape of a
hierarchical posterior, the local effects scaled by the group scale :math:`\tau`. Here the
local group's potential takes :math:`u` as a context, with no convexity in :math:`u` asked for:
with a context diagonal :math:`\tfrac12 x^\top D(y_{<k})\, x`
(:class:`~pyro_cpflow.potential.ContextQuadratic`) the map contains
:math:`\theta = b(u) + D(u)\,\varepsilon` exactly, the conditional Gaussian of a funnel. It is
the block-autoregressive structure of an IAF (Kingma et al., NeurIPS 2016) with CP-Flow blocks.

References: Huang et al., *Convex potential flows*, ICLR 2021 (the conditional CP-Flow);
Kingma et al., *Improved variational inference with inverse autoregressive flow*, NeurIPS 2016.

>>> from pyro_cpflow import block_triangular_cpflow
>>> flow = block_triangular_cpflow([2, 3], hidden_dims=(8, 8))
>>> x = torch.randn(4, 5)
>>> y = flow(x)
>>> torch.allclose(flow.inv(y), x, atol=1e-6)
True
>>> flow.log_abs_det_jacobian(x, y).shape
torch.Size([4])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform

from .checks import check_rows
from .pyro_glue import ModuleInverseMixin, VersionedCacheMixin, module_parameters_and_buffers, module_repr
from .transforms import ConditionalCPFlow, CPFlow

__all__ = ["BlockTriangularCPFlow"]


class BlockTriangularCPFlow(ModuleInverseMixin, VersionedCacheMixin, TransformModule):
    r"""The block-triangular map of the module docstring, a Pyro :class:`TransformModule`.

    :param first: the CP-Flow of the first group.
    :param rest: the conditional CP-Flows of the later groups, the :math:`k`-th taking the
        concatenated outputs of all groups before it (``context_dim = d_1 + ... + d_{k-1}``).

    ``flow.blocks`` holds the blocks; ``flow.inv`` is an ``nn.Module`` sharing the parameters.
    Each block keeps its own options (log-det mode, tolerances) and reports
    (``flow.blocks[k].diagnostics``); ``train()`` / ``eval()`` reach every block. An inverse
    in which some block missed its tolerance is returned but not cached.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, first: CPFlow, rest: Sequence[ConditionalCPFlow], cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        if not isinstance(first, CPFlow):
            raise TypeError(f"first must be a CPFlow, got {type(first).__name__}")
        sizes = [first.potential.input_dim]
        for k, block in enumerate(rest, start=1):
            if not isinstance(block, ConditionalCPFlow):
                raise TypeError(f"rest[{k - 1}] must be a ConditionalCPFlow, got {type(block).__name__}")
            context_dim = block.potential.network.context_dim
            if context_dim != sum(sizes):
                raise ValueError(
                    f"rest[{k - 1}] takes a context of dimension {context_dim}, but the groups "
                    f"before it have {sum(sizes)} coordinates"
                )
            sizes.append(block.potential.input_dim)
        self.sizes = tuple(sizes)
        self.blocks = nn.ModuleList([first, *rest])

    __repr__ = module_repr

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, sizes={self.sizes}"

    @property
    def input_dim(self) -> int:
        return sum(self.sizes)

    def _cache_parameters(self) -> Iterable[Tensor]:
        return module_parameters_and_buffers(self)

    def _block_map(self, k: int, outputs: Sequence[Tensor]) -> Transform:
        """Group ``k``'s map: the first block, or a later one conditioned on the ``outputs`` of
        the groups before it (``outputs[:k]``)."""
        if k == 0:
            return self.blocks[0]
        return self.blocks[k].condition(torch.cat(list(outputs[:k]), -1))

    def _split(self, value: Tensor, name: str) -> tuple[Tensor, ...]:
        check_rows(value, name, self.input_dim)
        return value.split(self.sizes, -1)

    def _call(self, x: Tensor) -> Tensor:
        parts, outputs, maps = self._split(x, "x"), [], []
        for k, part in enumerate(parts):
            maps.append(self._block_map(k, outputs))
            outputs.append(maps[k](part))
        self._side_store(x, (parts, outputs, maps))
        return torch.cat(outputs, -1)

    def _inverse(self, y: Tensor) -> Tensor:
        outputs = self._split(y, "y")
        inputs = []
        for k, output in enumerate(outputs):
            inputs.append(self._block_map(k, outputs).inv(output))
            report = self.blocks[k].diagnostics.inverse
            if report is not None and not report.all_converged:
                self._mark_unconverged()
        return torch.cat(inputs, -1)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\sum_k \log\det \nabla^2_{x_k} F_k(x_k; y_{<k})`, shape ``batch``; after a
        call at ``x`` each block reuses the potential it evaluated there."""
        kept = self._side_lookup(x)
        if kept is not None:
            parts, outputs, maps = kept
        else:
            parts, outputs = self._split(x, "x"), self._split(y, "y")
            maps = [self._block_map(k, outputs) for k in range(len(self.sizes))]
        terms = [block.log_abs_det_jacobian(p, o) for block, p, o in zip(maps, parts, outputs, strict=True)]
        return torch.stack(terms).sum(0)

    def clear_cache(self) -> None:
        """Forget this flow's pair and side entries, and the first block's."""
        super().clear_cache()
        self.blocks[0].clear_cache()

    def with_cache(self, cache_size: int = 1) -> BlockTriangularCPFlow:
        """``self``, or a view with another cache size sharing the blocks."""
        if cache_size == self._cache_size:
            return self
        return BlockTriangularCPFlow(self.blocks[0], list(self.blocks[1:]), cache_size=cache_size)
