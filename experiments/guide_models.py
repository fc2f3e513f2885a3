r"""The real models of the guide panel (``guide_panel.py``), with offline data only.

* ``eight_schools`` - Rubin's eight schools, **centred** (a funnel): ``mu ~ N(0, 5)``,
  ``tau ~ HalfCauchy(5)``, ``theta_j ~ N(mu, tau)``, ``y_j ~ N(theta_j, sigma_j)``; 10
  latents. Its NUTS reference runs on the non-centred form (same posterior, no funnel).
* ``baseball`` - the partially pooled model of Pyro's baseball example on the
  Efron-Morris data (18 players, 45 at-bats): ``phi ~ U(0, 1)``, ``kappa ~ Pareto(1, 1.5)``,
  ``theta_i ~ Beta(phi kappa, (1 - phi) kappa)``, ``hits_i ~ Binomial(45, theta_i)``; 20 latents.
* ``diabetes`` - Bayesian linear regression on scikit-learn's diabetes data (442 patients,
  10 standardised features, standardised target): ``b, w_k ~ N(0, 1)``,
  ``sigma ~ HalfNormal(1)``; 12 latents.
* ``breast_cancer`` - Bayesian logistic regression on scikit-learn's breast-cancer data
  (569 tumours, 30 standardised features): ``b ~ N(0, 5)``, ``w_k ~ N(0, 1)``; 31 latents
  (nearly separable classes: skewed, correlated posteriors).

The data sets ship inside scikit-learn (no download). ``build(name)`` returns a
:class:`PanelModel` with the model, the model for NUTS and a function that maps NUTS
samples to the model's sites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["MODEL_NAMES", "PanelModel", "build"]

SCHOOL_EFFECTS = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOL_SIGMAS = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
AT_BATS = 45
HITS = [18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7]


@dataclass
class PanelModel:
    """A panel model: ``model()`` for the guides; ``nuts_model()`` and ``to_sites`` (NUTS
    samples to the model's sites, a dict of ``(S, ...)`` tensors) for the reference."""

    name: str
    model: Callable[[], None]
    nuts_model: Callable[[], None]
    to_sites: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    latent_dim: int


def _eight_schools() -> PanelModel:
    y, sigma = torch.tensor(SCHOOL_EFFECTS), torch.tensor(SCHOOL_SIGMAS)

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    def non_centred() -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", 8):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)

    def to_sites(samples: dict[str, Tensor]) -> dict[str, Tensor]:
        mu, tau = samples["mu"], samples["tau"]
        return {"mu": mu, "tau": tau, "theta": mu[:, None] + tau[:, None] * samples["eta"]}

    return PanelModel("eight_schools", model, non_centred, to_sites, 10)


def _baseball() -> PanelModel:
    hits = torch.tensor(HITS, dtype=torch.get_default_dtype())

    def model() -> None:
        phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
        kappa = pyro.sample("kappa", dist.Pareto(1.0, 1.5))
        with pyro.plate("players", len(HITS)):
            theta = pyro.sample("theta", dist.Beta(phi * kappa, (1.0 - phi) * kappa))
            pyro.sample("hits", dist.Binomial(AT_BATS, theta), obs=hits)

    return PanelModel("baseball", model, model, dict, 20)


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``b + x w`` over the data plate (the last batch dimension), for ``w`` of shape ``(k,)``
    or, under vectorised particles, ``(P, 1, k)`` (a singleton in the plate's slot)."""
    if w.dim() > 1:
        return b + w.squeeze(-2) @ x.T
    return b + x @ w


def _standardised(data: Tensor) -> Tensor:
    return (data - data.mean(0)) / data.std(0)


def _diabetes() -> PanelModel:
    from sklearn.datasets import load_diabetes

    raw = load_diabetes()
    dtype = torch.get_default_dtype()
    x = _standardised(torch.as_tensor(raw.data, dtype=dtype))
    y = _standardised(torch.as_tensor(raw.target, dtype=dtype))

    def model() -> None:
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=dtype), 1.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("patients", x.shape[0]):
            pyro.sample("y", dist.Normal(_linear(x, w, b), sigma), obs=y)

    return PanelModel("diabetes", model, model, dict, 12)


def _breast_cancer() -> PanelModel:
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    dtype = torch.get_default_dtype()
    x = _standardised(torch.as_tensor(raw.data, dtype=dtype))
    y = torch.as_tensor(raw.target, dtype=dtype)

    def model() -> None:
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=dtype), 1.0).to_event(1))
        with pyro.plate("tumours", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=_linear(x, w, b)), obs=y)

    return PanelModel("breast_cancer", model, model, dict, 31)


_BUILDERS = {
    "eight_schools": _eight_schools,
    "baseball": _baseball,
    "diabetes": _diabetes,
    "breast_cancer": _breast_cancer,
}
MODEL_NAMES = tuple(_BUILDERS)


def build(name: str) -> PanelModel:
    """The panel model ``name`` (one of :data:`MODEL_NAMES`), its data in the default dtype."""
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}") from None
