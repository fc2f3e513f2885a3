"""Stacks of CP-Flow blocks: the inverse meets an end-to-end tolerance and reports it."""

import warnings

import pytest
import torch

from pyro_cpflow import (
    ActNorm,
    CPFlow,
    CPFlowStack,
    NonConvergenceError,
    NonConvergenceWarning,
    StackOptions,
    conditional_cpflow_stack,
    cpflow_stack,
)
from pyro_cpflow.solvers import residual_scale

D, C = 3, 2


def _randomized_stack(data_scale=0.1, **options):
    """Three curved blocks; ActNorms fitted to data of scale ``data_scale`` amplify the blocks' residuals."""
    stack = cpflow_stack(D, num_blocks=3, hidden_dims=(16, 16), **options)
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if "loc" not in name and "log_scale" not in name:
                p.add_(torch.randn_like(p))
        stack(data_scale * torch.randn(200, D))
    stack.clear_cache()
    return stack


def _targets(n=200):
    return torch.randn(n, D) * torch.logspace(-3, 4, n)[:, None]


def _round_trip(stack, x, y):
    """|stack(x) - y|_inf / max(1, |y|_inf), evaluated afresh."""
    stack.clear_cache()
    with torch.no_grad():
        error = (stack(x) - y).abs().amax(-1) / residual_scale(y)
    stack.clear_cache()
    return error


def test_stack_inverse_meets_the_end_to_end_tolerance():
    """Blocks at a loose tolerance each report success, yet the composition misses by
    orders of magnitude; the stack's Newton steps on the composition close the gap."""
    stack = _randomized_stack(inverse_tol=1e-10)
    for block in stack:
        if isinstance(block, CPFlow):
            block.inverse_tol = 1e-4
    y = _targets()
    with torch.no_grad():
        x = y
        for part in reversed(stack.parts):  # block by block, as a plain ComposeTransform does
            x = part.inv(x)
        assert all(block.last_inverse.all_converged for block in stack if isinstance(block, CPFlow))
        assert _round_trip(stack, x, y).max() > 1e3 * 1e-10
        x = stack.inv(y)
    report = stack.diagnostics.inverse
    assert report.method == "composition" and report.all_converged and report.tol == 1e-10
    assert report.residual.shape == (200,) and bool((report.relative_residual <= 1e-10).all())
    assert _round_trip(stack, x, y).max() <= 1e-10
    assert stack.inv.diagnostics is stack.diagnostics


def test_stack_inverse_default_tolerance_float64_and_float32():
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        stack = _randomized_stack(data_scale=1.0).to(dtype)
        y = _targets().to(dtype)
        with torch.no_grad():
            x = stack.inv(y)
        report = stack.diagnostics.inverse
        assert report.tol == tol
        # every sample either meets the tolerance end to end or is reported
        error = _round_trip(stack, x, y)
        assert bool((error[report.converged] <= tol).all())
        assert float(report.converged.double().mean()) > 0.95


def test_stack_inverse_failure_policy_and_no_cache():
    stack = _randomized_stack(inverse_tol=1e-10, refine_max_iter=1)
    for block in stack:
        if isinstance(block, CPFlow):
            block.inverse_tol = 1e-3
    y = _targets(50)
    with torch.no_grad():
        with pytest.warns(
            NonConvergenceWarning, match=r"composition inverse did not converge.*\|stack\(x\) - y\|"
        ):
            stack.inv(y)
        assert not stack.diagnostics.inverse.all_converged
        # a missed inverse is not cached: asking again solves (and warns) again
        with pytest.warns(NonConvergenceWarning):
            stack.inv(y)
        stack.on_failure = "raise"
        assert stack.inv.on_failure == "raise"
        with pytest.raises(NonConvergenceError, match="refine_max_iter"):
            stack.inv(y)
        stack.on_failure = "ignore"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stack.inv(y)
        stack.refine_max_iter = 10
        x = stack.inv(y)
        assert stack.diagnostics.inverse.all_converged and stack.inv(y) is x  # now cached


def test_stack_inverse_gradients_are_the_inverse_jacobian():
    stack = _randomized_stack(data_scale=1.0)
    y = torch.randn(4, D)

    def inverse(v):
        stack.clear_cache()
        return stack.inv(v[None])[0]

    for row in y:
        jacobian = torch.autograd.functional.jacobian(inverse, row)
        x = inverse(row).detach()
        forward = torch.autograd.functional.jacobian(lambda v: stack.with_cache(0)(v[None])[0], x)
        assert torch.allclose(jacobian @ forward, torch.eye(D), atol=1e-8)


def test_stack_inverse_parameter_gradients_match_finite_differences():
    stack = _randomized_stack(data_scale=1.0)
    y = torch.randn(5, D)
    parameter = next(stack[2].parameters())  # one of the middle block's parameters
    stack.clear_cache()
    stack.inv(y).sum().backward()
    direction = torch.randn_like(parameter)
    step = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            parameter.add_(sign * step * direction)
            stack.clear_cache()
            values.append(stack.inv(y).sum())
            parameter.sub_(sign * step * direction)
    numeric = (values[0] - values[1]) / (2 * step)
    assert torch.allclose((parameter.grad * direction).sum(), numeric, rtol=1e-5, atol=1e-7)


