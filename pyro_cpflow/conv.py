r"""A convolutional input-convex potential for images, and the CP-Flow block built on it.

The network (Huang et al. 2021, section 4 and eq. 7, with convolutions in place of dense
layers) reads an image :math:`x \in \mathbb{R}^{C \times H \times W}`:

.. math::

    z_1 = s(W_0 \star x + b_0), \qquad
    z_{k+1} = s\Bigl(\bigl[P_k \star z_k + W_k \star x + b_k;\; L_k \star x + c_k\bigr]\Bigr),
    \qquad
    g(x) = \sum_{c, i, j} p_c\, z_K[c, i, j] + w^\top x,

where :math:`\star` is a stride-1 "same" convolution, :math:`P_k = \mathrm{softplus}(A_k) /
\mathrm{fan\_in} \ge 0` elementwise (non-negative kernels on the convex path
:math:`z_k \to z_{k+1}`), :math:`W_k, L_k` are unconstrained kernels on the input path, the
channels :math:`s(L_k \star x + c_k)` are the input augmentation of eq. 7 (half of each
hidden layer after the first), :math:`s` is a convex non-decreasing activation
(:func:`~pyro_cpflow.nn.gaussian_softplus` or softplus) and :math:`p_c = \mathrm{softplus}(a_c) /
h_K \ge 0`. The read-out sums over the positions (not a mean), so that each pixel's share of
:math:`\nabla g` and :math:`\nabla^2 g` stays of order one whatever the image size.
A convolution is a linear map, so each pre-activation is affine in :math:`(z_k, x)` with
non-negative coefficients on :math:`z_k`, and :math:`g` is convex by the argument of the
dense ICNN (:mod:`pyro_cpflow.nn`).

:class:`ConvAffineLayer` describes one such pre-activation in the terms of
:class:`~pyro_cpflow.affine.AffineLayer` (the map, its transposes by transposed
convolutions, its Jacobian in :math:`x`), so the analytic engine
:class:`~pyro_cpflow.derivatives.NetworkTrace` evaluates :math:`g`, :math:`\nabla g`,
Hessian-vector products (one forward tangent, one backward sweep: no double
backpropagation) and, for small images, the dense Hessian, on flattened rows ``(N, C H W)``.
:class:`ConvexConvPotential` adds the strongly convex quadratic of
:class:`~pyro_cpflow.potential.ConvexPotential`,

.. math::

    F(x) = \sigma g(x) + \tfrac12 x^\top\bigl((\alpha + \beta) I + L L^\top\bigr) x + b^\top x,
    \qquad \nabla^2 F \succeq \alpha I,

and :func:`conv_cpflow` wraps it as a :class:`~pyro_cpflow.transforms.CPFlow`: the forward
map :math:`\nabla F`, the inverse by Newton-CG, the stochastic log-det (needed in
:math:`d = CHW` of hundreds) or the exact one for small images.

References: Amos, Xu & Kolter, ICML 2017 (arXiv:1609.07152); Huang, Chen, Tsirigotis &
Courville, ICLR 2021 (arXiv:2012.05942).

>>> flow = conv_cpflow((1, 4, 4), hidden_channels=(8, 8))
>>> x = torch.randn(3, 16)
>>> flow(x).shape, flow.log_abs_det_jacobian(x, flow(x)).shape
(torch.Size([3, 16]), torch.Size([3]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .affine import AffineLayer
from .derivatives import NetworkTrace, PotentialTrace
from .nn import DEFAULT_INPUT_GAIN, _scale_init, get_activation, positive_weight
from .packing import PackedParameters
from .potential import ConvexPotential
from .transforms import CPFlow

__all__ = ["ConvAffineLayer", "ConvICNN", "ConvPotentialTrace", "ConvexConvPotential", "conv_cpflow"]


@dataclass
class ConvAffineLayer:
    r"""A pre-activation :math:`u = [P \star z + W \star x;\ W' \star x] + o` on flattened images.

    Rows are images flattened channel-first, ``(N, C H W)``. The input kernel ``input_weight``
    produces all ``h`` output channels (the rows of the augmented features included); the
    non-negative ``convex_weight`` adds :math:`P \star z` to the first ``h_c`` of them. All
    convolutions have stride 1 and "same" zero padding, so that :math:`W^\top a` is the
    transposed convolution of :math:`a` with the same kernel.

    :ivar input_weight: ``(h, C, k, k)``.
    :ivar offset: ``(h,)`` per-channel offsets, or ``None``.
    :ivar convex_weight: ``(h_c, h_prev, k, k)`` with ``h_c <= h``, or ``None`` (first layer).
    :ivar spatial: ``(H, W)``.
    """

    input_weight: Tensor
    offset: Tensor | None
    convex_weight: Tensor | None
    spatial: tuple[int, int]

    @property
    def input_gates(self) -> tuple[None]:
        """No per-sample gates on the input (the :class:`~pyro_cpflow.affine.AffineLayer` field)."""
        return (None,)

    @property
    def _padding(self) -> int:
        return self.input_weight.shape[-1] // 2

    def _images(self, rows: Tensor, channels: int) -> Tensor:
        return rows.reshape(rows.shape[0], channels, *self.spatial)

    def linear(self, z: Tensor | None, x: Tensor, offset: Tensor | None = None) -> Tensor:
        """The linear part :math:`A(z, x)` plus ``offset`` (per channel) if given, ``(N, h H W)``."""
        u = F.conv2d(
            self._images(x, self.input_weight.shape[1]), self.input_weight, offset, padding=self._padding
        )
        if z is not None and self.convex_weight is not None:
            convex = F.conv2d(
                self._images(z, self.convex_weight.shape[1]), self.convex_weight, padding=self._padding
            )
            # u is a fresh result whose value no backward pass needs: add in place
            u[:, : convex.shape[1]] += convex
        return u.reshape(x.shape[0], -1)

    def __call__(self, z: Tensor | None, x: Tensor) -> Tensor:
        return self.linear(z, x, self.offset)

    def transpose_input(self, adjoint: Tensor) -> Tensor:
        r""":math:`\partial (a^\top u) / \partial x = W^\top a`, a transposed convolution, ``(N, C H W)``."""
        images = self._images(adjoint, self.input_weight.shape[0])
        return F.conv_transpose2d(images, self.input_weight, padding=self._padding).reshape(
            adjoint.shape[0], -1
        )

    def transpose_convex(self, adjoint: Tensor) -> Tensor:
        r""":math:`\partial (a^\top u) / \partial z = P^\top a_{1:h_c}`, ``(N, h_prev H W)``."""
        weight = self.convex_weight
        images = self._images(adjoint, self.input_weight.shape[0])[:, : weight.shape[0]]  # type: ignore[union-attr]
        return F.conv_transpose2d(images, weight, padding=self._padding).reshape(adjoint.shape[0], -1)

    def _dense_input_weight(self) -> Tensor:
        """The convolution :math:`W \\star` as a matrix ``(h H W, C H W)``, from the unit images."""
        channels = self.input_weight.shape[1]
        d = channels * math.prod(self.spatial)
        units = torch.eye(d, dtype=self.input_weight.dtype, device=self.input_weight.device)
        return self.linear(None, units).T

    def input_jacobian(self) -> Tensor:
        """:math:`\\partial u / \\partial x`, ``(1, h H W, C H W)``: dense, for small images only."""
        return self._dense_input_weight()[None]

    def convex_jacobian(self, slopes: Tensor, previous: Tensor) -> Tensor:
        r"""The convex term's Jacobian :math:`P \star (s' \odot J)`, ``(N, h_c H W, d)``, given the
        previous layer's slopes ``(N, h_prev H W)`` and Jacobian ``(N or 1, h_prev H W, d)``:
        the convex kernel applied to every column."""
        scaled = slopes[..., None] * previous
        n, _, d = scaled.shape
        weight = self.convex_weight
        columns = scaled.transpose(1, 2).reshape(n * d, weight.shape[1], *self.spatial)  # type: ignore[union-attr]
        return F.conv2d(columns, weight, padding=self._padding).reshape(n, d, -1).transpose(1, 2)  # type: ignore[arg-type]

    def detach(self) -> ConvAffineLayer:
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return ConvAffineLayer(
            self.input_weight.detach(), cut(self.offset), cut(self.convex_weight), self.spatial
        )


class ConvICNN(PackedParameters):
    r"""Convolutional input-convex network :math:`g: \mathbb{R}^{C H W} \to \mathbb{R}` (module docstring).

    :param image_shape: ``(C, H, W)`` of the images; rows are these images flattened.
    :param hidden_channels: channels :math:`h_k` of the hidden layers.
    :param kernel_size: odd side of the square kernels.
    :param augmented: make half of each hidden layer after the first an input-augmented
        feature :math:`s(L_k \star x + c_k)` (eq. 7 of Huang et al.).
    :param activation: a name in :data:`~pyro_cpflow.nn.ACTIVATIONS`.
    :param input_gain: the kernels reading :math:`x` start with PyTorch's initialisation of
        a ``Conv2d`` times this gain (as in :class:`~pyro_cpflow.nn.ICNN`).

    The parameters are packed into one tensor (:class:`~pyro_cpflow.packing.PackedParameters`);
    the state dict names them one by one (``first.weight``, ``convex_paths.0.raw_weight``,
    ``input_paths.0.weight``, ..., ``output_convex.raw_weight``, ``output_input.weight``).

    >>> net = ConvICNN((2, 4, 4), hidden_channels=(8, 8))
    >>> net(torch.randn(5, 32)).shape
    torch.Size([5])
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        hidden_channels: Sequence[int] = (32, 32),
        kernel_size: int = 3,
        augmented: bool = True,
        activation: str = "gaussian_softplus",
        input_gain: float = DEFAULT_INPUT_GAIN,
    ) -> None:
        super().__init__()
        channels, height, width = (int(n) for n in image_shape)
        hidden = [int(h) for h in hidden_channels]
        if min(channels, height, width) < 1:
            raise ValueError(f"image_shape must be three positive sizes (C, H, W), got {tuple(image_shape)}")
        if not hidden or min(hidden) < (2 if augmented else 1):
            raise ValueError(
                f"hidden_channels must be a non-empty list of positive ints (at least 2 when "
                f"augmented), got {tuple(hidden_channels)}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.image_shape = (channels, height, width)
        self.input_dim = channels * height * width
        self.hidden_channels = tuple(hidden)
        self.kernel_size = kernel_size
        self.augmented = augmented
        self.activation = get_activation(activation)
        # initial values from ordinary layers, drawn in a fixed order, then packed
        pad = kernel_size // 2
        first = nn.Conv2d(channels, hidden[0], kernel_size, padding=pad)
        convex_paths, input_paths = [], []
        for width_in, width_out in zip(hidden[:-1], hidden[1:], strict=True):
            convex_width = width_out - width_out // 2 if augmented else width_out
            convex = torch.empty(convex_width, width_in, kernel_size, kernel_size)
            nn.init.uniform_(convex, -1.0, 1.0)  # softplus(raw) spread around log 2, as in PositiveLinear
            convex_paths.append(convex)
            input_paths.append(nn.Conv2d(channels, width_out, kernel_size, padding=pad))
        output_convex = torch.empty(hidden[-1])
        nn.init.uniform_(output_convex, -1.0, 1.0)
        # no bias: a constant does not change the gradient map, so it would never train
        output_input = nn.Linear(self.input_dim, 1, bias=False)
        _scale_init([first, *input_paths], input_gain)
        tensors = {"first.weight": first.weight, "first.bias": first.bias}
        for k, (convex, direct) in enumerate(zip(convex_paths, input_paths, strict=True)):
            tensors[f"convex_paths.{k}.raw_weight"] = convex
            tensors[f"input_paths.{k}.weight"] = direct.weight
            tensors[f"input_paths.{k}.bias"] = direct.bias
        tensors["output_convex.raw_weight"] = output_convex
        tensors["output_input.weight"] = output_input.weight
        self.pack(tensors)

    def extra_repr(self) -> str:
        return (
            f"image_shape={self.image_shape}, hidden_channels={self.hidden_channels}, "
            f"kernel_size={self.kernel_size}, augmented={self.augmented}, activation={self.activation.name!r}"
        )

    def affine_layers(self, context: Tensor | None = None) -> tuple[list[ConvAffineLayer], AffineLayer]:
        """The pre-activations: ``(hidden, output)``, the hidden ones :class:`ConvAffineLayer` s and
        the read-out an :class:`~pyro_cpflow.affine.AffineLayer` of width 1."""
        if context is not None:
            raise ValueError("ConvICNN takes no context")
        p = self.unpacked()
        spatial = self.image_shape[1:]
        fan = self.kernel_size * self.kernel_size
        hidden = [ConvAffineLayer(p["first.weight"], p["first.bias"], None, spatial)]
        for k, width_in in enumerate(self.hidden_channels[:-1]):
            convex = positive_weight(p[f"convex_paths.{k}.raw_weight"], width_in * fan)
            hidden.append(
                ConvAffineLayer(p[f"input_paths.{k}.weight"], p[f"input_paths.{k}.bias"], convex, spatial)
            )
        # p_c on every position of channel c: the sum over channels and positions
        per_channel = positive_weight(p["output_convex.raw_weight"], self.hidden_channels[-1])
        readout = per_channel.repeat_interleave(math.prod(spatial))[None]
        return hidden, AffineLayer((p["output_input.weight"],), (None,), None, readout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Evaluate :math:`g(x)` for rows ``x`` ``(N, C H W)``; returns ``(N,)``."""
        return NetworkTrace(self.affine_layers(context), self.activation, x, derivatives=False).value


class ConvPotentialTrace(PotentialTrace):
    """A :class:`~pyro_cpflow.derivatives.PotentialTrace` of a convolutional network.

    Its input weights are kernels, not rows that a whitening could absorb, so it offers no
    fast whitened product: :func:`~pyro_cpflow.linalg.stochastic_logdet` then whitens
    around :meth:`hvp` (two products with :math:`Q^{-1/2}`, :math:`O(d r)` each).
    """

    whitened_hvp = None  # type: ignore[assignment]

    def detach(self) -> ConvPotentialTrace:
        return ConvPotentialTrace(self.network.detach(), self.quadratic.detach())


class ConvexConvPotential(ConvexPotential):
    r"""The potential :math:`F = \sigma g + \frac12 x^\top Q x + b^\top x` of a :class:`ConvICNN` :math:`g`.

    As :class:`~pyro_cpflow.potential.ConvexPotential`: :math:`Q = (\alpha + \beta) I + L L^\top`.

    :param network: the :class:`ConvICNN`.
    :param alpha: the floor :math:`\alpha > 0` of :math:`\nabla^2 F`.
    :param quadratic_rank: columns of :math:`L` (default 0: :math:`Q = (\alpha + \beta) I`;
        a dense :math:`L` would have :math:`d^2` entries).
    :param initial_scale: starting :math:`\sigma`.
    :param initial_factor_std: as in :class:`~pyro_cpflow.potential.ConvexPotential`.

    >>> potential = ConvexConvPotential(ConvICNN((1, 3, 3), (4, 4)))
    >>> potential.evaluate(torch.randn(2, 9)).hessian().shape
    torch.Size([2, 9, 9])
    """

    def __init__(
        self,
        network: ConvICNN,
        alpha: float = 1e-2,
        quadratic_rank: int = 0,
        initial_scale: float = 0.1,
        initial_factor_std: float = 0.3,
    ) -> None:
        super().__init__(network, network.input_dim, alpha, quadratic_rank, initial_scale, initial_factor_std)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.network.image_shape  # type: ignore[return-value]

    def evaluate(
        self, x: Tensor, context: Tensor | None = None, derivatives: bool = True
    ) -> ConvPotentialTrace:
        """As :meth:`~pyro_cpflow.potential.ConvexPotential.evaluate`, as a :class:`ConvPotentialTrace`."""
        trace = super().evaluate(x, context, derivatives)
        return ConvPotentialTrace(trace.network, trace.quadratic)


def conv_cpflow(
    image_shape: Sequence[int],
    hidden_channels: Sequence[int] = (32, 32),
    kernel_size: int = 3,
    augmented: bool = True,
    activation: str = "gaussian_softplus",
    input_gain: float = DEFAULT_INPUT_GAIN,
    alpha: float = 1e-2,
    quadratic_rank: int = 0,
    initial_scale: float = 0.1,
    **options,
) -> CPFlow:
    """One CP-Flow block on images ``image_shape`` flattened to rows: :math:`\\nabla F` of a
    :class:`ConvexConvPotential`. ``options`` are those of :class:`~pyro_cpflow.options.FlowOptions`
    (``logdet="stochastic"`` for large images, ``cg_rtol``, ``inverse_tol``, ...)."""
    network = ConvICNN(image_shape, hidden_channels, kernel_size, augmented, activation, input_gain)
    potential = ConvexConvPotential(network, alpha, quadratic_rank, initial_scale)
    return CPFlow(potential, **options)
