"""AutoCPFlow against the patterns of Pyro's own autoguide tests (tests/infer/test_autoguide.py).

Each test below reproduces a parametrisation that Pyro's ``AutoIAFNormal`` passes there,
run against the installed Pyro, plus what a CP-Flow guide adds (median and quantiles by
sampling, round trips of the parameters).
"""

import functools

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import (
    AutoDiscreteParallel,
    AutoGuideList,
    init_to_feasible,
    init_to_mean,
    init_to_median,
    init_to_sample,
    init_to_value,
)

from pyro_cpflow import AutoCPFlow
from pyro_cpflow.autoguide import TRIANGULAR_QUADRATIC_RANK, negative_log_density

SMALL = functools.partial(AutoCPFlow, hidden_dims=(8, 8))
ELBOS = [Trace_ELBO, TraceGraph_ELBO, TraceEnum_ELBO]


@pytest.fixture(autouse=True)
def _seeded():
    # the param store is emptied around every test by the root conftest.py
    pyro.set_rng_seed(0)


def test_scores():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0).expand([10]))

    guide = SMALL(model)
    guide_trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace()
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    assert "_AutoCPFlow_latent" not in model_trace.nodes
    assert guide_trace.nodes["_AutoCPFlow_latent"]["log_prob_sum"].item() != 0.0
    assert model_trace.nodes["z"]["log_prob_sum"].item() != 0.0
    assert guide_trace.nodes["z"]["log_prob_sum"].item() == 0.0


@pytest.mark.parametrize("Elbo", ELBOS)
def test_factor(Elbo):
    def model(log_factor):
        pyro.sample("z1", dist.Normal(0.0, 1.0))
        pyro.factor("f1", log_factor)
        pyro.sample("z2", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
        with pyro.plate("plate", 3):
            pyro.factor("f2", log_factor)
            pyro.sample("z3", dist.Normal(torch.zeros(3), torch.ones(3)))

    guide = SMALL(model)
    elbo = Elbo(strict_enumeration_warning=False)
    elbo.loss(model, guide, torch.tensor(0.0))
    pyro.set_rng_seed(123)
    loss_5 = elbo.loss(model, guide, torch.tensor(5.0))
    pyro.set_rng_seed(123)
    loss_4 = elbo.loss(model, guide, torch.tensor(4.0))
    assert loss_5 - loss_4 == pytest.approx(-1 - 3)


@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize("init_loc_fn", [init_to_feasible, init_to_mean, init_to_median, init_to_sample])
def test_shapes(init_loc_fn, Elbo):
    def model():
        pyro.sample("z1", dist.Normal(0.0, 1.0))
        pyro.sample("z2", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
        with pyro.plate("plate", 3):
            pyro.sample("z3", dist.Normal(torch.zeros(3), torch.ones(3)))
        pyro.sample("z4", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
        pyro.sample("z5", dist.Dirichlet(torch.ones(3)))
        pyro.sample("z6", dist.Normal(0, 1).expand((2,)).mask(torch.arange(2) > 0).to_event(1))

    guide = SMALL(model, init_loc_fn=init_loc_fn)
    loss = Elbo(strict_enumeration_warning=False).loss(model, guide)
    assert np.isfinite(loss), loss


def test_discrete_parallel():
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])

    def model(data):
        weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2)))
        locs = pyro.sample("locs", dist.Normal(0, 10).expand_by([2]).to_event(1))
        scale = pyro.sample("scale", dist.LogNormal(0, 1))
        with pyro.plate("data", len(data)):
            weights = weights.expand(torch.Size((len(data),)) + weights.shape)
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)

    guide = AutoGuideList(model)
    guide.append(SMALL(poutine.block(model, hide=["assignment"])))
    guide.append(AutoDiscreteParallel(poutine.block(model, expose=["assignment"])))
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss_and_grads(model, guide, data)
    assert np.isfinite(loss), loss


def test_guide_list():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]))
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(5), torch.eye(5, 5)))

    guide = AutoGuideList(model)
    guide.append(SMALL(poutine.block(model, expose=["x"])))
    guide.append(SMALL(poutine.block(model, expose=["y"])))
    assert set(guide()) == {"x", "y"}


def _three_site_model():
    pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.LogNormal(0.0, 1.0))
    pyro.sample("z", dist.Beta(2.0, 2.0))


