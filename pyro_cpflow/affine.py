r"""The pieces a network describes itself with, for :mod:`pyro_cpflow.derivatives`.

An :class:`Activation` carries an elementwise convex, non-decreasing function with its first
two derivatives; an :class:`AffineLayer` is one pre-activation :math:`u = A(z, x) + o`,
linear in the previous layer's output :math:`z` and the input :math:`x` for a fixed context,
with the products the derivative formulas need: the map itself (also applied to tangents),
its transpose (for backward sweeps) and its Jacobian in :math:`x`.

>>> layer = AffineLayer((torch.eye(2),), (None,), torch.zeros(2))
>>> layer(None, torch.ones(3, 2)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Activation", "AffineLayer"]


@dataclass(frozen=True)
class Activation:
    """An elementwise convex, non-decreasing activation with its first two derivatives.

    ``orders(x)`` returns ``(s(x), s'(x), s''(x))`` together, sharing their common parts.
    """

    name: str
    value: Callable[[Tensor], Tensor]
    first: Callable[[Tensor], Tensor]
    second: Callable[[Tensor], Tensor]
    orders: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]

    def __call__(self, x: Tensor) -> Tensor:
        return self.value(x)


@dataclass
class AffineLayer:
    r"""A pre-activation :math:`u = P(z \odot \gamma) + [W_b (x \odot \eta_b)]_b + o`.

    The input term stacks row blocks :math:`W_b` (each with an optional per-sample gate
    :math:`\eta_b`); the convex term, with non-negative :math:`P` and an optional gate
    :math:`\gamma \ge 0`, adds to the leading rows (the others are input-augmented features).

    :ivar input_weights: blocks ``(h_b, d)``; their heights add up to the width ``h``.
    :ivar input_gates: one ``(N, d)`` gate or ``None`` per block.
    :ivar offset: ``(h,)``, ``(N, h)`` or ``None``.
    :ivar convex_weight: ``(h_c, h_prev)`` with ``h_c <= h``, or ``None`` (first layer).
    :ivar convex_gate: ``(N, h_prev)`` or ``None``.
    """

    input_weights: tuple[Tensor, ...]
    input_gates: tuple[Tensor | None, ...]
    offset: Tensor | None = None
    convex_weight: Tensor | None = None
    convex_gate: Tensor | None = None

    def linear(self, z: Tensor | None, x: Tensor, offset: Tensor | None = None) -> Tensor:
        """The linear part :math:`A(z, x)`, plus ``offset`` if given, ``(N, h)``."""
        if (
            len(self.input_weights) == 1
            and self.input_gates[0] is None
            and (offset is None or offset.dim() == 1)
        ):
            u = F.linear(x, self.input_weights[0], offset)  # one fused product
        else:
            parts = [
                F.linear(x if gate is None else x * gate, weight)
                for weight, gate in zip(self.input_weights, self.input_gates, strict=True)
            ]
            u = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
            if offset is not None:
                u = u + offset
        if z is None or self.convex_weight is None:
            return u
        gated = z if self.convex_gate is None else z * self.convex_gate
        convex = F.linear(gated, self.convex_weight)
        if convex.shape[-1] == u.shape[-1]:
            return u + convex
        # u is a fresh result whose value no backward pass needs: add in place, in its first rows
        u[..., : convex.shape[-1]] += convex
        return u

    def __call__(self, z: Tensor | None, x: Tensor) -> Tensor:
        return self.linear(z, x, self.offset)

    def transpose_input(self, adjoint: Tensor) -> Tensor:
        """:math:`\\partial (a^\\top u) / \\partial x` for ``adjoint`` :math:`a` ``(N, h)``."""
        total, start = None, 0
        for weight, gate in zip(self.input_weights, self.input_gates, strict=True):
            stop = start + weight.shape[0]
            part = adjoint[..., start:stop] @ weight
            if gate is not None:
                part = part * gate
            total = part if total is None else total + part
            start = stop
        return total  # type: ignore[return-value]

    def transpose_convex(self, adjoint: Tensor) -> Tensor:
        """:math:`\\partial (a^\\top u) / \\partial z` for ``adjoint`` :math:`a` ``(N, h)``."""
        weight = self.convex_weight
        rows = weight.shape[0]  # type: ignore[union-attr]
        part = (adjoint if rows == adjoint.shape[-1] else adjoint[..., :rows]) @ weight  # type: ignore[operator]
        return part if self.convex_gate is None else part * self.convex_gate

    def scaled(self, scale: Tensor) -> AffineLayer:
        r"""The layer times ``scale`` (a scalar): :math:`\sigma u`."""
        return AffineLayer(
            tuple(scale * w for w in self.input_weights),
            self.input_gates,
            None if self.offset is None else scale * self.offset,
            None if self.convex_weight is None else scale * self.convex_weight,
            self.convex_gate,
        )

    def output_adjoints(self) -> tuple[Tensor, Tensor]:
        r""":math:`(\partial u / \partial z, \partial u / \partial x)` of a layer of width 1:
        ``(h_prev,)`` or ``(N, h_prev)``, and ``(d,)`` or ``(N, d)``."""
        z_part = self.convex_weight[0]  # type: ignore[index]
        if self.convex_gate is not None:
            z_part = z_part * self.convex_gate
        x_part = None
        for weight, gate in zip(self.input_weights, self.input_gates, strict=True):
            part = weight[0] if gate is None else weight[0] * gate
            x_part = part if x_part is None else x_part + part
        return z_part, x_part  # type: ignore[return-value]

    def input_jacobian(self) -> Tensor:
        """:math:`\\partial u / \\partial x` of the input term, ``(N, h, d)`` or ``(1, h, d)``."""
        blocks = [
            weight[None] if gate is None else weight * gate[:, None, :]
            for weight, gate in zip(self.input_weights, self.input_gates, strict=True)
        ]
        if len(blocks) == 1:
            return blocks[0]
        rows = max(block.shape[0] for block in blocks)
        return torch.cat([block.expand(rows, *block.shape[1:]) for block in blocks], -2)

    def convex_jacobian(self, slopes: Tensor, previous: Tensor) -> Tensor:
        r"""The convex term's Jacobian :math:`P \operatorname{diag}(\gamma \odot s') J`, ``(N, h_c, d)``,
        given the previous layer's slopes :math:`s'` ``(N, h_prev)`` and the Jacobian :math:`J`
        ``(N, h_prev, d)`` or ``(1, h_prev, d)`` of its pre-activations.

        When :math:`J` is one matrix for every row, there is no gate and the rows outnumber
        the convex units, this is one product :math:`s' R` with
        :math:`R_{j,(i,k)} = P_{ij} J_{jk}` (``(h_prev, h_c d)``), instead of scaling an
        ``(N, h_prev, d)`` copy of :math:`J` per row.
        """
        weight: Tensor = self.convex_weight  # type: ignore[assignment]
        rows, (units, width) = slopes.shape[0], weight.shape
        if previous.shape[0] == 1 and self.convex_gate is None and rows > units:
            shared = previous[0]
            mixed = (weight.T[:, :, None] * shared[:, None, :]).reshape(width, -1)
            return (slopes @ mixed).view(rows, units, shared.shape[-1])
        gated = slopes if self.convex_gate is None else slopes * self.convex_gate
        return weight @ (gated[..., None] * previous)

    def stacked_with(self, features: AffineLayer) -> AffineLayer:
        """This layer followed by the rows of ``features``, a layer without convex term."""
        if features.convex_weight is not None:
            raise ValueError("only features without a convex term can be stacked below a layer")
        if self.offset is None or features.offset is None:
            raise ValueError("stacked layers need offsets")
        return AffineLayer(
            self.input_weights + features.input_weights,
            self.input_gates + features.input_gates,
            torch.cat([self.offset, features.offset], -1),
            self.convex_weight,
            self.convex_gate,
        )

    def detach(self) -> AffineLayer:
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return AffineLayer(
            tuple(w.detach() for w in self.input_weights),
            tuple(cut(g) for g in self.input_gates),
            cut(self.offset),
            cut(self.convex_weight),
            cut(self.convex_gate),
        )
