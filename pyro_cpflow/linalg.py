r"""Hessian-free linear algebra for batches of symmetric positive-definite matrices.

Every routine acts on a batch of ``N`` independent problems of dimension ``d`` and
touches the matrices only through a batched product ``matvec: (N, d) -> (N, d)``;
for CP-Flow that product is a Hessian-vector product obtained by double
backpropagation, at the cost of about two gradient evaluations.

* :func:`conjugate_gradient` solves :math:`H_i w_i = b_i`, judging convergence per
  sample: a finished sample stops changing while the others go on.
* :func:`stochastic_logdet` estimates :math:`\log\det H_i` by stochastic Lanczos
  quadrature: :math:`\log\det H = \mathbb{E}_v[v^\top \log(H) v]` for Rademacher
  :math:`v`, and :math:`v^\top \log(H) v \approx |v|^2 \sum_j \tau_j^2 \log\theta_j`
  with :math:`(\theta_j, \tau_j)` the eigenvalues and first eigenvector components of
  the Lanczos tridiagonal matrix.
* :func:`logdet_gradient_surrogate` gives a scalar whose gradient is an unbiased
  estimate of :math:`\partial \log\det H`: with :math:`w = H^{-1} v` held fixed,
  :math:`\partial (w^\top H v) = v^\top H^{-1} (\partial H) v`, whose expectation is
  :math:`\mathrm{tr}(H^{-1} \partial H) = \partial \log\det H`.
* :func:`dense_hessian` and :func:`cholesky_logdet` give exact values for small ``d``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CGResult",
    "MatVec",
    "cholesky_logdet",
    "conjugate_gradient",
    "dense_hessian",
    "hessian_vector_product",
    "lanczos_tridiagonal",
    "logdet_gradient_surrogate",
    "rademacher",
    "stochastic_logdet",
]

MatVec = Callable[[Tensor], Tensor]


def hessian_vector_product(
    gradient: Tensor, inputs: Tensor, vector: Tensor, create_graph: bool = False
) -> Tensor:
    r""":math:`H v` where ``gradient`` :math:`= \nabla F(\text{inputs})` was computed with a graph.

    Each sample's gradient depends only on its own input, so one backward pass gives
    the whole batch of products. With ``create_graph=False`` the product is a constant
    (no memory kept); with ``create_graph=True`` it is differentiable in the
    parameters and in ``inputs``.

    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> g, = torch.autograd.grad((x ** 4).sum(), x, create_graph=True)
    >>> v = torch.randn(4, 3)
    >>> torch.allclose(hessian_vector_product(g, x, v), 12 * x.detach() ** 2 * v)
    True
    """
    (product,) = torch.autograd.grad(
        gradient, inputs, vector, retain_graph=True, create_graph=create_graph
    )
    return product


def dense_hessian(gradient: Tensor, inputs: Tensor, create_graph: bool = False) -> Tensor:
    """The batch of Hessians ``(N, d, d)`` from ``gradient`` ``(N, d)``.

    The ``d`` Hessian-vector products with the unit vectors run as one vectorised
    backward pass (``is_grads_batched``), two to three times faster than a loop.
    """
    n, d = inputs.shape
    units = torch.eye(d, dtype=inputs.dtype, device=inputs.device)[:, None, :].expand(d, n, d)
    (columns,) = torch.autograd.grad(
        gradient,
        inputs,
        units,
        retain_graph=True,
        create_graph=create_graph,
        is_grads_batched=True,
    )
    return columns.permute(1, 2, 0)


def cholesky_logdet(matrix: Tensor) -> Tensor:
    r""":math:`\log\det A = 2\sum_i \log L_{ii}` for symmetric positive-definite ``A = L L^T``.

    Raises ``ValueError`` naming the failing batch entries when ``A`` is not
    numerically positive definite.
    """
    sym = 0.5 * (matrix + matrix.transpose(-1, -2))
    chol, info = torch.linalg.cholesky_ex(sym)
    if bool((info > 0).any()):
        bad = torch.nonzero(info.reshape(-1)).flatten().tolist()[:10]
        raise ValueError(f"matrix is not positive definite at batch entries {bad}")
    return 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


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
    """

    solution: Tensor
    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor


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
    for iteration in range(max_iter):
        if check_every and iteration % check_every == 0 and not bool(active.any()):
            break
        product = matvec(direction)
        curvature = (direction * product).sum(-1)
        positive = curvature > 0
        healthy = healthy & (positive | ~active)
        active = active & positive
        step = torch.where(active, _safe_divide(inner, curvature), 0.0)
        solution = solution + step[:, None] * direction
        residual = residual - step[:, None] * product
        preconditioned = precondition(residual)
        new_inner = (residual * preconditioned).sum(-1)
        ratio = torch.where(active, _safe_divide(new_inner, inner), 0.0)
        direction = torch.where(active[:, None], preconditioned + ratio[:, None] * direction, direction)
        inner = torch.where(active, new_inner, inner)
        iterations = iterations + active.long()
        active = active & (residual.norm(dim=-1) > tolerance)
    residual_norm = residual.norm(dim=-1)
    converged = healthy & (residual_norm <= tolerance)
    return CGResult(solution, iterations, residual_norm, converged)


