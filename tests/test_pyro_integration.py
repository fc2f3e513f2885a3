"""CP-Flow inside Pyro: SVI guides, every ELBO, autoguides, NeuTra HMC, amortized VAEs."""

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow
from pyro.infer.reparam import NeuTraReparam

import pyro_cpflow.transforms
from pyro_cpflow import ActNorm, conditional_cpflow, cpflow, cpflow_stack

D = 5


class ConjugateGaussian:
    """z ~ N(0, I), y ~ N(A z, s^2 I): the posterior is a correlated Gaussian in closed form."""

    def __init__(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        mixing = torch.randn(D, D, generator=generator)
        self.design = torch.randn(12, D, generator=generator) @ mixing  # correlated columns
        self.noise = 3.0
        z_true = torch.randn(D, generator=generator)
        self.data = self.design @ z_true + self.noise * torch.randn(12, generator=generator)
        precision = torch.eye(D) + self.design.T @ self.design / self.noise**2
        self.covariance = torch.linalg.inv(precision)
        self.mean = self.covariance @ self.design.T @ self.data / self.noise**2
        self.posterior = dist.MultivariateNormal(self.mean, covariance_matrix=self.covariance)
        # best mean-field Gaussian: KL = 0.5 (sum log Lambda_ii - log det Lambda)
        self.mean_field_kl = 0.5 * float(precision.diagonal().log().sum() - torch.logdet(precision))

    def model(self):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z @ self.design.T, self.noise).to_event(1), obs=self.data)

    def kl(self, sample_and_log_q, num_samples=4000):
        with torch.no_grad():
            z, log_q = sample_and_log_q(num_samples)
            return float((log_q - self.posterior.log_prob(z)).mean())


@pytest.fixture
def forbid_inverse(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the inverse solver was called")

    monkeypatch.setattr(pyro_cpflow.transforms, "invert_gradient_map", refuse)


def _flow_guide(flow):
    base = dist.Normal(torch.zeros(D), 1.0).to_event(1)

    def guide():
        pyro.module("flow", flow)
        pyro.sample("z", dist.TransformedDistribution(base, [flow]))

    def sample_and_log_q(n):
        q = dist.TransformedDistribution(base, [flow])
        z = q.sample((n,))
        return z, q.log_prob(z)

    return guide, sample_and_log_q


def _train(model, guide, steps, lr, loss=None):
    pyro.clear_param_store()
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.995})
    elbo = loss or Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(model, guide, optimizer, elbo)
    return [svi.step() for _ in range(steps)]


def test_cpflow_guide_beats_the_mean_field_limit(forbid_inverse):
    problem = ConjugateGaussian()
    assert problem.mean_field_kl > 0.5  # a real correlation for the guide to capture
    torch.manual_seed(0)
    flow = cpflow(D, hidden_dims=(16, 16), logdet="exact")
    guide, sample_and_log_q = _flow_guide(flow)
    _train(problem.model, guide, steps=300, lr=3e-2)
    kl = problem.kl(sample_and_log_q)
    # the mean-field family cannot go below mean_field_kl; AutoNormal trained alike stays above it
    normal = AutoNormal(problem.model)
    _train(problem.model, normal, steps=300, lr=3e-2)
    normal_kl = problem.kl(lambda n: _autonormal_sample(normal, n))
    assert normal_kl > 0.9 * problem.mean_field_kl
    assert kl < 0.1 * problem.mean_field_kl, (kl, problem.mean_field_kl)


def _autonormal_sample(guide, n):
    q = dist.Normal(guide.locs.z, guide.scales.z).to_event(1)
    z = q.sample((n,))
    return z, q.log_prob(z)


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        TraceMeanField_ELBO(),
        RenyiELBO(alpha=0.5, num_particles=3),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
    ],
    ids=["trace", "mean-field", "renyi", "vectorized"],
)
def test_every_elbo_trains_without_calling_the_solver(elbo, forbid_inverse):
    problem = ConjugateGaussian()
    flow = cpflow(D, hidden_dims=(8, 8), logdet="exact")
    guide, _ = _flow_guide(flow)
    before = [p.detach().clone() for p in flow.parameters()]
    losses = _train(problem.model, guide, steps=3, lr=1e-2, loss=elbo)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p.detach(), b) for p, b in zip(flow.parameters(), before, strict=True))


def test_stochastic_logdet_guide_trains(forbid_inverse):
    problem = ConjugateGaussian()
    torch.manual_seed(0)
    flow = cpflow(D, hidden_dims=(16, 16), logdet="stochastic", num_probes=2)
    guide, sample_and_log_q = _flow_guide(flow)
    start = problem.kl(sample_and_log_q)
    _train(problem.model, guide, steps=200, lr=3e-2)
    flow.eval()  # auto/eval semantics aside, score with the exact log-det
    flow.logdet = "exact"
    assert problem.kl(sample_and_log_q) < 0.2 * start


def _trained_autonormalizingflow(problem):
    torch.manual_seed(0)
    guide = AutoNormalizingFlow(problem.model, partial(cpflow, hidden_dims=(16, 16), logdet="exact"))
    losses = _train(problem.model, guide, steps=300, lr=3e-2)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 1.0
    return guide


def _neutra_nuts(problem, guide, num_samples, warmup_steps, max_tree_depth):
    """NeuTra: NUTS in the flow's base space, with the trained (exact-mode) flow; the draws of z."""
    neutra = NeuTraReparam(guide.requires_grad_(False))
    reparam_model = poutine.reparam(problem.model, config=lambda _: neutra)
    mcmc = MCMC(
        NUTS(reparam_model, max_tree_depth=max_tree_depth),
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        disable_progbar=True,
    )
    mcmc.run()
    z = neutra.transform_sample(mcmc.get_samples()["z_shared_latent"])["z"]
    assert z.shape == (num_samples, D) and torch.isfinite(z).all()
    return z


