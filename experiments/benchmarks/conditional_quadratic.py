"""Does a context-dependent quadratic term help an amortized CP-Flow posterior?

Model (amortized conjugate Gaussian with a per-datum noise level):

    z ~ N(0, I_d),   s ~ LogUniform(0.3, 3),   y | z, s ~ N(A z, s^2 I_m),

whose exact posterior p(z | y, s) is Gaussian with a covariance that changes with
``s``. An amortized guide reads ``(y, log s)`` through an encoder into features ``h``,
draws from a diagonal Gaussian ``N(mu(h), sigma(h))`` and pushes it through a
conditional CP-Flow conditioned on ``h``. We compare the PICNN potential alone with
the potential plus the context-dependent term ``0.5 |L(h)^T x|^2 + b(h)^T x``
(``context_quadratic_rank > 0``), and with the diagonal Gaussian alone, by the mean
exact KL(q || p) over held-out contexts after a fixed training budget.

Run:  python -m experiments.benchmarks.conditional_quadratic [--steps 1500] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from tqdm import trange

from pyro_cpflow import conditional_cpflow

RESULTS = Path(__file__).parent / "results"


class Problem:
    """The amortized conjugate Gaussian model and its exact posteriors."""

    def __init__(self, latent_dim: int, observed_dim: int, generator: torch.Generator) -> None:
        mixing = torch.randn(latent_dim, latent_dim, generator=generator)
        self.design = torch.randn(observed_dim, latent_dim, generator=generator) @ mixing / latent_dim**0.5
        self.latent_dim = latent_dim

    def simulate(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        log_noise = torch.empty(n).uniform_(
            torch.log(torch.tensor(0.3)), torch.log(torch.tensor(3.0)), generator=generator
        )
        z = torch.randn(n, self.latent_dim, generator=generator)
        y = z @ self.design.T + log_noise.exp()[:, None] * torch.randn(
            n, self.design.shape[0], generator=generator
        )
        return y, log_noise

    def posterior(self, y: torch.Tensor, log_noise: torch.Tensor) -> dist.MultivariateNormal:
        noise_sq = (2 * log_noise).exp()[:, None, None]
        precision = torch.eye(self.latent_dim) + self.design.T @ self.design / noise_sq
        covariance = torch.linalg.inv(precision)
        mean = (covariance @ (self.design.T @ y[..., None]) / noise_sq).squeeze(-1)
        return dist.MultivariateNormal(mean, covariance_matrix=covariance)

    def model(self, y: torch.Tensor, log_noise: torch.Tensor) -> None:
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            scale = log_noise.exp()[:, None]
            pyro.sample("y", dist.Normal(z @ self.design.T, scale).to_event(1), obs=y)


class AmortizedGuide(nn.Module):
    """Encoder -> diagonal Gaussian base -> optional conditional CP-Flow."""

    def __init__(self, observed_dim: int, latent_dim: int, context_dim: int, flow_rank: int | None) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(observed_dim + 1, 64), nn.Tanh(), nn.Linear(64, context_dim), nn.Tanh()
        )
        self.loc = nn.Linear(context_dim, latent_dim)
        self.log_scale = nn.Linear(context_dim, latent_dim)
        self.flow = (
            None
            if flow_rank is None
            else conditional_cpflow(
                latent_dim,
                context_dim,
                hidden_dims=(32, 32),
                logdet="exact",
                context_quadratic_rank=flow_rank,
            )
        )

    def distribution(self, y: torch.Tensor, log_noise: torch.Tensor) -> dist.Distribution:
        h = self.encoder(torch.cat([y, log_noise[:, None]], -1))
        base = dist.Normal(self.loc(h), self.log_scale(h).exp()).to_event(1)
        return base if self.flow is None else dist.TransformedDistribution(base, [self.flow.condition(h)])

    def forward(self, y: torch.Tensor, log_noise: torch.Tensor) -> None:
        pyro.module("guide", self)
        with pyro.plate("data", y.shape[0]):
            pyro.sample("z", self.distribution(y, log_noise))


def mean_kl(
    problem: Problem, guide: AmortizedGuide, y: torch.Tensor, log_noise: torch.Tensor, samples: int
) -> float:
    """Mean over contexts of KL(q || p), by sampling q with the exact log-det."""
    with torch.no_grad():
        q = guide.distribution(y, log_noise)
        z = q.sample((samples,))
        return float((q.log_prob(z) - problem.posterior(y, log_noise).log_prob(z)).mean())


def run(variant: str, flow_rank: int | None, seed: int, steps: int, latent_dim: int) -> dict:
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(1234)  # the same problem for every variant
    problem = Problem(latent_dim, observed_dim=8, generator=generator)
    test_y, test_noise = problem.simulate(200, generator)
    guide = AmortizedGuide(8, latent_dim, context_dim=16, flow_rank=flow_rank)
    pyro.clear_param_store()
    svi = SVI(
        problem.model,
        guide,
        pyro.optim.ClippedAdam({"lr": 3e-3, "lrd": 0.9995}),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
    )
    train_generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in trange(steps, desc=f"{variant} seed {seed}", leave=False):
        svi.step(*problem.simulate(64, train_generator))
    seconds = time.perf_counter() - start
    guide.eval()
    return {
        "variant": variant,
        "seed": seed,
        "kl": mean_kl(problem, guide, test_y, test_noise, samples=500),
        "seconds": seconds,
        "parameters": sum(p.numel() for p in guide.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.conditional_quadratic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--latent-dim", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "conditional_quadratic.json")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    variants = {"diagonal Gaussian": None, "CP-Flow, PICNN": 0, "CP-Flow, PICNN + L(c)": args.latent_dim}
    rows = [
        run(name, rank, seed, args.steps, args.latent_dim)
        for seed in range(args.seeds)
        for name, rank in variants.items()
    ]
    lines = ["| posterior | parameters | mean KL(q‖p) per seed | train time (s) |", "|---|---|---|---|"]
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        kls = ", ".join(f"{r['kl']:.4f}" for r in mine)
        seconds = sum(r["seconds"] for r in mine) / len(mine)
        lines.append(f"| {name} | {mine[0]['parameters']} | {kls} | {seconds:.0f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
