r"""The strongly convex potential whose gradient is a CP-Flow.

.. math::

    F(x) = \sigma\, g(x) + \tfrac12\, x^\top\bigl((\alpha + \beta) I + L L^\top\bigr) x + b^\top x,

with :math:`g` an (P)ICNN, :math:`\sigma = \mathrm{softplus}(\cdot) > 0` a learnable
scale that starts small, :math:`\beta = \mathrm{softplus}(\cdot) \ge 0` learnable,
:math:`L \in \mathbb{R}^{d \times r}` and :math:`b \in \mathbb{R}^d` learnable, and
:math:`\alpha > 0` a fixed floor.
Hence :math:`\nabla^2 F \succeq \alpha I` everywhere: :math:`\nabla F` is invertible
and its Jacobian is symmetric positive definite.

The :math:`L L^\top` and :math:`b` terms make every affine map :math:`x \mapsto A x + b`
with :math:`A \succ \alpha I` symmetric exactly representable, hence every Gaussian.
:math:`L` starts non-zero, because :math:`L = 0` is a stationary point of
:math:`L \mapsto L L^\top x`.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .derivatives import NetworkTrace, PotentialTrace, QuadraticTerms, ZeroNetworkTrace
from .linalg import logdet_from_cholesky
from .nn import NoNetwork
from .packing import PackedParameters

__all__ = [
    "ContextQuadratic",
    "ConvexPotential",
    "DenseQuadraticFactor",
    "LowRankQuadraticFactor",
    "QuadraticFactor",
    "factorize",
    "inverse_softplus",
]


def inverse_softplus(y: float) -> float:
    """The :math:`x` with :math:`\\mathrm{softplus}(x) = y`, for ``y > 0``."""
    if y <= 0:
        raise ValueError(f"softplus takes only positive values, got {y}")
    return y + math.log(-math.expm1(-y))


class ContextQuadratic(PackedParameters):
    r"""Context-dependent terms :math:`\tfrac12 |L(c)^\top x|^2 + \tfrac12 x^\top D(c)\, x + b(c)^\top x`.

    They are convex in :math:`x` for every context :math:`c`.

    :math:`L(c) \in \mathbb{R}^{d \times r}`, the positive diagonal :math:`D(c)` and
    :math:`b(c)` come from a one-hidden-layer network of the context; ``rank=0`` leaves
    :math:`L` out, ``diagonal=False`` leaves :math:`D` out. Its output layer starts small but
    not zero: at :math:`L(c) = 0` the gradient of :math:`L \mapsto |L^\top x|^2` vanishes.

    The diagonal is :math:`D(c) = d_0 \exp(h(c))` with :math:`d_0` = ``initial_diagonal``:
    a log-linear scale, so a context can change the curvature of each coordinate by orders
    of magnitude, as the conditional posterior of a hierarchical model's local latents given
    its global ones does (a funnel: the scale of the group effects is the group scale
    :math:`\tau`). It costs :math:`d` outputs where :math:`L` costs :math:`d r`.

    >>> terms = ContextQuadratic(context_dim=3, input_dim=2, rank=2, diagonal=True)
    >>> terms(torch.randn(5, 2), torch.randn(5, 3)).shape
    torch.Size([5])
    """

    def __init__(
        self,
        context_dim: int,
        input_dim: int,
        rank: int,
        hidden_dim: int = 64,
        initial_std: float = 0.05,
        diagonal: bool = False,
        initial_diagonal: float = 0.05,
    ) -> None:
        super().__init__()
        if not (isinstance(rank, int) and rank >= 0):
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        if rank == 0 and not diagonal:
            raise ValueError("ContextQuadratic needs rank > 0 or diagonal=True")
        if not initial_diagonal > 0:
            raise ValueError(f"initial_diagonal must be positive, got {initial_diagonal!r}")
        self.input_dim = input_dim
        self.rank = rank
        self.diagonal = bool(diagonal)
        self.log_initial_diagonal = math.log(initial_diagonal)
        outputs = input_dim * (rank + 1 + int(self.diagonal))
        body = nn.Linear(context_dim, hidden_dim)
        head = nn.Linear(hidden_dim, outputs)
        nn.init.normal_(head.weight, std=initial_std / math.sqrt(hidden_dim))
        nn.init.normal_(head.bias, std=initial_std)
        self.pack(
            {
                "body.0.weight": body.weight,
                "body.0.bias": body.bias,
                "head.weight": head.weight,
                "head.bias": head.bias,
            }
        )

    def terms(self, context: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """:math:`L(c)` ``(N, d, r)``, :math:`D(c)` ``(N, d)`` (each ``None`` where left out)
        and :math:`b(c)` ``(N, d)`` for context rows ``(N, c)``."""
        p = self.unpacked()
        features = torch.tanh(F.linear(context, p["body.0.weight"], p["body.0.bias"]))
        out = F.linear(features, p["head.weight"], p["head.bias"])
        d, split = self.input_dim, self.input_dim * self.rank
        factor = out[:, :split].reshape(-1, d, self.rank) if self.rank else None
        diagonal = torch.exp(out[:, split + d :] + self.log_initial_diagonal) if self.diagonal else None
        return factor, diagonal, out[:, split : split + d]

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        factor, diagonal, shift = self.terms(context)
        value = (x * shift).sum(-1)
        if factor is not None:
            value = value + 0.5 * torch.einsum("nd,ndr->nr", x, factor).pow(2).sum(-1)
        if diagonal is not None:
            value = value + 0.5 * (diagonal * x * x).sum(-1)
        return value


class DenseQuadraticFactor:
    r"""One Cholesky factorisation :math:`Q = C C^\top` of the potential's quadratic, and what it gives.

    :math:`Q \succeq \alpha I` by construction, so the factorisation skips its error check,
    which would wait for a GPU. The factor is a constant; :attr:`logdet` keeps the graph
    to the parameters, with the gradient :math:`\partial \log\det Q / \partial Q = Q^{-1}`
    from the same factor. :math:`C` is the square root :math:`S` of :meth:`whiten` and
    :meth:`unwhiten` (triangular solves); :meth:`solve` uses :math:`Q^{-1}`, formed on first use.

    :ivar source: the :class:`~pyro_cpflow.derivatives.QuadraticTerms` it factorises, when
        made by :func:`factorize` (``None`` for a bare matrix).
    """

    def __init__(self, matrix: Tensor, source: QuadraticTerms | None = None) -> None:
        self.matrix = matrix
        self.source = source
        self.cholesky, _ = torch.linalg.cholesky_ex(matrix.detach())
        self.logdet = logdet_from_cholesky(matrix, self.cholesky)

    @cached_property
    def inverse(self) -> Tensor:
        """:math:`Q^{-1}`, a constant ``(d, d)``."""
        return torch.cholesky_inverse(self.cholesky)

    def solve(self, rows: Tensor) -> Tensor:
        """:math:`Q^{-1} v` for rows ``(N, d)``."""
        return rows @ self.inverse

    def matvec(self, rows: Tensor) -> Tensor:
        """:math:`Q v` for rows, differentiable in the parameters."""
        return rows @ self.matrix

    def whiten(self, rows: Tensor) -> Tensor:
        r""":math:`C^{-1} v` for rows ``(N, d)`` (or the rows of a weight matrix: :math:`W C^{-\top}`)."""
        return torch.linalg.solve_triangular(self.cholesky.mT, rows, upper=True, left=False)

    def unwhiten(self, rows: Tensor) -> Tensor:
        r""":math:`C^{-\top} v` for rows ``(N, d)``; :math:`C^{-\top} C^{-1} = Q^{-1}`."""
        return torch.linalg.solve_triangular(self.cholesky, rows, upper=False, left=False)


class LowRankQuadraticFactor:
    r""":math:`Q = c I + L L^\top` with :math:`L \in \mathbb{R}^{d \times r}`, :math:`r < d`, used
    through :math:`r \times r` algebra.

    With :math:`M = c I_r + L^\top L`: :math:`\log\det Q = (d - r)\log c + \log\det M`
    (matrix determinant lemma) and :math:`Q^{-1} v = (v - L M^{-1} L^\top v) / c` (Woodbury).
    The square root of :meth:`whiten` is the symmetric :math:`S = Q^{1/2}`. With the
    eigendecomposition :math:`L^\top L = U \operatorname{diag}(\lambda) U^\top` (the thin SVD
    :math:`L = V \Sigma U^\top` has :math:`\Sigma^2 = \lambda`, :math:`V = L U \Sigma^{-1}`),
    :math:`Q^{-1/2} = c^{-1/2}\bigl(I - V \operatorname{diag}(k) V^\top\bigr)
    = c^{-1/2}\bigl(I - L G L^\top\bigr)`,
    :math:`k_j = 1 - (1 + \lambda_j / c)^{-1/2}`, :math:`G = U \operatorname{diag}(k / \lambda) U^\top`,
    and :math:`k_j / \lambda_j \to 1 / (2c)` as :math:`\lambda_j \to 0`: one :math:`r \times r`
    eigendecomposition, no SVD of :math:`L`. Every product costs :math:`O(d r)` per row
    instead of :math:`O(d^2)`.

    :ivar source: as for :class:`DenseQuadraticFactor`.
    """

    def __init__(self, coefficient: Tensor, factor: Tensor, source: QuadraticTerms | None = None) -> None:
        self.coefficient, self.factor, self.source = coefficient, factor, source
        rank = factor.shape[1]
        small = torch.addmm(
            coefficient * torch.eye(rank, dtype=factor.dtype, device=factor.device), factor.T, factor
        )
        # one factorisation of M serves the solves and the log-det (whose gradient is M^-1)
        cholesky, _ = torch.linalg.cholesky_ex(small.detach())
        self._small_inverse = torch.cholesky_inverse(cholesky)
        small_logdet = logdet_from_cholesky(small, cholesky)
        self.logdet = (factor.shape[0] - rank) * torch.log(coefficient) + small_logdet
        self._constant_factor, self._constant_coefficient = factor.detach(), coefficient.detach()

    def solve(self, rows: Tensor) -> Tensor:
        factor = self._constant_factor
        correction = ((rows @ factor) @ self._small_inverse) @ factor.T
        return (rows - correction) / self._constant_coefficient

    def matvec(self, rows: Tensor) -> Tensor:
        return self.coefficient * rows + (rows @ self.factor) @ self.factor.T

    @cached_property
    def _inverse_root_core(self) -> Tensor:
        """:math:`G` ``(r, r)`` of :math:`Q^{-1/2} = c^{-1/2}(I - L G L^\\top)` (see the class docstring)."""
        factor, coefficient = self._constant_factor, self._constant_coefficient
        eigenvalues, vectors = torch.linalg.eigh(factor.T @ factor)
        ratio = eigenvalues.clamp_min(0.0) / coefficient  # lambda / c
        # k / lambda = (1 - (1 + t)^(-1/2)) / (t c), written without cancellation; 1 / (2c) at t = 0
        shrink = torch.where(
            ratio > 0,
            -torch.expm1(-0.5 * torch.log1p(ratio)) / (ratio * coefficient).clamp_min(1e-300),
            0.5 / coefficient,
        )
        return (vectors * shrink) @ vectors.T

    def whiten(self, rows: Tensor) -> Tensor:
        r""":math:`Q^{-1/2} v` for rows ``(N, d)`` (or the rows of a weight matrix)."""
        factor = self._constant_factor
        correction = ((rows @ factor) @ self._inverse_root_core) @ factor.T
        return (rows - correction) / self._constant_coefficient.sqrt()

    def unwhiten(self, rows: Tensor) -> Tensor:
        r""":math:`S^{-\top} v = Q^{-1/2} v` (the root is symmetric)."""
        return self.whiten(rows)


QuadraticFactor = DenseQuadraticFactor | LowRankQuadraticFactor


def factorize(terms: QuadraticTerms) -> QuadraticFactor:
    """The factorisation of :math:`Q` that is cheaper for its shape: low rank when :math:`2r < d`.

    >>> from pyro_cpflow.nn import ICNN
    >>> potential = ConvexPotential(ICNN(100, [8]), 100, quadratic_rank=10)
    >>> type(potential.factorize()).__name__
    'LowRankQuadraticFactor'
    >>> rows = torch.randn(2, 100)
    >>> factor = potential.factorize()
    >>> torch.allclose(factor.matvec(factor.solve(rows)), rows, atol=1e-5)
    True
    """
    if terms.low_rank:
        return LowRankQuadraticFactor(terms.coefficient, terms.factor, terms)
    return DenseQuadraticFactor(terms.matrix, terms)


class ConvexPotential(PackedParameters):
    r"""Strongly convex potential :math:`F(x) = \sigma g(x) + \frac12 x^\top Q x + b^\top x`.

    :param network: an :class:`~pyro_cpflow.nn.ICNN` or :class:`~pyro_cpflow.nn.PICNN`
        (anything mapping ``(x, context)`` to a value convex in ``x``).
    :param input_dim: dimension :math:`d`.
    :param alpha: fixed strong-convexity floor :math:`\alpha > 0`.
    :param quadratic_rank: number of columns :math:`r` of :math:`L` (``0`` disables it).
    :param initial_scale: starting value of :math:`\sigma`.
    :param initial_factor_std: standard deviation of the entries of
        :math:`L \sqrt r`, so that :math:`L L^\top \approx` ``initial_factor_std**2 * I``.
    :param context_terms: optional :class:`ContextQuadratic` adding context-dependent
        quadratic and linear terms (conditional potentials only).
    :param learn_quadratic: ``False`` fixes :math:`Q = I` (:math:`\beta = 1 - \alpha`, no
        :math:`L`; ``quadratic_rank`` must be 0): for a flow followed by learned scales that
        would otherwise share an overall scale with :math:`Q`
        (:class:`~pyro_cpflow.AutoAmortizedCPFlow`, where that shared scale let latents
        collapse: ``experiments/RESULTS.md``, "Amortized guide across seeds").

    The quadratic starts at :math:`Q \approx I`, so :math:`\nabla F` starts near the
    identity. ``raw_scale``, ``raw_beta`` (when learned), ``factor`` and ``shift`` are views of
    one packed parameter (:class:`~pyro_cpflow.packing.PackedParameters`), each its own
    state-dict entry.

    >>> from pyro_cpflow.nn import ICNN
    >>> potential = ConvexPotential(ICNN(3, [8, 8]), 3)
    >>> x = torch.randn(4, 3)
    >>> potential.gradient(x).shape
    torch.Size([4, 3])
    """

    def __init__(
        self,
        network: nn.Module,
        input_dim: int,
        alpha: float = 1e-2,
        quadratic_rank: int | None = None,
        initial_scale: float = 0.1,
        initial_factor_std: float = 0.3,
        context_terms: ContextQuadratic | None = None,
        learn_quadratic: bool = True,
    ) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"alpha must be positive (it bounds the Hessian below), got {alpha}")
        rank = (input_dim if learn_quadratic else 0) if quadratic_rank is None else quadratic_rank
        if not 0 <= rank <= input_dim:
            raise ValueError(f"quadratic_rank must lie in [0, {input_dim}], got {rank}")
        if not learn_quadratic and rank:
            raise ValueError(f"learn_quadratic=False fixes Q = I: quadratic_rank must be 0, got {rank}")
        if not alpha < 1 and not learn_quadratic:
            raise ValueError(f"learn_quadratic=False fixes Q = I, which needs alpha < 1, got {alpha}")
        self.network = network
        self.input_dim = input_dim
        self.alpha = float(alpha)
        self.learn_quadratic = bool(learn_quadratic)
        start_beta = max(1.0 - alpha - (initial_factor_std**2 if rank else 0.0), 1e-3)
        factor = torch.randn(input_dim, rank) * (initial_factor_std / math.sqrt(max(rank, 1)))
        tensors = {
            "raw_scale": torch.tensor(inverse_softplus(initial_scale)),
            "raw_beta": torch.tensor(inverse_softplus(start_beta)),
            "factor": factor,
            "shift": torch.zeros(input_dim),
        }
        if not learn_quadratic:
            del tensors["raw_beta"]
        self.pack(tensors)
        self.context_terms = context_terms

    @property
    def raw_scale(self) -> Tensor:
        """The raw (unconstrained) :math:`\\sigma`, a view of ``packed``."""
        return self.view("raw_scale")

    @property
    def raw_beta(self) -> Tensor:
        """The raw (unconstrained) :math:`\\beta`, a view of ``packed`` (when it is learned)."""
        if not self.learn_quadratic:
            raise RuntimeError(
                "raw_beta: this potential's quadratic is fixed at Q = I (learn_quadratic=False)"
            )
        return self.view("raw_beta")

    @property
    def factor(self) -> Tensor:
        """:math:`L` ``(d, r)``, a view of ``packed``."""
        return self.view("factor")

    @property
    def shift(self) -> Tensor:
        """:math:`b` ``(d,)``, a view of ``packed``."""
        return self.view("shift")

    @property
    def scale(self) -> Tensor:
        """:math:`\\sigma`, the weight of the network term."""
        return F.softplus(self.raw_scale)

    @property
    def beta(self) -> Tensor:
        """:math:`\\beta`, the isotropic curvature above the floor (``1 - alpha`` when fixed)."""
        if not self.learn_quadratic:
            return self.shift.new_tensor(1.0 - self.alpha)
        return F.softplus(self.raw_beta)

    @torch.no_grad()
    def set_quadratic(self, matrix: Tensor) -> None:
        r"""Set :math:`Q = (\alpha + \beta) I + L L^\top` to the symmetric positive definite
        ``matrix`` :math:`M`, as closely as a rank-:math:`r` factor allows.

        With :math:`M = U \operatorname{diag}(\mu) U^\top`: :math:`\alpha + \beta = \mu_{\min}/2`
        (:math:`\beta \ge 10^{-3}`), and :math:`L` the columns :math:`u_i \sqrt{\mu_i - \alpha - \beta}`
        of the :math:`r` largest eigenvalues (exact when :math:`r = d` and :math:`\mu_{\min} > 2\alpha`).

        >>> from pyro_cpflow.nn import ICNN
        >>> potential = ConvexPotential(ICNN(2, [4]), 2)
        >>> potential.set_quadratic(torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
        >>> potential.quadratic_matrix()
        tensor([[2.0000, 0.5000],
                [0.5000, 1.0000]], grad_fn=<...>)
        """
        d, rank = self.input_dim, self.factor.shape[1]
        if not self.learn_quadratic:
            raise ValueError(
                "set_quadratic: this potential's quadratic is fixed at Q = I (learn_quadratic=False)"
            )
        if matrix.shape != (d, d):
            raise ValueError(f"matrix must have shape ({d}, {d}), got {tuple(matrix.shape)}")
        eigenvalues, vectors = torch.linalg.eigh((matrix + matrix.mT) / 2)
        if not bool(torch.isfinite(eigenvalues).all()) or float(eigenvalues[0]) <= 0:
            raise ValueError("matrix must be symmetric positive definite")
        beta = max(float(eigenvalues[0]) / 2 - self.alpha, 1e-3)
        excess = (eigenvalues - self.alpha - beta).clamp_min(0)
        top = slice(d - rank, d)  # eigh sorts ascending
        self.raw_beta.fill_(inverse_softplus(beta))
        self.factor.copy_(vectors[:, top] * excess[top].sqrt())

    def quadratic_matrix(self) -> Tensor:
        """The dense :math:`Q = (\\alpha + \\beta) I + L L^\\top`, shape ``(d, d)``."""
        return self.quadratic_terms(with_context=False).matrix

    def quadratic_terms(self, context: Tensor | None = None, with_context: bool = True) -> QuadraticTerms:
        """The quadratic and linear terms of :math:`F`: :math:`Q`, :math:`b` and, unless
        ``with_context=False``, the context terms (if any)."""
        return self._quadratic_terms(self.unpacked(), context, with_context)

    def _quadratic_terms(
        self, parameters: dict[str, Tensor], context: Tensor | None, with_context: bool = True
    ) -> QuadraticTerms:
        context_factor, context_diagonal, shift = None, None, parameters["shift"]
        if with_context and self.context_terms is not None:
            context_factor, context_diagonal, context_shift = self.context_terms.terms(context)
            shift = shift + context_shift
        if self.learn_quadratic:
            coefficient = self.alpha + F.softplus(parameters["raw_beta"])
        else:  # fixed: alpha + (1 - alpha)
            coefficient = parameters["shift"].new_tensor(1.0)
        return QuadraticTerms(coefficient, parameters["factor"], shift, context_factor, context_diagonal)

    def evaluate(self, x: Tensor, context: Tensor | None = None, derivatives: bool = True) -> PotentialTrace:
        """:math:`F` at rows ``x`` ``(N, d)`` (context rows ``(N, c)``): a lazy
        :class:`~pyro_cpflow.derivatives.PotentialTrace` with the value, gradient, Hessian-vector
        products and Hessian, all differentiable in the parameters, ``x`` and the context."""
        parameters = self.unpacked()
        if isinstance(self.network, NoNetwork):
            network: NetworkTrace | ZeroNetworkTrace = ZeroNetworkTrace(x)
        else:
            network = NetworkTrace(
                self.network.affine_layers(context),  # type: ignore[operator]
                self.network.activation,  # type: ignore[arg-type]
                x,
                scale=F.softplus(parameters["raw_scale"]),
                derivatives=derivatives,
            )
        return PotentialTrace(network, self._quadratic_terms(parameters, context))

    def extra_repr(self) -> str:
        fixed = "" if self.learn_quadratic else ", learn_quadratic=False"
        return f"input_dim={self.input_dim}, alpha={self.alpha}, quadratic_rank={self.factor.shape[1]}{fixed}"

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """:math:`F(x)` for ``x`` of shape ``(N, d)`` (and ``context`` ``(N, c)``); returns ``(N,)``."""
        return self.evaluate(x, context, derivatives=False).value

    def gradient(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`\nabla F(x)` for ``x`` of shape ``(N, d)``, differentiable (analytic backward sweep)."""
        return self.evaluate(x, context).gradient

    def factorize(self, terms: QuadraticTerms | None = None) -> QuadraticFactor:
        """The factorisation of :math:`Q` (from ``terms``, if already formed), for
        preconditioning and log-dets (:func:`factorize`)."""
        return factorize(self.quadratic_terms(with_context=False) if terms is None else terms)

    def initial_inverse_guess(self, y: Tensor, factor: QuadraticFactor | None = None) -> Tensor:
        """:math:`Q^{-1} (y - b)`: the inverse of the affine part, a good start for solvers."""
        with torch.no_grad():
            factor = self.factorize() if factor is None else factor
            rows = (y - self.shift).reshape(-1, self.input_dim)
            return factor.solve(rows).reshape(y.shape)
