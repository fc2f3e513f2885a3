"""The convex inverse solver: round trips, far points, failure reports, implicit gradients."""

import warnings

import pytest
import torch
from torch.func import functional_call

from pyro_cpflow.nn import ICNN
from pyro_cpflow.potential import ConvexPotential
from pyro_cpflow.solvers import (
    InverseReport,
    NonConvergenceError,
    NonConvergenceWarning,
    invert_gradient_map,
    residual_scale,
    solve_gradient_equation,
)


def _potential(d, alpha=1e-2, randomize=0.0, seed=0):
    torch.manual_seed(seed)
    potential = ConvexPotential(ICNN(d, [32, 32], augmented=True), d, alpha=alpha)
    with torch.no_grad():
        for p in potential.parameters():
            p.add_(randomize * torch.randn_like(p))
    return potential


def _ill_conditioned(d):
    """Curvature from 1e-3 (the floor) to about 1e3: condition number ~1e6."""
    potential = _potential(d, alpha=1e-3, randomize=2.0, seed=3)
    with torch.no_grad():
        potential.raw_beta.fill_(-30.0)
        potential.factor.zero_()
        potential.factor[0, 0] = 30.0
        potential.raw_scale.fill_(3.0)
    return potential


@pytest.mark.parametrize("d", [1, 3, 10])
def test_round_trip(d):
    potential = _potential(d, randomize=2.0)
    x = 3 * torch.randn(64, d)
    y = potential.gradient(x)
    x_hat, report = solve_gradient_equation(potential, y)
    assert report.all_converged
    assert (x_hat - x).abs().max() < 1e-8


@pytest.mark.parametrize("d", [1, 3, 10])
def test_round_trip_lbfgs(d):
    """Batch-wide L-BFGS stalls near sqrt(eps) (its line search compares summed values)."""
    potential = _potential(d, randomize=2.0)
    x = 3 * torch.randn(64, d)
    y = potential.gradient(x)
    x_hat, report = solve_gradient_equation(potential, y, method="lbfgs", tol=1e-5, max_iter=500)
    assert report.all_converged
    assert (x_hat - x).abs().max() < 1e-3


@pytest.mark.parametrize("randomize", [0.0, 3.0])
def test_round_trip_far_points(randomize):
    d = 5
    potential = _potential(d, randomize=randomize)
    x = torch.randn(200, d) * torch.logspace(-2, 3, 200)[:, None]
    y = potential.gradient(x)
    assert y.abs().max() > 1e3
    x_hat, report = solve_gradient_equation(potential, y, initial=potential.initial_inverse_guess(y))
    assert report.all_converged
    assert (x_hat - x).abs().max() < 1e-8
    assert report.iterations.max() <= 30


def test_round_trip_ill_conditioned():
    d = 6
    potential = _ill_conditioned(d)
    x = 5 * torch.randn(100, d)
    y = potential.gradient(x)
    hessian = torch.autograd.functional.hessian(lambda v: potential(v[None])[0], x[0])
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues.max() / eigenvalues.min() > 1e5
    # tol is relative to max(1, |y|_inf), here about 1e4: 1e-14 is near float64's resolution
    x_hat, report = solve_gradient_equation(potential, y, tol=1e-14)
    assert report.all_converged
    # |x_hat - x| <= |H^-1| |residual| <= tol max(1, |y|) / alpha
    assert (x_hat - x).abs().max() < 1e-14 * float(report.scale.max()) / potential.alpha


def test_newton_converges_quadratically():
    potential = _potential(4, randomize=2.0)
    y = potential.gradient(torch.randn(50, 4) * 5)
    _, loose = solve_gradient_equation(potential, y, tol=1e-4)
    _, tight = solve_gradient_equation(potential, y, tol=1e-12)
    # eight more orders of magnitude cost only a few more Newton steps
    assert int(tight.iterations.max()) - int(loose.iterations.max()) <= 3


