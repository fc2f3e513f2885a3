r"""Hessian-free linear algebra for batches of symmetric positive-definite matrices.

Every routine acts on a batch of ``N`` independent problems of dimension ``d`` and
touches the matrices only through a batched product ``matvec: (N, d) -> (N, d)``; for
CP-Flow that is :meth:`~pyro_cpflow.derivatives.PotentialTrace.hvp`.

* :func:`conjugate_gradient` solves :math:`H_i w_i = b_i` (preconditioned, from a start,
  with per-sample tolerances), judging convergence per sample and freezing converged samples.
* :func:`lanczos_conjugate_gradient` is the lean lock-step CG that also returns the Lanczos
  tridiagonal matrix its own coefficients define (the modified batched CG of Gardner et
  al. 2018), so that one solve also gives a quadrature estimate of :math:`b^\top f(H) b`
  (:func:`lanczos_quadrature`).
* :func:`stochastic_logdet` uses one whitened solve per probe for both the value of
  :math:`\log\det H` and an unbiased surrogate of its gradient.
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
    "lanczos_conjugate_gradient",
    "lanczos_quadrature",
    "rademacher",
    "stochastic_logdet",
]

MatVec = Callable[[Tensor], Tensor]


class _LogdetFromCholesky(torch.autograd.Function):
    r""":math:`\log\det A = 2\sum_i \log C_{ii}` from a given Cholesky factor :math:`A = C C^\top`,
    with the backward pass :math:`\bar A = \bar\ell\, A^{-1}`.

    :math:`\partial \log\det A = \mathrm{tr}(A^{-1}\partial A)` for symmetric :math:`A`, and
    :math:`A^{-1}` comes from the same factor in one call (``cholesky_inverse``): cheaper
    than differentiating through the factorisation. The factor is a constant, so a backward
    pass that builds a graph (``create_graph=True``: Hessians, NeuTra's second derivatives)
    forms :math:`A^{-1}` from :math:`A` itself instead, and its derivative
    :math:`-A^{-1}\,\partial A\,A^{-1}` is exact.
    """

    @staticmethod
    def forward(ctx, matrix: Tensor, cholesky: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(matrix, cholesky)
        return 2.0 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        matrix, cholesky = ctx.saved_tensors
        inverse = torch.linalg.inv(matrix) if torch.is_grad_enabled() else torch.cholesky_inverse(cholesky)
        return grad_output[..., None, None] * inverse, None


def logdet_from_cholesky(matrix: Tensor, cholesky: Tensor) -> Tensor:
    r""":math:`\log\det` of ``matrix`` from its (constant) Cholesky factor ``cholesky``,
    differentiable in ``matrix`` to any order (:class:`_LogdetFromCholesky`)."""
    if not matrix.requires_grad:
        return 2.0 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return _LogdetFromCholesky.apply(matrix, cholesky)


def cholesky_logdet(matrix: Tensor) -> Tensor:
    r""":math:`\log\det A = 2\sum_i \log L_{ii}` for symmetric positive-definite ``A = L L^T``.

    Only the lower triangle of ``A`` is read (as by the Cholesky factorisation); the
    gradient is :math:`A^{-1}`, symmetric, and second derivatives are exact too. Raises
    ``ValueError`` naming the failing batch entries when ``A`` is not numerically positive
    definite.

    >>> a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], requires_grad=True)
    >>> cholesky_logdet(a).backward()
    >>> torch.allclose(a.grad, torch.linalg.inv(a.detach()))
    True
    """
    chol, info = torch.linalg.cholesky_ex(matrix.detach())
    if bool((info > 0).any()):
        bad = torch.nonzero(info.reshape(-1)).flatten().tolist()[:10]
        raise ValueError(f"matrix is not positive definite at batch entries {bad}")
    return logdet_from_cholesky(matrix, chol)


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
    :ivar lanczos: from :func:`lanczos_conjugate_gradient`, the :class:`LanczosMatrices`
        of the Krylov spaces.
    """

    solution: Tensor
    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor
    lanczos: LanczosMatrices | None = None


