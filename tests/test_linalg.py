"""Conjugate gradients, the Lanczos matrix from CG's coefficients, log-dets, against dense linear algebra."""

import pytest
import torch

from pyro_cpflow.linalg import (
    cholesky_logdet,
    conjugate_gradient,
    lanczos_conjugate_gradient,
    lanczos_quadrature,
    stochastic_logdet,
)
from pyro_cpflow.potential import DenseQuadraticFactor, LowRankQuadraticFactor

pytestmark = pytest.mark.float64  # tolerances of float64, whatever --dtype says


def _spd_batch(n, d, condition=10.0):
    q, _ = torch.linalg.qr(torch.randn(n, d, d))
    eigenvalues = torch.exp(torch.rand(n, d) * torch.log(torch.tensor(condition)))
    return q @ torch.diag_embed(eigenvalues) @ q.transpose(-1, -2)


def _matvec(matrices):
    return lambda v: torch.einsum("nij,nj->ni", matrices, v)


def test_cg_matches_dense_solve():
    a = _spd_batch(20, 8)
    b = torch.randn(20, 8)
    result = conjugate_gradient(_matvec(a), b, rtol=1e-12)
    expected = torch.linalg.solve(a, b)
    assert torch.allclose(result.solution, expected, atol=1e-9)
    assert bool(result.converged.all())
    assert bool((result.residual_norm <= 1e-12 * b.norm(dim=-1)).all())


def test_cg_without_convergence_tests_runs_max_iter_and_freezes_converged_samples():
    from tests.sync_counter import HostSyncCounter

    a = _spd_batch(20, 8, condition=100.0)
    b = torch.randn(20, 8)
    adaptive = conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=40)
    with HostSyncCounter() as counter:
        fixed = conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=40, check_every=0)
    assert counter.total == 0, dict(counter.counts)
    assert bool(adaptive.converged.all()) and bool(fixed.converged.all())
    assert torch.equal(fixed.iterations, adaptive.iterations)  # frozen once converged
    assert torch.allclose(fixed.solution, adaptive.solution, rtol=0, atol=1e-12)
    with HostSyncCounter() as counter:
        conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=40, check_every=5)
    assert 1 <= counter.total <= 40 // 5
    starved = conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=2, check_every=0)
    assert not bool(starved.converged.any()) and bool((starved.iterations == 2).all())
    with pytest.raises(ValueError, match="check_every"):
        conjugate_gradient(_matvec(a), b, check_every=-1)


def test_cg_per_sample_convergence_with_one_ill_conditioned_sample():
    d = 50
    a = torch.eye(d).repeat(8, 1, 1) * 2.0
    a[0] = _spd_batch(1, d, condition=1e6)[0]
    b = torch.randn(8, d)
    result = conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=500)
    assert bool(result.converged.all())
    # the well-conditioned samples finish in one step and stop changing
    assert result.iterations[1:].tolist() == [1] * 7
    assert int(result.iterations[0]) > 20
    assert torch.allclose(result.solution[1:], b[1:] / 2.0, atol=1e-12)


def test_cg_zero_rhs_and_reports_non_convergence():
    a = _spd_batch(3, 6, condition=1e4)
    b = torch.randn(3, 6)
    b[1] = 0.0
    result = conjugate_gradient(_matvec(a), b, rtol=1e-12, max_iter=2)
    assert torch.isfinite(result.solution).all()
    assert bool(result.converged[1]) and int(result.iterations[1]) == 0
    assert not bool(result.converged[0]) and not bool(result.converged[2])


def test_cg_stops_on_indefinite_matrix_without_nan():
    a = -torch.eye(4).expand(2, 4, 4)
    result = conjugate_gradient(_matvec(a), torch.randn(2, 4), rtol=1e-10)
    assert torch.isfinite(result.solution).all()
    assert not bool(result.converged.any())


