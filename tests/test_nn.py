"""Convexity of the networks and the potential, at initialisation and far from it."""

import pytest
import torch

from pyro_cpflow.nn import ICNN, PICNN, PositiveLinear, gaussian_softplus, get_activation
from pyro_cpflow.potential import ContextQuadratic, ConvexPotential

pytestmark = pytest.mark.float64  # tolerances of float64, whatever --dtype says

D, C = 4, 3
CONTEXTS = 3


def _randomize(module: torch.nn.Module, scale: float = 3.0) -> None:
    """Move every parameter far from its initial value (including negative raw weights)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def _networks():
    return {
        "icnn": lambda: ICNN(D, [16, 16, 16], augmented=False),
        "icnn-augmented": lambda: ICNN(D, [16, 16, 16], augmented=True),
        "icnn-softplus": lambda: ICNN(D, [16, 16], augmented=True, activation="softplus"),
        "picnn": lambda: PICNN(D, C, [16, 16, 16], augmented=False),
        "picnn-augmented": lambda: PICNN(D, C, [16, 16, 16], augmented=True),
    }


def _scalar_function(network, context):
    if isinstance(network, PICNN):
        return lambda x: network(x, context.expand(x.shape[0], C))
    return network


def _contexts(network):
    return [torch.randn(1, C) * 3 for _ in range(CONTEXTS)] if isinstance(network, PICNN) else [None]


@pytest.mark.parametrize("name", list(_networks()))
@pytest.mark.parametrize("randomized", [False, True])
def test_convex_along_segments(name, randomized):
    network = _networks()[name]()
    if randomized:
        _randomize(network)
    for context in _contexts(network):
        f = _scalar_function(network, context)
        a, b = 4 * torch.randn(200, D), 4 * torch.randn(200, D)
        t = torch.rand(200, 1)
        lhs = f(t * a + (1 - t) * b)
        rhs = t.squeeze(-1) * f(a) + (1 - t.squeeze(-1)) * f(b)
        slack = 1e-10 * (1 + rhs.abs())
        assert bool((lhs <= rhs + slack).all()), float((lhs - rhs).max())


@pytest.mark.parametrize("name", list(_networks()))
@pytest.mark.parametrize("randomized", [False, True])
def test_potential_hessian_eigenvalues_above_alpha(name, randomized):
    alpha = 0.05
    network = _networks()[name]()
    terms = ContextQuadratic(C, D, rank=2) if isinstance(network, PICNN) else None
    potential = ConvexPotential(network, D, alpha=alpha, context_terms=terms)
    if randomized:
        _randomize(potential)
    for context in _contexts(network):
        for x in 3 * torch.randn(10, D):
            ctx = None if context is None else context
            hessian = torch.autograd.functional.hessian(lambda v, ctx=ctx: potential(v[None], ctx)[0], x)
            eigenvalues = torch.linalg.eigvalsh(hessian)
            assert float(eigenvalues.min()) >= alpha * (1 - 1e-9)


def test_a_nonconvex_function_fails_the_segment_check():
    """The segment check above can fail: a network with a negative output weight is concave somewhere."""
    f = lambda x: -gaussian_softplus(x).sum(-1)  # noqa: E731
    a, b = torch.randn(200, D), torch.randn(200, D)
    t = torch.rand(200, 1)
    assert bool((f(t * a + (1 - t) * b) > t.squeeze(-1) * f(a) + (1 - t.squeeze(-1)) * f(b)).any())


def test_picnn_depends_on_context_and_icnn_rejects_it():
    network = PICNN(D, C, [8, 8])
    x = torch.randn(5, D)
    assert not torch.allclose(network(x, torch.zeros(5, C)), network(x, torch.ones(5, C)))
    with pytest.raises(ValueError, match="needs a context"):
        network(x)
    with pytest.raises(ValueError, match="takes no context"):
        ICNN(D, [8])(x, torch.zeros(5, C))


def test_positive_linear_is_nonnegative_and_fan_in_scaled():
    layer = PositiveLinear(10, 3)
    with torch.no_grad():
        layer.raw_weight.normal_(0, 10)
    assert bool((layer.weight >= 0).all())
    assert torch.allclose(layer.weight * 10, torch.nn.functional.softplus(layer.raw_weight))


def test_gaussian_softplus_derivatives():
    x = torch.linspace(-6, 6, 101, requires_grad=True)
    (d1,) = torch.autograd.grad(gaussian_softplus(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x, create_graph=True)
    (d3,) = torch.autograd.grad(d2.sum(), x)
    normal = torch.distributions.Normal(0.0, 1.0)
    value = x.detach()
    assert torch.allclose(gaussian_softplus(value), value * normal.cdf(value) + normal.log_prob(value).exp())
    assert torch.allclose(d1, normal.cdf(value))
    assert torch.allclose(d2, normal.log_prob(value).exp())
    assert torch.allclose(d3, -value * normal.log_prob(value).exp())
    assert torch.autograd.gradgradcheck(gaussian_softplus, (torch.randn(5, requires_grad=True),))


@pytest.mark.parametrize("used", [(0, 1, 2), (0,), (1,), (2,), (1, 2), (0, 2)])
def test_activation_orders_have_the_derivatives_of_their_formulas(used):
    """(s, s', s'') and their first and second derivatives, through any subset of the outputs,
    against autograd on the written formulas (and against finite differences)."""
    activation = get_activation("gaussian_softplus")
    normal = torch.distributions.Normal(0.0, 1.0)

    def formulas(x):
        pdf = normal.log_prob(x).exp()
        return x * normal.cdf(x) + pdf, normal.cdf(x), pdf

    x = 3 * torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 7, 5, dtype=torch.float64)

    def scalar(outputs):
        return sum((outputs[i] * weights[i]).sum() for i in used)

    (ours,) = torch.autograd.grad(scalar(activation.orders(x)), x, create_graph=True)
    (expected,) = torch.autograd.grad(scalar(formulas(x)), x, create_graph=True)
    assert torch.allclose(ours, expected, atol=1e-12, rtol=0)
    (ours_second,) = torch.autograd.grad((ours**2).sum(), x)
    (expected_second,) = torch.autograd.grad((expected**2).sum(), x)
    assert torch.allclose(ours_second, expected_second, atol=1e-10, rtol=0)

    def selected(v):
        outputs = activation.orders(v)
        return tuple(outputs[i] for i in used)

    small = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(selected, (small,))
    assert torch.autograd.gradgradcheck(selected, (small,))


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="unknown activation"):
        get_activation("relu")
    with pytest.raises(ValueError, match="hidden_dims"):
        ICNN(2, [])
    with pytest.raises(ValueError, match="alpha must be positive"):
        ConvexPotential(ICNN(2, [4]), 2, alpha=0.0)
    with pytest.raises(ValueError, match="quadratic_rank"):
        ConvexPotential(ICNN(2, [4]), 2, quadratic_rank=3)


def test_potential_starts_near_identity_and_represents_spd_affine_maps():
    potential = ConvexPotential(ICNN(D, [16, 16]), D)
    x = torch.randn(100, D)
    assert (potential.gradient(x) - x).abs().mean() < 0.5
    # with the network switched off, grad F(x) = Q x + b for the learnable SPD Q and b
    target = torch.randn(D, D)
    target = target @ target.T + 0.5 * torch.eye(D)
    factor = torch.linalg.cholesky(target - (potential.alpha + 0.1) * torch.eye(D))
    with torch.no_grad():
        potential.raw_scale.fill_(-50.0)
        potential.raw_beta.fill_(0.1 + torch.log(-torch.expm1(torch.tensor(-0.1))).item())
        potential.factor.copy_(factor)
        potential.shift.copy_(torch.arange(D))
    assert torch.allclose(potential.gradient(x), x @ target + torch.arange(D), atol=1e-12)


def test_quadratic_factor_starts_nonzero():
    potential = ConvexPotential(ICNN(D, [4]), D)
    assert float(potential.factor.detach().abs().max()) > 0
