"""The analytic derivative engine against autograd, for every network kind, far from initialisation."""

import pytest
import torch
import torch.nn.functional as F

from pyro_cpflow.derivatives import AutogradTrace
from pyro_cpflow.linalg import cholesky_logdet
from pyro_cpflow.nn import ICNN, PICNN, NoNetwork, gaussian_softplus
from pyro_cpflow.potential import ContextQuadratic, ConvexPotential

pytestmark = pytest.mark.float64  # tolerances of float64, whatever --dtype says

D, C, N = 4, 3, 6
TOL = 1e-10
ROWS = [N, 40]
"""Row counts: at 6 the Hessian forms every term per sample; at 40 (``N > d``, ``N d >=``
:data:`~pyro_cpflow.derivatives.ROW_GRAM_MIN_ENTRIES`) it forms the terms of the rows shared
by all samples at once, and the convex rows from a shared Jacobian by one product."""


def _potential(kind: str) -> ConvexPotential:
    torch.manual_seed(1)
    if kind.startswith("icnn"):
        network = ICNN(
            D,
            [16, 12, 10],
            augmented="augmented" in kind,
            activation="softplus" if "softplus" in kind else "gaussian_softplus",
        )
        potential = ConvexPotential(network, D, quadratic_rank=2)
    elif kind.startswith("none"):  # the quadratic and context terms alone
        terms = ContextQuadratic(C, D, rank=2, diagonal=True)
        potential = ConvexPotential(NoNetwork(D, C), D, context_terms=terms)
    else:
        network = PICNN(
            D,
            C,
            [16, 12, 10],
            augmented="augmented" in kind,
            activation="softplus" if "softplus" in kind else "gaussian_softplus",
        )
        terms = None
        if "quadratic" in kind or "diagonal" in kind:
            terms = ContextQuadratic(C, D, rank=2 if "quadratic" in kind else 0, diagonal="diagonal" in kind)
        potential = ConvexPotential(network, D, context_terms=terms)
    with torch.no_grad():
        for parameter in potential.parameters():
            parameter.add_(0.7 * torch.randn_like(parameter))
    return potential


KINDS = [
    "icnn",
    "icnn-augmented",
    "icnn-augmented-softplus",
    "picnn",
    "picnn-augmented",
    "picnn-augmented-softplus",
    "picnn-augmented-quadratic",
    "picnn-augmented-diagonal",
    "picnn-augmented-quadratic-diagonal",
    "none-quadratic-diagonal",
]


def _inputs(potential, rows=N):
    x = 2 * torch.randn(rows, D)
    context = 2 * torch.randn(rows, C) if isinstance(potential.network, (PICNN, NoNetwork)) else None
    return x, context


def _close(ours, expected, rows):
    """Equal to ``TOL``: absolutely at the original ``N`` rows; at more rows relative to the
    largest entry of ``expected`` (at least 1), since the context diagonal's exponential reaches
    1e5 at some of 40 random contexts, beyond what an absolute 1e-10 allows in float64."""
    scale = 1.0 if rows == N else max(1.0, float(expected.detach().abs().max()))
    return torch.allclose(ours, expected, atol=TOL * scale, rtol=0)


def _oracle(potential, x, context):
    return AutogradTrace(lambda z: potential(z, context), x)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_hvp_and_hessian_match_autograd(kind, rows):
    potential = _potential(kind)
    x, context = _inputs(potential, rows)
    trace, oracle = potential.evaluate(x, context), _oracle(potential, x, context)
    v = torch.randn(rows, D)
    assert _close(trace.value, oracle.value, rows)
    assert _close(trace.gradient, oracle.gradient, rows)
    assert _close(trace.hvp(v), oracle.hvp(v), rows)
    assert _close(trace.hessian(), oracle.hessian(), rows)
    assert _close(trace.detach().hvp(v), oracle.hvp(v), rows)
    # the Hessian is what autograd.functional gives for one row, symmetric positive definite
    row = torch.autograd.functional.hessian(
        lambda z: potential(z[None], None if context is None else context[:1])[0], x[0]
    )
    assert _close(trace.hessian()[0], row, rows)
    assert float(torch.linalg.eigvalsh(trace.hessian().detach()).min()) >= potential.alpha * (1 - 1e-9)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", KINDS)