def _trained_three_site_guide(Elbo):
    guide = SMALL(_three_site_model)
    elbo = Elbo(strict_enumeration_warning=False, num_particles=100, vectorize_particles=True)
    svi = SVI(_three_site_model, guide, pyro.optim.Adam({"lr": 0.05, "betas": (0.8, 0.99)}), elbo)
    for _ in range(100):
        svi.step()
    return guide


@pytest.mark.parametrize("Elbo", ELBOS)
def test_median(Elbo):
    median = _trained_three_site_guide(Elbo).median()
    assert median["x"].item() == pytest.approx(0.0, abs=0.1)
    assert median["y"].item() == pytest.approx(1.0, abs=0.1)
    assert median["z"].item() == pytest.approx(0.5, abs=0.1)


def test_quantiles():
    guide = _trained_three_site_guide(Trace_ELBO)
    pyro.set_rng_seed(1)
    quantiles = guide.quantiles([0.1, 0.5, 0.9])
    pyro.set_rng_seed(1)
    median = guide.median()
    for name in ["x", "y", "z"]:
        assert quantiles[name].shape == (3,)
        assert torch.equal(median[name], quantiles[name][1])
    x, y, z = ([v.item() for v in quantiles[name]] for name in ["x", "y", "z"])
    assert -3.0 < x[0] and x[0] + 1.0 < x[1] and x[1] + 1.0 < x[2] < 3.0
    assert 0.01 < y[0] and y[0] * 2.0 < y[1] and y[1] * 2.0 < y[2] < 100.0
    assert 0.01 < z[0] and z[0] + 0.1 < z[1] and z[1] + 0.1 < z[2] < 0.99
    with pytest.raises(ValueError, match="quantiles must lie in"):
        guide.quantiles([0.5, 1.5])


def test_the_guide_starts_at_init_loc_with_init_scale():
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(3), 10.0).to_event(1))
        pyro.sample("b", dist.LogNormal(0.0, 1.0))

    start = {"a": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor(5.0)}
    guide = SMALL(model, init_loc_fn=init_to_value(values=start), init_scale=0.01)
    guide()
    samples = guide.get_posterior().sample((2000,))
    expected = torch.cat([start["a"], start["b"].log()[None]])
    assert torch.allclose(samples.mean(0), expected, atol=0.01)
    # the flow starts near (not at) the identity: spreads within a factor 2 of init_scale
    assert bool(((samples.std(0) > 0.005) & (samples.std(0) < 0.02)).all())


def test_the_negative_log_density_is_the_models_in_the_unconstrained_space():
    def model():
        pyro.sample("a", dist.Normal(torch.tensor([1.0, -1.0]), 2.0).to_event(1))
        pyro.sample("b", dist.LogNormal(0.5, 0.7))

    guide = SMALL(model)
    guide()
    z = torch.tensor([0.3, 0.2, -0.4])
    a, log_b = z[:2], z[2]
    expected = dist.Normal(torch.tensor([1.0, -1.0]), 2.0).log_prob(a).sum()
    expected = expected + dist.LogNormal(0.5, 0.7).log_prob(log_b.exp()) + log_b  # + log |d b / d log b|
    assert torch.allclose(negative_log_density(guide, z), -expected)


@pytest.mark.parametrize("affine", ["diagonal", "triangular"])
def test_curvature_initialisation_is_the_laplace_approximation(affine):
    """On a Gaussian posterior started at its mean, the Gaussian part of the start is the
    posterior's covariance exactly (the network adds a little curvature)."""
    mean = torch.tensor([1.0, -1.0, 0.5])
    covariance = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]]) * 0.2

    def model():
        pyro.sample("x", dist.MultivariateNormal(mean, covariance))

    guide = SMALL(model, affine=affine, init_curvature=True, init_loc_fn=init_to_value(values={"x": mean}))
    guide()
    assert guide.affine == affine
    quadratic = guide.flow.potential.quadratic_matrix().detach()
    if affine == "diagonal":
        scale = covariance.diagonal().sqrt()
        assert torch.allclose(guide.scale, scale, atol=1e-5)
        linear = torch.diag(scale) @ quadratic
    else:
        linear = guide.scale[:, None] * guide.scale_tril @ quadratic
        assert torch.equal(guide.scale_tril.detach(), guide.scale_tril.detach().tril())
    assert torch.allclose(linear @ linear.T, covariance, atol=1e-5)
    samples = guide.get_posterior().sample((20000,))
    assert torch.allclose(torch.cov(samples.T), covariance, atol=0.03)
    # without it, the isotropic start of init_scale
    pyro.clear_param_store()
    plain = SMALL(model, affine=affine, init_loc_fn=init_to_value(values={"x": mean}))
    plain()
    assert torch.allclose(plain.scale, torch.full((3,), 0.1))


