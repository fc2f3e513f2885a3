r"""One evaluation path for a convex potential: value, gradient, Hessian-vector products, Hessian.

Every network in :mod:`pyro_cpflow.nn` is a chain of affine pre-activations followed by
elementwise convex activations,

.. math::

    u_k = A_k(z_{k-1}, x) + o_k, \qquad z_k = s(u_k), \qquad g(x) = A_{\mathrm{out}}(z_K, x),

where each :math:`A_k` is linear in :math:`(z_{k-1}, x)` for a fixed context (an
:class:`~pyro_cpflow.affine.AffineLayer`). With :math:`\delta_k = \partial g / \partial z_k`
from one backward sweep and :math:`J_k = \partial u_k / \partial x` propagated forward, the
only second derivatives come from the activations:

.. math::

    \nabla^2 g(x) = \sum_k J_k^\top \operatorname{diag}\bigl(\delta_k \odot s''(u_k)\bigr) J_k ,

a sum of positive semi-definite terms (:math:`\delta_k \ge 0` by input convexity). Hence:

* the gradient :math:`\nabla g` by an explicit backward sweep (:attr:`NetworkTrace.gradient`),
* a Hessian-vector product by one forward tangent :math:`t_k = J_k v` and one backward
  sweep of small tensors (:meth:`NetworkTrace.hvp`), with no double backpropagation,
* the dense Hessian by forward propagation of :math:`J_k` (:meth:`NetworkTrace.hessian`).

All formulas are written with ordinary differentiable operations, so gradients with
respect to the parameters (and to :math:`x`, the context) come from first-order
backpropagation through them. :class:`PotentialTrace` adds the quadratic terms of the
potential :math:`F = \sigma g + \tfrac12 x^\top Q x + b^\top x`; :class:`AutogradTrace`
gives the same interface for an arbitrary callable, by autograd (the test oracle).
Evaluation is lazy: the forward pass runs at construction, the backward sweep and the
curvatures :math:`\delta_k \odot s''(u_k)` when first needed.

References: Amos, Xu & Kolter, *Input convex neural networks*, ICML 2017
(arXiv:1609.07152); Huang, Chen, Tsirigotis & Courville, *Convex potential flows*, ICLR
2021 (arXiv:2012.05942), section 4.

>>> from pyro_cpflow.nn import ICNN
>>> net = ICNN(3, [8, 8])
>>> trace = NetworkTrace(net.affine_layers(None), net.activation, torch.randn(4, 3))
>>> trace.gradient.shape, trace.hessian().shape
(torch.Size([4, 3]), torch.Size([4, 3, 3]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol

import torch
from torch import Tensor

from .affine import Activation, AffineLayer

__all__ = [
    "ROW_GRAM_MIN_ENTRIES",
    "AutogradTrace",
    "NetworkTrace",
    "PotentialTrace",
    "QuadraticTerms",
    "ZeroNetworkTrace",
]

ROW_GRAM_MIN_ENTRIES = 128
"""Smallest ``N d`` at which :meth:`NetworkTrace.hessian` forms the terms of rows shared by
every sample as one product with their outer products: below it, the extra set-up costs
more than it saves (ad-hoc A/B runs on the CPU with the ICNN (64, 64), a whole exact training step:
1-2% slower at ``N d <= 32``, level at 128, 1.5x faster at ``N d = 1600`` and 2x at 4096)."""


class NetworkTrace:
    r"""A network :math:`g` evaluated at rows ``x`` ``(N, d)``: value, gradient, Hessian.

    :param layers: ``(hidden, output)``: the activated :class:`AffineLayer` s and the
        linear output layer of width 1, as returned by the networks' ``affine_layers``.
    :param activation: the :class:`Activation` of the hidden layers.
    :param x: the rows.
    :param scale: optional scalar :math:`\sigma`: the trace is then that of :math:`\sigma g`
        (folded into the output layer, so no product of the results needs scaling).
    :param derivatives: compute :math:`s'(u_k), s''(u_k)` with the forward pass (set it to
        ``False`` when only the value is wanted, as in a line search).
    """

    def __init__(
        self,
        layers: tuple[Sequence[AffineLayer], AffineLayer],
        activation: Activation,
        x: Tensor,
        scale: Tensor | None = None,
        derivatives: bool = True,
    ) -> None:
        self.hidden, self.output = list(layers[0]), layers[1]
        if scale is not None:
            self.output = self.output.scaled(scale)
        self.activation = activation
        self.x = x
        self.pre_activations: list[Tensor] = []
        self.slopes: list[Tensor] = []
        self.second_derivatives: list[Tensor] = []
        z = None
        for layer in self.hidden:
            u = layer(z, x)
            self.pre_activations.append(u)
            if derivatives:
                z, slope, second = activation.orders(u)
                self.slopes.append(slope)
                self.second_derivatives.append(second)
            else:
                z = activation(u)
        self.value = self.output(z, x).squeeze(-1)

    @cached_property
    def _backward(self) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """``(gradient, slopes s'(u_k), adjoints delta_k)`` from one explicit backward sweep."""
        if not self.slopes:
            self.slopes = [self.activation.first(u) for u in self.pre_activations]
        slopes = self.slopes
        adjoint, gradient = self.output.output_adjoints()
        adjoint = adjoint.expand_as(self.pre_activations[-1])
        adjoints: list[Tensor] = [None] * len(self.hidden)  # type: ignore[list-item]
        for k in reversed(range(len(self.hidden))):
            adjoints[k] = adjoint
            error = adjoint * slopes[k]
            gradient = gradient + self.hidden[k].transpose_input(error)
            if k > 0:
                adjoint = self.hidden[k].transpose_convex(error)
        return gradient.expand_as(self.x), slopes, adjoints

    @property
    def gradient(self) -> Tensor:
        r""":math:`\nabla g(x)`, ``(N, d)``."""
        return self._backward[0]

    @cached_property
    def curvatures(self) -> list[Tensor]:
        r""":math:`\delta_k \odot s''(u_k)` per hidden layer, each ``(N, h_k)``, non-negative."""
        _, _, adjoints = self._backward
        if not self.second_derivatives:
            self.second_derivatives = [self.activation.second(u) for u in self.pre_activations]
        return [a * s2 for a, s2 in zip(adjoints, self.second_derivatives, strict=True)]

    def hvp(self, v: Tensor) -> Tensor:
        r""":math:`\nabla^2 g(x)\, v` for ``v`` ``(N, d)``: one forward tangent, one backward sweep."""
        slopes = self._backward[1]
        curvatures = self.curvatures
        tangents = []
        tangent = None
        for k, layer in enumerate(self.hidden):
            tangent = layer.linear(None if k == 0 else slopes[k - 1] * tangent, v)
            tangents.append(tangent)
        result, adjoint = None, None
        for k in reversed(range(len(self.hidden))):
            mu = curvatures[k] * tangents[k]
            if adjoint is not None:
                mu = mu + slopes[k] * adjoint
            part = self.hidden[k].transpose_input(mu)
            result = part if result is None else result + part
            if k > 0:
                adjoint = self.hidden[k].transpose_convex(mu)
        return result  # type: ignore[return-value]

    def hessian(self) -> Tensor:
        r""":math:`\nabla^2 g(x)`, ``(N, d, d)``, by forward propagation of :math:`J_k`.

        After the first layer, :math:`J_k = [\,W_k + P_k \operatorname{diag}(s'_{k-1}) J_{k-1};\ W'_k\,]`:
        only the rows of the convex units depend on the sample; the input rows (all of the
        first layer's without gates, the input-augmented ones after it) are one matrix
        :math:`W` for every sample. When the samples outnumber the dimensions (and the
        product is large enough to pay for its set-up, :data:`ROW_GRAM_MIN_ENTRIES`), the
        terms of those rows, :math:`\sum_i c_{ki}\, w_i w_i^\top`, are formed for all samples by
        one product of the curvatures with the rows' outer products
        :math:`[w_i \otimes w_i]_i` (``(m, d^2)``): memory :math:`m d^2`, below the
        ``(N, d, m)`` of the per-sample form since :math:`d < N`. The other rows give
        :math:`J^\top \operatorname{diag}(c) J` per sample.
        """
        slopes = self._backward[1]
        n, d = self.x.shape
        by_rows = n > d and n * d >= ROW_GRAM_MIN_ENTRIES
        shared_rows: list[Tensor] = []
        shared_curvatures: list[Tensor] = []
        hessian = None
        jacobian: Tensor = None  # type: ignore[assignment]
        last = len(self.hidden) - 1
        for k, (layer, curvature) in enumerate(zip(self.hidden, self.curvatures, strict=True)):
            inputs = layer.input_jacobian()
            if k == 0:
                blocks = [(inputs, curvature)]
                jacobian = inputs
            else:
                convex = layer.convex_jacobian(slopes[k - 1], jacobian)
                units = convex.shape[-2]
                leading = inputs[..., :units, :] + convex
                if units == inputs.shape[-2]:
                    blocks, jacobian = [(leading, curvature)], leading
                else:
                    tail = inputs[..., units:, :]
                    tail_shared = by_rows and tail.shape[0] == 1
                    if k < last or not tail_shared:  # the whole J_k: a later layer or this term needs it
                        jacobian = torch.cat([leading, tail.expand(leading.shape[0], -1, -1)], -2)
                    if tail_shared:
                        blocks = [(leading, curvature[..., :units]), (tail, curvature[..., units:])]
                    else:
                        blocks = [(jacobian, curvature)]
            for block, weights in blocks:
                if by_rows and block.shape[0] == 1:
                    shared_rows.append(block[0])
                    shared_curvatures.append(weights)
                    continue
                # J^T diag(c) J; a shared J (1, h, d) folds the batch into one matrix product
                term = (block.transpose(-1, -2) * weights[..., None, :]) @ (
                    block[0] if block.shape[0] == 1 else block
                )
                hessian = term if hessian is None else hessian + term
        if shared_rows:
            rows, weights = torch.cat(shared_rows), torch.cat(shared_curvatures, -1)
            outer = (rows[:, :, None] * rows[:, None, :]).reshape(rows.shape[0], d * d)
            term = (weights @ outer).view(n, d, d)
            hessian = term if hessian is None else hessian + term
        return hessian.expand(n, -1, -1)  # type: ignore[union-attr]

    def whitened(self, whiten: Callable[[Tensor], Tensor]) -> NetworkTrace | None:
        r"""A constant copy whose :meth:`hvp` is :math:`S^{-1}\nabla^2 g\, S^{-\top} v`, or ``None``.

        ``whiten`` maps rows :math:`w^\top` to :math:`(S^{-1} w)^\top`. The input enters every
        hidden layer through :math:`W_k x`, so replacing each :math:`W_k` by :math:`W_k S^{-\top}`
        (rows whitened once per call) turns a tangent of :math:`S^{-\top} v` into one of
        :math:`v` and :math:`W_k^\top \mu` into :math:`S^{-1} W_k^\top \mu`: the whitened
        product costs what a plain one does. Gated inputs (:math:`W (x \odot \eta)`, the
        PICNN) mix the gate into the weight per sample, so there is no copy for them.
        """
        if any(gate is not None for layer in self.hidden for gate in layer.input_gates):
            return None
        copy = self.detach()
        weights = [w for layer in copy.hidden for w in layer.input_weights]
        whitened = whiten(torch.cat(weights)).split([w.shape[0] for w in weights])
        layers, start = [], 0
        for layer in copy.hidden:
            stop = start + len(layer.input_weights)
            layers.append(replace(layer, input_weights=tuple(whitened[start:stop])))
            start = stop
        copy.hidden = layers
        return copy

    def detach(self) -> NetworkTrace:
        """A copy whose products and Hessian are constants (no graph): for iterative solvers."""
        gradient, slopes, _ = self._backward
        copy = object.__new__(NetworkTrace)
        copy.hidden = [layer.detach() for layer in self.hidden]
        copy.output = self.output.detach()
        copy.activation = self.activation
        copy.x = self.x.detach()
        copy.pre_activations = [u.detach() for u in self.pre_activations]
        copy.slopes = [t.detach() for t in slopes]
        copy.second_derivatives = []
        copy.value = self.value.detach()
        copy.__dict__["_backward"] = (gradient.detach(), copy.slopes, [])
        copy.__dict__["curvatures"] = [c.detach() for c in self.curvatures]
        return copy


class ZeroNetworkTrace:
    """The :class:`NetworkTrace` interface of :math:`g = 0` (:class:`~pyro_cpflow.nn.NoNetwork`):
    every derivative is zero, and whitening leaves it zero."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    @property
    def value(self) -> Tensor:
        return self.x.new_zeros(self.x.shape[0])

    @property
    def gradient(self) -> Tensor:
        return torch.zeros_like(self.x)

    def hvp(self, v: Tensor) -> Tensor:
        return torch.zeros_like(v)

    def hessian(self) -> Tensor:
        n, d = self.x.shape
        return self.x.new_zeros(n, d, d)

    def whitened(self, whiten: Callable[[Tensor], Tensor]) -> ZeroNetworkTrace:
        return self.detach()

    def detach(self) -> ZeroNetworkTrace:
        return ZeroNetworkTrace(self.x.detach())


@dataclass
class QuadraticTerms:
    r"""The terms :math:`\tfrac12 x^\top Q x + \tfrac12 |M^\top x|^2 + \tfrac12 x^\top D x + b^\top x`.

    :math:`Q = cI + LL^\top`; :math:`M` and the diagonal :math:`D` are per-sample context terms.

    :ivar coefficient: :math:`c > 0` (a scalar tensor).
    :ivar factor: :math:`L` ``(d, r)``.
    :ivar shift: :math:`b` ``(d,)`` or ``(N, d)``.
    :ivar context_factor: optional per-sample :math:`M(c)` ``(N, d, r')``.
    :ivar context_diagonal: optional per-sample positive diagonal :math:`D(c)` ``(N, d)``.

    Products with :math:`Q` use the dense matrix when :math:`2r \ge d` and the factor
    otherwise (:attr:`low_rank`), whichever has fewer operations.
    """

    coefficient: Tensor
    factor: Tensor
    shift: Tensor
    context_factor: Tensor | None = None
    context_diagonal: Tensor | None = None

    @property
    def has_context(self) -> bool:
        """Whether per-sample context terms are present (then :math:`Q` alone is not the quadratic)."""
        return self.context_factor is not None or self.context_diagonal is not None

    @property
    def low_rank(self) -> bool:
        return 2 * self.factor.shape[1] < self.factor.shape[0]

    @cached_property
    def matrix(self) -> Tensor:
        """The dense :math:`Q`, ``(d, d)``."""
        factor = self.factor
        eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
        return torch.addmm(self.coefficient * eye, factor, factor.T)

    def matvec(self, v: Tensor) -> Tensor:
        """The Hessian of these terms times ``v`` (rows)."""
        if self.low_rank:
            product = torch.addmm(self.coefficient * v, v @ self.factor, self.factor.T)
        else:
            product = v @ self.matrix
        if self.context_factor is not None:
            inner = torch.einsum("nd,ndr->nr", v, self.context_factor)
            product = product + torch.einsum("nr,ndr->nd", inner, self.context_factor)
        if self.context_diagonal is not None:
            product = product + self.context_diagonal * v
        return product

    def hessian(self, n: int) -> Tensor:
        matrix = self.matrix.expand(n, *self.matrix.shape)
        if self.context_factor is not None:
            matrix = matrix + self.context_factor @ self.context_factor.transpose(-1, -2)
        if self.context_diagonal is not None:
            matrix = matrix + torch.diag_embed(self.context_diagonal)
        return matrix

    def detach(self) -> QuadraticTerms:
        factor, diagonal = self.context_factor, self.context_diagonal
        return QuadraticTerms(
            self.coefficient.detach(),
            self.factor.detach(),
            self.shift.detach(),
            None if factor is None else factor.detach(),
            None if diagonal is None else diagonal.detach(),
        )


class WhiteningFactor(Protocol):
    """A factorisation :math:`Q = S S^\\top` as :meth:`PotentialTrace.whitened_hvp` uses it."""

    source: QuadraticTerms | None

    def whiten(self, rows: Tensor) -> Tensor: ...

    def unwhiten(self, rows: Tensor) -> Tensor: ...


class PotentialTrace:
    r""":math:`F = \sigma g + q` at rows ``x``: :math:`\sigma g` a :class:`NetworkTrace`,
    :math:`q` :class:`QuadraticTerms`.

    The interface every solver uses: :attr:`value`, :attr:`gradient`, :meth:`hvp`,
    :meth:`hessian` and :meth:`detach`.
    """

    def __init__(self, network: NetworkTrace | ZeroNetworkTrace, quadratic: QuadraticTerms) -> None:
        self.network = network
        self.quadratic = quadratic
        self.x = network.x

    @cached_property
    def _quadratic_product(self) -> Tensor:
        return self.quadratic.matvec(self.x)

    @cached_property
    def value(self) -> Tensor:
        """:math:`F(x)`, ``(N,)``."""
        linear = torch.add(self.quadratic.shift, self._quadratic_product, alpha=0.5)  # b + Qx / 2
        return self.network.value + (linear * self.x).sum(-1)

    @cached_property
    def gradient(self) -> Tensor:
        r""":math:`\nabla F(x)`, ``(N, d)``."""
        return self.network.gradient + self._quadratic_product + self.quadratic.shift

    def hvp(self, v: Tensor) -> Tensor:
        r""":math:`\nabla^2 F(x)\, v`, rows."""
        return self.network.hvp(v) + self.quadratic.matvec(v)

    def hessian(self) -> Tensor:
        r""":math:`\nabla^2 F(x)`, ``(N, d, d)``."""
        return self.network.hessian() + self.quadratic.hessian(self.x.shape[0])

    def whitened_hvp(self, factor: WhiteningFactor) -> Callable[[Tensor], Tensor]:
        r"""The constant product :math:`v \mapsto S^{-1} \nabla^2 F\, S^{-\top} v`, with
        :math:`Q = S S^\top` from ``factor``.

        When ``factor`` factorises this trace's own :math:`Q` (``factor.source is
        self.quadratic``, as :func:`~pyro_cpflow.potential.factorize` records) and the
        network takes its input ungated (:meth:`NetworkTrace.whitened`), the quadratic
        whitens to the identity: :math:`S^{-1}HS^{-\top} v = S^{-1}\sigma\nabla^2 g\,S^{-\top}v + v`,
        with no :math:`d \times d` work per product. Otherwise (another :math:`Q`, gated
        inputs, context terms) the product is ``whiten(hvp(unwhiten(v)))``.
        """
        constant = self.detach()
        network = None
        if factor.source is self.quadratic and not self.quadratic.has_context:
            network = constant.network.whitened(factor.whiten)
        if network is None:
            return lambda v: factor.whiten(constant.hvp(factor.unwhiten(v)))
        return lambda v: network.hvp(v) + v

    def detach(self) -> PotentialTrace:
        return PotentialTrace(self.network.detach(), self.quadratic.detach())


class AutogradTrace:
    r"""The :class:`PotentialTrace` interface for any batched callable ``F: (N, d) -> (N,)``, by autograd.

    Gradient by backpropagation with a graph, Hessian-vector products by double
    backpropagation. It serves generic potentials in the solvers and as the oracle in tests.

    >>> trace = AutogradTrace(lambda x: (x ** 4).sum(-1) / 12, torch.ones(2, 3))
    >>> trace.detach().hvp(torch.ones(2, 3))  # x^2 v
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """

    def __init__(self, function: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.function = function
        self.x = x
        self._differentiable = True

    @cached_property
    def _leaf_and_value(self) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            leaf = self.x if self.x.requires_grad else self.x.detach().requires_grad_(True)
            return leaf, self.function(leaf)

    @property
    def value(self) -> Tensor:
        value = self._leaf_and_value[1]
        return value if self._differentiable else value.detach()

    @cached_property
    def _gradient(self) -> Tensor:
        leaf, value = self._leaf_and_value
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(value.sum(), leaf, create_graph=True)
        return grad

    @property
    def gradient(self) -> Tensor:
        return self._gradient if self._differentiable else self._gradient.detach()

    def hvp(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            (product,) = torch.autograd.grad(
                self._gradient,
                self._leaf_and_value[0],
                v,
                retain_graph=True,
                create_graph=self._differentiable,
            )
        return product

    def hessian(self) -> Tensor:
        n, d = self.x.shape
        units = torch.eye(d, dtype=self.x.dtype, device=self.x.device)[:, None, :].expand(d, n, d)
        with torch.enable_grad():
            (columns,) = torch.autograd.grad(
                self._gradient,
                self._leaf_and_value[0],
                units,
                retain_graph=True,
                create_graph=self._differentiable,
                is_grads_batched=True,
            )
        return columns.permute(1, 2, 0)

    def detach(self) -> AutogradTrace:
        copy = AutogradTrace(self.function, self.x)
        copy.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_")})
        copy._differentiable = False
        return copy
