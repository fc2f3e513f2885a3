"""The stochastic log-det of a flow: the value and gradient of one CG solve against the exact ones."""

import warnings

import pytest
import torch

from pyro_cpflow import NonConvergenceWarning, conditional_cpflow, cpflow

pytestmark = pytest.mark.float64  # tolerances of float64, whatever --dtype says

D = 4
RUNS = 3000


def _flow(**options):
    torch.manual_seed(0)
    flow = cpflow(D, hidden_dims=(16, 16), **options)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return flow


def _grads(value, flow, retain_graph=False):
    """Gradients for every parameter; zero for those the log-det ignores (the linear terms)."""
    params = list(flow.parameters())
    grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _exact_and_replicated(flow, x):
    """Exact log-det and its gradients, and the stochastic one on RUNS copies of x."""
    flow.logdet = "exact"
    x_exact = x.clone().requires_grad_(True)
    exact = flow.log_abs_det_jacobian(x_exact, flow(x_exact))
    exact_param_grads = _grads(exact.sum(), flow, retain_graph=True)
    (exact_x_grad,) = torch.autograd.grad(exact.sum(), x_exact)
    flow.logdet = "stochastic"
    copies = x.repeat(RUNS, 1).requires_grad_(True)  # one probe per copy
    stochastic = flow.log_abs_det_jacobian(copies, flow(copies)).reshape(RUNS, -1)
    return exact.detach(), exact_param_grads, exact_x_grad, copies, stochastic


def test_value_and_input_gradient_average_to_exact():
    flow = _flow(cg_rtol=1e-10)
    x = torch.randn(3, D)
    exact, _, exact_x_grad, copies, stochastic = _exact_and_replicated(flow, x)
    # value: CG run to convergence makes the quadrature exact per probe, up to the Hutchinson noise
    stderr = stochastic.detach().std(0) / RUNS**0.5
    assert bool(((stochastic.detach().mean(0) - exact).abs() < 4.5 * stderr).all())
    # input gradient: per copy, then averaged
    (x_grads,) = torch.autograd.grad(stochastic.sum(), copies)
    x_grads = x_grads.reshape(RUNS, 3, D)
    stderr = x_grads.std(0) / RUNS**0.5
    error = (x_grads.mean(0) - exact_x_grad).abs()
    assert bool((error < 4.5 * stderr + 1e-10).all()), float((error / stderr).max())
    assert float(stderr.max()) < 0.2 * float(exact_x_grad.abs().max())


def test_parameter_gradient_averages_to_exact():
    flow = _flow(cg_rtol=1e-10)
    x = torch.randn(3, D)
    _, exact_grads, _, copies, stochastic = _exact_and_replicated(flow, x)
    # split the copies into groups to estimate the standard error of the average
    groups = 30
    per_group = stochastic.reshape(groups, RUNS // groups, 3).sum((1, 2)) / (RUNS // groups)
    group_grads = [_grads(per_group[g], flow, retain_graph=True) for g in range(groups)]
    for i, exact in enumerate(exact_grads):
        samples = torch.stack([grads[i] for grads in group_grads])
        stderr = samples.std(0) / groups**0.5
        error = (samples.mean(0) - exact).abs()
        assert bool((error < 5 * stderr + 1e-8).all()), (i, float((error / (stderr + 1e-12)).max()))


def test_a_wrong_gradient_would_be_detected():
    """The statistical check above is sharp: a 10% bias in the gradient is many standard errors."""
    flow = _flow(cg_rtol=1e-10)
    x = torch.randn(3, D)
    _, _, exact_x_grad, copies, stochastic = _exact_and_replicated(flow, x)
    (x_grads,) = torch.autograd.grad(stochastic.sum(), copies)
    x_grads = x_grads.reshape(RUNS, 3, D)
    stderr = x_grads.std(0) / RUNS**0.5
    biased = 1.1 * x_grads.mean(0)
    assert bool(((biased - exact_x_grad).abs() > 4.5 * stderr).any())


def test_value_is_the_estimate_not_the_surrogate():
    flow = _flow(logdet="stochastic", num_probes=64)
    x = torch.randn(5, D)
    value = flow.log_abs_det_jacobian(x, flow(x))
    flow.logdet = "exact"
    exact = flow.log_abs_det_jacobian(x, flow(x))
    assert (value - exact).abs().max() < 0.5


def test_cg_statistics_and_non_convergence_warning():
    flow = _flow(logdet="stochastic")
    x = torch.randn(6, D)
    flow.log_abs_det_jacobian(x, flow(x)).sum().backward()
    stats = flow.last_cg
    assert stats.iterations.shape == (6,) and bool(stats.converged.all())
    flow.cg_max_iter, flow.cg_rtol = 1, 1e-14
    with pytest.warns(NonConvergenceWarning, match="raise cg_max_iter"):
        flow.log_abs_det_jacobian(x, flow(x)).sum().backward()
    flow.on_failure = "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.log_abs_det_jacobian(x, flow(x)).sum().backward()


def test_no_graph_under_no_grad():
    flow = _flow(logdet="stochastic")
    x = torch.randn(6, D)
    with torch.no_grad():
        value = flow.log_abs_det_jacobian(x, flow(x))
    assert not value.requires_grad and torch.isfinite(value).all()


def test_conditional_stochastic_gradient_reaches_the_context():
    flow = conditional_cpflow(D, 2, hidden_dims=(8, 8), logdet="stochastic")
    context = torch.randn(5, 2, requires_grad=True)
    transform = flow.condition(context)
    x = torch.randn(5, D)
    transform.log_abs_det_jacobian(x, transform(x)).sum().backward()
    assert context.grad is not None and bool((context.grad != 0).any())


def test_condition_estimate_is_a_lower_bound_of_the_true_one():
    flow = _flow(logdet="stochastic", cg_rtol=1e-12)
    x = 3 * torch.randn(20, D)
    with torch.no_grad():
        flow.log_abs_det_jacobian(x, flow(x))
        hessians = flow.hessian(x)
        whitened = flow.potential.factorize().solve(hessians.reshape(-1, D)).reshape(hessians.shape)  # H Q^-1
    eigenvalues = torch.linalg.eigvals(whitened).real
    true = eigenvalues.amax(-1) / eigenvalues.amin(-1)
    estimate = flow.diagnostics.condition
    assert bool((estimate <= true * (1 + 1e-8)).all())
    assert bool((estimate >= 0.5 * true).all())  # converged CG has found the extreme Ritz values
