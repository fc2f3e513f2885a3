r"""Input-convex neural networks.

An input-convex neural network (ICNN, Amos et al. 2017) is a scalar network
:math:`g(x)` that is convex in :math:`x` for every value of its parameters. Each
hidden layer computes

.. math::

    z_{k+1} = s\bigl(P_k z_k + W_k x + b_k\bigr),

where :math:`P_k` has non-negative entries and :math:`s` is convex and
non-decreasing; a non-negative combination of convex functions, composed with a
convex non-decreasing function, stays convex. Here :math:`P_k = \mathrm{softplus}(A_k)
/ \mathrm{fan\_in}` (no clamping, smooth gradients) and :math:`s` is a twice
differentiable member of the softplus family, so the Hessian of the potential
exists everywhere.

The *input-augmented* ICNN of CP-Flow (Huang et al. 2021, eq. 7) makes half of
every hidden layer a fresh convex feature of the input, :math:`s(L_k x + c_k)`.

The partially input-convex network (:class:`PICNN`) is convex in :math:`x` for every
context :math:`c` and arbitrary in :math:`c`: the context drives gates and offsets
of the convex path through an ordinary network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .affine import Activation, AffineLayer
from .derivatives import NetworkTrace
from .packing import PackedParameters

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_INPUT_GAIN",
    "ICNN",
    "NoNetwork",
    "PICNN",
    "PositiveLinear",
    "gaussian_softplus",
    "get_activation",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_MINUS_INV_SQRT_2 = -1.0 / math.sqrt(2.0)


def _normal_cdf(x: Tensor) -> Tensor:
    # erfc is accurate in the lower tail and, on a CPU, several times faster than special.ndtr
    return 0.5 * torch.erfc(x * _MINUS_INV_SQRT_2)


def _normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(torch.addcmul(x.new_full((), -_LOG_SQRT_2PI), x, x, value=-0.5))


def _gaussian_softplus_orders(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r""":math:`(s, s', s'') = (x\Phi + \varphi, \Phi, \varphi)` from one evaluation of each."""
    cdf, pdf = _normal_cdf(x), _normal_pdf(x)
    return torch.addcmul(pdf, x, cdf), cdf, pdf


class _GaussianSoftplus(torch.autograd.Function):
    r""":math:`s(x) = x\Phi(x) + \varphi(x)` with the analytic derivative :math:`s' = \Phi`.

    The backward pass is written with differentiable operations, so higher derivatives
    (:math:`s'' = \varphi`, needed by Hessians and their gradients) come from autograd
    on a graph much smaller than that of the composite formula.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * _normal_cdf(x) + _normal_pdf(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_output * _normal_cdf(x)


def gaussian_softplus(x: Tensor) -> Tensor:
    r"""Gaussian softplus :math:`s(x) = x\,\Phi(x) + \varphi(x)`.

    Convex and increasing, with :math:`s' = \Phi` and :math:`s'' = \varphi > 0`, so it
    is smooth to every order. It equals :math:`\mathbb{E}[\max(0, x + \varepsilon)]`
    for :math:`\varepsilon \sim \mathcal{N}(0, 1)`.

    >>> [round(v, 4) for v in gaussian_softplus(torch.tensor([-50.0, 0.0, 50.0])).tolist()]
    [0.0, 0.3989, 50.0]
    """
    return _GaussianSoftplus.apply(x)


def _softplus(x: Tensor) -> Tensor:
    # log(1 + e^x) without the linear cut-off of F.softplus above 20, which would break the
    # identity s'' = sigmoid (1 - sigmoid) that the analytic Hessian relies on
    return torch.logaddexp(x, x.new_zeros(()))


def _sigmoid_slope(x: Tensor) -> Tensor:
    sigmoid = torch.sigmoid(x)
    return sigmoid * (1.0 - sigmoid)


def _softplus_orders(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sigmoid = torch.sigmoid(x)
    return _softplus(x), sigmoid, sigmoid - sigmoid * sigmoid


ACTIVATIONS: dict[str, Activation] = {
    "softplus": Activation("softplus", _softplus, torch.sigmoid, _sigmoid_slope, _softplus_orders),
    "gaussian_softplus": Activation(
        "gaussian_softplus", gaussian_softplus, _normal_cdf, _normal_pdf, _gaussian_softplus_orders
    ),
}
"""Convex, non-decreasing, twice differentiable activations, with their derivatives."""


def get_activation(name: str) -> Activation:
    """Look up an :class:`~pyro_cpflow.derivatives.Activation` by name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def positive_weight(raw: Tensor, fan_in: int) -> Tensor:
    r"""The non-negative weight :math:`\mathrm{softplus}(A) / \mathrm{fan\_in}` of raw ``A``."""
    return F.softplus(raw) / fan_in


class PositiveLinear(nn.Module):
    r"""Linear map with non-negative weights :math:`\mathrm{softplus}(A) / \mathrm{fan\_in}`.

    Dividing by the fan-in keeps activations of order one however wide the layer.

    >>> layer = PositiveLinear(3, 2)
    >>> bool((layer.weight >= 0).all())
    True
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.raw_weight = nn.Parameter(torch.empty(out_features, in_features))
        # softplus(raw) spread around log 2, as with a default-initialised Linear
        nn.init.uniform_(self.raw_weight, -1.0, 1.0)

    @property
    def weight(self) -> Tensor:
        return positive_weight(self.raw_weight, self.in_features)

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight)


DEFAULT_INPUT_GAIN = 4.0


def _scale_init(layers: Sequence[nn.Module], gain: float) -> None:
    """Multiply the initial weights and biases of ``layers`` by ``gain``."""
    if not gain > 0:
        raise ValueError(f"input_gain must be positive, got {gain}")
    with torch.no_grad():
        for layer in layers:
            for parameter in layer.parameters(recurse=False):
                parameter.mul_(gain)


def _check_dims(input_dim: int, hidden_dims: Sequence[int], augmented: bool) -> None:
    if input_dim < 1:
        raise ValueError(f"input_dim must be positive, got {input_dim}")
    if len(hidden_dims) == 0 or any(h < 1 for h in hidden_dims):
        raise ValueError(f"hidden_dims must be a non-empty list of positive ints, got {hidden_dims}")
    if augmented and any(h < 2 for h in hidden_dims):
        raise ValueError("an augmented network needs hidden widths of at least 2")


class ICNN(PackedParameters):
    r"""Fully input-convex network :math:`g: \mathbb{R}^d \to \mathbb{R}`.

    .. math::

        z_1 = s(W_0 x + b_0), \quad
        z_{k+1} = s(P_k z_k + W_k x + b_k), \quad
        g(x) = p^\top z_K + w^\top x,

    with non-negative :math:`P_k, p` (:class:`PositiveLinear`). With
    ``augmented=True`` half of each hidden layer after the first is
    :math:`s(L_k x + c_k)`, a convex feature computed directly from the input.

    The parameters are packed into one tensor (:class:`~pyro_cpflow.packing.PackedParameters`);
    the state dict names them one by one (``first.weight``, ``convex_paths.0.raw_weight``,
    ``input_paths.0.weight``, ..., ``output_input.weight``).

    :param input_dim: dimension :math:`d` of :math:`x`.
    :param hidden_dims: widths of the hidden layers.
    :param augmented: use the input-augmented architecture.
    :param activation: a name in :data:`ACTIVATIONS`.
    :param input_gain: the layers reading :math:`x` start with PyTorch's default
        initialisation times this gain. On standardised data, gain 1 leaves the features
        so smooth that the potential is nearly quadratic and maximum likelihood stalls
        near the Gaussian fit; gain 4 (measured on the 2-D toy sets) lets it bend.

    >>> net = ICNN(2, [16, 16], augmented=True)
    >>> net(torch.randn(5, 2)).shape
    torch.Size([5])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        augmented: bool = True,
        activation: str = "gaussian_softplus",
        input_gain: float = DEFAULT_INPUT_GAIN,
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        _check_dims(input_dim, hidden_dims, augmented)
        self.input_dim = input_dim
        self.augmented = augmented
        self.activation = get_activation(activation)
        self.hidden_dims = tuple(hidden_dims)
        # the initial values are drawn by ordinary layers (PyTorch's initialisation, in a
        # fixed order), then packed: one linear map of x per layer, the rows of W_k (convex
        # units) and, when augmented, those of L_k (input-augmented units) below them
        first = nn.Linear(input_dim, hidden_dims[0])
        convex_paths, input_paths = [], []
        for width_in, width in zip(hidden_dims[:-1], hidden_dims[1:], strict=True):
            convex_width = width - width // 2 if augmented else width
            convex_paths.append(PositiveLinear(width_in, convex_width))
            input_paths.append(nn.Linear(input_dim, width))
        output_convex = PositiveLinear(hidden_dims[-1], 1)
        # no bias: a constant does not change the gradient map, so it would never train
        output_input = nn.Linear(input_dim, 1, bias=False)
        _scale_init([first, *input_paths], input_gain)
        tensors = {"first.weight": first.weight, "first.bias": first.bias}
        for k, (convex, direct) in enumerate(zip(convex_paths, input_paths, strict=True)):
            tensors[f"convex_paths.{k}.raw_weight"] = convex.raw_weight
            tensors[f"input_paths.{k}.weight"] = direct.weight
            tensors[f"input_paths.{k}.bias"] = direct.bias
        tensors["output_convex.raw_weight"] = output_convex.raw_weight
        tensors["output_input.weight"] = output_input.weight
        self.pack(tensors)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, hidden_dims={self.hidden_dims}, augmented={self.augmented}, "
            f"activation={self.activation.name!r}"
        )

    def affine_layers(self, context: Tensor | None = None) -> tuple[list[AffineLayer], AffineLayer]:
        """The pre-activations as :class:`~pyro_cpflow.derivatives.AffineLayer` s: ``(hidden, output)``."""
        if context is not None:
            raise ValueError("ICNN takes no context; use PICNN for a conditional potential")
        p = self.unpacked()
        hidden = [AffineLayer((p["first.weight"],), (None,), p["first.bias"])]
        for k, width_in in enumerate(self.hidden_dims[:-1]):
            hidden.append(
                AffineLayer(
                    (p[f"input_paths.{k}.weight"],),
                    (None,),
                    p[f"input_paths.{k}.bias"],
                    positive_weight(p[f"convex_paths.{k}.raw_weight"], width_in),
                )
            )
        output_convex = positive_weight(p["output_convex.raw_weight"], self.hidden_dims[-1])
        output = AffineLayer((p["output_input.weight"],), (None,), None, output_convex)
        return hidden, output

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Evaluate :math:`g(x)` for ``x`` of shape ``(N, d)``; returns shape ``(N,)``."""
        return NetworkTrace(self.affine_layers(context), self.activation, x, derivatives=False).value


class PICNN(PackedParameters):
    r"""Partially input-convex network :math:`g(x, c)`, convex in :math:`x` for every :math:`c`.

    A context path :math:`u_0 = c,\ u_{k+1} = \tanh(V_k u_k + a_k)` is an ordinary
    network. The convex path is

    .. math::

        z_{k+1} = s\Bigl(P_k\bigl(z_k \odot \mathrm{softplus}(G_k u_k)\bigr)
                  + W_k\bigl(x \odot (H_k u_k + 1)\bigr) + U_k u_k + b_k\Bigr),

    with non-negative :math:`P_k` (the output layer has no offset :math:`U_K u_K + b_K`,
    which would not change the gradient in :math:`x`). For fixed :math:`c` the gate on :math:`z_k` is
    non-negative and the term in :math:`x` is linear, so convexity in :math:`x` holds
    as in the :class:`ICNN`. With ``augmented=True`` half of each hidden layer after
    the first is :math:`s(W'_k(x \odot (H'_k u_k + 1)) + U'_k u_k + b'_k)`.

    The parameters are packed into one tensor, as in :class:`ICNN`; the state dict names
    them one by one (``context_layers.0.weight``, ``layers.0.input_gate.weight``, ...).

    :param input_dim: dimension of the convex input :math:`x`.
    :param context_dim: dimension of the context :math:`c`.
    :param hidden_dims: widths of the hidden layers (of both paths).
    :param augmented: use the input-augmented architecture.
    :param activation: a name in :data:`ACTIVATIONS`.
    :param input_gain: as in :class:`ICNN`, for the hidden layers' terms in :math:`x`
        and their context offsets (which place the features).

    >>> net = PICNN(2, 3, [16, 16])
    >>> net(torch.randn(5, 2), torch.randn(5, 3)).shape
    torch.Size([5])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        augmented: bool = True,
        activation: str = "gaussian_softplus",
        input_gain: float = DEFAULT_INPUT_GAIN,
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        _check_dims(input_dim, hidden_dims, augmented)
        if context_dim < 1:
            raise ValueError(f"context_dim must be positive, got {context_dim}")
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.hidden_dims = tuple(hidden_dims)
        self.augmented = augmented
        self.activation = get_activation(activation)
        context_widths = [context_dim] + hidden_dims
        # initial values from ordinary layers (drawn in a fixed order), then packed
        draft = nn.Module()
        draft.context_layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(context_widths[:-1], context_widths[1:], strict=True)
        )
        draft.layers = nn.ModuleList()
        draft.augment_layers = nn.ModuleList()
        widths_in = [None] + hidden_dims
        widths_out = hidden_dims + [1]
        for k, (width_in, width) in enumerate(zip(widths_in, widths_out, strict=True)):
            hidden = k < len(hidden_dims)
            first_or_output = width_in is None or not hidden
            convex_width = width if (first_or_output or not augmented) else width - width // 2
            # the output's offset would be constant in x: no effect on the gradient map
            draft.layers.append(
                _PICNNLayer(input_dim, context_widths[k], width_in, convex_width, offset=hidden)
            )
            if hidden and augmented and width_in is not None:
                draft.augment_layers.append(_PICNNLayer(input_dim, context_widths[k], None, width // 2))
        for layer in [*draft.layers[:-1], *draft.augment_layers]:
            _scale_init([layer.input_weight, layer.context_offset], input_gain)
        self._layers = [layer.spec(f"layers.{k}.") for k, layer in enumerate(draft.layers)]
        self._augment_layers = [
            layer.spec(f"augment_layers.{k}.") for k, layer in enumerate(draft.augment_layers)
        ]
        self.pack(dict(draft.named_parameters()))

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, hidden_dims={self.hidden_dims}, "
            f"augmented={self.augmented}, activation={self.activation.name!r}"
        )

    def affine_layers(self, context: Tensor | None) -> tuple[list[AffineLayer], AffineLayer]:
        """The pre-activations for context rows ``(N, c)``: ``(hidden, output)`` (see :class:`ICNN`)."""
        if context is None:
            raise ValueError("PICNN needs a context tensor")
        p = self.unpacked()
        u = context
        hidden = []
        for k, layer in enumerate(self._layers[:-1]):
            affine = layer.affine(p, u)
            if self.augmented and k > 0:
                affine = affine.stacked_with(self._augment_layers[k - 1].affine(p, u))
            hidden.append(affine)
            u = torch.tanh(F.linear(u, p[f"context_layers.{k}.weight"], p[f"context_layers.{k}.bias"]))
        return hidden, self._layers[-1].affine(p, u)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Evaluate :math:`g(x, c)` for ``x`` ``(N, d)`` and ``context`` ``(N, c)``; returns ``(N,)``."""
        return NetworkTrace(self.affine_layers(context), self.activation, x, derivatives=False).value


class _PICNNLayer(nn.Module):
    """The initial parameters of one pre-activation of the PICNN convex path (see :class:`PICNN`)."""

    def __init__(
        self, input_dim: int, context_width: int, convex_in: int | None, width: int, offset: bool = True
    ) -> None:
        super().__init__()
        self.input_gate = nn.Linear(context_width, input_dim)
        nn.init.zeros_(self.input_gate.weight)
        nn.init.ones_(self.input_gate.bias)
        self.input_weight = nn.Linear(input_dim, width, bias=False)
        self.context_offset = nn.Linear(context_width, width) if offset else None
        self.convex_in = convex_in
        if convex_in is not None:
            self.convex_gate = nn.Linear(context_width, convex_in)
            self.convex_weight = PositiveLinear(convex_in, width)

    def spec(self, prefix: str) -> _PICNNLayerSpec:
        return _PICNNLayerSpec(prefix, self.convex_in, self.context_offset is not None)


@dataclass(frozen=True)
class _PICNNLayerSpec:
    """Where one PICNN pre-activation finds its parameters among the packed ones, and its shape."""

    prefix: str
    convex_in: int | None
    offset: bool

    def _linear(self, p: dict[str, Tensor], name: str, u: Tensor) -> Tensor:
        return F.linear(u, p[f"{self.prefix}{name}.weight"], p[f"{self.prefix}{name}.bias"])

    def affine(self, p: dict[str, Tensor], u: Tensor) -> AffineLayer:
        """This pre-activation, for context features ``u`` ``(N, c_k)``, as an affine map of ``(z, x)``."""
        weight = p[f"{self.prefix}input_weight.weight"]
        gate = self._linear(p, "input_gate", u)
        offset = self._linear(p, "context_offset", u) if self.offset else None
        if self.convex_in is None:
            return AffineLayer((weight,), (gate,), offset)
        convex_weight = positive_weight(p[f"{self.prefix}convex_weight.raw_weight"], self.convex_in)
        return AffineLayer(
            (weight,), (gate,), offset, convex_weight, F.softplus(self._linear(p, "convex_gate", u))
        )


class NoNetwork(nn.Module):
    r"""The network :math:`g = 0`: a potential made of its quadratic and context terms alone.

    With :class:`~pyro_cpflow.potential.ContextQuadratic` terms, :math:`F(x; c) =
    \tfrac12 x^\top (Q + D(c) + L(c)L(c)^\top) x + b(c)^\top x` and the conditional map is the
    affine :math:`x \mapsto A(c)\,x + b(c)` with :math:`A(c) \succ 0`: a conditional Gaussian.
    Its log-determinant depends on the context only, so the map's log-density is as smooth as
    the context network (``tanh``), with none of the activation bumps of an input-convex
    network (see ``experiments/RESULTS.md``, "NeuTra: the warped geometry").

    >>> NoNetwork(3, context_dim=2)
    NoNetwork(input_dim=3, context_dim=2)
    """

    def __init__(self, input_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim must be positive, got {input_dim}")
        self.input_dim = input_dim
        self.context_dim = context_dim

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}"

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x.new_zeros(x.shape[:-1])
