"""The amortized guides for plate-local latents (pyro_cpflow/amortized.py)."""

import functools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch import nn

from pyro_cpflow import AutoAmortizedCPFlow, AutoAmortizedNormal, conditional_cpflow

N, D_X, D_Z = 20, 3, 2
SMALL = functools.partial(AutoAmortizedCPFlow, hidden_dims=(8, 8))
GUIDES = [SMALL, AutoAmortizedNormal]


@pytest.fixture(autouse=True)
def _seeded():
    # the param store is emptied around every test by the root conftest.py
    pyro.set_rng_seed(0)


def linear_gaussian(x, subsample_size=None, A=None, noise=0.5, seen=None):
    """z_i ~ N(0, I_2), x_i ~ N(A z_i, noise^2 I_3)."""
    A = torch.tensor([[1.0, 0.5], [0.8, -0.3], [0.6, 0.9]]) if A is None else A
    with pyro.plate("data", len(x), subsample_size=subsample_size) as index:
        if seen is not None:
            seen.append(index)
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D_Z]).to_event(1))
        pyro.sample("x", dist.Normal(z @ A.T, noise).to_event(1), obs=x[index])


def subsample_plate(x, subsample_size=None, **kwargs):
    """The model's plate for each call (its subsample size is an argument of the model)."""
    return pyro.plate("data", len(x), subsample_size=subsample_size)


def make_guide(factory=SMALL, model=linear_gaussian, **kwargs):
    kwargs.setdefault("encoder", nn.Linear(D_X, 5))
    return factory(
        model, plate="data", data=lambda x, *args, **kw: x, create_plates=subsample_plate, **kwargs
    )


def test_each_datum_gets_a_sample_with_and_without_subsampling():
    x = torch.randn(N, D_X)
    for factory in GUIDES:
        for subsample_size, rows in [(None, N), (7, 7)]:
            pyro.clear_param_store()
            guide = make_guide(factory)
            assert guide(x, subsample_size)["z"].shape == (rows, D_Z)
            trace = poutine.trace(guide).get_trace(x, subsample_size)
            trace.compute_log_prob()
            assert trace.nodes[f"_{type(guide).__name__}_latent"]["log_prob"].shape == (rows,)
            assert guide.latent_dim == D_Z and guide.context_dim == 5


def test_a_plate_of_another_dimension_and_constrained_sites():
    def model(x):
        with pyro.plate("feature", 3, dim=-1):
            pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=4, dim=-2) as index:
            scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), scale).to_event(1), obs=x[index])

    x = torch.randn(N, 1, 1)
    guide = SMALL(poutine.block(model, hide=["w"]), plate="data", encoder=nn.Flatten(), data=lambda x: x)
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["scale"]["value"].shape == (4, 1)
    assert trace.nodes["z"]["value"].shape == (4, 1, 2)
    assert guide.latent_dim == 3
    trace.compute_log_prob()
    # the Delta of a positive site carries log|du/dz| = -log z for u = log z
    scale = trace.nodes["scale"]["value"]
    assert torch.allclose(trace.nodes["scale"]["log_prob"], -scale.log() * N / 4)  # scaled by N/B
    assert torch.equal(trace.nodes["z"]["log_prob"], torch.zeros(4, 1))


def test_the_subsample_indices_are_those_of_the_model():
    x = torch.randn(N, D_X)
    seen = []
    guide = make_guide()
    guide_trace = poutine.trace(guide).get_trace(x, 5)
    poutine.replay(linear_gaussian, trace=guide_trace)(x, 5, seen=seen)
    assert torch.equal(seen[-1], guide_trace.nodes["data"]["value"])
    # and the guide encoded exactly those data: its context comes from x[indices]
    index = guide_trace.nodes["data"]["value"]
    latent = guide_trace.nodes["_AutoAmortizedCPFlow_latent"]
    posterior = guide.posterior(x[index])
    assert torch.allclose(posterior.log_prob(latent["value"]), latent["fn"].log_prob(latent["value"]))


def test_a_subsampled_elbo_estimate_averages_to_the_full_data_elbo():
    x = torch.randn(N, D_X)
    guide = make_guide(init_scale=0.5)
    guide.eval()
    full = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    full_loss = full.loss(linear_gaussian, guide, x)
    subsampled = Trace_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
    estimates = torch.tensor([subsampled.loss(linear_gaussian, guide, x, 5) for _ in range(150)])
    error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - full_loss) < 4 * error
    # the scaling matters: without N/B the estimates would be 4 times smaller
    assert abs(full_loss) > 10 * error


