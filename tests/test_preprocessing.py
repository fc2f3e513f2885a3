"""Dequantisation, the logit transform and bits per dimension, against autograd and a known distribution."""

import math

import pytest
import torch

from pyro_cpflow.preprocessing import LogitTransform, bits_per_dim, dequantize


@pytest.mark.parametrize("margin", [0.0, 1e-6, 0.05])
def test_logit_log_det_matches_autograd(margin):
    logit = LogitTransform(margin)
    u = torch.rand(5, 12).clamp(1e-3, 1 - 1e-3)
    y = logit(u)
    derivative = torch.func.vmap(torch.func.grad(lambda v: logit(v)))(u.reshape(-1)).reshape(u.shape)
    assert torch.allclose(logit.log_abs_det_jacobian(u, y), derivative.log(), atol=1e-12)
    jacobian = torch.autograd.functional.jacobian(lambda row: logit(row), u[0])
    assert math.isclose(
        float(logit.log_abs_det_jacobian(u[0], y[0]).sum()),
        float(torch.linalg.slogdet(jacobian)[1]),
        abs_tol=1e-10,
    )
    assert torch.allclose(logit.inv(y), u, atol=1e-12)


def test_dequantisation_fills_each_bin_uniformly():
    levels = torch.tensor([0, 7, 255]).repeat(20000)
    u = dequantize(levels, generator=torch.Generator().manual_seed(0))
    assert bool(((u * 256).floor() == levels).all())  # each value stays in its own bin
    offsets = u * 256 - levels
    assert abs(float(offsets.mean()) - 0.5) < 0.01 and abs(float(offsets.var()) - 1 / 12) < 0.005
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        dequantize(torch.tensor([256]))
    with pytest.raises(TypeError, match="integer levels"):
        dequantize(torch.tensor([0.5]))


@pytest.mark.parametrize("margin", [0.0, 1e-6, 0.05])
def test_bits_per_dim_of_a_known_distribution(margin):
    """A standard logistic density for y = logit(margin + (1 - 2 margin) u) makes p = sigmoid(y) uniform
    on (0, 1): u is uniform on an interval of length 1 / (1 - 2 margin) that contains [0, 1], and the
    8-bit image has probability ((1 - 2 margin) / 256)^D whatever its pixels: 8 - log2(1 - 2 margin)
    bits per dimension, exactly."""
    images = torch.randint(0, 256, (64, 1, 4, 4))
    d = 16
    u = dequantize(images).reshape(64, d)
    logit = LogitTransform(margin)
    y = logit(u)
    logistic = -y - 2 * torch.nn.functional.softplus(-y)  # log density of the standard logistic
    log_density_u = (logistic + logit.log_abs_det_jacobian(u, y)).sum(-1)
    expected = 8 - math.log2(1 - 2 * margin)
    assert torch.allclose(bits_per_dim(log_density_u, d), torch.full((64,), expected), atol=1e-9)


def test_bits_per_dim_of_a_gaussian_on_the_unit_cube_bounds_the_bin_probabilities():
    """For a smooth density the dequantised bound lies above -log2 P(k) (Jensen) and approaches it as
    the bins shrink: a truncated normal of width 0.2 on [0, 1], 256 levels, its bin probabilities by
    its CDF, the expectation over the noise by the midpoint rule (and by sampling)."""
    normal = torch.distributions.Normal(torch.tensor(0.5), torch.tensor(0.2))
    log_mass = (normal.cdf(torch.tensor(1.0)) - normal.cdf(torch.tensor(0.0))).log()
    levels = torch.arange(64, 192)
    edges = torch.stack([levels, levels + 1]).double() / 256
    exact = -((normal.cdf(edges[1]) - normal.cdf(edges[0])).log() - log_mass) / math.log(2)
    noise = (torch.arange(1000) + 0.5) / 1000
    u = (levels[None] + noise[:, None]) / 256
    bound = bits_per_dim(normal.log_prob(u) - log_mass, 1).mean(0)  # one dimension per entry
    assert bool((bound >= exact).all()) and float((bound - exact).max()) < 1e-4
    sampled = dequantize(levels.repeat(400, 1), generator=torch.Generator().manual_seed(1))
    estimate = bits_per_dim(normal.log_prob(sampled) - log_mass, 1).mean(0)
    assert torch.allclose(estimate, exact, atol=2e-3)