def test_cg_per_sample_rtol():
    a = _spd_batch(2, 30, condition=1e3)
    b = torch.randn(2, 30)
    result = conjugate_gradient(_matvec(a), b, rtol=torch.tensor([1e-1, 1e-12]), max_iter=200)
    assert int(result.iterations[0]) < int(result.iterations[1])


def test_cholesky_logdet_matches_slogdet_and_rejects_indefinite():
    a = _spd_batch(10, 7, condition=1e3)
    assert torch.allclose(cholesky_logdet(a), torch.linalg.slogdet(a)[1], atol=1e-10)
    bad = a.clone()
    bad[3] = -bad[3]
    with pytest.raises(ValueError, match=r"batch entries \[3\]"):
        cholesky_logdet(bad)


def _log_quadratic_form(a, v):
    eigenvalues, vectors = torch.linalg.eigh(a)
    log_a = vectors @ torch.diag_embed(eigenvalues.log()) @ vectors.transpose(-1, -2)
    return torch.einsum("ni,nij,nj->n", v, log_a, v)


def test_cg_coefficients_give_exact_quadrature_at_convergence():
    """After d iterations the Lanczos matrix from CG's coefficients integrates log exactly."""
    a = _spd_batch(5, 6, condition=50)
    v = torch.randn(5, 6)
    result = lanczos_conjugate_gradient(_matvec(a), v, rtol=1e-14, max_iter=6)
    assert result.lanczos.dense().shape == (5, 6, 6)
    # T is the matrix of A in an orthonormal Krylov basis: same eigenvalues at convergence
    assert torch.allclose(torch.linalg.eigvalsh(result.lanczos.dense()), torch.linalg.eigvalsh(a), atol=1e-8)
    estimate = lanczos_quadrature(result.lanczos)
    assert torch.allclose(estimate, _log_quadratic_form(a, v), atol=1e-8)


def test_whitened_cg_quadrature_is_that_of_the_preconditioned_matrix():
    """CG on C^-1 H C^-T from eps integrates log(C^-1 H C^-T), whose trace is log det H - log det Q."""
    d = 7
    m = _spd_batch(1, d, condition=30)[0]
    a = m + _spd_batch(4, d, condition=5)
    factor = DenseQuadraticFactor(m)
    eps = torch.randn(4, d)
    result = lanczos_conjugate_gradient(
        lambda v: factor.whiten(_matvec(a)(factor.unwhiten(v))),
        eps,
        rtol=1e-14,
        max_iter=d,
    )
    chol = torch.linalg.cholesky(m)
    whitened = torch.linalg.solve_triangular(
        chol, torch.linalg.solve_triangular(chol, a, upper=False).transpose(-1, -2), upper=False
    )
    assert torch.allclose(result.lanczos.start_norm_sq, (eps * eps).sum(-1))
    estimate = lanczos_quadrature(result.lanczos)
    assert torch.allclose(estimate, _log_quadratic_form(whitened, eps), atol=1e-8)
    expected = torch.linalg.slogdet(a)[1] - factor.logdet
    assert torch.allclose(torch.linalg.slogdet(whitened)[1], expected, atol=1e-10)


def test_lockstep_cg_counts_and_cuts_per_sample_and_can_run_without_syncs():
    from tests.sync_counter import HostSyncCounter

    a = _spd_batch(20, 8, condition=100.0)
    b = torch.randn(20, 8)
    b[3] = 0.0
    adaptive = lanczos_conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=40)
    with HostSyncCounter() as counter:
        fixed = lanczos_conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=40, check_every=0)
    assert counter.total == 0, dict(counter.counts)
    assert bool(adaptive.converged.all()) and bool(fixed.converged.all())
    assert int(adaptive.iterations[3]) == 0 and torch.equal(fixed.iterations, adaptive.iterations)
    assert torch.allclose(fixed.solution, torch.linalg.solve(a, b), atol=1e-8)
    # past convergence the Lanczos matrices are cut: the quadratures agree
    assert torch.allclose(lanczos_quadrature(fixed.lanczos), lanczos_quadrature(adaptive.lanczos), atol=1e-10)
    starved = lanczos_conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=2, check_every=0)
    assert not bool(starved.converged[torch.arange(20) != 3].any())
    assert bool((starved.iterations[torch.arange(20) != 3] == 2).all())
    with pytest.raises(ValueError, match="check_every"):
        lanczos_conjugate_gradient(_matvec(a), b, check_every=-1)
    broken = lanczos_conjugate_gradient(lambda v: -v, b, rtol=1e-10, max_iter=5)
    assert not bool(broken.converged[torch.arange(20) != 3].any())


