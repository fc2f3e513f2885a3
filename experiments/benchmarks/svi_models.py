"""Three small Pyro models for timing SVI guides (``engine.py``).

* ``eight_schools`` - the non-centred eight-schools model (Rubin 1981): latent
  ``mu``, ``tau`` (unconstrained: ``log tau``) and 8 standardised effects; 10 latents.
* ``baseball`` - a hierarchical binomial model of the Efron-Morris batting averages
  (18 players, 45 at-bats each): latent ``mu``, ``tau`` (``log tau``) and 18 logits;
  20 latents.
* ``logistic`` - Bayesian logistic regression with 30 features and an intercept on a
  synthetic data set of 500 rows drawn from a fixed seed; 31 latents.

``build_model(name)`` returns the model function with its data as tensors of torch's
current default dtype (call it under the dtype the guide will use). Each model puts
its data under a ``pyro.plate``, so vectorised ELBO particles broadcast.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

__all__ = ["LATENT_DIMS", "MODEL_NAMES", "build_model"]

SCHOOL_EFFECTS = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOL_SIGMAS = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
AT_BATS = 45
HITS = [18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7]
LOGISTIC_ROWS, LOGISTIC_FEATURES, LOGISTIC_SEED = 500, 30, 1234

LATENT_DIMS = {"eight_schools": 10, "baseball": 20, "logistic": 31}
MODEL_NAMES = tuple(LATENT_DIMS)

Model = Callable[[], None]


def eight_schools() -> Model:
    """Non-centred eight schools: ``y_j ~ N(mu + tau * eta_j, sigma_j)``."""
    y = torch.tensor(SCHOOL_EFFECTS)
    sigma = torch.tensor(SCHOOL_SIGMAS)

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
        with pyro.plate("schools", len(SCHOOL_EFFECTS)):
            eta = pyro.sample("eta", dist.Normal(y.new_zeros(()), 1.0))
            pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)

    return model


def baseball() -> Model:
    """Logit-normal hierarchy: ``hits_i ~ Binomial(45, sigmoid(a_i))``, ``a_i ~ N(mu, tau)``."""
    hits = torch.tensor(HITS, dtype=torch.get_default_dtype())

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(hits.new_tensor(-1.0), 1.0))
        tau = pyro.sample("tau", dist.HalfNormal(hits.new_tensor(1.0)))
        with pyro.plate("players", len(HITS)):
            logits = pyro.sample("logits", dist.Normal(mu, tau))
            pyro.sample("hits", dist.Binomial(AT_BATS, logits=logits), obs=hits)

    return model


def logistic_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(500, 30)`` and labels ``(500,)`` from a fixed generator."""
    generator = torch.Generator().manual_seed(LOGISTIC_SEED)
    dtype = torch.get_default_dtype()
    features = torch.randn(LOGISTIC_ROWS, LOGISTIC_FEATURES, generator=generator, dtype=dtype)
    weights = torch.randn(LOGISTIC_FEATURES, generator=generator, dtype=dtype) / 2
    logits = features @ weights + 0.5
    labels = torch.bernoulli(torch.sigmoid(logits), generator=generator)
    return features, labels


def logistic() -> Model:
    """``labels ~ Bernoulli(sigmoid(features @ w + b))``, ``w ~ N(0, I)``, ``b ~ N(0, 5)``."""
    features, labels = logistic_data()

    def model() -> None:
        w = pyro.sample("w", dist.Normal(features.new_zeros(LOGISTIC_FEATURES), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(features.new_zeros(()), 5.0))
        with pyro.plate("data", LOGISTIC_ROWS):
            logits = (features * w).sum(-1) + b  # w: (..., 1, 30) under particles
            pyro.sample("labels", dist.Bernoulli(logits=logits), obs=labels)

    return model


_BUILDERS: dict[str, Callable[[], Model]] = {
    "eight_schools": eight_schools,
    "baseball": baseball,
    "logistic": logistic,
}


def build_model(name: str) -> Model:
    """The model called ``name`` (one of :data:`MODEL_NAMES`)."""
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}") from None