def test_the_density_of_a_sample_is_the_exact_density_of_the_flow():
    x = torch.randn(N, D_X)
    guide = make_guide(init_scale=0.7)
    guide(x)
    with torch.no_grad():  # move the flow and the heads away from the identity
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    guide.eval()
    trace = poutine.trace(guide).get_trace(x, 3)
    site = trace.nodes["_AutoAmortizedCPFlow_latent"]
    assert guide.flow.last_inverse is None  # scoring the sample used the caches
    index = trace.nodes["data"]["value"]
    context = guide.encoder(x[index])
    for row in range(3):
        u = site["value"][row]
        transform = dist.transforms.ComposeTransform(guide._transforms(context[row]))
        eps = transform.inv(u)  # a fresh transform: this runs the convex solver
        assert torch.allclose(transform(eps), u, atol=1e-9)
        jacobian = torch.autograd.functional.jacobian(transform, eps)
        log_q = dist.Normal(0.0, 1.0).log_prob(eps).sum() - torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(site["fn"].log_prob(u)[row], log_q, atol=1e-9)


def exact_posterior(x, A, noise):
    precision = torch.eye(D_Z) + A.T @ A / noise**2
    covariance = torch.linalg.inv(precision)
    return x @ A @ covariance / noise**2, covariance


def kl_to_exact(guide, x, A, noise, samples=2000):
    """Monte Carlo KL(q(z | x_i) || p(z | x_i)), averaged over the data."""
    mean, covariance = exact_posterior(x, A, noise)
    with torch.no_grad():
        q = guide.posterior(x)
        z = q.sample((samples,))
        log_p = dist.MultivariateNormal(mean, covariance).log_prob(z)
        return float((q.log_prob(z) - log_p).mean())


LEARNED_QUADRATIC = functools.partial(SMALL, learn_quadratic=True)


def test_training_on_a_conjugate_model_reaches_its_exact_posterior():
    """Every datum's posterior has the same correlation: a learned shared quadratic reaches it
    (KL < 0.05); the default, Q = I, gets it through the network, more slowly, and is still far
    below every diagonal Gaussian."""
    A = torch.tensor([[1.0, 0.9], [0.9, 1.0], [0.2, -0.1]])
    noise = 0.7
    x = dist.Normal(torch.randn(64, D_Z) @ A.T, noise).sample()
    model = functools.partial(linear_gaussian, A=A, noise=noise)
    _, covariance = exact_posterior(x, A, noise)
    precision = torch.linalg.inv(covariance)
    # the best diagonal Gaussian (reverse KL) has variances 1 / precision_kk
    diagonal_floor = 0.5 * float(precision.diagonal().log().sum() - torch.logdet(precision))
    assert diagonal_floor > 0.3
    results = {}
    for factory in [*GUIDES, LEARNED_QUADRATIC]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make_guide(factory, model=model, encoder=nn.Linear(D_X, 4), init_scale=0.5)
        svi = SVI(
            model,
            guide,
            pyro.optim.Adam({"lr": 0.05}),
            Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        )
        for _ in range(150):
            svi.step(x, 32)
        guide.eval()
        results[factory] = kl_to_exact(guide, x, A, noise)
    assert results[AutoAmortizedNormal] > 0.8 * diagonal_floor
    assert results[LEARNED_QUADRATIC] < 0.05 < 0.2 * diagonal_floor
    assert results[SMALL] < 0.1 < 0.33 * diagonal_floor


def test_the_default_flow_has_a_fixed_identity_quadratic():
    guide = make_guide()
    guide(torch.randn(N, D_X), 4)
    potential = guide.flow.potential
    assert not potential.learn_quadratic and potential.factor.shape[1] == 0
    assert torch.equal(potential.quadratic_matrix(), torch.eye(D_Z))
    assert not any(key.endswith("raw_beta") for key in guide.flow.state_dict())
    pyro.clear_param_store()
    learned = make_guide(functools.partial(SMALL, quadratic_rank=1))
    learned(torch.randn(N, D_X), 4)
    assert learned.flow.potential.learn_quadratic and learned.flow.potential.factor.shape[1] == 1


def test_predictive_draws_each_sample_with_its_own_subsample():
    x = torch.randn(N, D_X)
    guide = make_guide()
    guide(x, 4)
    for parallel in (False, True):
        samples = Predictive(
            linear_gaussian, guide=guide, num_samples=6, parallel=parallel, return_sites=["z", "x"]
        )(x, 4)
        assert samples["z"].shape == (6, 4, D_Z)
        assert samples["x"].shape == (6, 4, D_X)


