r"""Hessian-free linear algebra for batches of symmetric positive-definite matrices.

Every routine acts on a batch of ``N`` independent problems of dimension ``d`` and
touches the matrices only through a batched product ``matvec: (N, d) -> (N, d)``; for
CP-Flow that is :meth:`~pyro_cpflow.derivatives.PotentialTrace.hvp`.

* :func:`conjugate_gradient` solves :math:`H_i w_i = b_i`, judging convergence per
  sample, and can return the Lanczos tridiagonal matrix that its own coefficients define
  (the modified batched CG of Gardner et al. 2018), so that one solve also gives a
  quadrature estimate of :math:`b^\top f(H) b` (:func:`lanczos_quadrature`).
* :func:`stochastic_logdet` uses one preconditioned solve per probe for both the value
  of :math:`\log\det H` and an unbiased surrogate of its gradient.
* :func:`cholesky_logdet` gives exact values for small ``d``.

References: Hestenes & Stiefel (1952); Golub & Meurant, *Matrices, moments and
quadrature* (1994); Ubaru, Chen & Saad, *Fast estimation of tr(f(A)) via stochastic
Lanczos quadrature*, SIMAX 2017; Gardner, Pleiss, Bindel, Weinberger & Wilson,
*GPyTorch: blackbox matrix-matrix Gaussian process inference with GPU acceleration*,
NeurIPS 2018 (arXiv:1809.11165), appendix on mBCG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "CGResult",
    "LanczosMatrices",
    "MatVec",
    "StochasticLogdet",
    "cholesky_logdet",
    "conjugate_gradient",
    "lanczos_quadrature",
    "rademacher",
    "stochastic_logdet",
]

MatVec = Callable[[Tensor], Tensor]


class _SPDLogdet(torch.autograd.Function):
    r""":math:`\log\det A` by Cholesky, with the backward pass :math:`\bar A = \bar\ell\, A^{-1}`.

    :math:`\partial \log\det A = \mathrm{tr}(A^{-1}\partial A)` for symmetric :math:`A`, and
    :math:`A^{-1}` comes from the same factor in one call (``cholesky_inverse``): cheaper
    than differentiating through the factorisation.
    """

    @staticmethod
    def forward(ctx, matrix: Tensor) -> Tensor:  # type: ignore[override]
        chol, info = torch.linalg.cholesky_ex(matrix)
        if bool((info > 0).any()):
            bad = torch.nonzero(info.reshape(-1)).flatten().tolist()[:10]
            raise ValueError(f"matrix is not positive definite at batch entries {bad}")
        ctx.save_for_backward(chol)
        return 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        (chol,) = ctx.saved_tensors
        return grad_output[..., None, None] * torch.cholesky_inverse(chol)


def cholesky_logdet(matrix: Tensor) -> Tensor:
    r""":math:`\log\det A = 2\sum_i \log L_{ii}` for symmetric positive-definite ``A = L L^T``.

    Only the lower triangle of ``A`` is read (as by the Cholesky factorisation); the
    gradient is :math:`A^{-1}`, symmetric. Raises ``ValueError`` naming the failing batch
    entries when ``A`` is not numerically positive definite.

    >>> a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], requires_grad=True)
    >>> cholesky_logdet(a).backward()
    >>> torch.allclose(a.grad, torch.linalg.inv(a.detach()))
    True
    """
    return _SPDLogdet.apply(matrix)


def rademacher(shape: torch.Size | tuple[int, ...], like: Tensor) -> Tensor:
    """Independent random signs with the dtype and device of ``like``."""
    signs = torch.randint(0, 2, shape, device=like.device).to(like.dtype)
    return 2.0 * signs - 1.0


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` with 0 wherever the denominator is 0."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), 0.0)


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`, one entry per sample.

    :ivar solution: ``(N, d)`` approximate solutions.
    :ivar iterations: ``(N,)`` iterations each sample was active.
    :ivar residual_norm: ``(N,)`` final :math:`|b - H w|_2` (as tracked by the recurrence).
    :ivar converged: ``(N,)`` whether the sample met its tolerance.
    :ivar lanczos: with ``lanczos=True``, the :class:`LanczosMatrices` of the
        (preconditioned) Krylov spaces.
    """

    solution: Tensor
    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor
    lanczos: LanczosMatrices | None = None


