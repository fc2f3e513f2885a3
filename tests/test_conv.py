"""The convolutional ICNN and its potential: convexity, the analytic engine against autograd, the block."""

import pytest
import torch

from pyro_cpflow.conv import ConvexConvPotential, ConvICNN, conv_cpflow
from pyro_cpflow.derivatives import AutogradTrace

SHAPES = [(1, 4, 4), (2, 4, 4)]


def _randomize(module: torch.nn.Module, scale: float = 1.0) -> None:
    """Move every parameter away from its initial value (raw non-negative weights included)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def _network(shape, augmented=True, activation="gaussian_softplus", randomized=True):
    net = ConvICNN(shape, (6, 6, 6), augmented=augmented, activation=activation)
    if randomized:
        _randomize(net)
    return net


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("augmented", [True, False])
@pytest.mark.parametrize("activation", ["gaussian_softplus", "softplus"])
def test_convex_along_random_segments(shape, augmented, activation):
    net = _network(shape, augmented, activation)
    d = net.input_dim
    a, b = 3 * torch.randn(200, d), 3 * torch.randn(200, d)
    t = torch.rand(200, 1)
    lhs = net(t * a + (1 - t) * b)
    rhs = t[:, 0] * net(a) + (1 - t[:, 0]) * net(b)
    assert bool((lhs <= rhs + 1e-10 * (1 + rhs.abs())).all()), float((lhs - rhs).max())


@pytest.mark.parametrize("shape", SHAPES)
def test_hessian_is_symmetric_positive_definite_above_alpha(shape):
    alpha = 0.05
    potential = ConvexConvPotential(_network(shape), alpha=alpha)
    _randomize(potential)
    for x in 2 * torch.randn(4, potential.input_dim):
        hessian = torch.autograd.functional.hessian(lambda v: potential(v[None])[0], x)
        assert torch.allclose(hessian, hessian.T, atol=1e-12)
        assert float(torch.linalg.eigvalsh(hessian).min()) >= alpha * (1 - 1e-9)


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [0, 3])
def test_engine_matches_autograd(shape, rank, rows):
    """Value, gradient, Hessian-vector products and Hessian of the analytic engine (forward tangent and
    transposed convolutions) against double backpropagation through the same potential; at 40
    rows (more than d) the Hessian forms the terms of the rows shared by all samples at once."""
    potential = ConvexConvPotential(_network(shape), quadratic_rank=rank)
    x, v = torch.randn(rows, potential.input_dim), torch.randn(rows, potential.input_dim)
    trace, oracle = potential.evaluate(x), AutogradTrace(potential, x)
    assert torch.allclose(trace.value, oracle.value, atol=1e-12)
    assert torch.allclose(trace.gradient, oracle.gradient, atol=1e-12)
    assert torch.allclose(trace.hvp(v), oracle.hvp(v), atol=1e-12)
    assert torch.allclose(trace.hessian(), oracle.hessian(), atol=1e-12)
    assert torch.allclose(trace.detach().hvp(v), oracle.hvp(v), atol=1e-12)


@pytest.mark.parametrize("rows", [3, 40])
def test_parameter_gradients_of_the_analytic_gradient_and_hessian_match_autograd(rows):
    """Training differentiates the gradient map and the Hessian (the exact log-det): their
    parameter gradients agree."""
    potential = ConvexConvPotential(_network((2, 4, 4)))
    x, w, h = torch.randn(rows, 32), torch.randn(rows, 32), torch.randn(rows, 32, 32)
    parameters = list(potential.parameters())

    def scalar(trace):
        return (trace.gradient * w).sum() + (trace.hessian() * h).sum()

    ours = torch.autograd.grad(scalar(potential.evaluate(x)), parameters)
    theirs = torch.autograd.grad(scalar(AutogradTrace(potential, x)), parameters)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_block_log_dets_and_inverse():
    flow = conv_cpflow((2, 4, 4), (6, 6), logdet="exact")
    _randomize(flow.potential, 0.5)
    x = torch.randn(5, 32)
    y = flow(x)
    jacobian = torch.func.vmap(torch.func.jacrev(lambda r: flow.potential.evaluate(r[None]).gradient[0]))(x)
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), torch.linalg.slogdet(jacobian)[1], atol=1e-10)
    flow.logdet = "stochastic"
    flow.num_probes = 400
    flow.cg_rtol = 1e-10
    estimate = flow.log_abs_det_jacobian(x, y)
    assert torch.allclose(estimate, torch.linalg.slogdet(jacobian)[1], atol=0.3)
    back = flow.inv(y.clone())
    assert flow.last_inverse.all_converged
    assert torch.allclose(back, x, atol=1e-9)


def test_state_dict_names_each_kernel_and_reloads():
    net = ConvICNN((1, 4, 4), (4, 4, 4), augmented=True)
    names = sorted(net.state_dict())
    assert "convex_paths.1.raw_weight" in names and "input_paths.0.weight" in names
    assert net.state_dict()["convex_paths.0.raw_weight"].shape == (2, 4, 3, 3)  # half convex channels
    copy = ConvICNN((1, 4, 4), (4, 4, 4), augmented=True)
    copy.load_state_dict(net.state_dict())
    x = torch.randn(2, 16)
    assert torch.equal(copy(x), net(x))


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="odd"):
        ConvICNN((1, 4, 4), (4,), kernel_size=2)
    with pytest.raises(ValueError, match="at least 2"):
        ConvICNN((1, 4, 4), (4, 1))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ConvICNN((0, 4, 4), (4,))
    with pytest.raises(ValueError, match="no context"):
        ConvICNN((1, 4, 4), (4,)).affine_layers(torch.zeros(1, 2))