def test_non_convergence_is_reported():
    potential = _potential(4, randomize=2.0)
    y = potential.gradient(torch.randn(10, 4) * 50)
    with pytest.warns(NonConvergenceWarning, match="did not converge"):
        _, report = solve_gradient_equation(potential, y, max_iter=1, initial=torch.zeros_like(y))
    assert not report.all_converged
    with pytest.raises(NonConvergenceError):
        solve_gradient_equation(potential, y, max_iter=1, initial=torch.zeros_like(y), on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_gradient_equation(potential, y, max_iter=1, initial=torch.zeros_like(y), on_failure="ignore")


def test_bad_input_gets_clear_errors():
    potential = _potential(3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        solve_gradient_equation(potential, torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        solve_gradient_equation(potential, torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        solve_gradient_equation(potential, torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        solve_gradient_equation(potential, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown method"):
        solve_gradient_equation(potential, torch.zeros(2, 3), method="bisection")
    with pytest.raises(ValueError, match="initial"):
        solve_gradient_equation(potential, torch.zeros(2, 3), initial=torch.zeros(1, 3))


def test_implicit_gradient_in_y_matches_inverse_hessian():
    potential = _potential(3, randomize=2.0)
    y = torch.randn(4, 3, requires_grad=True)
    x, _ = invert_gradient_map(potential, y)
    jacobian_rows = [torch.autograd.grad(x[:, i].sum(), y, retain_graph=True)[0] for i in range(3)]
    jacobian = torch.stack(jacobian_rows, dim=1)  # (N, 3, 3): dx_i / dy_j per sample
    for n in range(4):
        hessian = torch.autograd.functional.hessian(lambda v: potential(v[None])[0], x[n].detach())
        assert torch.allclose(jacobian[n], torch.linalg.inv(hessian), atol=1e-8)


def test_implicit_gradients_pass_gradcheck():
    """Gradients in y and in every parameter, against finite differences."""
    torch.manual_seed(0)
    potential = ConvexPotential(ICNN(2, [4, 4], augmented=True), 2)
    with torch.no_grad():
        for p in potential.parameters():
            p.add_(torch.randn_like(p))
    names = [name for name, _ in potential.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in potential.parameters()]
    y = torch.randn(3, 2, requires_grad=True)

    def inverse(y, *values):
        state = dict(zip(names, values, strict=True))
        x, report = invert_gradient_map(lambda v: functional_call(potential, state, (v,)), y, tol=1e-13)
        return x

    assert torch.autograd.gradcheck(inverse, (y, *params), atol=1e-6, rtol=1e-5)


def test_implicit_gradients_in_the_context_pass_gradcheck():
    from pyro_cpflow.nn import PICNN

    torch.manual_seed(0)
    potential = ConvexPotential(PICNN(2, 3, [4, 4]), 2)
    y = torch.randn(3, 2, requires_grad=True)
    context = torch.randn(3, 3, requires_grad=True)

    def inverse(y, context):
        return invert_gradient_map(potential, y, context=context, tol=1e-13)[0]

    assert torch.autograd.gradcheck(inverse, (y, context), atol=1e-6, rtol=1e-5)


def test_converged_samples_leave_the_batch():
    """Easy samples stop after a few Newton steps while a hard one goes on."""
    potential = _potential(3, randomize=2.0)
    x = torch.randn(20, 3)
    x[0] = 40.0
    y = potential.gradient(x)
    initial = y.clone()
    initial[1:] = x[1:] + 1e-3  # nearly solved already
    _, report = solve_gradient_equation(potential, y, initial=initial)
    assert report.all_converged
    assert int(report.iterations[1:].max()) < int(report.iterations[0])


def test_no_graph_without_grad_mode():
    potential = _potential(2)
    y = torch.randn(3, 2, requires_grad=True)
    with torch.no_grad():
        x, _ = invert_gradient_map(potential, y)
    assert not x.requires_grad


def test_quadratic_preconditioner_cuts_newton_work():
    """With a dominant, ill-conditioned quadratic, preconditioning by Q saves most HVPs."""
    d = 32
    potential = _potential(d, randomize=0.0)
    with torch.no_grad():
        potential.factor.copy_(torch.randn(d, d) * torch.logspace(0, 1.5, d))
    x = 3 * torch.randn(100, d)
    y = potential.gradient(x)
    plain_x, plain = solve_gradient_equation(potential, y)
    fast_x, fast = solve_gradient_equation(potential, y, preconditioner=potential.factorize().solve)
    assert plain.all_converged and fast.all_converged
    assert (fast_x - x).abs().max() < 1e-8
    assert fast.hessian_products * 3 < plain.hessian_products


def test_line_search_tolerates_round_off_of_large_terms():
    """F(x) and y^T x can be far larger than phi = F(x) - y^T x; Newton must still finish."""
    potential = _potential(3, randomize=1.0)
    with torch.no_grad():
        potential.shift.fill_(1e5)  # adds b^T x to F and b to y: they cancel in phi
    x = torch.randn(50, 3)
    y = potential.gradient(x)
    x_hat, report = solve_gradient_equation(potential, y, tol=1e-10 / float(residual_scale(y.detach()).max()))
    assert report.all_converged, report.residual.max()
    assert int(report.iterations.max()) <= 15
    assert (x_hat - x).abs().max() < 1e-8


def test_tolerance_is_relative_to_the_target_in_float32():
    """float32 holds about 7 digits of |y| = 1e4: an absolute 1e-5 would ask for 9."""
    potential = _potential(4, randomize=0.5).float()
    y = torch.randn(400, 4) * torch.logspace(-3, 4, 400)[:, None]
    x, report = solve_gradient_equation(
        potential, y.float(), initial=potential.initial_inverse_guess(y.float())
    )
    assert report.tol == 1e-5
    assert report.all_converged, int((~report.converged).sum())
    assert torch.equal(report.scale, residual_scale(y.float()))
    # checked in float64, every converged answer holds
    exact = potential.double()
    error = (exact.gradient(x.double()) - y).abs().amax(-1) / residual_scale(y)
    assert float(error.detach().max()) <= 2e-5


def test_a_residual_below_its_own_rounding_error_is_not_a_success():
    """A stiff rank-one quadratic (curvature 1e7 along u) and targets orthogonal to u: float32
    evaluates L (L^T x) with an error far above 1e-5 |y|, so no residual certifies the answer."""
    potential = _potential(3, randomize=0.5)
    direction = torch.tensor([1.0, 2.0, 2.0]) / 3
    with torch.no_grad():
        potential.factor.zero_()
        potential.factor[:, 0] = 3e3 * direction
    potential = potential.float()
    y = torch.randn(50, 3)
    y = (y - (y @ direction)[:, None] * direction).float()
    with pytest.warns(NonConvergenceWarning, match="torch.float32 cannot resolve it there; use float64"):
        _, report = solve_gradient_equation(
            potential,
            y,
            initial=potential.initial_inverse_guess(y),
            preconditioner=potential.factorize().solve,
        )
    assert float(report.unresolved.double().mean()) > 0.5 and not bool(report.converged.any())
    # float64 resolves it to 1e-6 (its rounding error here is about 1e-9 |y|)
    potential, y = potential.double(), y.double()
    _, report = solve_gradient_equation(
        potential,
        y,
        tol=1e-6,
        initial=potential.initial_inverse_guess(y),
        preconditioner=potential.factorize().solve,
    )
    assert report.all_converged and not bool(report.unresolved.any())


def test_report_judges_residual_and_rounding_noise():
    scale = torch.tensor([1.0, 100.0, 1.0])
    report = InverseReport.judged(
        "newton-cg",
        torch.zeros(3, dtype=torch.long),
        0,
        residual=torch.tensor([5e-6, 5e-4, 5e-6]),
        noise=torch.tensor([1e-7, 1e-7, 2e-5]),
        tol=1e-5,
        scale=scale,
    )
    assert report.converged.tolist() == [True, True, False]  # relative; the third is below its noise
    assert report.unresolved.tolist() == [False, False, True]