def test_first_order_backprop_through_the_formulas_matches_double_backprop(kind, rows):
    """Parameter, input and context gradients of (a weighted) gradient, HVP and Hessian."""
    potential = _potential(kind)
    x, context = _inputs(potential, rows)
    x.requires_grad_(True)
    if context is not None:
        context.requires_grad_(True)
    leaves = [x, *potential.parameters()] + ([context] if context is not None else [])
    weights = torch.randn(rows, D), torch.randn(rows, D), torch.randn(rows, D, D)
    v = torch.randn(rows, D)

    def scalar(trace):
        return (
            (trace.gradient * weights[0]).sum()
            + (trace.hvp(v) * weights[1]).sum()
            + (trace.hessian() * weights[2]).sum()
            + trace.value.sum()
        )

    ours = torch.autograd.grad(scalar(potential.evaluate(x, context)), leaves, allow_unused=True)
    expected = torch.autograd.grad(scalar(_oracle(potential, x, context)), leaves, allow_unused=True)
    for a, b in zip(ours, expected, strict=True):
        a = torch.zeros(1) if a is None else a
        b = torch.zeros(1) if b is None else b
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_network_value_matches_the_written_definition():
    """The layered evaluation reproduces z_{k+1} = s(P_k z_k + W_k x + b_k) written out by hand."""
    torch.manual_seed(2)
    net = ICNN(D, [8, 6], augmented=True)
    x = torch.randn(N, D)
    s = gaussian_softplus
    p = net.state_dict()  # the packed parameters by name
    z = s(x @ p["first.weight"].T + p["first.bias"])
    # rows of W_1 (3 convex units), then of L_1 (3 augmented)
    direct = x @ p["input_paths.0.weight"].T + p["input_paths.0.bias"]
    convex = z @ (F.softplus(p["convex_paths.0.raw_weight"]) / 8).T
    z = torch.cat([s(convex + direct[:, :3]), s(direct[:, 3:])], -1)
    output = z @ (F.softplus(p["output_convex.raw_weight"]) / 6).T + x @ p["output_input.weight"].T
    expected = output.squeeze(-1)
    assert torch.allclose(net(x), expected, atol=1e-14)
    picnn = PICNN(D, C, [8], augmented=False)
    c = torch.randn(N, C)
    q = picnn.state_dict()

    def linear(name, inputs):
        return F.linear(inputs, q[f"{name}.weight"], q.get(f"{name}.bias"))

    z = s(
        linear("layers.0.input_weight", x * linear("layers.0.input_gate", c))
        + linear("layers.0.context_offset", c)
    )
    u = torch.tanh(linear("context_layers.0", c))
    convex = F.softplus(q["layers.1.convex_weight.raw_weight"]) / 8
    gated = z * F.softplus(linear("layers.1.convex_gate", u))
    expected = linear("layers.1.input_weight", x * linear("layers.1.input_gate", u)) + gated @ convex.T
    assert torch.allclose(picnn(x, c), expected.squeeze(-1), atol=1e-14)


def test_a_wrong_formula_would_be_caught():
    """The comparison is sharp: dropping one layer's curvature changes the Hessian far above TOL."""
    potential = _potential("icnn-augmented")
    x, _ = _inputs(potential)
    trace = potential.evaluate(x)
    full = trace.hessian()
    trace.network.curvatures[0] = torch.zeros_like(trace.network.curvatures[0])
    assert float((trace.hessian() - full).detach().abs().max()) > 1e3 * TOL


