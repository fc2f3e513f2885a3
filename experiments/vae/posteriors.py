r"""Five amortized posteriors behind one interface.

Each is :math:`q(z \mid x) = T_{h(x)} \# \mathcal{N}(\mu(x), \sigma^2(x))`: the encoder's
diagonal Gaussian pushed through a flow conditioned on the encoder features :math:`h(x)`
(the identity for ``gaussian``), as in the Sylvester-flows and CP-Flow experiments.

==================  =========================================================================
``gaussian``        no flow: the diagonal Gaussian (the plain VAE)
``planar``          Pyro's ``conditional_planar`` steps (parameters from :math:`h` by a DenseNN)
``iaf``             Pyro's ``conditional_affine_autoregressive`` steps (IAF, the stable
                    sigmoid-gated update of Kingma et al. 2016; context enters the MADE)
``cpflow``          CP-Flow blocks on the **input-augmented** PICNN with ActNorm between
                    blocks, or around them as in the reference code (``actnorm``)
                    (``pyro_cpflow.conditional_cpflow_stack(..., augmented=True)``)
``cpflow-vanilla``  the same with the plain PICNN (``augmented=False``)
==================  =========================================================================

Sampling and scoring a sample (``q.rsample()`` then ``q.log_prob(z)``) never inverts a flow:
every transform caches its last input. CP-Flow uses ``logdet="auto"`` by default: the
stochastic log-det estimator while training (64 latent dimensions exceed the library's
``exact_max_dim``) and the exact one in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyro.distributions as dist
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.transforms import conditional_affine_autoregressive, conditional_planar
from torch import Tensor, nn

from pyro_cpflow import conditional_cpflow_stack

__all__ = ["POSTERIORS", "AmortizedPosterior", "PosteriorConfig", "build_posterior", "cpflow_blocks"]

POSTERIORS = ("gaussian", "planar", "iaf", "cpflow", "cpflow-vanilla")

DEFAULT_STEPS = {"planar": 4, "iaf": 4, "cpflow": 4, "cpflow-vanilla": 4}
"""Flow steps (blocks) per posterior: ``--num_flows 4``, the reference code's default."""

DEFAULT_HIDDEN = {
    "planar": (256,),
    "iaf": (320,),  # ``made_h_size`` of the reference code, one hidden layer
    "cpflow": (64,) * 5,  # ``icnn_dimh = 64``, ``num_icnn_layers = 5`` of the reference code
    "cpflow-vanilla": (64,) * 5,
}
"""Hidden widths of the networks inside each flow step."""


@dataclass(frozen=True)
class PosteriorConfig:
    """What :func:`build_posterior` needs.

    :param name: one of :data:`POSTERIORS`.
    :param latent_dim: dimension of :math:`z`.
    :param context_dim: dimension of the encoder features :math:`h(x)`.
    :param steps: flow steps (blocks); ``None`` for :data:`DEFAULT_STEPS`.
    :param hidden_dims: hidden widths; ``None`` for :data:`DEFAULT_HIDDEN`.
    :param logdet: CP-Flow log-det mode (``"auto"``, ``"exact"`` or ``"stochastic"``).
    :param actnorm: CP-Flow's ActNorm placement: ``"between"`` blocks, ``"around"`` them (as
        in the reference code) or ``"none"``.
    :param cg_options: CP-Flow solver options (``cg_max_iter``, ``cg_check_every``,
        ``on_failure``; see :class:`pyro_cpflow.FlowOptions`).
    """

    name: str
    latent_dim: int
    context_dim: int
    steps: int | None = None
    hidden_dims: tuple[int, ...] | None = None
    logdet: str = "auto"
    actnorm: str = "between"
    cg_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.name not in POSTERIORS:
            raise ValueError(f"unknown posterior {self.name!r}; choose one of {POSTERIORS}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None for the default), got {self.steps}")

    @property
    def resolved_steps(self) -> int:
        if self.name == "gaussian":
            return 0
        return DEFAULT_STEPS[self.name] if self.steps is None else self.steps

    @property
    def resolved_hidden(self) -> tuple[int, ...]:
        if self.name == "gaussian":
            return ()
        return tuple(self.hidden_dims or DEFAULT_HIDDEN[self.name])


class AmortizedPosterior(nn.Module):
    r""":math:`q(z \mid x)`: a diagonal Gaussian, optionally pushed through a conditional flow.

    :param flow: a ``ConditionalComposeTransformModule`` in the sampling direction, or
        ``None`` for the Gaussian posterior.
    """

    def __init__(self, flow: ConditionalComposeTransformModule | None = None) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, mean: Tensor, scale: Tensor, context: Tensor) -> dist.TorchDistribution:
        """The distribution of batch shape ``mean.shape[:-1]``, conditioned on ``context``."""
        base = dist.Normal(mean, scale).to_event(1)
        if self.flow is None:
            return base
        return dist.ConditionalTransformedDistribution(base, [self.flow]).condition(context)


def build_posterior(config: PosteriorConfig) -> AmortizedPosterior:
    """The posterior named by ``config.name`` (see the module docstring)."""
    name, d, c = config.name, config.latent_dim, config.context_dim
    steps, hidden = config.resolved_steps, list(config.resolved_hidden)
    if name == "gaussian":
        return AmortizedPosterior()
    if name in ("cpflow", "cpflow-vanilla"):
        flow = conditional_cpflow_stack(
            d,
            c,
            num_blocks=steps,
            hidden_dims=hidden,
            augmented=name == "cpflow",
            logdet=config.logdet,
            actnorm=config.actnorm,
            **dict(config.cg_options),
        )
        return AmortizedPosterior(flow)
    parts: Sequence[nn.Module]
    if name == "planar":
        parts = [conditional_planar(d, c, hidden) for _ in range(steps)]
    else:
        parts = [conditional_affine_autoregressive(d, c, hidden, stable=True) for _ in range(steps)]
    return AmortizedPosterior(ConditionalComposeTransformModule(parts, cache_size=1))


def cpflow_blocks(posterior: AmortizedPosterior) -> list[nn.Module]:
    """The CP-Flow blocks of a posterior (empty for the others), for solver statistics."""
    from pyro_cpflow import ConditionalCPFlow

    if posterior.flow is None:
        return []
    return [t for t in posterior.flow.transforms if isinstance(t, ConditionalCPFlow)]
