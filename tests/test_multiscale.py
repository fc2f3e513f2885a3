"""The multiscale flow: log-det against the autograd Jacobian of the whole map, inverse, Pyro."""

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import Permute, affine_coupling

from pyro_cpflow.conv import conv_cpflow
from pyro_cpflow.multiscale import ChannelActNorm, MultiscaleFlow, level_shapes, squeeze, unsqueeze


def _cpflow_levels(shapes, hidden=(4, 4)):
    return [[ChannelActNorm(shape), conv_cpflow(shape, hidden, logdet="exact")] for shape in shapes]


def _flow(image_shape, num_levels, factor_out=True):
    shapes = level_shapes(image_shape, num_levels, factor_out)
    flow = MultiscaleFlow(image_shape, _cpflow_levels(shapes), factor_out)
    d = flow.input_dim
    flow(2.0 + 3.0 * torch.randn(50, d))  # data-dependent initialisation of the ActNorms
    with torch.no_grad():  # then away from it: every parameter matters in the checks
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return flow


def _jacobians(flow, x):
    """The Jacobian of the whole map at each row, by autograd through every block."""
    jacobian = torch.autograd.functional.jacobian
    return torch.stack([jacobian(lambda r: flow._call(r[None])[0], row) for row in x])


CASES = [((1, 4, 4), 2, True), ((2, 4, 4), 2, False), ((1, 8, 8), 3, True), ((2, 8, 8), 2, True)]


@pytest.mark.parametrize(("shape", "levels", "factor_out"), CASES)
def test_log_det_matches_slogdet_of_the_autograd_jacobian(shape, levels, factor_out):
    flow = _flow(shape, levels, factor_out)
    x = torch.randn(3, flow.input_dim)
    z = flow(x)
    jacobian = _jacobians(flow, x)
    sign, expected = torch.linalg.slogdet(jacobian)
    assert bool((sign > 0).all())
    assert torch.allclose(flow.log_abs_det_jacobian(x, z), expected, atol=1e-9)
    assert torch.allclose(flow.log_abs_det_jacobian(x.clone(), z), expected, atol=1e-9)  # recomputed


@pytest.mark.parametrize(("shape", "levels", "factor_out"), CASES)
def test_inverse_round_trip(shape, levels, factor_out):
    flow = _flow(shape, levels, factor_out)
    x = torch.randn(4, flow.input_dim)
    back = flow.inv(flow(x).clone())  # a new tensor: solved, not served from the caches
    assert flow.last_inverse_reports and all(r.all_converged for r in flow.last_inverse_reports)
    assert torch.allclose(back, x, atol=1e-9)


def test_squeeze_is_a_permutation_inverted_by_unsqueeze():
    rows = torch.randn(3, 2 * 4 * 6)
    squeezed = squeeze(rows, (2, 4, 6))
    assert torch.equal(squeezed.sort(-1).values, rows.sort(-1).values)
    assert torch.equal(unsqueeze(squeezed, (2, 4, 6)), rows)
    # the four pixels of the first 2x2 patch of channel 0 become the first pixel of channels 0..3
    image = rows.reshape(3, 2, 4, 6)
    first = squeezed.reshape(3, 8, 2, 3)[:, :4, 0, 0]
    assert torch.equal(first, image[:, 0, :2, :2].reshape(3, 4))


def test_level_shapes_refuse_odd_sizes():
    assert level_shapes((3, 8, 8), 3, factor_out=False) == ((3, 8, 8), (12, 4, 4), (48, 2, 2))
    with pytest.raises(ValueError, match="even height and width"):
        level_shapes((1, 14, 14), 3)


def test_channel_actnorm_log_det_and_initialisation():
    norm = ChannelActNorm((2, 3, 3))
    x = torch.randn(40, 18) * torch.tensor([2.0, 0.5]).repeat_interleave(9) + 1.0
    y = norm(x)
    per_channel = y.detach().reshape(40, 2, 9).transpose(0, 1).reshape(2, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(2), atol=1e-12)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(2))
    jacobian = torch.autograd.functional.jacobian(lambda r: norm(r[None])[0], x[0])
    assert torch.allclose(norm.log_abs_det_jacobian(x, y), torch.linalg.slogdet(jacobian)[1].expand(40))
    assert torch.allclose(norm.inv(y), x)


def test_density_and_samples_through_pyro():
    flow = _flow((1, 4, 4), 2)
    base = dist.Normal(torch.zeros(16), 1.0).to_event(1)
    p = dist.TransformedDistribution(base, [flow.inv])
    x = torch.randn(6, 16)
    z, logdet = flow._forward_with_logdet(x)
    assert torch.allclose(p.log_prob(x), base.log_prob(z) + logdet, atol=1e-12)
    samples = p.sample((5,))
    assert samples.shape == (5, 16) and torch.isfinite(samples).all()


def test_pyro_affine_couplings_as_blocks():
    """Any bijective row transform is a block: the coupling baseline of experiments/image_density.py."""
    torch.manual_seed(1)
    shapes = level_shapes((1, 4, 4), 2)
    levels = [
        [
            ChannelActNorm(s),
            affine_coupling(d, hidden_dims=[8]),
            Permute(torch.randperm(d)),
            affine_coupling(d, hidden_dims=[8]),
        ]
        for s in shapes
        for d in [s[0] * s[1] * s[2]]
    ]
    flow = MultiscaleFlow((1, 4, 4), levels)
    assert len(flow.block_modules) == 6  # the permutations are plain transforms
    x = torch.randn(3, 16)
    z = flow(x)
    jacobian = _jacobians(flow, x)
    assert torch.allclose(flow.log_abs_det_jacobian(x, z), torch.linalg.slogdet(jacobian)[1], atol=1e-10)
    assert torch.allclose(flow.inv(z.clone()), x, atol=1e-10)