def test_lockstep_cg_takes_a_known_first_product_and_saves_that_product():
    a = _spd_batch(20, 8, condition=100.0)
    b = torch.randn(20, 8)
    products = []

    def counted(v):
        products.append(v)
        return _matvec(a)(v)

    plain = lanczos_conjugate_gradient(counted, b, rtol=1e-10, max_iter=40)
    used = len(products)
    products.clear()
    reused = lanczos_conjugate_gradient(counted, b, rtol=1e-10, max_iter=40, first_product=_matvec(a)(b))
    assert len(products) == used - 1
    assert torch.equal(reused.iterations, plain.iterations)
    assert torch.allclose(reused.solution, plain.solution, atol=1e-12)
    assert torch.allclose(lanczos_quadrature(reused.lanczos), lanczos_quadrature(plain.lanczos), atol=1e-10)
    with pytest.raises(ValueError, match="first_product must have the shape of rhs"):
        lanczos_conjugate_gradient(counted, b, first_product=b[:3])


def test_samples_that_stop_early_keep_a_closed_quadrature():
    """A probe in a 2-d invariant subspace converges in 2 iterations, next to samples that need 6."""
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).repeat(3, 1, 1)
    v = torch.randn(3, 6)
    v[0] = 0.0
    v[0, 0], v[0, 1] = 1.0, 1.0
    result = lanczos_conjugate_gradient(_matvec(a), v, rtol=1e-12, max_iter=6)
    assert int(result.iterations[0]) == 2 and int(result.iterations[1:].min()) == 6
    estimate = lanczos_quadrature(result.lanczos)
    assert torch.isfinite(estimate).all()
    assert torch.allclose(estimate, _log_quadratic_form(a, v), atol=1e-10)


class _MatrixTrace:
    """The trace interface for explicit matrices ``A (N, d, d)`` (with their graph)."""

    def __init__(self, matrices, x):
        self.matrices, self.x = matrices, x

    def hvp(self, v):
        return torch.einsum("nij,nj->ni", self.matrices, v)

    def detach(self):
        return _MatrixTrace(self.matrices.detach(), self.x)


def _replicated_logdet(theta, quadratic, runs, preconditioned):
    """The stochastic log-det of A = B B^T + Q on ``runs`` copies (one probe each) and its exact value."""
    copies = theta.repeat(runs, 1, 1).requires_grad_(True)
    matrices = copies @ copies.transpose(-1, -2) + quadratic
    factor = DenseQuadraticFactor(quadratic) if preconditioned else None
    estimate = stochastic_logdet(_MatrixTrace(matrices, copies[:, 0]), factor, rtol=1e-12)
    return copies, estimate