def test_curvature_initialisation_falls_back_where_the_hessian_is_indefinite():
    def funnel():  # at (log tau, theta) = (0, 3) the log density is not concave in log tau
        log_tau = pyro.sample("log_tau", dist.Normal(0.0, 3.0))
        pyro.sample("theta", dist.Normal(0.0, log_tau.exp()))

    start = {"log_tau": torch.tensor(0.0), "theta": torch.tensor(3.0)}
    guide = SMALL(funnel, init_curvature=True, init_scale=0.2, init_loc_fn=init_to_value(values=start))
    guide()
    assert torch.allclose(guide.scale, torch.full((2,), 0.2))


def test_a_stale_param_store_of_other_shapes_is_refused():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    SMALL(model)()  # leaves its parameters in the store
    with pytest.raises(ValueError, match="clear_param_store"):
        AutoCPFlow(model, hidden_dims=(16,))()  # Pyro would hand back the (8, 8) flow's


def test_predictive_and_param_store_round_trip(tmp_path):
    def model(data=None):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        with pyro.plate("data", 20):
            return pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)

    data = torch.randn(20) + 2.0
    guide = SMALL(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(50):
        svi.step(data)
    predictive = Predictive(model, guide=guide, num_samples=7, return_sites=["loc", "obs"])
    draws = predictive()
    # Predictive puts each sample in its own batch slot, as for Pyro's autoguides
    assert draws["loc"].shape == (7, 1) and draws["obs"].shape == (7, 20)
    assert bool((draws["loc"] - data.mean()).abs().max() < 1.5)

    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.set_rng_seed(3)
    expected = guide()["loc"]
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    restored = SMALL(model)
    restored(data)  # builds the prototype; the parameters come from the loaded store
    pyro.set_rng_seed(3)
    assert torch.equal(restored()["loc"], expected)


def test_state_dict_round_trip_with_weights_only_load(tmp_path):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = SMALL(model, num_blocks=2)
    guide()
    with torch.no_grad():
        guide.flow.parts[0].potential.packed.add_(0.1)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    pyro.clear_param_store()
    fresh = SMALL(model, num_blocks=2)
    fresh()
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    eps = torch.randn(5, 3)
    assert torch.equal(fresh.get_transform()(eps), guide.get_transform()(eps))


@pytest.mark.parametrize(
    "bad",
    [
        {"init_scale": 0.0},
        {"init_scale": -1},
        {"num_blocks": 0},
        {"structure": "triangular"},
        {"structure": "hierarchical", "num_blocks": 2},
        {"affine": "full"},
    ],
)
def test_bad_arguments_name_themselves(bad):
    name = list(bad)[-1]
    with pytest.raises(ValueError, match=name):
        AutoCPFlow(_three_site_model, **bad)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_elbo_is_refused_with_what_to_use_instead():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    svi = SVI(model, SMALL(model), pyro.optim.Adam({"lr": 1e-2}), pyro.infer.JitTrace_ELBO())
    with pytest.raises(NotImplementedError, match="cannot be traced by torch.jit.*Use Trace_ELBO"):
        svi.step()


def _funnel_with_sites_around_the_plate():
    """A centred funnel whose global sites come before *and* after the plate, so that the
    latent vector interleaves global and local coordinates."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("groups", 4):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=torch.tensor([1.0, -2.0, 0.5, 3.0]))
    pyro.sample("nu", dist.Normal(mu, 1.0))


def _regression():
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", 5):
        pyro.sample("y", dist.Normal(w.sum(-1), 1.0), obs=torch.zeros(5))


def test_auto_structure_is_hierarchical_only_with_global_and_local_sites():
    guide = SMALL(_funnel_with_sites_around_the_plate)
    guide()
    assert guide.structure == "hierarchical"
    assert guide.flow.sizes == (3, 4)  # mu, tau, nu; theta
    assert guide.permutation is not None
    for model, kwargs in [(_regression, {}), (_funnel_with_sites_around_the_plate, {"num_blocks": 2})]:
        pyro.clear_param_store()
        other = SMALL(model, **kwargs)
        other()
        assert other.structure == "joint"
    pyro.clear_param_store()
    forced = SMALL(_funnel_with_sites_around_the_plate, structure="joint")
    forced()
    assert forced.structure == "joint"
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="structure='hierarchical' needs latent sites both"):
        SMALL(_regression, structure="hierarchical")()
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="local_hidden_dims only apply to structure='hierarchical'"):
        SMALL(_regression, local_hidden_dims=())()


def test_auto_affine_is_triangular_in_the_joint_structure_with_a_low_rank_quadratic():
    guide = SMALL(_regression)
    guide()
    assert (guide.structure, guide.affine) == ("joint", "triangular")
    assert guide.flow.potential.factor.shape == (3, min(TRIANGULAR_QUADRATIC_RANK, 3))
    assert torch.equal(guide.scale_tril, torch.eye(3))
    pyro.clear_param_store()
    chosen = SMALL(_regression, quadratic_rank=1, num_blocks=2)
    chosen()
    assert chosen.affine == "triangular"
    assert all(block.potential.factor.shape == (3, 1) for block in chosen.flow.parts)
    pyro.clear_param_store()
    diagonal = SMALL(_regression, affine="diagonal")
    diagonal()
    assert diagonal.flow.potential.factor.shape == (3, 3)  # cpflow's own default rank
    assert not hasattr(diagonal, "scale_tril")
    pyro.clear_param_store()
    hierarchical = SMALL(_funnel_with_sites_around_the_plate)
    hierarchical()
    assert (hierarchical.structure, hierarchical.affine) == ("hierarchical", "diagonal")


@pytest.mark.parametrize("affine", ["diagonal", "triangular"])
def test_joint_density_is_the_jacobian_of_the_whole_map(affine):
    """log q(z) of a sample (cached path) and of the same point scored afresh (inverse path)
    against the base density and slogdet of the autograd Jacobian of eps -> z."""
    guide = _randomised(SMALL(_three_site_model, affine=affine)).eval()
    if affine == "triangular":
        with torch.no_grad():
            guide.scale_tril = guide.scale_tril + torch.randn(guide.latent_dim, guide.latent_dim).tril(-1)
    posterior = guide.get_posterior()
    eps = torch.randn(3, guide.latent_dim)
    z = dist.transforms.ComposeTransform(posterior.transforms)(eps)
    jacobian = torch.stack(
        [torch.autograd.functional.jacobian(lambda e: guide.get_transform()(e[None])[0], e) for e in eps]
    )
    expected = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) - torch.linalg.slogdet(jacobian).logabsdet
    if affine == "triangular":  # the map mixes the coordinates after the flow
        assert (jacobian - jacobian.mT).abs().max() > 1e-2
    assert torch.allclose(posterior.log_prob(z), expected, atol=1e-8)
    assert torch.allclose(guide.get_posterior().log_prob(z.detach().clone()), expected, atol=1e-7)


def _randomised(guide):
    guide()
    with torch.no_grad():
        for parameter in guide.flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return guide


@pytest.mark.parametrize("local", [{}, {"local_hidden_dims": ()}], ids=["picnn", "gaussian"])
def test_hierarchical_density_is_the_jacobian_of_the_whole_map(local):
    """log q(z) of a sample (cached path) and of the same point scored afresh (inverse path)
    against the base density and slogdet of the autograd Jacobian of eps -> z, through the
    permutation back to the latent's order."""
    guide = _randomised(SMALL(_funnel_with_sites_around_the_plate, **local)).eval()
    posterior = guide.get_posterior()
    eps = torch.randn(3, guide.latent_dim)
    transform = dist.transforms.ComposeTransform(posterior.transforms)
    z = transform(eps)
    jacobian = torch.stack(
        [torch.autograd.functional.jacobian(lambda e: guide.get_transform()(e[None])[0], e) for e in eps]
    )
    base = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1)
    expected = base - torch.linalg.slogdet(jacobian).logabsdet
    # the local block depends on the global outputs: the map is not block diagonal
    global_columns = guide.permutation[:3]
    local_rows = guide.permutation[3:]
    assert jacobian[:, local_rows][:, :, global_columns].abs().max() > 1e-3
    assert torch.allclose(posterior.log_prob(z), expected, atol=1e-8)
    fresh = z.detach().clone()
    assert torch.allclose(guide.get_posterior().log_prob(fresh), expected, atol=1e-7)


def test_hierarchical_guide_through_the_param_store(tmp_path):
    guide = _randomised(SMALL(_funnel_with_sites_around_the_plate))
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.set_rng_seed(3)
    expected = guide()
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    restored = SMALL(_funnel_with_sites_around_the_plate)
    restored()
    pyro.set_rng_seed(3)
    assert all(torch.equal(value, expected[name]) for name, value in restored().items())
