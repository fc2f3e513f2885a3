"""Conjugate gradients, Lanczos log-dets, Hessian products against dense linear algebra."""

import pytest
import torch

from pyro_cpflow.linalg import (
    cholesky_logdet,
    conjugate_gradient,
    dense_hessian,
    hessian_vector_product,
    lanczos_tridiagonal,
    logdet_gradient_surrogate,
    stochastic_logdet,
)


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


def test_lanczos_full_steps_is_exact_quadrature():
    """With m = d steps the quadrature v^T log(A) v is exact for every probe."""
    a = _spd_batch(5, 6, condition=50)
    v = torch.randn(5, 6)
    tridiagonal, norm_sq = lanczos_tridiagonal(_matvec(a), v, steps=6)
    theta, u = torch.linalg.eigh(tridiagonal)
    estimate = norm_sq * (u[:, 0, :] ** 2 * theta.log()).sum(-1)
    eigenvalues, vectors = torch.linalg.eigh(a)
    log_a = vectors @ torch.diag_embed(eigenvalues.log()) @ vectors.transpose(-1, -2)
    exact = torch.einsum("ni,nij,nj->n", v, log_a, v)
    assert torch.allclose(estimate, exact, atol=1e-8)


def test_lanczos_breakdown_is_handled():
    """A probe in a 2-d invariant subspace of a 6-d matrix breaks down after 2 steps."""
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).expand(3, 6, 6)
    v = torch.zeros(3, 6)
    v[:, 0], v[:, 1] = 1.0, 1.0
    tridiagonal, _ = lanczos_tridiagonal(_matvec(a), v, steps=6)
    theta, u = torch.linalg.eigh(tridiagonal)
    estimate = 2.0 * (u[:, 0, :] ** 2 * theta.log()).sum(-1)
    assert torch.isfinite(estimate).all()
    assert torch.allclose(estimate, torch.full((3,), torch.log(torch.tensor(2.0))), atol=1e-10)


def test_slq_average_matches_exact_logdet():
    torch.manual_seed(1)
    runs = 4000
    a = _spd_batch(4, 10, condition=20)
    copies = a.repeat(runs, 1, 1)  # each probe of each matrix is one batch entry
    samples = stochastic_logdet(_matvec(copies), copies[:, 0], steps=10).reshape(runs, 4)
    exact = torch.linalg.slogdet(a)[1]
    stderr = samples.std(0) / runs**0.5
    assert bool(((samples.mean(0) - exact).abs() < 4 * stderr).all())
    # a wrong answer would be caught: the tolerance is far below the log-det differences
    assert float(stderr.max()) < 0.1
    # more probes per call reduce the spread
    many = stochastic_logdet(_matvec(copies), copies[:, 0], num_probes=8, steps=10).reshape(runs, 4)
    assert bool((many.std(0) < 0.5 * samples.std(0)).all())


def test_hessian_vector_product_and_dense_hessian():
    x = torch.randn(6, 3, requires_grad=True)
    w = torch.randn(3, 3)
    f = (torch.nn.functional.softplus(x @ w) ** 2).sum()
    (grad,) = torch.autograd.grad(f, x, create_graph=True)
    hessians = dense_hessian(grad, x)
    for i in range(6):
        expected = torch.autograd.functional.hessian(
            lambda v: (torch.nn.functional.softplus(v @ w) ** 2).sum(), x[i].detach()
        )
        assert torch.allclose(hessians[i], expected, atol=1e-12)
    v = torch.randn(6, 3)
    assert torch.allclose(
        hessian_vector_product(grad, x, v), torch.einsum("nij,nj->ni", hessians, v), atol=1e-12
    )


def test_logdet_surrogate_gradient_is_unbiased():
    """E_v[grad (w^T A(theta) v)] equals grad log det A(theta) for A = B(theta) B(theta)^T + I."""
    torch.manual_seed(2)
    runs = 4000
    theta = torch.randn(3, 5, 5)
    exact_theta = theta.clone().requires_grad_(True)
    eye = torch.eye(5)
    exact_a = exact_theta @ exact_theta.transpose(-1, -2) + eye
    exact = torch.autograd.grad(torch.linalg.slogdet(exact_a)[1].sum(), exact_theta)[0]
    copies = theta.repeat(runs, 1, 1).requires_grad_(True)  # one probe per copy
    a = copies @ copies.transpose(-1, -2) + eye
    surrogate, result = logdet_gradient_surrogate(
        _matvec(a.detach()), _matvec(a), torch.zeros(3 * runs, 5), rtol=1e-12
    )
    assert bool(result.converged.all())
    per_probe = torch.autograd.grad(surrogate.sum(), copies)[0].reshape(runs, 3, 5, 5)
    stderr = per_probe.std(0) / runs**0.5
    error = (per_probe.mean(0) - exact).abs()
    assert bool((error < 4.5 * stderr).all()), float((error / stderr).max())
    assert float(stderr.max()) < 0.1 * float(exact.abs().max())


def test_preconditioned_cg_matches_solve_in_fewer_iterations():
    d = 40
    base = _spd_batch(1, d, condition=1e4)[0]
    a = base + 0.1 * _spd_batch(6, d, condition=10)  # H = M + small perturbation
    b = torch.randn(6, d)
    chol = torch.linalg.cholesky(base)
    plain = conjugate_gradient(_matvec(a), b, rtol=1e-10, max_iter=1000)
    preconditioned = conjugate_gradient(
        _matvec(a), b, rtol=1e-10, max_iter=1000,
        preconditioner=lambda v: torch.cholesky_solve(v.T, chol).T,
    )
    expected = torch.linalg.solve(a, b)
    assert bool(preconditioned.converged.all())
    assert torch.allclose(preconditioned.solution, expected, atol=1e-7)
    assert int(preconditioned.iterations.max()) * 4 < int(plain.iterations.max())