@dataclass
class LanczosMatrices:
    """Symmetric tridiagonal matrices :math:`T_i` ``(m, m)``, kept as their bands.

    ``m`` is the most iterations of any sample; a sample that stopped earlier has its
    matrix closed off by decoupled unit entries (which add nothing to a quadrature).

    :ivar diagonal: ``(N, m)``.
    :ivar offdiagonal: ``(N, m - 1)``.
    :ivar start_norm_sq: ``(N,)`` :math:`|u|^2 = b^\top M^{-1} b`, of the start vector.
    """

    diagonal: Tensor
    offdiagonal: Tensor
    start_norm_sq: Tensor

    def dense(self, rows: slice = slice(None)) -> Tensor:
        """The matrices ``(n, m, m)`` of the given rows."""
        matrices = torch.diag_embed(self.diagonal[rows])
        off = self.offdiagonal[rows]
        matrices.diagonal(offset=1, dim1=-2, dim2=-1).copy_(off)
        matrices.diagonal(offset=-1, dim1=-2, dim2=-1).copy_(off)
        return matrices


def conjugate_gradient(
    matvec: MatVec,
    rhs: Tensor,
    initial: Tensor | None = None,
    rtol: float | Tensor = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    preconditioner: MatVec | None = None,
    check_every: int = 1,
    lanczos: bool = False,
) -> CGResult:
    r"""Solve :math:`H_i w_i = b_i` for a batch of SPD :math:`H_i` by (preconditioned) CG.

    Sample :math:`i` stops once :math:`|b_i - H_i w_i| \le \max(\text{rtol}\,|b_i|,
    \text{atol})`; from then on its iterate no longer changes, while the other samples
    go on, so one ill-conditioned sample does not hold the tolerance of the rest
    hostage. A sample whose search direction loses positive curvature (possible only
    by round-off for SPD matrices) stops and is reported as not converged. No division
    by zero can occur.

    :param matvec: batched product ``(N, d) -> (N, d)``.
    :param rhs: ``(N, d)`` right-hand sides.
    :param initial: optional ``(N, d)`` starting point (default zero).
    :param rtol: relative tolerance, a float or one value per sample ``(N,)``.
    :param max_iter: default ``2 d``.
    :param preconditioner: optional batched :math:`M^{-1} v` for an SPD :math:`M \approx H`;
        the iteration count then depends on the conditioning of :math:`M^{-1} H`.
    :param check_every: the loop ends early once every sample has converged; that test
        reads a flag on the host (a device synchronisation on a GPU) and runs every
        ``check_every`` iterations. ``0`` never tests: exactly ``max_iter`` iterations run,
        converged samples frozen, with no synchronisation; the result is the same as with
        early exit whenever ``max_iter`` iterations suffice.
    :param lanczos: also return the Lanczos tridiagonal matrix :math:`T` of each sample,
        from the CG coefficients alone (no extra products). With step lengths
        :math:`\alpha_j` and direction updates :math:`\beta_j`,
        :math:`T_{jj} = 1/\alpha_j + \beta_{j-1}/\alpha_{j-1}` and
        :math:`T_{j,j+1} = \sqrt{\beta_j}/\alpha_j`: the matrix of
        :math:`M^{-1/2} H M^{-1/2}` in the Lanczos basis started from :math:`M^{-1/2} b`.

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> result = conjugate_gradient(lambda v: v @ A, torch.ones(5, 2), rtol=1e-10)
    >>> torch.allclose(result.solution @ A, torch.ones(5, 2))
    True
    """
    if rhs.dim() != 2:
        raise ValueError(f"rhs must have shape (N, d), got {tuple(rhs.shape)}")
    if check_every < 0:
        raise ValueError(f"check_every must be >= 0, got {check_every}")
    n, d = rhs.shape
    max_iter = 2 * d if max_iter is None else max_iter
    precondition = (lambda v: v) if preconditioner is None else preconditioner
    if initial is None:
        solution = torch.zeros_like(rhs)
        residual = rhs.clone()
    else:
        solution = initial.clone()
        residual = rhs - matvec(solution)
    tolerance = torch.clamp(rtol * rhs.norm(dim=-1), min=atol)
    preconditioned = precondition(residual)
    direction = preconditioned
    inner = (residual * preconditioned).sum(-1)  # r^T M^{-1} r
    active = residual.norm(dim=-1) > tolerance
    healthy = torch.ones(n, dtype=torch.bool, device=rhs.device)
    iterations = torch.zeros(n, dtype=torch.long, device=rhs.device)
    start_norm_sq = inner
    tiny = torch.finfo(rhs.dtype).tiny
    steps: list[Tensor] = []  # (alpha_j, active during j); (beta_j, active after j)
    ratios: list[Tensor] = []
    masks: list[Tensor] = []
    for iteration in range(max_iter):
        if check_every and iteration % check_every == 0 and not bool(active.any()):
            break
        product = matvec(direction)
        curvature = (direction * product).sum(-1)
        positive = curvature > 0
        healthy = healthy & (positive | ~active)
        active = active & positive
        # where a sample is active its curvature is positive and the quotient finite; the
        # other quotients are discarded by the where (no division by zero reaches a result)
        step = torch.where(active, inner / curvature, 0.0)
        solution = torch.addcmul(solution, step[:, None], direction)
        residual = torch.addcmul(residual, step[:, None], product, value=-1.0)
        preconditioned = precondition(residual)
        new_inner = (residual * preconditioned).sum(-1)
        ratio = torch.where(active, new_inner / inner.clamp_min(tiny), 0.0)
        direction = torch.where(
            active[:, None], torch.addcmul(preconditioned, ratio[:, None], direction), direction
        )
        inner = torch.where(active, new_inner, inner)
        iterations = iterations + active
        if lanczos:
            steps.append(step)
            ratios.append(ratio)
            masks.append(active)
        active = active & (residual.norm(dim=-1) > tolerance)
    residual_norm = residual.norm(dim=-1)
    converged = healthy & (residual_norm <= tolerance)
    result = CGResult(solution, iterations, residual_norm, converged)
    if lanczos:
        result.lanczos = _lanczos_from_cg(steps, ratios, masks, start_norm_sq)
    return result