def test_an_autoguide_list_guides_global_latents_with_another_guide():
    y = torch.randn(30, 4) + 2.0

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", len(y), subsample_size=10) as g:
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
            with pyro.plate("obs", 4):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=y[g].T)

    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, expose=["mu"])))
    guide.append(SMALL(model, sites="theta", plate="groups", encoder=nn.Linear(4, 3), data=lambda y: y))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(150):
        svi.step(y)
    names = set(pyro.get_param_store())
    assert any(name.startswith("AutoGuideList.1.flow$$$") for name in names)
    assert any(name.startswith("AutoGuideList.1.encoder$$$") for name in names)
    assert abs(float(guide[0].median()["mu"]) - float(y.mean())) < 0.5
    median = guide.median(y)  # AutoGuideList merges its parts' medians
    assert set(median) == {"mu", "theta"} and median["theta"].shape == (30,)


@pytest.mark.parametrize("factory", GUIDES)
def test_quantiles_and_median_cover_every_member_of_the_plate(factory):
    x = torch.randn(N, D_X)
    guide = _trained_guide(x, factory)
    pyro.set_rng_seed(1)
    quantiles = guide.quantiles([0.1, 0.5, 0.9], x, 5, num_samples=400)["z"]
    assert quantiles.shape == (3, N, D_Z)  # all N members, not the subsample
    assert bool((quantiles[0] < quantiles[1]).all() and (quantiles[1] < quantiles[2]).all())
    pyro.set_rng_seed(1)
    median = guide.median(x, 5, num_samples=400)["z"]
    assert torch.equal(median, quantiles[1])
    pyro.set_rng_seed(1)
    direct = guide.posterior(x).sample((400,)).median(0).values
    assert torch.allclose(median, direct, atol=0.1)
    with pytest.raises(ValueError, match="quantiles must lie in"):
        guide.quantiles([1.5], x, 5)
    with pytest.raises(ValueError, match="num_samples"):
        guide.median(x, 5, num_samples=1)


def _trained_guide(x, factory=SMALL):
    guide = make_guide(factory)
    svi = SVI(linear_gaussian, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(x, 5)
    return guide


def test_the_param_store_round_trip_restores_the_guide(tmp_path):
    x = torch.randn(N, D_X)
    guide = _trained_guide(x)
    guide.eval()
    z = torch.randn(4, D_Z)
    expected = guide.posterior(x[:4]).log_prob(z)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = make_guide()
    fresh(x, 5)
    fresh.eval()
    assert torch.allclose(fresh.posterior(x[:4]).log_prob(z), expected)


def test_a_stale_param_store_of_other_shapes_is_refused():
    x = torch.randn(N, D_X)
    make_guide()(x)  # leaves its encoder's parameters (5 context features) in the store
    with pytest.raises(ValueError, match="clear_param_store"):
        make_guide(encoder=nn.Linear(D_X, 7))(x)  # Pyro would hand back the 5-feature encoder's


def test_the_state_dict_round_trip_loads_with_weights_only(tmp_path):
    x = torch.randn(N, D_X)
    guide = _trained_guide(x)
    guide.eval()
    z = torch.randn(4, D_Z)
    expected = guide.posterior(x[:4]).log_prob(z)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    pyro.clear_param_store()
    fresh = make_guide()
    fresh(x, 5)
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    fresh.eval()
    assert torch.allclose(fresh.posterior(x[:4]).log_prob(z), expected)


def _global_and_local(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        with pyro.plate("inner", 2, dim=-2):
            pyro.sample("w", dist.Normal(0.0, 1.0))
        z = pyro.sample("z", dist.Normal(mu, 1.0).expand([D_Z]).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"sites": "zz"},
            ValueError,
            r"sites: the model has no latent site 'zz'; its latent sites are \['mu', 'w', 'z'\]",
        ),
        (
            {"sites": "mu"},
            ValueError,
            r"sites: site 'mu' is inside the plates \[\], but .* guides sites inside plate 'data'",
        ),
        ({"sites": "w"}, ValueError, r"site 'w' is inside the plates \['data', 'inner'\]"),
        ({}, ValueError, r"site 'mu' is inside the plates \[\]"),
        (
            {"sites": "z", "plate": "dta"},
            ValueError,
            r"plate: the model has no plate named 'dta' .* \['data', 'inner'\]",
        ),
        (
            {"sites": "z", "encoder": nn.Flatten(0)},
            ValueError,
            r"encoder must map features \(20, 1\) to context features \(B, c\) with B = 20, "
            r"got shape \(20,\)",
        ),
        (
            {"sites": "z", "data": lambda x: x[:5]},
            ValueError,
            r"data\(\*args, \*\*kwargs\) must return the features of all 20 members of plate 'data', "
            r"a tensor \(20, ...\), got shape \(5, 1\)",
        ),
        ({"sites": "z", "data": lambda x: x.tolist()}, ValueError, r"got list"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    options = {"plate": "data", "encoder": nn.Linear(1, 3), "data": lambda x: x, **kwargs}
    guide = SMALL(_global_and_local, **options)
    with pytest.raises(error, match=match):
        guide(torch.randn(N, 1))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"plate": 3}, TypeError, "plate must be the name of a plate"),
        ({"encoder": lambda x: x}, TypeError, "encoder must be an nn.Module, got function"),
        ({"data": torch.zeros(3)}, TypeError, "data must be a callable"),
        ({"init_scale": 0.0}, ValueError, "init_scale must be a positive number, got 0.0"),
        ({"sites": []}, TypeError, "sites must be a site name or a non-empty sequence"),
        ({"num_blocks": 0}, ValueError, "num_blocks must be a positive int, got 0"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, error, match):
    options = {"plate": "data", "encoder": nn.Linear(1, 3), "data": lambda x: x, **kwargs}
    with pytest.raises(error, match=match):
        SMALL(_global_and_local, **options)