def test_autonormalizingflow_and_a_short_neutra_chain():
    problem = ConjugateGaussian()
    guide = _trained_autonormalizingflow(problem)

    def sample_and_log_q(n):
        posterior = guide.get_posterior()
        z = posterior.sample((n,))
        return z, posterior.log_prob(z)

    assert problem.kl(sample_and_log_q) < problem.mean_field_kl
    z = _neutra_nuts(problem, guide, num_samples=4, warmup_steps=4, max_tree_depth=2)
    assert z.std(0).gt(0).all()  # the chain moves


@pytest.mark.slow  # NUTS: about 30 s on two cores
def test_neutra_hmc_reaches_the_posterior_mean():
    problem = ConjugateGaussian()
    z = _neutra_nuts(
        problem, _trained_autonormalizingflow(problem), num_samples=60, warmup_steps=40, max_tree_depth=4
    )
    # the chain is near the exact posterior mean (within a few posterior standard deviations)
    scale = problem.covariance.diagonal().sqrt()
    assert bool(((z.mean(0) - problem.mean).abs() < 4 * scale / 60**0.5 + 0.5 * scale).all())


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_compiled_nuts_through_a_flow_is_refused_with_what_to_use_instead():
    problem = ConjugateGaussian()
    guide = AutoNormalizingFlow(problem.model, partial(cpflow, hidden_dims=(4, 4), logdet="exact"))
    guide()
    neutra = NeuTraReparam(guide.requires_grad_(False))
    reparam_model = poutine.reparam(problem.model, config=lambda _: neutra)
    mcmc = MCMC(NUTS(reparam_model, jit_compile=True), num_samples=2, warmup_steps=1, disable_progbar=True)
    with pytest.raises(NotImplementedError, match="cannot be traced by torch.jit.*jit_compile=False"):
        mcmc.run()


def test_amortized_vae_trains_without_calling_the_solver(forbid_inverse):
    torch.manual_seed(0)
    latent, context, observed = 2, 6, 10
    encoder = torch.nn.Sequential(torch.nn.Linear(observed, context), torch.nn.Tanh())
    decoder = torch.nn.Linear(latent, observed)
    flow = conditional_cpflow(latent, context, hidden_dims=(8, 8), logdet="exact")
    data = torch.randn(16, observed)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("flow", flow)
        base = dist.Normal(torch.zeros(latent), 1.0).to_event(1)
        posterior = dist.ConditionalTransformedDistribution(base, [flow])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", posterior.condition(encoder(x)))

    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    encoder_before = encoder[0].weight.detach().clone()
    flow_before = [p.detach().clone() for p in flow.parameters()]
    losses = [svi.step(data) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(encoder[0].weight, encoder_before)  # gradients reach the context
    assert any(not torch.equal(p.detach(), b) for p, b in zip(flow.parameters(), flow_before, strict=True))


def _two_moons(n, generator):
    angle = torch.rand(n, generator=generator) * torch.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    x = torch.where(upper[:, None], x, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], -1))
    return x + 0.1 * torch.randn(n, 2, generator=generator)


def test_density_direction_trains_without_solver_and_samples_with_it(monkeypatch):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    flow = cpflow(2, hidden_dims=(32, 32), logdet="exact")
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    p = dist.TransformedDistribution(base, [flow.inv])
    pyro.clear_param_store()
    pyro.module("density", flow.inv)  # the inverse registers the flow's parameters
    assert len(pyro.get_param_store()) == len(list(flow.parameters()))
    held_out = _two_moons(2000, generator)
    calls = []
    real_solver = pyro_cpflow.transforms.invert_gradient_map

    def counting_solver(*args, **kwargs):
        calls.append(1)
        return real_solver(*args, **kwargs)

    monkeypatch.setattr(pyro_cpflow.transforms, "invert_gradient_map", counting_solver)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    with torch.no_grad():
        start = -float(p.log_prob(held_out).mean())
    for _ in range(150):
        optimizer.zero_grad()
        (-p.log_prob(_two_moons(256, generator)).mean()).backward()
        optimizer.step()
    assert not calls
    with torch.no_grad():
        end = -float(p.log_prob(held_out).mean())
    assert end < start - 0.5
    samples = p.sample((300,))
    assert calls
    assert torch.isfinite(samples).all() and torch.isfinite(p.log_prob(samples)).all()
    assert flow.last_inverse.all_converged


@pytest.mark.parametrize("actnorm", ["between", "around"])
def test_cpflow_stack_guide_trains_from_a_single_sample(actnorm, forbid_inverse):
    """Trace_ELBO runs the guide once with one sample first: ActNorm must initialise from it."""
    problem = ConjugateGaussian()
    torch.manual_seed(0)
    stack = cpflow_stack(D, num_blocks=2, hidden_dims=(8, 8), logdet="exact", actnorm=actnorm)
    guide, sample_and_log_q = _flow_guide(stack)
    losses = _train(problem.model, guide, steps=20, lr=1e-2, loss=Trace_ELBO())
    assert all(torch.isfinite(torch.tensor(losses)))
    norms = [part for part in stack if isinstance(part, ActNorm)]
    assert norms and all(norm.is_initialized() for norm in norms)
    with torch.no_grad():
        z, log_q = sample_and_log_q(50)
    assert torch.isfinite(log_q).all()