@dataclass
class LanczosMatrices:
    r"""Symmetric tridiagonal matrices :math:`T_i` ``(m, m)``, kept as their bands.

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
    tiny = torch.finfo(rhs.dtype).tiny
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
        active = active & (residual.norm(dim=-1) > tolerance)
    residual_norm = residual.norm(dim=-1)
    converged = healthy & (residual_norm <= tolerance)
    return CGResult(solution, iterations, residual_norm, converged)


def lanczos_conjugate_gradient(
    matvec: MatVec,
    rhs: Tensor,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    check_every: int = 1,
    first_product: Tensor | None = None,
) -> CGResult:
    r"""CG on :math:`A_i w_i = u_i` in lock-step, with the Lanczos matrices of its coefficients.

    The modified batched CG of Gardner et al. (2018): with step lengths :math:`\alpha_j`
    and direction updates :math:`\beta_j`, the Lanczos tridiagonal matrix of :math:`A_i`
    started from :math:`u_i` is

    .. math::

        T_{jj} = \frac{1}{\alpha_j} + \frac{\beta_{j-1}}{\alpha_{j-1}}, \qquad
        T_{j,j+1} = \frac{\sqrt{\beta_j}}{\alpha_j},

    so the solve also gives the quadrature :math:`|u|^2 e_1^\top f(T) e_1 \approx u^\top f(A) u`
    (:func:`lanczos_quadrature`) with no extra product. Built for the whitened operators of
    :func:`stochastic_logdet` (:math:`A \succeq` a multiple of :math:`I`, no preconditioner),
    it is lean: every sample takes every step (about ten tensor operations besides the
    product), and the run ends once all residuals satisfy :math:`|r_i| \le \mathrm{rtol}\,|u_i|`.
    A sample that converged earlier keeps iterating, which only refines its solution (each
    step moves it by at most :math:`|r_i|/\lambda_{\min}`), but its Lanczos matrix is cut
    at the step where it converged, as if it had stopped, so round-off past convergence
    never reaches a quadrature. Curvatures are clamped at the smallest normal number, so no
    step divides by zero; a non-finite residual is reported as not converged.

    :param matvec: batched product ``(N, d) -> (N, d)`` with SPD :math:`A_i`.
    :param rhs: ``(N, d)`` start vectors :math:`u_i`.
    :param rtol: relative tolerance.
    :param max_iter: default ``2 d``.
    :param check_every: as for :func:`conjugate_gradient` (``0``: exactly ``max_iter`` steps,
        no host synchronisation).
    :param first_product: :math:`A_i u_i`, when the caller has it already: the first step
        then costs no product.
    :returns: a :class:`CGResult` with ``lanczos`` set; ``iterations`` counts the steps each
        sample needed.

    >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    >>> result = lanczos_conjugate_gradient(lambda v: v @ A, torch.ones(2, 3), rtol=1e-10)
    >>> result.lanczos.dense().shape, result.iterations.tolist()
    (torch.Size([2, 3, 3]), [3, 3])
    """
    if rhs.dim() != 2:
        raise ValueError(f"rhs must have shape (N, d), got {tuple(rhs.shape)}")
    if check_every < 0:
        raise ValueError(f"check_every must be >= 0, got {check_every}")
    if first_product is not None and first_product.shape != rhs.shape:
        raise ValueError(
            f"first_product must have the shape of rhs {tuple(rhs.shape)}, got {tuple(first_product.shape)}"
        )
    max_iter = 2 * rhs.shape[1] if max_iter is None else max_iter
    tiny = torch.finfo(rhs.dtype).tiny
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = rhs.clone()
    inner = (rhs * rhs).sum(-1)
    start_norm_sq = inner
    tolerance_sq = (rtol * rtol) * inner
    steps: list[Tensor] = []
    ratios: list[Tensor] = []
    inners: list[Tensor] = [inner]
    for iteration in range(max_iter):
        if check_every and iteration % check_every == 0 and not bool((inner > tolerance_sq).any()):
            break
        product = first_product if iteration == 0 and first_product is not None else matvec(direction)
        step = inner / (direction * product).sum(-1).clamp_min(tiny)
        solution.addcmul_(step[:, None], direction)
        residual.addcmul_(step[:, None], product, value=-1.0)
        new_inner = (residual * residual).sum(-1)
        ratio = new_inner / inner.clamp_min(tiny)
        direction = torch.addcmul(residual, ratio[:, None], direction)
        inner = new_inner
        steps.append(step)
        ratios.append(ratio)
        inners.append(inner)
    # a step counts for a sample while its residual before the step was above tolerance
    active = torch.stack(inners[:-1], -1) > tolerance_sq[:, None] if steps else None
    residual_norm = inner.sqrt()
    converged = torch.isfinite(residual_norm) & (inner <= tolerance_sq)
    if active is None:
        iterations = torch.zeros_like(inner, dtype=torch.long)
    else:
        iterations = active.sum(-1)
    result = CGResult(solution, iterations, residual_norm, converged)
    result.lanczos = _lanczos_from_cg(steps, ratios, active, start_norm_sq)
    return result


def _lanczos_from_cg(
    steps: list[Tensor], ratios: list[Tensor], active: Tensor | None, start_norm_sq: Tensor
) -> LanczosMatrices:
    """The Lanczos matrices from CG's step lengths and direction ratios; ``active`` ``(N, m)``
    says which steps each sample took."""
    if not steps:
        ones = torch.ones_like(start_norm_sq)[:, None]
        return LanczosMatrices(ones, ones[:, :0], start_norm_sq)
    alpha = torch.stack(steps, -1)
    beta = torch.stack(ratios, -1)
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


def lanczos_quadrature(lanczos: LanczosMatrices, function: Callable[[Tensor], Tensor] = torch.log) -> Tensor:
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
    r"""The quadrature and the Ritz estimate :math:`\theta_{max} / \theta_{min}` of the condition
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

    def whiten(self, rows: Tensor) -> Tensor: ...

    def unwhiten(self, rows: Tensor) -> Tensor: ...

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