def test_an_encoder_whose_output_changes_shape_is_named():
    class Flaky(nn.Linear):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return super().forward(x) if self.calls <= 2 else super().forward(x)[:, :2]

    guide = make_guide(encoder=Flaky(D_X, 5))
    guide(torch.randn(N, D_X))  # the prototype, then the guide's own call
    with pytest.raises(
        ValueError, match=r"encoder must return context features \(20, 5\), got shape \(20, 2\)"
    ):
        guide(torch.randn(N, D_X))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jit_tracing_is_refused():
    x = torch.randn(N, D_X)
    guide = make_guide()
    svi = SVI(linear_gaussian, guide, pyro.optim.Adam({"lr": 0.01}), JitTrace_ELBO())
    with pytest.raises(NotImplementedError, match="cannot be traced by torch.jit"):
        svi.step(x)


def test_two_blocks_and_flow_options_reach_the_flow():
    x = torch.randn(N, D_X)
    guide = make_guide(num_blocks=2, logdet="exact", alpha=0.05)
    guide(x)
    blocks = list(guide.flow.transforms)
    assert len(blocks) == 2 and all(block.logdet == "exact" for block in blocks)


def _experiment():
    from experiments import amortized_guide

    return amortized_guide


def test_quick_experiment_run_reports_every_guide():
    results = _experiment().main(["--quick", "--no-progress"])
    rows = results["guides"]
    assert list(rows) == ["AutoAmortizedCPFlow", "AutoAmortizedNormal", "AutoNormal"]
    for name, row in rows.items():
        assert row["finite"] and row["train"]["elbo_se"] > 0
        assert row["train"]["iwae"] >= row["train"]["elbo"]
        assert ("test" in row) == (name != "AutoNormal")  # a per-datum guide cannot generalise


def test_a_full_experiment_run_is_never_overwritten(tmp_path):
    out = tmp_path / "amortized_guide.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        _experiment().parse_args(["--out", str(out)])
    assert _experiment().parse_args(["--out", str(out), "--overwrite"]).overwrite


def test_a_fixed_quadratic_is_the_identity_with_exact_log_dets_and_clear_errors():
    flow = conditional_cpflow(3, context_dim=2, hidden_dims=(8,), learn_quadratic=False)
    with torch.no_grad():
        flow.potential.packed.add_(0.3 * torch.randn_like(flow.potential.packed))
    conditioned = flow.condition(torch.randn(2))
    x = torch.randn(4, 3)
    jacobian = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: conditioned(v[None])[0], v) for v in x]
    )
    expected = torch.linalg.slogdet(jacobian).logabsdet
    assert torch.allclose(conditioned.log_abs_det_jacobian(x, conditioned(x)), expected, atol=1e-10)
    assert torch.equal(flow.potential.quadratic_matrix(), torch.eye(3))
    assert float(flow.potential.beta) == pytest.approx(1 - flow.potential.alpha)
    with pytest.raises(RuntimeError, match="learn_quadratic=False"):
        _ = flow.potential.raw_beta
    with pytest.raises(ValueError, match="learn_quadratic=False"):
        flow.potential.set_quadratic(torch.eye(3))
    with pytest.raises(ValueError, match="quadratic_rank must be 0"):
        conditional_cpflow(3, context_dim=2, hidden_dims=(8,), learn_quadratic=False, quadratic_rank=2)