@pytest.mark.parametrize("preconditioned", [False, True])
def test_stochastic_logdet_value_and_gradient_average_to_exact(preconditioned):
    torch.manual_seed(2)
    runs, d = 4000, 5
    theta = 0.5 * torch.randn(3, d, d)
    raw = torch.randn(d, d, requires_grad=True)
    quadratic = raw @ raw.T + torch.eye(d)
    exact_theta = theta.clone().requires_grad_(True)
    exact_value = torch.linalg.slogdet(exact_theta @ exact_theta.transpose(-1, -2) + quadratic)[1]
    exact_theta_grad, exact_raw_grad = torch.autograd.grad(
        exact_value.sum(), [exact_theta, raw], retain_graph=True
    )
    copies, estimate = _replicated_logdet(theta, quadratic, runs, preconditioned)
    assert bool(estimate.cg.converged.all())
    values = estimate.value.reshape(runs, 3)
    stderr = values.std(0) / runs**0.5
    assert bool(((values.mean(0) - exact_value.detach()).abs() < 4.5 * stderr).all())
    combined = estimate.combined()
    assert torch.allclose(combined.detach(), estimate.value)
    theta_grads, raw_grad = torch.autograd.grad(combined.sum(), [copies, raw])
    per_probe = theta_grads.reshape(runs, 3, d, d)
    stderr = per_probe.std(0) / runs**0.5
    error = (per_probe.mean(0) - exact_theta_grad).abs()
    assert bool((error < 4.5 * stderr + 1e-12).all()), float((error / stderr).max())
    # the quadratic's gradient, summed over probes, is an average of runs estimates
    assert torch.allclose(
        raw_grad / runs, exact_raw_grad, rtol=0.1, atol=0.05 * float(exact_raw_grad.abs().max())
    )


def test_preconditioning_with_the_quadratic_cuts_the_variance():
    """With H close to Q the preconditioned value, and the gradient in Q's parameters, are far less noisy."""
    torch.manual_seed(3)
    calls, runs, d = 40, 25, 6
    theta = 0.2 * torch.randn(1, d, d)
    raw = torch.randn(d, d, requires_grad=True)
    spread = {}
    for preconditioned in (False, True):
        values, grads = [], []
        for _ in range(calls):
            quadratic = raw @ raw.T + torch.eye(d)
            _, estimate = _replicated_logdet(theta, quadratic, runs, preconditioned)
            values.append(estimate.value)
            grads.append(torch.autograd.grad(estimate.combined().mean(), raw)[0])
        spread[preconditioned] = float(torch.cat(values).std()), float(torch.stack(grads).std(0).max())
    assert spread[True][0] < 0.2 * spread[False][0]
    assert spread[True][1] < 0.2 * spread[False][1]


def test_preconditioned_cg_matches_solve_in_fewer_iterations():
    d = 40
    base = _spd_batch(1, d, condition=1e4)[0]
    a = base + 0.1 * _spd_batch(6, d, condition=10)  # H = M + small perturbation
    b = torch.randn(6, d)
    chol = torch.linalg.cholesky(base)
    plain = conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=1000)
    preconditioned = conjugate_gradient(
        _matvec(a),
        b,
        rtol=1e-10,
        max_iter=1000,
        preconditioner=lambda v: torch.cholesky_solve(v.T, chol).T,
    )
    expected = torch.linalg.solve(a, b)
    assert bool(preconditioned.converged.all())
    assert torch.allclose(preconditioned.solution, expected, atol=1e-7)
    assert int(preconditioned.iterations.max()) * 4 < int(plain.iterations.max())


def test_quadrature_in_chunks_equals_one_pass(monkeypatch):
    import pyro_cpflow.linalg as linalg

    a = _spd_batch(9, 5, condition=100)
    result = lanczos_conjugate_gradient(_matvec(a), torch.randn(9, 5), rtol=1e-14, max_iter=5)
    whole = lanczos_quadrature(result.lanczos)
    monkeypatch.setattr(linalg, "QUADRATURE_CHUNK_ENTRIES", 50)  # two matrices of 5 x 5 at a time
    assert torch.allclose(lanczos_quadrature(result.lanczos), whole, atol=1e-13)