def _whitened_operator(trace: _Trace, factor: _Preconditioner) -> MatVec:
    r""":math:`v \mapsto S^{-1} H S^{-\top} v` without a graph: the trace's own fast form when it
    has one (:meth:`~pyro_cpflow.derivatives.PotentialTrace.whitened_hvp`), else three products."""
    fast = getattr(trace, "whitened_hvp", None)
    if fast is not None:
        return fast(factor)
    constant = trace.detach()
    return lambda v: factor.whiten(constant.hvp(factor.unwhiten(v)))


def stochastic_logdet(
    trace: _Trace,
    preconditioner: _Preconditioner | None = None,
    num_probes: int = 1,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    check_every: int = 1,
    gradient: bool = True,
) -> StochasticLogdet:
    r"""Value and gradient of :math:`\log\det H` from one CG solve per probe.

    Let :math:`Q = S S^\top` be the preconditioner (the potential's quadratic, with
    :math:`Q \preceq H`) and :math:`A = S^{-1} H S^{-\top}`, which has the spectrum of
    :math:`Q^{-1} H`, so :math:`\log\det H = \log\det Q + \log\det A`. For a Rademacher
    probe :math:`\varepsilon` (:math:`\mathbb{E}[\varepsilon\varepsilon^\top] = I`), CG on
    :math:`A \hat w = \varepsilon` (:func:`lanczos_conjugate_gradient`) gives the Lanczos
    matrix :math:`T` of :math:`A` from :math:`\varepsilon` at no extra cost, and

    .. math::

        \log\det H = \log\det Q + \mathbb{E}\bigl[\varepsilon^\top \log(A)\, \varepsilon\bigr]
        \approx \log\det Q + |\varepsilon|^2\, e_1^\top \log(T)\, e_1 .

    This is preconditioned CG on :math:`H w = b` with :math:`b = S\varepsilon`
    (:math:`\mathbb{E}[bb^\top] = Q`) in other coordinates: :math:`w = S^{-\top}\hat w = H^{-1} b`
    and :math:`v = S^{-\top}\varepsilon = Q^{-1} b`, with the same Krylov spaces and
    coefficients. In these coordinates the quadratic whitens to :math:`I` and the network's
    input weights absorb :math:`S^{-\top}` once per call, so a product with :math:`A` costs
    what one with :math:`H` does, and no :math:`d \times d` work happens inside CG.

    For the gradient, with :math:`w, v` held constant, :math:`\mathbb{E}[w v^\top] = H^{-1}`
    and :math:`\mathbb{E}[v v^\top] = Q^{-1}`, so the surrogate

    .. math::

        s = w^\top H v - v^\top Q v + \log\det Q

    has :math:`\mathbb{E}[\partial s] = \mathrm{tr}(H^{-1}\partial H) - \mathrm{tr}(Q^{-1}\partial Q)
    + \mathrm{tr}(Q^{-1}\partial Q) = \partial \log\det H`: the stochastic part estimates only
    :math:`\partial\log\det(Q^{-1}H)`, which vanishes where the network term does, and the
    quadratic's share is exact. Memory does not grow with the CG iterations: the products
    inside CG are constants, one product with a graph forms :math:`s`. That product, :math:`Hv`,
    is formed first, because it also gives CG's first step for free:
    :math:`A\varepsilon = S^{-1} H S^{-\top}\varepsilon = S^{-1}(Hv)`.

    Without a preconditioner, :math:`S = I`: :math:`s = w^\top H v` with :math:`v = \varepsilon`.
    The value is exact in expectation up to the quadrature error, which is small once CG
    has converged to ``rtol`` (the Krylov space then resolves :math:`\log` as well as
    :math:`1/x`); a sample that misses ``rtol`` (in the whitened norm) is flagged in
    ``cg.converged``.

    :param trace: the potential evaluated at the rows (``x``, ``hvp``, ``detach``, and
        optionally ``whitened_hvp``).
    :param preconditioner: a factorisation of :math:`Q` (:func:`~pyro_cpflow.potential.factorize`)
        or ``None``.
    :param num_probes: probes averaged.
    :param rtol: relative tolerance of :func:`lanczos_conjugate_gradient`.
    :param max_iter: its iteration cap (default ``2 d``).
    :param check_every: how often it tests for convergence (``0``: never).
    :param gradient: form the surrogate (otherwise ``surrogate`` is ``None``).

    >>> from pyro_cpflow import cpflow
    >>> potential = cpflow(3, hidden_dims=(8, 8)).potential
    >>> trace = potential.evaluate(torch.randn(5, 3))
    >>> estimate = stochastic_logdet(trace, potential.factorize(trace.quadratic))
    >>> estimate.combined().shape, bool(estimate.cg.converged.all())
    (torch.Size([5]), True)
    """
    x = trace.x
    n = x.shape[0]
    if preconditioner is None:
        operator, unwhiten = trace.detach().hvp, None
    else:
        operator, unwhiten = _whitened_operator(trace, preconditioner), preconditioner.unwhiten
    value = torch.zeros(n, dtype=x.dtype, device=x.device)
    surrogate = torch.zeros_like(value) if gradient else None
    results, conditions = [], []
    for _ in range(num_probes):
        probe = rademacher(x.shape, x)
        first_product = None
        if surrogate is not None:  # v = S^-T eps and H v first: H v is also CG's first product
            direction = probe if unwhiten is None else unwhiten(probe)
            product = trace.hvp(direction)
            first_product = product.detach()
            if preconditioner is not None:
                first_product = preconditioner.whiten(first_product)
        result = lanczos_conjugate_gradient(
            operator,
            probe,
            rtol=rtol,
            max_iter=max_iter,
            check_every=check_every,
            first_product=first_product,
        )
        results.append(result)
        quadrature, condition = _quadrature_and_condition(result.lanczos)  # type: ignore[arg-type]
        value = value + quadrature
        conditions.append(condition)
        if surrogate is not None:
            solution = result.solution if unwhiten is None else unwhiten(result.solution)  # w = S^-T w_hat
            surrogate = surrogate + (solution * product).sum(-1)
            if preconditioner is not None:
                surrogate = surrogate - (direction * preconditioner.matvec(direction)).sum(-1)
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