def _lanczos_from_cg(
    steps: list[Tensor], ratios: list[Tensor], masks: list[Tensor], start_norm_sq: Tensor
) -> LanczosMatrices:
    """The Lanczos matrices from CG's step lengths and direction ratios."""
    if not steps:
        ones = torch.ones_like(start_norm_sq)[:, None]
        return LanczosMatrices(ones, ones[:, :0], start_norm_sq)
    alpha = torch.stack(steps, -1)
    beta = torch.stack(ratios, -1)
    active = torch.stack(masks, -1)
    inverse_alpha = _safe_divide(torch.ones_like(alpha), alpha)
    diagonal = inverse_alpha.clone()
    diagonal[:, 1:] = diagonal[:, 1:] + beta[:, :-1] * inverse_alpha[:, :-1]
    diagonal = torch.where(active, diagonal, 1.0)
    # T_{j,j+1} couples j and j+1 only while the sample is still iterating at j+1
    coupled = active[:, 1:]
    off = torch.where(coupled, beta[:, :-1].clamp_min(0.0).sqrt() * inverse_alpha[:, :-1], 0.0)
    return LanczosMatrices(diagonal, off, start_norm_sq)


QUADRATURE_CHUNK_ENTRIES = 2**13
"""Dense entries of the Lanczos matrices expanded at once: bounds the quadrature's memory."""


def lanczos_quadrature(
    lanczos: LanczosMatrices, function: Callable[[Tensor], Tensor] = torch.log
) -> Tensor:
    r"""Gauss quadrature :math:`|u|^2 e_1^\top f(T) e_1 \approx u^\top f(A) u`, shape ``(N,)``.

    :math:`T` is the Lanczos matrix of :math:`A` started from :math:`u`; with
    eigenpairs :math:`(\theta_j, s_j)`, the estimate is :math:`|u|^2 \sum_j s_{1j}^2 f(\theta_j)`.
    Ritz values are clamped at the smallest positive normal number before ``function``.
    The matrices are expanded and diagonalised a few rows at a time, so memory stays
    bounded however many iterations CG ran.
    """
    return _quadrature_and_condition(lanczos, function)[0]