def test_stack_log_prob_reuses_the_refined_points():
    """The density of a sample drawn through the solving direction uses the pairs it cached."""
    import pyro.distributions as dist

    stack = _randomized_stack(data_scale=1.0)
    p = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [stack.inv])
    with torch.no_grad():
        z = torch.randn(6, D)
        x = stack.inv(z)
        cached = p.log_prob(x)
        stack.clear_cache()
        fresh = p.log_prob(x.clone())
    assert torch.allclose(cached, fresh, atol=1e-9)


def test_conditional_stack_inverse_is_refined_and_broadcasts():
    stack = conditional_cpflow_stack(D, C, num_blocks=2, hidden_dims=(8, 8), actnorm="around")
    context = torch.randn(4, 1, C)
    conditioned = stack.condition(context)
    with torch.no_grad():
        conditioned(torch.randn(50, D))  # initialise the ActNorms
        y = 3 * torch.randn(5, D)
        x = conditioned.inv(y)
    assert x.shape == (4, 5, D)
    report = stack.diagnostics.inverse
    assert report.all_converged and report.residual.shape == (20,)
    assert conditioned.diagnostics is stack.diagnostics
    stack.on_failure = "raise"
    assert stack.condition(context).on_failure == "raise"


def test_stack_options_are_validated_and_shared():
    stack = cpflow_stack(D, num_blocks=2, hidden_dims=(8, 8), inverse_tol=1e-9, refine_max_iter=3)
    assert stack.options == StackOptions(inverse_tol=1e-9, refine_max_iter=3)
    assert stack[0].inverse_tol == 1e-9  # the blocks get inverse_tol and on_failure too
    with pytest.raises(ValueError, match="on_failure must be one of"):
        stack.on_failure = "explode"
    with pytest.raises(TypeError, match="unknown stack option"):
        stack.options.replace(cg_rtol=1.0)
    with pytest.raises(ValueError, match="refine_max_iter"):
        cpflow_stack(D, num_blocks=2, refine_max_iter=0)
    stack.inv.inverse_tol = 1e-8
    assert stack.inverse_tol == 1e-8
    assert stack.with_cache(0).inverse_tol == 1e-8
    other = CPFlowStack([ActNorm(D)], inverse_tol=1e-6)
    assert other.options.inverse_tol == 1e-6


def test_stack_blocks_of_different_widths():
    """``block_hidden_dims`` gives each block its own network; the stack is still a flow:
    log-det against slogdet of the autograd Jacobian of the whole map, inverse round trip."""
    stack = cpflow_stack(D, num_blocks=2, block_hidden_dims=[(12, 12, 12), (6, 6)], logdet="exact")
    blocks = [t for t in stack if isinstance(t, CPFlow)]
    assert [b.potential.network.hidden_dims for b in blocks] == [(12, 12, 12), (6, 6)]
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if "loc" not in name and "log_scale" not in name:
                p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(5, D)
    y = stack(x)
    jacobians = torch.stack(
        [torch.autograd.functional.jacobian(lambda r: stack(r[None])[0], row) for row in x]
    )
    assert torch.allclose(stack.log_abs_det_jacobian(x, y), torch.linalg.slogdet(jacobians)[1], atol=1e-8)
    stack.clear_cache()
    with torch.no_grad():
        assert torch.allclose(stack.inv(y), x, atol=1e-7)
    with pytest.raises(ValueError, match="block_hidden_dims must hold one sequence per block"):
        cpflow_stack(D, num_blocks=3, block_hidden_dims=[(8,), (8,)])
    with pytest.raises(ValueError, match="either hidden_dims"):
        cpflow_stack(D, num_blocks=2, hidden_dims=(8,), block_hidden_dims=[(8,), (8,)])


def test_stack_cache_follows_stack_options_and_in_place_edits():
    stack = _randomized_stack(data_scale=1.0)
    y = torch.randn(5, D)
    with torch.no_grad():
        x = stack.inv(y)
        assert stack.inv(y) is x and stack(x) is y
        stack.inverse_tol = 1e-8
        assert stack.inv(y) is not x  # solved again under the new options
        x = stack.inv(y)
        y.mul_(2)
        moved = stack.inv(y)
    assert moved is not x and _round_trip(stack, moved, y).max() <= 1e-8


def test_failing_stack_call_forgets_actnorm_initialisation():
    """A batch that a later part rejects leaves no state behind in the ActNorms before it."""
    stack = conditional_cpflow_stack(D, C, num_blocks=2, hidden_dims=(8, 8), actnorm="around")
    first = stack.transforms[0].condition(None)
    assert isinstance(first, ActNorm)
    conditioned = stack.condition(torch.randn(5, C))
    with pytest.raises(ValueError, match="does not broadcast"):
        conditioned(7 + torch.randn(4, D))
    assert not first.is_initialized() and not bool(first.initialized)
    data = torch.randn(5, D)
    conditioned(data)
    assert first.is_initialized() and torch.allclose(first.loc, data.mean(0))