def test_quadratic_factor_logdet_gradient_and_solves():
    raw = torch.randn(5, 5, requires_grad=True)
    matrix = raw @ raw.T + torch.eye(5)
    factor = DenseQuadraticFactor(matrix)
    (grad,) = torch.autograd.grad(factor.logdet, raw)
    (expected,) = torch.autograd.grad(torch.logdet(raw @ raw.T + torch.eye(5)), raw)
    assert torch.allclose(grad, expected, atol=1e-12)
    rows = torch.randn(3, 5)
    assert torch.allclose(factor.solve(rows), torch.linalg.solve(matrix.detach(), rows.T).T, atol=1e-12)
    chol = factor.cholesky
    assert torch.allclose(chol @ chol.T, matrix.detach(), atol=1e-12)


def test_low_rank_factor_matches_the_dense_one():
    d, r = 9, 3
    coefficient = torch.tensor(0.7, requires_grad=True)
    factor = torch.randn(d, r, requires_grad=True)
    low = LowRankQuadraticFactor(coefficient, factor)
    matrix = coefficient * torch.eye(d) + factor @ factor.T
    dense = DenseQuadraticFactor(matrix)
    rows = torch.randn(4, d)
    assert torch.allclose(low.solve(rows), dense.solve(rows), atol=1e-12)
    assert torch.allclose(low.matvec(rows), dense.matvec(rows), atol=1e-12)
    assert torch.allclose(low.logdet, dense.logdet, atol=1e-12)
    grads = torch.autograd.grad(low.logdet, [coefficient, factor])
    expected = torch.autograd.grad(
        torch.logdet(coefficient * torch.eye(d) + factor @ factor.T), [coefficient, factor]
    )
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, expected, strict=True))
    # its root S is symmetric, S S^T = Q
    root_inverse = low.whiten(torch.eye(d))
    assert torch.allclose(root_inverse, root_inverse.T, atol=1e-12)
    root = torch.linalg.inv(root_inverse)
    assert torch.allclose(root @ root.T, matrix.detach(), atol=1e-10)


@pytest.mark.parametrize("low_rank", [False, True])
def test_whitening_maps_q_to_the_identity_and_unwhitening_completes_q_inverse(low_rank):
    d, r = 8, (3 if low_rank else 8)
    coefficient, factor = torch.tensor(0.4), torch.randn(d, r)
    matrix = coefficient * torch.eye(d) + factor @ factor.T
    white = LowRankQuadraticFactor(coefficient, factor) if low_rank else DenseQuadraticFactor(matrix)
    rows = torch.randn(5, d)
    # rows Q^-1 = unwhiten(whiten(rows)), and S^-1 Q S^-T = I
    assert torch.allclose(white.unwhiten(white.whiten(rows)), rows @ torch.linalg.inv(matrix), atol=1e-10)
    assert torch.allclose(white.whiten(white.whiten(matrix).T), torch.eye(d), atol=1e-10)


def test_log_determinants_have_exact_second_derivatives():
    """Hessians through ``cholesky_logdet`` and the quadratic's factor log-det (dense and low
    rank) equal those through ``slogdet``: the constant Cholesky factor of the first-order
    backward pass must not leak into a backward pass that builds a graph."""
    torch.manual_seed(0)
    theta = torch.randn(12, dtype=torch.float64)

    def spd(t):
        b = t.reshape(4, 3)
        return b @ b.T + torch.eye(4, dtype=t.dtype)

    def reference(t):
        return torch.linalg.slogdet(spd(t))[1]

    expected = torch.autograd.functional.hessian(reference, theta)
    for logdet in (
        lambda t: cholesky_logdet(spd(t)),
        lambda t: DenseQuadraticFactor(spd(t)).logdet,
        lambda t: LowRankQuadraticFactor(torch.tensor(1.0, dtype=t.dtype), t.reshape(4, 3)).logdet,
    ):
        assert torch.allclose(logdet(theta), reference(theta), atol=1e-12)
        assert torch.allclose(torch.autograd.functional.hessian(logdet, theta), expected, atol=1e-10)
