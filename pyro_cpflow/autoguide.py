r"""A CP-Flow autoguide in Pyro's conventions.

:class:`AutoCPFlow` is an :class:`~pyro.infer.autoguide.AutoContinuous` guide: every latent
site is mapped to the unconstrained space and concatenated into one vector :math:`z \in
\mathbb{R}^d`, whose posterior is

.. math::

    z = m + \operatorname{diag}(s)\, U f(\varepsilon), \qquad \varepsilon \sim \mathcal N(0, I_d),

with :math:`f` a CP-Flow, a learnable location :math:`m`, positive scale :math:`s` and, for
a model without plates, a unit lower-triangular :math:`U` (the parametrisation of
:class:`~pyro.infer.autoguide.AutoMultivariateNormal`; :math:`U = I` in the hierarchical
structure). The flow starts near the identity, so the guide starts as :math:`\mathcal N(m_0,
s_0^2 I)` with :math:`m_0` from ``init_loc_fn`` and :math:`s_0 =` ``init_scale``, like
:class:`~pyro.infer.autoguide.AutoNormal`. The affine map keeps the flow's problem on a unit
scale whatever the units of the latents; the flow adds the non-Gaussian shape (its ICNN) and,
with its quadratic :math:`\tfrac12 x^\top Q x`, correlations.

**Why both** :math:`U` **and a low-rank** :math:`Q` (``affine="triangular"``, the default for
a model without plates). Both are Gaussian parametrisations, and on the guide panel each
converges slowly where the other is quick: the logistic regression (:math:`d = 31`, broad
correlations among many coefficients) through :math:`U`, the diabetes regression (a few
near-collinear coefficients) through :math:`Q = cI + LL^\top`. A likely reason, not measured
here: :math:`Q` is a symmetric root whose eigenvalues must spread by the square root of the
correlation matrix's condition number, while a correlation :math:`\rho` needs entries of
:math:`U` of order :math:`\rho/\sqrt{1-\rho^2}`, far for Adam, but only one well-scaled
direction of a low-rank :math:`L`. On the guide panel, mean ELBO of three seeds at 3000
steps: the logistic regression −57.10 with :math:`U` and :math:`Q` of rank 4, −57.15 with a
full-rank :math:`Q`, −57.10 with none (AutoMultivariateNormal −57.10), −57.24 with the
diagonal map and a full-rank :math:`Q`; the diabetes regression −502.86 with :math:`U` and
rank 4, −503.05 with no :math:`Q` (AutoMultivariateNormal −503.08), −502.88 with the diagonal
map (``experiments/RESULTS.md``, "The guide's affine map"). A guide saved before this default
loads into ``AutoCPFlow(..., affine="diagonal")``.

**Structure.** For a model whose latent sites are all outside plates (a regression), :math:`f =
\nabla F` is one gradient map of all :math:`d` coordinates (``structure="joint"``). For a
hierarchical model, with *global* sites outside every plate (a group mean and scale) and
*local* ones inside a plate (the group effects), the default ``structure="auto"`` picks the
block-triangular flow (:mod:`pyro_cpflow.triangular`)

.. math::

    y_g = \nabla F_g(\varepsilon_g), \qquad
    y_\ell = \nabla_{\varepsilon_\ell} F_\ell(\varepsilon_\ell;\, y_g),

the local coordinates a conditional CP-Flow given the global ones, with a log-linear context
diagonal :math:`\tfrac12 \varepsilon_\ell^\top D(y_g)\, \varepsilon_\ell` in its potential.
One gradient map cannot scale the local effects by the group scale without stretching the
group scale too (a convexity constraint, measured in ``experiments/RESULTS.md``, "Funnel:
capacity or optimisation"); given the global coordinates as a context it can, and
:math:`\theta = b(u) + D(u)\,\varepsilon` is then exactly representable.

Densities are exact in eval mode (``guide.eval()``); in training the flow's ``logdet``
option decides (``"auto"``: exact where it is measured to be no slower).

References: Kucukelbir et al., *Automatic differentiation variational inference*, JMLR 2017;
Huang et al., *Convex potential flows*, ICLR 2021.

>>> import pyro, pyro.distributions as dist
>>> def model():
...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
>>> guide = AutoCPFlow(model, hidden_dims=(8, 8))
>>> sorted(guide())
['x']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, LowerCholeskyAffine, Permute
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import Transform, biject_to

from .checks import check_not_tracing
from .factories import block_triangular_cpflow, cpflow, cpflow_stack
from .pyro_glue import take_stored_parameters

__all__ = ["AutoCPFlow", "negative_log_density"]

STRUCTURES = ("auto", "joint", "hierarchical")
"""Values of ``AutoCPFlow(structure=...)``."""

AFFINES = ("auto", "diagonal", "triangular")
"""Values of ``AutoCPFlow(affine=...)``."""

TRIANGULAR_QUADRATIC_RANK = 4
"""The flow's default ``quadratic_rank`` (at most ``d``) in the joint structure with the
triangular affine map: a few well-scaled directions beside :math:`U` (module docstring)."""

HIERARCHICAL_OPTIONS = ("context_diagonal", "local_hidden_dims")
"""Options of :func:`~pyro_cpflow.factories.block_triangular_cpflow` that only the hierarchical
structure takes."""


def _symmetric_root(matrix: Tensor) -> Tensor:
    """:math:`M^{1/2}` of a symmetric positive definite ``matrix``."""
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    return (vectors * eigenvalues.clamp_min(0).sqrt()) @ vectors.mT


def _triangular_start(covariance: Tensor, quadratic: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(s, U)`` of the triangular affine map that starts the guide at ``covariance``.

    Leaving the network out, the guide is :math:`z = m + M Q \varepsilon` with
    :math:`M = \operatorname{diag}(s)\, U` and the flow's quadratic :math:`Q`, of covariance
    :math:`M Q^2 M^\top`. With the Cholesky factors :math:`C C^\top = \Sigma` and
    :math:`R R^\top = Q^2`, :math:`M = C R^{-1}` is lower triangular and
    :math:`M Q^2 M^\top = C R^{-1} R R^\top R^{-\top} C^\top = \Sigma`.
    """
    root = torch.linalg.cholesky(quadratic @ quadratic)
    start = torch.linalg.solve_triangular(root, torch.linalg.cholesky(covariance), upper=False, left=False)
    scale = start.diagonal()
    return scale, start / scale[:, None]