@pytest.mark.parametrize("kind", [*KINDS, "icnn-full-rank"])
def test_whitened_products_equal_the_whitened_hessian(kind):
    """S^-1 H S^-T v by the whitened network (fast form) equals the dense whitened Hessian."""
    if kind == "icnn-full-rank":
        torch.manual_seed(1)
        potential = ConvexPotential(ICNN(D, [16, 12]), D)  # dense Q: Cholesky root
    else:
        potential = _potential(kind)
    x, context = _inputs(potential)
    trace = potential.evaluate(x, context)
    factor = potential.factorize(trace.quadratic)
    root_inverse = factor.whiten(torch.eye(D))  # rows of S^-T, i.e. S^-T itself
    whitened = root_inverse.T @ trace.hessian().detach() @ root_inverse
    v = torch.randn(N, D)
    expected = torch.einsum("nij,nj->ni", whitened, v)
    assert torch.allclose(trace.whitened_hvp(factor)(v), expected, atol=TOL, rtol=0)
    gated = isinstance(potential.network, PICNN)
    assert (trace.network.whitened(factor.whiten) is None) == gated
    # a factor of another Q takes the general path and is still right
    foreign = type(factor).__new__(type(factor))
    foreign.__dict__.update(factor.__dict__, source=None)
    assert torch.allclose(trace.whitened_hvp(foreign)(v), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("rank,diagonal", [(2, False), (0, True), (2, True)])
def test_context_terms_add_their_closed_form_to_the_potential(rank, diagonal):
    """``F`` with the context terms minus ``F`` without them is ``|L(c)^T x|^2 / 2 + x^T D(c) x / 2
    + b(c)^T x``, written out independently of the engine's products."""
    potential = _potential("picnn-augmented")
    potential.context_terms = ContextQuadratic(C, D, rank=rank, diagonal=diagonal)
    with torch.no_grad():
        for parameter in potential.context_terms.parameters():
            parameter.add_(0.7 * torch.randn_like(parameter))
    x, context = _inputs(potential)
    factor, diag, shift = potential.context_terms.terms(context)
    expected = (x * shift).sum(-1)
    if factor is not None:
        expected = expected + 0.5 * torch.stack([(x[n] @ factor[n]).pow(2).sum() for n in range(N)])
    if diag is not None:
        assert bool((diag > 0).all())
        expected = expected + 0.5 * torch.stack([x[n] @ torch.diag(diag[n]) @ x[n] for n in range(N)])
    with_terms = potential(x, context)
    terms = potential.context_terms
    potential.context_terms = None
    assert torch.allclose(with_terms - potential(x, context), expected, atol=TOL, rtol=0)
    assert torch.allclose(terms(x, context), expected, atol=TOL, rtol=0)


def test_context_diagonal_starts_at_its_initial_value_and_rejects_bad_arguments():
    terms = ContextQuadratic(C, D, rank=0, diagonal=True, initial_diagonal=0.2, initial_std=0.0)
    _, diagonal, _ = terms.terms(torch.randn(5, C))
    assert torch.allclose(diagonal, torch.full((5, D), 0.2))
    with pytest.raises(ValueError, match="rank > 0 or diagonal"):
        ContextQuadratic(C, D, rank=0)
    with pytest.raises(ValueError, match="initial_diagonal"):
        ContextQuadratic(C, D, rank=1, initial_diagonal=0.0)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", ["icnn-augmented", "picnn-augmented-quadratic-diagonal"])
def test_third_derivatives_through_the_hessian_and_log_det_match_autograd(kind, rows):
    """Third derivatives: the x-gradient of the log-det (what HMC on a NeuTra-warped density
    takes) differentiated again, through the library's Cholesky log-det and the Hessian's
    backward pass, against autograd on autograd's Hessian and ``torch.logdet``."""
    potential = _potential(kind)
    x, context = _inputs(potential, rows)
    x.requires_grad_(True)
    weights = torch.randn(rows, D)

    def second(trace, logdet_of):
        logdet = logdet_of(trace.hessian()).sum()
        (gradient,) = torch.autograd.grad(logdet, x, create_graph=True)
        (result,) = torch.autograd.grad((gradient * weights).sum(), x)
        return result

    expected = second(_oracle(potential, x, context), torch.logdet)
    ours = second(potential.evaluate(x, context), cholesky_logdet)
    assert torch.allclose(ours, expected, atol=1e-9, rtol=1e-9)