def lanczos_tridiagonal(matvec: MatVec, start: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    r"""``steps`` Lanczos iterations from ``start`` ``(N, d)`` with full reorthogonalisation.

    Returns the tridiagonal matrices :math:`T_i` ``(N, m, m)`` and the squared norms
    :math:`|v_i|^2` ``(N,)``. When the Krylov space of a sample becomes invariant
    (breakdown, :math:`\beta_j \approx 0`), its :math:`T` is closed off: the remaining
    diagonal entries are 1 and decoupled, so they add nothing to the quadrature.
    """
    n, d = start.shape
    steps = min(steps, d)
    norm_sq = (start * start).sum(-1)
    q = start / norm_sq.sqrt().clamp_min(torch.finfo(start.dtype).tiny)[:, None]
    basis: list[Tensor] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    alive = norm_sq > 0
    for j in range(steps):
        basis.append(q)
        w = matvec(q)
        alpha = (q * w).sum(-1)
        alphas.append(torch.where(alive, alpha, 1.0))
        if j == steps - 1:
            break
        stacked = torch.stack(basis, dim=1)  # (N, j+1, d)
        for _ in range(2):  # twice is enough (Kahan's "twice is enough")
            w = w - torch.einsum("nkd,nk->nd", stacked, torch.einsum("nkd,nd->nk", stacked, w))
        beta = w.norm(dim=-1)
        scale = alpha.abs().clamp_min(torch.finfo(start.dtype).tiny)
        alive = alive & (beta > 1e3 * torch.finfo(start.dtype).eps * scale)
        betas.append(torch.where(alive, beta, 0.0))
        q = torch.where(alive[:, None], w / torch.where(alive, beta, 1.0)[:, None], 0.0)
    diag = torch.stack(alphas, dim=-1)
    tridiagonal = torch.diag_embed(diag)
    if betas:
        off = torch.stack(betas, dim=-1)
        tridiagonal = tridiagonal + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    return tridiagonal, norm_sq


def stochastic_logdet(
    matvec: MatVec,
    like: Tensor,
    num_probes: int = 1,
    steps: int = 10,
) -> Tensor:
    r"""Stochastic Lanczos quadrature estimate of :math:`\log\det H_i`, shape ``(N,)``.

    Averages ``num_probes`` Rademacher probes, each with ``steps`` Lanczos iterations
    (capped at ``d``). The estimate is unbiased over probes up to the quadrature error,
    which falls geometrically in ``steps`` for well-conditioned :math:`H`.

    :param like: an ``(N, d)`` tensor giving the shape, dtype and device.
    """
    with torch.no_grad():
        total = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
        for _ in range(num_probes):
            tridiagonal, norm_sq = lanczos_tridiagonal(matvec, rademacher(like.shape, like), steps)
            eigenvalues, eigenvectors = torch.linalg.eigh(tridiagonal)
            weights = eigenvectors[:, 0, :] ** 2
            log_eigs = eigenvalues.clamp_min(torch.finfo(like.dtype).tiny).log()
            total = total + norm_sq * (weights * log_eigs).sum(-1)
        return total / num_probes


def logdet_gradient_surrogate(
    matvec: MatVec,
    matvec_with_graph: MatVec,
    like: Tensor,
    num_probes: int = 1,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    preconditioner: MatVec | None = None,
    check_every: int = 1,
) -> tuple[Tensor, CGResult]:
    r"""A scalar per sample whose gradient estimates :math:`\partial \log\det H` without bias.

    For each Rademacher probe :math:`v`, :math:`w = H^{-1} v` is found by
    :func:`conjugate_gradient` with the constant product ``matvec`` (no graph, so
    memory does not grow with the iterations), and the surrogate is
    :math:`w^\top (H v)` with :math:`H v` from ``matvec_with_graph``. Its value is
    meaningless (about ``d``); only its gradient is used. ``rtol``, ``max_iter``,
    ``preconditioner`` and ``check_every`` go to :func:`conjugate_gradient`.

    Returns the surrogate ``(N,)`` (averaged over probes) and the CG result of the
    last probe, augmented with the worst iteration count over probes.
    """
    surrogate = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    results = []
    for _ in range(num_probes):
        probe = rademacher(like.shape, like)
        result = conjugate_gradient(
            matvec, probe, rtol=rtol, max_iter=max_iter, preconditioner=preconditioner,
            check_every=check_every,
        )
        results.append(result)
        surrogate = surrogate + (result.solution.detach() * matvec_with_graph(probe)).sum(-1)
    merged = CGResult(
        solution=results[-1].solution,
        iterations=torch.stack([r.iterations for r in results]).amax(0),
        residual_norm=torch.stack([r.residual_norm for r in results]).amax(0),
        converged=torch.stack([r.converged for r in results]).all(0),
    )
    return surrogate / num_probes, merged
