r"""A multiscale flow on images: blocks, squeeze (space-to-depth) and factoring out, per level.

The layout of RealNVP (Dinh, Sohl-Dickstein & Bengio, arXiv:1605.08803) and Glow (Kingma &
Dhariwal, arXiv:1807.03039). Images travel as flattened rows ``(N, C H W)``, channel first.
Level :math:`\ell` applies its blocks (any bijective transforms of rows, such as
:func:`~pyro_cpflow.conv.conv_cpflow` blocks after a :class:`ChannelActNorm`) at shape
:math:`(C_\ell, H_\ell, W_\ell)`; between two levels the image is *squeezed*, each
:math:`2 \times 2` patch becoming four channels,

.. math::

    (C, H, W) \to (4C, H/2, W/2),

and, with ``factor_out``, the second half of its channels leaves the flow: it is part of the
output as it is, and the next level works on :math:`(2C, H/2, W/2)` only. The map is a
bijection of :math:`\mathbb{R}^D`, :math:`D = C H W`; the output is the concatenation of the
factored parts, in the order they left, and of the last level's result. Squeezes and splits
are permutations of coordinates (log-det 0), and each block acts on the coordinates still in
the flow, so the Jacobian is block triangular and

.. math::

    \log|\det J(x)| = \sum_{\text{blocks } b} \log|\det J_b(h_b)| ,

with :math:`h_b` the input of block :math:`b`. With a standard normal base on all :math:`D`
outputs, ``TransformedDistribution(base, [flow.inv])`` is the density of the data (training
needs only the forward direction); its ``sample`` inverts the blocks, from the last level to
the first.

>>> from pyro_cpflow.conv import conv_cpflow
>>> flow = MultiscaleFlow((1, 4, 4), [[ChannelActNorm((1, 4, 4)), conv_cpflow((1, 4, 4), (4, 4))],
...                                   [conv_cpflow((2, 2, 2), (4, 4))]])
>>> x = torch.randn(3, 16)
>>> z = flow(x)
>>> z.shape, flow.log_abs_det_jacobian(x, z).shape, flow.level_shapes
(torch.Size([3, 16]), torch.Size([3]), ((1, 4, 4), (2, 2, 2)))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform

from .actnorm import ActNorm
from .pyro_glue import ModuleInverseMixin, VersionedCacheMixin, module_parameters_and_buffers, module_repr

__all__ = ["ChannelActNorm", "MultiscaleFlow", "level_shapes", "squeeze", "unsqueeze"]

Shape = tuple[int, int, int]


def squeeze(rows: Tensor, shape: Sequence[int]) -> Tensor:
    """Space to depth: rows of images ``(C, H, W)`` to rows of ``(4C, H/2, W/2)``
    (:func:`torch.nn.functional.pixel_unshuffle`), a permutation of the coordinates.

    >>> squeeze(torch.arange(4.0)[None], (1, 2, 2))
    tensor([[0., 1., 2., 3.]])
    """
    channels, height, width = shape
    images = rows.reshape(-1, channels, height, width)
    return F.pixel_unshuffle(images, 2).reshape(*rows.shape[:-1], -1)


def unsqueeze(rows: Tensor, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`squeeze` for images whose unsqueezed shape is ``shape`` ``(C, H, W)``."""
    channels, height, width = shape
    images = rows.reshape(-1, 4 * channels, height // 2, width // 2)
    return F.pixel_shuffle(images, 2).reshape(*rows.shape[:-1], -1)


def level_shapes(image_shape: Sequence[int], num_levels: int, factor_out: bool = True) -> tuple[Shape, ...]:
    """The image shape each level of a :class:`MultiscaleFlow` works on.

    >>> level_shapes((1, 28, 28), 3)
    ((1, 28, 28), (2, 14, 14), (4, 7, 7))
    """
    channels, height, width = (int(n) for n in image_shape)
    shapes = [(channels, height, width)]
    for _ in range(num_levels - 1):
        if height % 2 or width % 2:
            raise ValueError(
                f"a squeeze needs even height and width, got {height}x{width} after "
                f"{len(shapes) - 1} squeezes of {tuple(image_shape)}: use fewer levels"
            )
        channels, height, width = 4 * channels, height // 2, width // 2
        if factor_out:
            channels //= 2
        shapes.append((channels, height, width))
    return tuple(shapes)


class ChannelActNorm(TransformModule):
    r"""ActNorm per channel on flattened images: :math:`y_{chw} = (x_{chw} - \mu_c) e^{-s_c}`.

    A :class:`~pyro_cpflow.actnorm.ActNorm` of width ``C`` applied at every position
    (channels last), so its data-dependent initialisation standardises each channel over the
    batch and the positions. :math:`\log|\det J| = -H W \sum_c s_c`. It keeps no cache of its
    own (the map is cheap); the inner ``ActNorm`` keeps its versioned one.

    >>> norm = ChannelActNorm((2, 3, 3))
    >>> y = norm(5.0 + 2.0 * torch.randn(100, 18))
    >>> round(float(y.detach().reshape(100, 2, 9)[:, 0].std(unbiased=False)), 4)
    1.0
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, image_shape: Sequence[int], min_scale: float = 1e-4) -> None:
        super().__init__(cache_size=0)
        self.image_shape: Shape = tuple(int(n) for n in image_shape)  # type: ignore[assignment]
        self.norm = ActNorm(self.image_shape[0], min_scale)

    __repr__ = module_repr

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}"

    def _channels_last(self, rows: Tensor) -> Tensor:
        return rows.reshape(*rows.shape[:-1], *self.image_shape).movedim(-3, -1)

    def _rows(self, images: Tensor) -> Tensor:
        return images.movedim(-1, -3).reshape(*images.shape[:-3], -1)

    def _call(self, x: Tensor) -> Tensor:
        return self._rows(self.norm(self._channels_last(x)))

    def _inverse(self, y: Tensor) -> Tensor:
        return self._rows(self.norm.inv(self._channels_last(y)))

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        positions = self.image_shape[1] * self.image_shape[2]
        return (-positions * self.norm.log_scale.sum()).expand(x.shape[:-1])


class MultiscaleFlow(ModuleInverseMixin, VersionedCacheMixin, TransformModule):
    r"""Levels of blocks with a squeeze (and optionally a split) between levels (see the module docstring).

    :param image_shape: ``(C, H, W)`` of the input images (rows of ``C H W``).
    :param levels: one list of blocks per level, each a bijective transform of the rows of that
        level's shape (:attr:`level_shapes`, from :func:`level_shapes`). Blocks that are modules
        (``TransformModule`` s) are registered in order in ``block_modules``, for their
        parameters and state; a plain ``Transform`` (such as Pyro's ``Permute``) has no state
        to save and must be rebuilt identically.
    :param factor_out: after each squeeze, move half of the channels to the output.

    The forward map keeps its log-det beside the cached pair, so ``log_abs_det_jacobian``
    right after a call costs nothing. ``last_inverse_reports`` holds the reports of the CP-Flow
    blocks' solvers from the last inverse; a result that one of them could not bring to its
    tolerance is not cached.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self,
        image_shape: Sequence[int],
        levels: Sequence[Sequence[Transform]],
        factor_out: bool = True,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if not levels:
            raise ValueError("a multiscale flow needs at least one level")
        self.image_shape: Shape = tuple(int(n) for n in image_shape)  # type: ignore[assignment]
        self.factor_out = factor_out
        self.level_shapes = level_shapes(self.image_shape, len(levels), factor_out)
        self.levels = tuple(tuple(blocks) for blocks in levels)
        self.block_modules = nn.ModuleList(block for block in self.blocks() if isinstance(block, nn.Module))
        self.input_dim = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        self.last_inverse_reports: list = []

    __repr__ = module_repr

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, levels={len(self.levels)}, factor_out={self.factor_out}"

    def blocks(self) -> Iterable[Transform]:
        """Every block, in the order of the forward map."""
        for level in self.levels:
            yield from level

    def _cache_parameters(self) -> Iterable[Tensor]:
        return module_parameters_and_buffers(self)

    def _forward_with_logdet(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, logdet, outputs = x, x.new_zeros(x.shape[:-1]), []
        for index, level in enumerate(self.levels):
            if index > 0:
                h = squeeze(h, self._squeezed_from(index))
                if self.factor_out:
                    h, out = h.chunk(2, -1)  # channels first: the second half of the row
                    outputs.append(out)
            for block in level:
                y = block(h)
                logdet = logdet + block.log_abs_det_jacobian(h, y)
                h = y
        return torch.cat([*outputs, h], -1), logdet

    def _squeezed_from(self, index: int) -> Shape:
        """The shape the squeeze before level ``index`` starts from: level ``index - 1``'s."""
        return self.level_shapes[index - 1]

    def _call(self, x: Tensor) -> Tensor:
        z, logdet = self._forward_with_logdet(x)
        self._side_store(x, logdet)
        return z

    def _inverse(self, z: Tensor) -> Tensor:
        levels = range(1, len(self.levels))
        sizes = [self._factored_size(index) for index in levels] if self.factor_out else []
        parts = list(z.split([*sizes, z.shape[-1] - sum(sizes)], -1))
        h = parts.pop()
        self.last_inverse_reports = []
        for index in reversed(range(len(self.levels))):
            for block in reversed(self.levels[index]):
                h = block.inv(h)
                report = getattr(block, "last_inverse", None)
                if report is not None:
                    self.last_inverse_reports.append(report)
                    if not report.all_converged:
                        self._mark_unconverged()
            if index > 0:
                if self.factor_out:
                    h = torch.cat([h, parts.pop()], -1)
                h = unsqueeze(h, self._squeezed_from(index))
        return h

    def _factored_size(self, index: int) -> int:
        """Coordinates that leave the flow before level ``index``."""
        channels, height, width = self.level_shapes[index]
        return channels * height * width

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\sum_b \\log|\\det J_b|`, shape ``batch``: the one kept by the last call at ``x``,
        else from a forward pass."""
        kept = self._side_lookup(x)
        if kept is not None:
            return kept
        return self._forward_with_logdet(x)[1]

    def with_cache(self, cache_size: int = 1) -> MultiscaleFlow:
        if cache_size == self._cache_size:
            return self
        raise NotImplementedError("MultiscaleFlow keeps cache_size=1")