def _quadrature_and_condition(
    lanczos: LanczosMatrices, function: Callable[[Tensor], Tensor] = torch.log
) -> tuple[Tensor, Tensor]:
    """The quadrature and the Ritz estimate :math:`\theta_{max} / \theta_{min}` of the condition
    number of :math:`A` (a lower bound), per row."""
    n, m = lanczos.diagonal.shape
    chunk = max(1, QUADRATURE_CHUNK_ENTRIES // (m * m))
    tiny = torch.finfo(lanczos.diagonal.dtype).tiny
    values, conditions = [], []
    for start in range(0, n, chunk):
        eigenvalues, eigenvectors = torch.linalg.eigh(lanczos.dense(slice(start, start + chunk)))
        weights = eigenvectors[:, 0, :] ** 2
        eigenvalues = eigenvalues.clamp_min(tiny)
        values.append((weights * function(eigenvalues)).sum(-1))
        # decoupled unit entries (samples that stopped early) carry no weight: leave them out
        coupled = weights > 0
        largest = torch.where(coupled, eigenvalues, 0.0).amax(-1)
        smallest = torch.where(coupled, eigenvalues, torch.inf).amin(-1)
        conditions.append(largest / smallest)
    return lanczos.start_norm_sq * torch.cat(values), torch.cat(conditions)


class _Trace(Protocol):
    x: Tensor

    def hvp(self, v: Tensor) -> Tensor: ...

    def detach(self) -> _Trace: ...


class _Preconditioner(Protocol):
    logdet: Tensor

    def solve(self, rows: Tensor) -> Tensor: ...

    def probe_rows(self, like: Tensor) -> Tensor: ...

    def matvec(self, rows: Tensor) -> Tensor: ...


@dataclass
class StochasticLogdet:
    r"""The stochastic log-det of :func:`stochastic_logdet`.

    :ivar value: ``(N,)`` the estimate, detached.
    :ivar surrogate: ``(N,)`` a scalar whose gradient is the unbiased gradient estimate
        (its value is meaningless), or ``None`` when no gradient was asked for.
    :ivar cg: the CG statistics, merged over probes (worst iterations and residuals).
    :ivar condition: ``(N,)`` the largest over probes of the Ritz estimate
        :math:`\theta_{max}/\theta_{min}` of the condition number of :math:`Q^{-1}H` (a
        lower bound): how hard the problem was for CG.
    """

    value: Tensor
    surrogate: Tensor | None
    cg: CGResult
    condition: Tensor

    def combined(self) -> Tensor:
        """``value + (surrogate - surrogate.detach())``: the estimate, with the surrogate's gradient."""
        if self.surrogate is None:
            return self.value
        return self.value + (self.surrogate - self.surrogate.detach())


def stochastic_logdet(
    trace: _Trace,
    preconditioner: _Preconditioner | None = None,
    num_probes: int = 1,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    check_every: int = 1,
    gradient: bool = True,
) -> StochasticLogdet:
    r"""Value and gradient of :math:`\log\det H` from one preconditioned CG solve per probe.

    Let :math:`Q` be the preconditioner (the potential's quadratic, with :math:`Q \preceq H`)
    and :math:`b` a random probe with :math:`\mathbb{E}[b b^\top] = Q` (:math:`C\varepsilon` for a
    Cholesky factor :math:`C` and Rademacher :math:`\varepsilon`, or
    :math:`\sqrt c\,\varepsilon_1 + L\varepsilon_2` when :math:`Q = cI + LL^\top` is low rank), and
    :math:`v = Q^{-1} b`. Preconditioned CG on :math:`H w = b` is CG on
    :math:`A = Q^{-1/2} H Q^{-1/2}` (the spectrum of :math:`Q^{-1} H`) started from
    :math:`u = Q^{-1/2} b`, with :math:`\mathbb{E}[u u^\top] = I` and
    :math:`|u|^2 = b^\top Q^{-1} b`, CG's first inner product. Its coefficients give the
    Lanczos matrix :math:`T` of :math:`A` and :math:`u` at no extra cost, so

    .. math::

        \log\det H = \log\det Q + \mathbb{E}\bigl[u^\top \log(A)\, u\bigr]
        \approx \log\det Q + |u|^2\, e_1^\top \log(T)\, e_1 .

    For the gradient, with :math:`w = H^{-1} b` and :math:`v` held constant,
    :math:`\mathbb{E}[w v^\top] = H^{-1}` and :math:`\mathbb{E}[v v^\top] = Q^{-1}`, so the
    surrogate

    .. math::

        s = w^\top H v - v^\top Q v + \log\det Q

    has :math:`\mathbb{E}[\partial s] = \mathrm{tr}(H^{-1}\partial H) - \mathrm{tr}(Q^{-1}\partial Q)
    + \mathrm{tr}(Q^{-1}\partial Q) = \partial \log\det H`: the stochastic part estimates only
    :math:`\partial\log\det(Q^{-1}H)`, which vanishes where the network term does, and the
    quadratic's share is exact. Memory does not grow with the CG iterations: the products
    inside CG are constants, one product with a graph forms :math:`s`.

    Without a preconditioner, :math:`Q = I`: plain Rademacher probes, :math:`s = w^\top H v`.
    The value is exact in expectation up to the quadrature error, which is small once CG
    has converged to ``rtol`` (the Krylov space then resolves :math:`\log` as well as
    :math:`1/x`); a sample that misses ``rtol`` is flagged in ``cg.converged``.

    :param trace: the potential evaluated at the rows (``x``, ``hvp``, ``detach``).
    :param preconditioner: a factorisation of :math:`Q` (:func:`~pyro_cpflow.potential.factorize`)
        or ``None``.
    :param num_probes: probes averaged.
    :param rtol, max_iter, check_every: for :func:`conjugate_gradient`.
    :param gradient: form the surrogate (otherwise ``surrogate`` is ``None``).

    >>> from pyro_cpflow import cpflow
    >>> potential = cpflow(3, hidden_dims=(8, 8)).potential
    >>> trace = potential.evaluate(torch.randn(5, 3))
    >>> estimate = stochastic_logdet(trace, potential.factorize(trace.quadratic))
    >>> estimate.combined().shape, bool(estimate.cg.converged.all())
    (torch.Size([5]), True)
    """
    constant = trace.detach()
    x = trace.x
    value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    surrogate = torch.zeros_like(value) if gradient else None
    results, conditions = [], []
    for _ in range(num_probes):
        if preconditioner is None:
            rhs = probe = rademacher(x.shape, x)
            solve = None
        else:
            rhs = preconditioner.probe_rows(x)  # covariance Q
            probe = preconditioner.solve(rhs)  # Q^-1 b: covariance Q^-1
            solve = preconditioner.solve
        result = conjugate_gradient(
            constant.hvp, rhs, rtol=rtol, max_iter=max_iter, preconditioner=solve,
            check_every=check_every, lanczos=True,
        )
        results.append(result)
        quadrature, condition = _quadrature_and_condition(result.lanczos)  # type: ignore[arg-type]
        value = value + quadrature
        conditions.append(condition)
        if surrogate is not None:
            surrogate = surrogate + (result.solution * trace.hvp(probe)).sum(-1)
            if preconditioner is not None:
                surrogate = surrogate - (probe * preconditioner.matvec(probe)).sum(-1)
    value = value / num_probes
    if surrogate is not None:
        surrogate = surrogate / num_probes
    if preconditioner is not None:
        value = value + preconditioner.logdet.detach()
        if surrogate is not None:
            surrogate = surrogate + preconditioner.logdet
    merged = CGResult(
        solution=results[-1].solution,
        iterations=torch.stack([r.iterations for r in results]).amax(0),
        residual_norm=torch.stack([r.residual_norm for r in results]).amax(0),
        converged=torch.stack([r.converged for r in results]).all(0),
    )
    return StochasticLogdet(value.detach(), surrogate, merged, torch.stack(conditions).amax(0))
