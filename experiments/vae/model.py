r"""The gated convolutional VAE of the Sylvester-flows and CP-Flow experiments, in Pyro.

Encoder (van den Berg et al. 2018, as used by Huang et al. 2021): five 5x5 gated
convolutions with ``c, c, 2c, 2c, 2c`` channels (``c = 32``; strides 1, 2, 1, 2, 1) and a
gated convolution whose kernel covers the remaining ``H/4 x W/4`` map, giving the
``feature_dim = 256`` features :math:`h(x)`. Linear heads give the mean and (through a
softplus) the variance of the amortized Gaussian :math:`\mathcal{N}(\mu(x), \sigma^2(x))`;
:math:`h(x)` is also the context of the conditional flows. The decoder mirrors the encoder
with gated transposed convolutions; a 1x1 convolution gives Bernoulli logits, or, for
256-way categorical pixels (Frey Faces), a 5x5 convolution to 256 channels and a 1x1
convolution to 256 logits per pixel, exactly as in the reference code.

:class:`VAE` holds the networks and an amortized posterior
(:mod:`~experiments.vae.posteriors`) and exposes

* :meth:`VAE.model` and :meth:`VAE.guide`, a Pyro model and guide (usable with
  ``pyro.infer.SVI``), with KL warm-up as ``poutine.scale(scale=beta)`` on the latent site;
* :meth:`VAE.forward`, the negative ELBO per image (:func:`elbo_loss`, Trace_ELBO's
  estimator), so that ``DistributedDataParallel(vae)`` trains it;
* :meth:`VAE.log_weights`, importance weights :math:`\log p(x, z_k) - \log q(z_k \mid x)`
  for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

__all__ = [
    "Architecture",
    "Decoder",
    "Encoder",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "VAE",
    "elbo_loss",
]

NUM_CLASSES = 256  # levels of a categorical pixel
LIKELIHOODS = ("bernoulli", "categorical")


@dataclass(frozen=True)
class Architecture:
    """Sizes of the VAE; the defaults are those of the published experiments.

    :param image_shape: ``(C, H, W)`` with ``H`` and ``W`` divisible by 4.
    :param likelihood: ``"bernoulli"`` or ``"categorical"`` (256 levels per pixel).
    :param latent_dim: dimension of :math:`z`.
    :param feature_dim: dimension of the encoder features :math:`h(x)` (the flows' context).
    :param channels: base width ``c`` of the convolutions.
    :param head_channels: width of the 5x5 convolution before the categorical logits
        (256 in the reference code; unused for Bernoulli pixels).
    """

    image_shape: tuple[int, int, int]
    likelihood: str
    latent_dim: int = 64
    feature_dim: int = 256
    channels: int = 32
    head_channels: int = NUM_CLASSES

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        _, height, width = self.image_shape
        if height % 4 or width % 4:
            raise ValueError(f"image height and width must be divisible by 4, got {self.image_shape}")

    @property
    def last_kernel(self) -> tuple[int, int]:
        """The kernel of the last encoder layer: the ``H/4 x W/4`` map left after two strides."""
        return self.image_shape[1] // 4, self.image_shape[2] // 4


class GatedConv2d(nn.Module):
    r"""Gated convolution :math:`h(x) \odot \mathrm{sigmoid}(g(x))` (Dauphin et al. 2017)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__()
        self.h = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.g = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedConvTranspose2d(nn.Module):
    r"""Gated transposed convolution :math:`h(x) \odot \mathrm{sigmoid}(g(x))`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride: int = 1,
        padding: int = 0,
        output_padding: int = 0,
    ) -> None:
        super().__init__()
        args = (in_channels, out_channels, kernel_size, stride, padding, output_padding)
        self.h = nn.ConvTranspose2d(*args)
        self.g = nn.ConvTranspose2d(*args)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class Encoder(nn.Module):
    r"""Images ``(B, C, H, W)`` to features :math:`h`, mean :math:`\mu` and scale :math:`\sigma`."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        c = arch.channels
        self.features = nn.Sequential(
            GatedConv2d(arch.image_shape[0], c, 5, 1, 2),
            GatedConv2d(c, c, 5, 2, 2),
            GatedConv2d(c, 2 * c, 5, 1, 2),
            GatedConv2d(2 * c, 2 * c, 5, 2, 2),
            GatedConv2d(2 * c, 2 * c, 5, 1, 2),
            GatedConv2d(2 * c, arch.feature_dim, arch.last_kernel, 1, 0),
        )
        self.mean = nn.Linear(arch.feature_dim, arch.latent_dim)
        self.variance = nn.Linear(arch.feature_dim, arch.latent_dim)
        # the reference code clips the variance to [0.01, 7] for categorical pixels only
        self.clip_variance = arch.likelihood == "categorical"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.features(x).flatten(1)
        variance = F.softplus(self.variance(h))
        if self.clip_variance:
            variance = variance.clamp(0.01, 7.0)
        else:
            variance = variance.clamp_min(torch.finfo(variance.dtype).tiny)
        return h, self.mean(h), variance.sqrt()


class Decoder(nn.Module):
    """Latents ``(..., latent_dim)`` to logits ``(..., C, H, W)`` or ``(..., C, H, W, 256)``."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        c = arch.channels
        self.arch = arch
        self.features = nn.Sequential(
            GatedConvTranspose2d(arch.latent_dim, 2 * c, arch.last_kernel, 1, 0),
            GatedConvTranspose2d(2 * c, 2 * c, 5, 1, 2),
            GatedConvTranspose2d(2 * c, c, 5, 2, 2, 1),
            GatedConvTranspose2d(c, c, 5, 1, 2),
            GatedConvTranspose2d(c, c, 5, 2, 2, 1),
            GatedConvTranspose2d(c, c, 5, 1, 2),
        )
        channels = arch.image_shape[0]
        if arch.likelihood == "bernoulli":
            self.logits = nn.Conv2d(c, channels, 1)
        else:
            self.logits = nn.Sequential(
                nn.Conv2d(c, arch.head_channels, 5, 1, 2),
                nn.Conv2d(arch.head_channels, channels * NUM_CLASSES, 1),
            )

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        logits = self.logits(self.features(z.reshape(-1, z.shape[-1], 1, 1)))
        channels, height, width = self.arch.image_shape
        if self.arch.likelihood == "bernoulli":
            return logits.reshape(*batch, channels, height, width)
        # (N, 256 * C, H, W) -> (..., C, H, W, 256), classes first as in the reference code
        logits = logits.reshape(-1, NUM_CLASSES, channels, height, width).movedim(1, -1)
        return logits.reshape(*batch, channels, height, width, NUM_CLASSES)


def elbo_loss(model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
    """The negative ELBO of one joint sample, summed over plates; differentiable.

    This is ``pyro.infer.Trace_ELBO().differentiable_loss`` for a fully reparameterized
    guide (its score-function term vanishes), computed from the same traces, but without
    that method's ``torch_item`` and NaN checks, which wait for the device on every step.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not site["fn"].has_rsample:
            raise ValueError(f"guide site {name!r} is not reparameterized; use Trace_ELBO")
    return guide_trace.log_prob_sum() - model_trace.log_prob_sum()


class VAE(nn.Module):
    r"""Gated-conv VAE with an amortized posterior, as a Pyro model and guide.

    :param arch: the sizes (:class:`Architecture`).
    :param posterior: an :class:`~experiments.vae.posteriors.AmortizedPosterior`; called
        as ``posterior(mean, scale, context)`` it returns :math:`q(z \mid x)`.
    """

    def __init__(self, arch: Architecture, posterior: nn.Module) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        self.posterior = posterior

    # ---------------------------------------------------------------- distributions

    def prior(self, batch_shape: torch.Size | tuple[int, ...], like: Tensor) -> dist.TorchDistribution:
        r""":math:`p(z) = \mathcal{N}(0, I)` with the given batch shape (dtype/device of ``like``)."""
        zeros = like.new_zeros((*batch_shape, self.arch.latent_dim))
        return dist.Normal(zeros, 1.0).to_event(1)

    def likelihood(self, z: Tensor) -> dist.TorchDistribution:
        r""":math:`p(x \mid z)`, batch shape ``z.shape[:-1]``, event shape ``(C, H, W)``."""
        logits = self.decoder(z)
        if self.arch.likelihood == "bernoulli":
            return dist.Bernoulli(logits=logits).to_event(3)
        return dist.Categorical(logits=logits).to_event(3)

    def observation(self, x: Tensor) -> Tensor:
        """Images in ``[0, 1]`` as values of :meth:`likelihood` (integer levels if categorical)."""
        if self.arch.likelihood == "bernoulli":
            return x
        return torch.round(x * (NUM_CLASSES - 1)).long()

    def approximate_posterior(self, x: Tensor, num_samples: int = 0) -> dist.TorchDistribution:
        r""":math:`q(z \mid x)` of batch shape ``(B,)``, or ``(num_samples, B)`` when positive."""
        context, mean, scale = self.encoder(x)
        if num_samples:
            context, mean, scale = (t.expand(num_samples, *t.shape) for t in (context, mean, scale))
        return self.posterior(mean, scale, context)

    def mean_image(self, z: Tensor) -> Tensor:
        """The mean of :math:`p(x \\mid z)` in ``[0, 1]``, for pictures."""
        logits = self.decoder(z)
        if self.arch.likelihood == "bernoulli":
            return torch.sigmoid(logits)
        levels = torch.arange(NUM_CLASSES, dtype=logits.dtype, device=logits.device)
        return (logits.softmax(-1) * levels).sum(-1) / (NUM_CLASSES - 1)

    # ---------------------------------------------------------------- Pyro programs

    def model(self, x: Tensor, beta: float = 1.0) -> None:
        """:math:`p(z) p(x \\mid z)`; the latent site is scaled by ``beta`` (KL warm-up)."""
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", self.prior((x.shape[0],), x))
            pyro.sample("x", self.likelihood(z), obs=self.observation(x))

    def guide(self, x: Tensor, beta: float = 1.0) -> None:
        """:math:`q(z \\mid x)`: the amortized posterior, scaled like the model's latent site."""
        pyro.module("encoder", self.encoder)
        pyro.module("posterior", self.posterior)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=beta):
            pyro.sample("z", self.approximate_posterior(x))

    def forward(self, x: Tensor, beta: float = 1.0) -> Tensor:
        """The training loss: the (``beta``-weighted) negative ELBO per image, in nats."""
        return elbo_loss(self.model, self.guide, x, beta) / x.shape[0]

    # ---------------------------------------------------------------- evaluation

    def log_weights(self, x: Tensor, num_samples: int) -> Tensor:
        r""":math:`\log p(x, z_k) - \log q(z_k \mid x)` for ``num_samples`` draws; ``(K, B)``.

        Their mean is an ELBO estimate, and
        :math:`\mathrm{logsumexp}_k - \log K` an importance-sampled :math:`\log p(x)`.
        ``q.log_prob`` scores the guide's own samples (no inverse solver); call it in eval
        mode for the exact CP-Flow log-determinant.
        """
        q = self.approximate_posterior(x, num_samples)
        z = q.rsample()
        log_joint = self.prior(z.shape[:-1], z).log_prob(z) + self.likelihood(z).log_prob(self.observation(x))
        return log_joint - q.log_prob(z)