def negative_log_density(guide: AutoContinuous, z: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    r""":math:`-\log p(z, \text{data})` of ``guide.model`` at the unconstrained latent vector ``z``
    of an :class:`~pyro.infer.autoguide.AutoContinuous` guide (any of them: the packing of the
    latent sites is theirs), with the Jacobians of the maps to each site's support: the
    guide is run with its latent set to ``z`` and the model replayed on its trace."""
    guide.sample_latent = lambda *_, **__: z  # an instance attribute shadows the method
    # blocked: hidden from the handlers of the SVI step (and its particle plate) that
    # may be running this guide's first call
    try:
        with poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            replayed = poutine.replay(guide.model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    finally:
        del guide.sample_latent
    return guide_trace.log_prob_sum() - model_trace.log_prob_sum()


class AutoCPFlow(AutoContinuous):
    r"""An autoguide whose posterior is an affine map of a CP-Flow of a standard normal.

    :param model: a Pyro model.
    :param hidden_dims: widths of each block's ICNN (and of the local block's PICNN). The
        default, one hidden layer of 128 units, costs about half the tensor operations of two
        layers of 64 per step (180 against 346 for a block), and on the guide panel (four
        models, three seeds: ``experiments/results/guide_panel.json``,
        ``guide_panel_one_layer_seed1.json``, ``guide_panel_one_layer_seed2.json``; two layers
        at seed 0 in ``guide_panel_two_layers.json``) its ELBO was as good or better in 10 of 12
        runs (up to 0.15 nats better; 0.03 and 0.07 worse on baseball at seeds 1 and 2).
    :param num_blocks: CP-Flow blocks composed in the joint structure (without ActNorm: the
        affine map after them already standardises).
    :param structure: ``"joint"``: one gradient map of every coordinate; ``"hierarchical"``:
        the global sites (outside every plate) by a CP-Flow, the local ones (inside a plate)
        by a conditional CP-Flow given the global ones (module docstring); ``"auto"``
        (default): hierarchical when the model has both kinds of site and ``num_blocks=1``,
        else joint. ``guide.structure`` says which was built after the first call.
    :param affine: the linear part of the affine map after the flow: ``"diagonal"``,
        :math:`\operatorname{diag}(s)`; ``"triangular"``, :math:`\operatorname{diag}(s)\, U`
        with :math:`U` unit lower triangular (``guide.scale_tril``, as in
        :class:`~pyro.infer.autoguide.AutoMultivariateNormal`), and in the joint structure
        the flow's ``quadratic_rank`` defaults to :data:`TRIANGULAR_QUADRATIC_RANK`;
        ``"auto"`` (default): triangular in the joint structure, diagonal in the
        hierarchical one (whose blocks keep their own correlations, and where :math:`U`
        did no better in ad-hoc runs). ``guide.affine`` says which was built after the first call.
    :param init_loc_fn: a per-site initialisation (see :mod:`pyro.infer.autoguide.initialization`);
        the guide's location starts there.
    :param init_scale: the guide's initial standard deviation in the unconstrained space.
    :param init_curvature: start from the curvature of the model at the initial location
        instead: with :math:`H` the Hessian of :math:`-\log p(z, \text{data})` there (one
        autograd Hessian, :math:`d` backward passes), the guide's Gaussian part starts at
        covariance :math:`\Sigma = H^{-1}`: with the triangular affine map through
        :math:`s` and :math:`U` (the flow's :math:`Q` as it starts), with the diagonal one
        :math:`s = \sqrt{\operatorname{diag}\Sigma}` and the first block's :math:`Q` the
        square root of the correlation matrix
        (:meth:`~pyro_cpflow.potential.ConvexPotential.set_quadratic`): a Laplace approximation
        at ``init_loc_fn``'s point, not at the mode. Where :math:`H` is not positive definite
        (a funnel's neck), the guide starts from ``init_scale`` as without it. Off by default:
        on the guide panel (``experiments/results/guide_panel_curvature_variants.json``) it
        gained 0.03 and 0.02 nats of ELBO on the logistic and linear regressions, tied on
        baseball and lost 0.12 on the eight-schools funnel. In the hierarchical structure
        only the scales start there.
    :param flow_options: other keyword arguments of :func:`~pyro_cpflow.cpflow` (``logdet``,
        ``alpha``, ``input_gain``, tolerances...), given to every block; in the hierarchical
        structure also ``context_diagonal`` (default ``True``) and ``local_hidden_dims`` of
        :func:`~pyro_cpflow.factories.block_triangular_cpflow`: ``local_hidden_dims=()``
        makes the local block a conditional Gaussian of the global one, a smoother
        log-density for NeuTra (``experiments/RESULTS.md``, "NeuTra: the warped geometry").

    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> pyro.clear_param_store()
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = AutoCPFlow(model, hidden_dims=(8, 8))
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    >>> loss = svi.step()
    >>> guide.median()["x"].shape
    torch.Size([2])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        hidden_dims: Sequence[int] = (128,),
        num_blocks: int = 1,
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = 0.1,
        init_curvature: bool = False,
        structure: str = "auto",
        affine: str = "auto",
        **flow_options: Any,
    ) -> None:
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if not (isinstance(num_blocks, int) and num_blocks >= 1):
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if affine not in AFFINES:
            raise ValueError(f"affine must be one of {AFFINES}, got {affine!r}")
        if structure == "hierarchical" and num_blocks != 1:
            raise ValueError(f"structure='hierarchical' has one block per group; got num_blocks={num_blocks}")
        self._structure = structure
        self.structure: str | None = None  # the one built, known after the first call
        self._affine = affine
        self.affine: str | None = None  # likewise
        self._init_scale = float(init_scale)
        self._init_curvature = bool(init_curvature)
        self._hidden_dims = tuple(hidden_dims)
        self._num_blocks = num_blocks
        self._flow_options = flow_options
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc().detach()
        self.loc = nn.Parameter(loc)
        global_positions, local_positions = self._global_and_local_positions()
        has_both = bool(global_positions) and bool(local_positions)
        if self._structure == "hierarchical" and not has_both:
            raise ValueError(
                "structure='hierarchical' needs latent sites both outside and inside plates; "
                f"this model has {len(global_positions)} global and {len(local_positions)} local "
                "coordinates: use structure='joint'"
            )
        wanted = self._structure == "hierarchical" or (self._structure == "auto" and self._num_blocks == 1)
        self.structure = "hierarchical" if wanted and has_both else "joint"
        misplaced = sorted(set(HIERARCHICAL_OPTIONS) & set(self._flow_options))
        if self.structure == "joint" and misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} only apply to structure='hierarchical' (a model with latent "
                "sites outside and inside plates); this guide built the joint structure"
            )
        if self._affine == "auto":
            self.affine = "triangular" if self.structure == "joint" else "diagonal"
        else:
            self.affine = self._affine
        options = {"hidden_dims": self._hidden_dims, **self._flow_options}
        if self.affine == "triangular" and self.structure == "joint":
            options.setdefault("quadratic_rank", min(TRIANGULAR_QUADRATIC_RANK, self.latent_dim))
        self.permutation: Tensor | None = None
        if self.structure == "hierarchical":
            sizes = [len(global_positions), len(local_positions)]
            flow = block_triangular_cpflow(sizes, **options)
            order = torch.tensor(global_positions + local_positions)
            if not bool((order == torch.arange(self.latent_dim)).all()):
                self.permutation = torch.argsort(order)  # grouped order -> the latent's order
        elif self._num_blocks == 1:
            flow = cpflow(self.latent_dim, **options)
        else:
            flow = cpflow_stack(self.latent_dim, self._num_blocks, actnorm="none", **options)
        self.flow = flow.to(dtype=loc.dtype, device=loc.device)
        self._setup_affine(loc, *args, **kwargs)
        if not pyro.settings.get("module_local_params"):
            take_stored_parameters(self._pyro_get_fullname("flow"), self.flow)

    def _setup_affine(self, loc: Tensor, *args: Any, **kwargs: Any) -> None:
        """``scale`` (and ``scale_tril``) at ``init_scale``, or at the curvature of the model."""
        scale = loc.new_full(loc.shape, self._init_scale)
        unit_tril = torch.eye(self.latent_dim, dtype=loc.dtype, device=loc.device)
        covariance = self._laplace_covariance(loc, *args, **kwargs) if self._init_curvature else None
        first_potential = None
        if self.structure == "joint":
            first_potential = (self.flow if self._num_blocks == 1 else self.flow[0]).potential
        if covariance is not None and self.affine == "triangular":
            # through the first block's quadratic as it starts (the identity where there is none)
            quadratic = unit_tril if first_potential is None else first_potential.quadratic_matrix().detach()
            scale, unit_tril = _triangular_start(covariance, quadratic)
        elif covariance is not None:
            scale = covariance.diagonal().sqrt()
            if first_potential is not None:
                first_potential.set_quadratic(_symmetric_root(covariance / scale[:, None] / scale[None, :]))
        self.scale = PyroParam(scale, constraints.softplus_positive)
        if self.affine == "triangular":
            self.scale_tril = PyroParam(unit_tril, constraints.unit_lower_cholesky)

    def _global_and_local_positions(self) -> tuple[list[int], list[int]]:
        """The coordinates of the latent vector that belong to sites outside every plate, and
        to sites inside one, each in the latent's order."""
        global_positions: list[int] = []
        local_positions: list[int] = []
        start = 0
        for name, shape in self._unconstrained_shapes.items():
            size = shape.numel()
            positions = local_positions if self._cond_indep_stacks[name] else global_positions
            positions.extend(range(start, start + size))
            start += size
        return global_positions, local_positions

    def _laplace_covariance(self, loc: Tensor, *args: Any, **kwargs: Any) -> Tensor | None:
        r""":math:`H^{-1}` for the Hessian :math:`H` of the negative log density at ``loc``, or
        ``None`` where :math:`H` is not positive definite."""
        hessian = torch.autograd.functional.hessian(
            lambda z: negative_log_density(self, z, *args, **kwargs), loc.clone()
        ).detach()
        eigenvalues, vectors = torch.linalg.eigh((hessian + hessian.mT) / 2)
        if not bool(torch.isfinite(eigenvalues).all()) or float(eigenvalues[0]) <= 0:
            return None
        return (vectors / eigenvalues) @ vectors.mT

    def get_base_dist(self) -> dist.Distribution:
        """:math:`\\mathcal N(0, I_d)`."""
        zeros = self.loc.new_zeros(self.latent_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any):
        """:math:`\\varepsilon \\mapsto m + \\operatorname{diag}(s)\\, U f(\\varepsilon)`."""
        return dist.transforms.ComposeTransform(self._transforms())

    def _transforms(self) -> list:
        # the affine map caches its input, the flow's output, so that scoring a sample
        # finds the flow's own cache instead of running its inverse
        if self.affine == "triangular":
            scale_tril = self.scale[:, None] * self.scale_tril
            affine: Transform = LowerCholeskyAffine(self.loc, scale_tril, cache_size=1)
        else:
            affine = AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)
        if self.permutation is None:
            return [self.flow, affine]
        # cached too, so that scoring a sample finds the flow's output, not a permuted copy
        return [self.flow, Permute(self.permutation.to(self.loc.device), cache_size=1), affine]

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        check_not_tracing()
        return dist.TransformedDistribution(self.get_base_dist(), self._transforms())

    @torch.no_grad()
    def _latent_samples(self, num_samples: int) -> Tensor:
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
        if self.prototype_trace is None:
            raise RuntimeError("the guide has not been run yet: call it (or an SVI step) first")
        return self.get_posterior().sample((num_samples,))

    @torch.no_grad()
    def median(self, *args: Any, num_samples: int = 2000, **kwargs: Any) -> dict[str, Tensor]:
        """The posterior median of each latent site, coordinate-wise, from ``num_samples`` draws
        (a flow has no closed form; see :meth:`quantiles`)."""
        return {name: value[0] for name, value in self.quantiles([0.5], num_samples=num_samples).items()}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, num_samples: int = 2000, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Coordinate-wise posterior quantiles of each latent site from ``num_samples`` draws,
        stacked along a new leading dimension (as Pyro's autoguides return them).

        The quantiles are taken in the unconstrained space and mapped to each site's support,
        exact for the elementwise monotone maps (``exp``, ``sigmoid``...) and, as in Pyro's own
        autoguides, a convention for the others (simplex, correlation matrices)."""
        levels = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device).reshape(-1)
        if not bool(((levels >= 0) & (levels <= 1)).all()):
            raise ValueError(f"quantiles must lie in [0, 1], got {levels.tolist()}")
        latents = self._latent_samples(num_samples).quantile(levels, dim=0)
        result: dict[str, list[Tensor]] = {}
        for latent in latents:
            for site, unconstrained in self._unpack_latent(latent):
                transform = biject_to(site["fn"].support)
                result.setdefault(site["name"], []).append(transform(unconstrained))
        return {name: torch.stack(values) for name, values in result.items()}
