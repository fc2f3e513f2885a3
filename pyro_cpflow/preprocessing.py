r"""Image preprocessing for density models: uniform dequantisation, the logit transform, bits per dimension.

**Dequantisation.** A pixel takes one of :math:`K` levels :math:`k \in \{0, \dots, K-1\}`
(:math:`K = 256` for 8 bits). With :math:`\varepsilon \sim U[0, 1)^D` and
:math:`u = (k + \varepsilon)/K \in [0, 1)^D`, a continuous density :math:`p_U` on the unit
cube defines the discrete model :math:`P(k) = \int_{[0,1)^D} p_U((k+\varepsilon)/K)\, K^{-D}
\,d\varepsilon`, and by Jensen's inequality (Theis, van den Oord & Bethge, arXiv:1511.01844)

.. math::

    \log P(k) \ge \mathbb{E}_\varepsilon\bigl[\log p_U(u)\bigr] - D \log K .

**The logit transform** (Dinh et al., arXiv:1605.08803) moves the cube to
:math:`\mathbb{R}^D`: :math:`p = \lambda + (1 - 2\lambda) u`, :math:`y = \mathrm{logit}(p)`, with
a small :math:`\lambda` keeping :math:`p` away from 0 and 1. It acts coordinatewise with

.. math::

    \frac{dy}{du} = \frac{1 - 2\lambda}{p (1 - p)}, \qquad
    \log\Bigl|\det\frac{\partial y}{\partial u}\Bigr|
      = \sum_i \bigl[\log(1 - 2\lambda) + \mathrm{softplus}(y_i) + \mathrm{softplus}(-y_i)\bigr],

since :math:`-\log p = \mathrm{softplus}(-y)` and :math:`-\log(1-p) = \mathrm{softplus}(y)`.
A flow models :math:`p_Y`; then :math:`\log p_U(u) = \log p_Y(y) + \log|\det \partial y /
\partial u|`.

**Bits per dimension.** With :math:`\mathrm{NLL}_Y = -\log p_Y(y)` (nats, from the flow) and
:math:`\Lambda = \log|\det \partial y / \partial u|`, the negative log-likelihood of the 8-bit
image in bits per dimension is bounded by

.. math::

    \mathrm{bpd} = \frac{\mathrm{NLL}_Y - \Lambda + D \log K}{D \ln 2}
                 = \frac{-\log p_U(u) + D \log K}{D \ln 2},

averaged over images and dequantisation noise (:func:`bits_per_dim`).

>>> images = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8)
>>> u = dequantize(images)
>>> logit = LogitTransform(1e-6)
>>> y = logit(u)
>>> bool(((u >= 0) & (u < 1)).all()), torch.allclose(logit.inv(y), u)
(True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform, constraints

__all__ = ["LogitTransform", "bits_per_dim", "dequantize"]


def dequantize(
    levels: Tensor,
    num_levels: int = 256,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r""":math:`u = (k + \varepsilon) / K` with :math:`\varepsilon \sim U[0, 1)` per entry, for
    integer levels ``k`` in :math:`[0, K)`.

    :param levels: integer tensor of pixel levels.
    :param num_levels: :math:`K`.
    :param generator: the random stream of :math:`\varepsilon` (default torch's global one).
    :param dtype: of the result (default torch's default dtype).
    """
    if levels.dtype.is_floating_point:
        raise TypeError(f"dequantize takes integer levels, got dtype {levels.dtype}")
    low, high = int(levels.min()), int(levels.max())
    if low < 0 or high >= num_levels:
        raise ValueError(f"levels must lie in [0, {num_levels}), got values in [{low}, {high}]")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    noise = torch.rand(levels.shape, generator=generator, dtype=dtype, device=levels.device)
    return (levels.to(dtype) + noise) / num_levels


class LogitTransform(Transform):
    r""":math:`y = \mathrm{logit}(\lambda + (1 - 2\lambda) u)` coordinatewise, :math:`(0, 1) \to \mathbb{R}`.

    :param margin: :math:`\lambda \in [0, 1/2)`.

    ``log_abs_det_jacobian(u, y)`` is elementwise (``event_dim`` 0), as for torch's own
    coordinatewise transforms; sum it over the coordinates of an image (see the module
    docstring for the formula).
    """

    domain = constraints.unit_interval
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, margin: float = 1e-6, cache_size: int = 0) -> None:
        if not 0 <= margin < 0.5:
            raise ValueError(f"margin must lie in [0, 1/2), got {margin}")
        super().__init__(cache_size=cache_size)
        self.margin = float(margin)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogitTransform) and other.margin == self.margin

    def __hash__(self) -> int:
        return hash((LogitTransform, self.margin))

    def _call(self, u: Tensor) -> Tensor:
        p = self.margin + (1.0 - 2.0 * self.margin) * u
        return torch.log(p) - torch.log1p(-p)

    def _inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.margin) / (1.0 - 2.0 * self.margin)

    def log_abs_det_jacobian(self, u: Tensor, y: Tensor) -> Tensor:
        return math.log1p(-2.0 * self.margin) + F.softplus(y) + F.softplus(-y)


def bits_per_dim(log_density: Tensor, num_dims: int, num_levels: int = 256) -> Tensor:
    r""":math:`(-\log p_U(u) + D \log K) / (D \ln 2)` per image, from ``log_density`` :math:`= \log p_U(u)`
    (nats, the density of the dequantised image on the unit cube).

    A model that is uniform on the cube (:math:`p_U = 1`) gives :math:`\log_2 K`, 8 bits for
    8-bit images:

    >>> bits_per_dim(torch.zeros(3), num_dims=784)
    tensor([8., 8., 8.])
    """
    return (-log_density + num_dims * math.log(num_levels)) / (num_dims * math.log(2.0))
