r"""The standard 2-D toy densities of the flow literature, sampled with a seeded generator.

Written from the published definitions (Grathwohl et al. 2019, FFJORD; Durkan et al.
2019, neural spline flows; Huang et al. 2021, CP-Flow), with the same scales and noise
levels. Where the reference code spaces points on a deterministic grid of angles
(``rings``, ``moons``) the angles here are drawn uniformly, so that every function
returns an i.i.d. sample from the same limiting density.

Every sampler has the signature ``(n, generator) -> Tensor (n, 2)`` (float64, CPU);
:func:`sample_toy` adds the name lookup, the seed, the dtype and the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TOY_DATASETS", "sample_toy"]

Sampler = Callable[[int, torch.Generator], Tensor]


def _randn(n: int, d: int, g: torch.Generator) -> Tensor:
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _rand(n: int, d: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, d, generator=g, dtype=torch.float64)


def _shuffle(x: Tensor, g: torch.Generator) -> Tensor:
    return x[torch.randperm(x.shape[0], generator=g)]


def eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    """Eight isotropic Gaussians (std 0.5) at radius 4 on the compass points, all divided by 1.414."""
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centers = 4.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    labels = torch.randint(0, 8, (n,), generator=g)
    return (centers[labels] + 0.5 * _randn(n, 2, g)) / 1.414


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the 8 dark squares of a 4 x 4 checkerboard of side 2 on [-4, 4]^2."""
    x1 = 4.0 * _rand(n, 1, g) - 2.0
    x2 = _rand(n, 1, g) - 2.0 * torch.randint(0, 2, (n, 1), generator=g).to(torch.float64)
    x2 = x2 + torch.remainder(torch.floor(x1), 2.0)
    return 2.0 * torch.cat([x1, x2], dim=-1)


def _spiral_arm(n: int, g: torch.Generator) -> Tensor:
    t = torch.sqrt(_rand(n, 1, g)) * (540.0 * 2.0 * math.pi / 360.0)
    return torch.cat([-torch.cos(t) * t, torch.sin(t) * t], dim=-1) + 0.5 * _rand(n, 2, g)


def two_spirals(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved spirals of 1.5 turns (uniform jitter 0.5), scaled by 1/3, noise 0.1."""
    half = n // 2
    x = torch.cat([_spiral_arm(half, g), -_spiral_arm(n - half, g)], dim=0) / 3.0
    return _shuffle(x + 0.1 * _randn(n, 2, g), g)


def pinwheel(n: int, g: torch.Generator) -> Tensor:
    """Five curved arms: radial std 0.3, tangential std 0.1, rate 0.25, scaled by 2."""
    num_arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = torch.randint(0, num_arms, (n,), generator=g)
    features = _randn(n, 2, g) * torch.tensor([radial_std, tangential_std], dtype=torch.float64)
    features[:, 0] += 1.0
    angles = labels.to(torch.float64) * (2.0 * math.pi / num_arms) + rate * torch.exp(features[:, 0])
    cos, sin = torch.cos(angles), torch.sin(angles)
    # row vector times [[cos, -sin], [sin, cos]], as in the reference definition
    x = torch.stack(
        [features[:, 0] * cos + features[:, 1] * sin, -features[:, 0] * sin + features[:, 1] * cos], -1
    )
    return 2.0 * x


def rings(n: int, g: torch.Generator) -> Tensor:
    """Four concentric circles of radii 3, 2.25, 1.5, 0.75 (equal mass), noise 0.08."""
    radii = torch.tensor([3.0, 2.25, 1.5, 0.75], dtype=torch.float64)
    which = torch.randint(0, 4, (n,), generator=g)
    angle = 2.0 * math.pi * _rand(n, 1, g).squeeze(-1)
    x = radii[which, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return x + 0.08 * _randn(n, 2, g)


def moons(n: int, g: torch.Generator) -> Tensor:
    """Two interleaving half circles (noise 0.1), mapped by ``2 x + (-1, -0.2)``."""
    upper = torch.randint(0, 2, (n,), generator=g).bool()
    angle = math.pi * _rand(n, 1, g).squeeze(-1)
    outer = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    inner = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=-1)
    x = torch.where(upper[:, None], outer, inner) + 0.1 * _randn(n, 2, g)
    return 2.0 * x + torch.tensor([-1.0, -0.2], dtype=torch.float64)


TOY_DATASETS: dict[str, Sampler] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "pinwheel": pinwheel,
    "rings": rings,
    "moons": moons,
}


def sample_toy(
    name: str,
    n: int,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``n`` points of the toy set ``name``; the same ``seed`` gives the same points.

    >>> sample_toy("rings", 5, seed=0).shape
    torch.Size([5, 2])
    >>> bool((sample_toy("moons", 7, seed=3) == sample_toy("moons", 7, seed=3)).all())
    True
    """
    try:
        sampler = TOY_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown toy set {name!r}; choose one of {sorted(TOY_DATASETS)}") from None
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return sampler(n, generator).to(device=device, dtype=dtype)
