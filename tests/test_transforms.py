"""Generic checks of every CP-Flow transform, in the style of Pyro's and zuko's flow tests.

``FACTORIES`` names each flow the package builds; the generic tests run each of them in both
log-det modes, and in float64 and float32 (or in the session's ``--dtype``) on ``--device``.
The specific checks after them are written for float64 and pin it."""

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import iterated

from pyro_cpflow import (
    ActNorm,
    FlowOptions,
    InverseTransformModule,
    NonConvergenceError,
    NonConvergenceWarning,
    block_triangular_cpflow,
    conditional_cpflow,
    conditional_cpflow_stack,
    cpflow,
    cpflow_stack,
)

D, C = 3, 2
SMALL = {"hidden_dims": (8, 8), "logdet": "exact"}
LOGDET_MODES = ["exact", "stochastic"]
DTYPES = [torch.float64, torch.float32]
# per dtype: tolerance of the log-det against slogdet, and of the inverse round trip
LOGDET_ATOL = {torch.float64: 1e-8, torch.float32: 1e-4}
INVERSE_ATOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def _randomize(module, scale=0.5):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "loc" in name or "log_scale" in name:  # ActNorm: leave it data-initialised
                continue
            p.add_(scale * torch.randn_like(p))


@dataclass(frozen=True)
class Factory:
    """How the generic suite builds one flow: ``make(options)`` returns the module owning the
    parameters; a conditional one is bound to a context, and ``inverse`` uses its ``.inv``."""

    make: Callable[[dict], torch.nn.Module]
    conditional: bool = False
    inverse: bool = False
    modes: tuple[str, ...] = tuple(LOGDET_MODES)  # the log-det modes it has


FACTORIES = {
    "cpflow": Factory(lambda o: cpflow(D, **o)),
    "cpflow.inv": Factory(lambda o: cpflow(D, **o), inverse=True),
    "conditional_cpflow": Factory(lambda o: conditional_cpflow(D, C, **o), conditional=True),
    "conditional_cpflow.inv": Factory(
        lambda o: conditional_cpflow(D, C, **o), conditional=True, inverse=True
    ),
    "conditional_cpflow-quadratic": Factory(
        lambda o: conditional_cpflow(D, C, context_quadratic_rank=2, **o), conditional=True
    ),
    "conditional_cpflow-diagonal": Factory(
        lambda o: conditional_cpflow(D, C, context_diagonal=True, **o), conditional=True
    ),
    "conditional_cpflow-gaussian": Factory(
        lambda o: conditional_cpflow(D, C, **{**o, "hidden_dims": ()}, context_diagonal=True),
        conditional=True,
    ),
    "block_triangular_cpflow": Factory(lambda o: block_triangular_cpflow([1, 2], **o)),
    "block_triangular_cpflow-gaussian": Factory(
        lambda o: block_triangular_cpflow([1, 2], local_hidden_dims=(), **o)
    ),
    "block_triangular_cpflow.inv": Factory(lambda o: block_triangular_cpflow([1, 2], **o), inverse=True),
    "cpflow_stack": Factory(lambda o: cpflow_stack(D, num_blocks=2, **o)),
    "cpflow_stack.inv": Factory(lambda o: cpflow_stack(D, num_blocks=2, **o), inverse=True),
    "conditional_cpflow_stack": Factory(
        lambda o: conditional_cpflow_stack(D, C, num_blocks=2, **o), conditional=True
    ),
    "conditional_cpflow_stack-around": Factory(
        lambda o: conditional_cpflow_stack(D, C, num_blocks=2, actnorm="around", **o), conditional=True
    ),
    "iterated": Factory(lambda o: iterated(2, cpflow, D, **o)),
    "ActNorm": Factory(lambda o: ActNorm(D), modes=("exact",)),  # always exact
    "ActNorm.inv": Factory(lambda o: ActNorm(D), inverse=True, modes=("exact",)),
}
CASES = [pytest.param(name, mode, id=f"{name}-{mode}") for name, f in FACTORIES.items() for mode in f.modes]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))


def _bind(owner, factory, context):
    transform = owner.condition(context) if factory.conditional else owner
    return transform.inv if factory.inverse else transform


def _build(name, logdet="exact", dtype=None, device=None):
    """A randomised flow from the factory table, data-initialised ActNorms set, on ``device``
    in ``dtype`` (the defaults: the session's)."""
    factory = FACTORIES[name]
    dtype = torch.get_default_dtype() if dtype is None else dtype
    owner = factory.make({**SMALL, "logdet": logdet}).to(device=device, dtype=dtype)
    _randomize(owner)
    context = torch.randn(C, device=device, dtype=dtype) if factory.conditional else None
    transform = _bind(owner, factory, context)
    with torch.no_grad():  # one pass sets the ActNorms from data
        transform(2 * torch.randn(50, D, device=device, dtype=dtype) + 1)
    return transform, owner, context


def _fresh_forward(transform, x):
    """y = t(x), bypassing every cache."""
    transform.clear_cache()
    y = transform(x)
    transform.clear_cache()
    return y


@dtypes
@pytest.mark.parametrize(("name", "logdet"), CASES)
def test_log_abs_det_jacobian_matches_autograd(name, logdet, dtype, device):
    transform, _, _ = _build(name, logdet, dtype, device)
    x = torch.randn(5, D, device=device, dtype=dtype)
    jacobian = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: _fresh_forward(transform, v[None])[0], xi) for xi in x]
    )
    expected = torch.linalg.slogdet(jacobian.double())[1].to(dtype)
    atol = LOGDET_ATOL[dtype]
    if logdet == "exact":
        y = _fresh_forward(transform, x)
        assert torch.allclose(transform.log_abs_det_jacobian(x, y), expected, atol=atol, rtol=atol)
        return
    # stochastic: one probe per row; the average of many rows at the same points is unbiased
    copies = 400
    rows = x.repeat(copies, 1, 1)
    with torch.no_grad():
        values = transform.log_abs_det_jacobian(rows, _fresh_forward(transform, rows)).double()
    stderr = values.std(0) / copies**0.5
    assert stderr.max() > 0  # a real estimate, not the exact value
    assert bool(((values.mean(0) - expected).abs() <= 4.5 * stderr + atol).all())


@dtypes
@pytest.mark.parametrize(("name", "logdet"), CASES)
def test_inverse_round_trip(name, logdet, dtype, device):
    transform, _, _ = _build(name, logdet, dtype, device)
    x = 2 * torch.randn(4, 5, D, device=device, dtype=dtype)
    y = _fresh_forward(transform, x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert not torch.allclose(y, x, atol=0.1)  # the randomised flow is not the identity
    tolerance = INVERSE_ATOL[dtype]
    assert torch.allclose(transform.inv(y), x, atol=tolerance, rtol=tolerance)
    # and the cache returns the exact pair
    assert transform.inv(transform(x)) is x


@dtypes
@pytest.mark.parametrize(("name", "logdet"), CASES)
def test_state_dict_through_torch_load_weights_only_rebuilds_the_flow(name, logdet, dtype, device):
    transform, owner, context = _build(name, logdet, dtype, device)
    buffer = io.BytesIO()
    torch.save(owner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh_owner = FACTORIES[name].make({**SMALL, "logdet": logdet}).to(device=device, dtype=dtype)
    fresh_owner.load_state_dict(state)
    fresh = _bind(fresh_owner, FACTORIES[name], context)
    x = torch.randn(6, D, device=device, dtype=dtype)
    y, y_fresh = _fresh_forward(transform, x), _fresh_forward(fresh, x)
    assert torch.equal(y_fresh, y)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1)  # the same probes for a stochastic log-det
        expected = transform.log_abs_det_jacobian(x, y)
        torch.manual_seed(1)
        assert torch.equal(fresh.log_abs_det_jacobian(x, y_fresh), expected)
    # the check can fail: a fresh module is another flow until the state is loaded
    other_owner = FACTORIES[name].make({**SMALL, "logdet": logdet}).to(device=device, dtype=dtype)
    _randomize(other_owner)
    other = _bind(other_owner, FACTORIES[name], context)
    assert not torch.allclose(_fresh_forward(other, x), y)


@pytest.mark.parametrize(("name", "logdet"), CASES)
def test_whole_module_through_torch_save_and_load(name, logdet, dtype, device):
    """Pickling the whole module (``torch.save(flow)``, loaded with ``weights_only=False``, as
    for any module whose class must be rebuilt) gives the same map and log-det."""
    transform, owner, context = _build(name, logdet, dtype, device)
    x = torch.randn(6, D, device=device, dtype=dtype)
    assert owner.inv is not None  # a kept inverse module (not a submodule) must not break pickling
    buffer = io.BytesIO()
    torch.save(owner, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(owner) and loaded is not owner
    fresh = _bind(loaded, FACTORIES[name], context)
    y = _fresh_forward(transform, x)
    assert torch.equal(_fresh_forward(fresh, x), y)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1)
        expected = transform.log_abs_det_jacobian(x, y)
        torch.manual_seed(1)
        assert torch.equal(fresh.log_abs_det_jacobian(x, _fresh_forward(fresh, x)), expected)
    # parameters are the loaded module's own, not shared with the original
    assert all(
        a.data_ptr() != b.data_ptr() for a, b in zip(loaded.parameters(), owner.parameters(), strict=True)
    )


@pytest.mark.parametrize("name", FACTORIES)
def test_repr_names_the_class_and_its_sizes(name):
    transform, owner, _ = _build(name)
    assert repr(owner).startswith(type(owner).__name__ + "(")
    assert repr(transform).startswith(type(transform).__name__ + "(")
    # nn.Module's repr, not Pyro's bare class name: the sizes of every block are shown
    assert f"input_dim={D}" in repr(owner)


def test_repr_shows_the_options_that_differ_from_their_defaults():
    flow = cpflow(D, hidden_dims=(8, 4), logdet="exact", cg_rtol=1e-4)
    text = repr(flow)
    assert "logdet='exact'" in text and "cg_rtol=0.0001" in text and "hidden_dims=(8, 4)" in text
    assert "num_probes" not in text and "on_failure" not in text  # defaults are not listed
    assert repr(cpflow(D, hidden_dims=(8,))).splitlines()[1].strip() == f"input_dim={D}"


@dtypes
@pytest.mark.parametrize(("name", "logdet"), CASES)
def test_train_and_eval_agree(name, logdet, dtype, device):
    transform, owner, _ = _build(name, logdet, dtype, device)
    x = torch.randn(6, D, device=device, dtype=dtype)
    owner.train()
    y_train = _fresh_forward(transform, x)
    ld_train = transform.log_abs_det_jacobian(x, y_train)
    owner.eval()
    assert not any(m.training for m in owner.modules())
    y_eval = _fresh_forward(transform, x)
    ld_eval = transform.log_abs_det_jacobian(x, y_eval)
    tolerance = INVERSE_ATOL[dtype]
    assert torch.allclose(y_eval, y_train, atol=tolerance, rtol=tolerance)
    assert ld_eval.shape == ld_train.shape == (6,)
    if logdet == "exact":
        assert torch.allclose(ld_eval, ld_train, atol=LOGDET_ATOL[dtype], rtol=LOGDET_ATOL[dtype])


@dtypes
@pytest.mark.parametrize(("name", "logdet"), CASES)
def test_rsample_gradients_reach_every_parameter(name, logdet, dtype, device):
    transform, owner, _ = _build(name, logdet, dtype, device)
    base = dist.Normal(torch.zeros(D, device=device, dtype=dtype), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [transform])
    z = q.rsample((16,))
    assert z.requires_grad and z.dtype == dtype
    loss = (z**2).sum(-1).mean() / 2 + q.log_prob(z).mean()  # a reverse KL to N(0, I)
    loss.backward()
    named = list(owner.named_parameters())
    assert named
    missing = [n for n, p in named if p.grad is None or not bool((p.grad != 0).any())]
    assert not missing, missing
    assert all(bool(torch.isfinite(p.grad).all()) for _, p in named)


@pytest.mark.parametrize(("name", "logdet"), CASES)
@pytest.mark.parametrize("batch_shape", [(), (3,), (3, 4)])
def test_sample_and_log_prob_shapes(name, batch_shape, logdet, dtype, device):
    """In the ``--dtype`` and on the ``--device`` of the session."""
    transform, _, _ = _build(name, logdet, dtype, device)
    event = (D,)
    assert transform.forward_shape(batch_shape + event) == batch_shape + event
    assert transform.inverse_shape(batch_shape + event) == batch_shape + event
    base = dist.Normal(torch.zeros(batch_shape + (D,), device=device, dtype=dtype), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [transform])
    z = q.rsample((2,))
    assert z.shape == (2,) + batch_shape + (D,)
    assert tuple(transform.inverse_shape(z.shape)) == z.shape
    log_prob = q.log_prob(z)
    assert log_prob.shape == (2,) + batch_shape
    assert torch.isfinite(log_prob).all()
    if logdet == "exact":  # scoring a fresh point (not the cached sample) agrees with the cached path
        fresh = z.detach().clone()
        tolerance = 1e-7 if dtype == torch.float64 else 1e-3
        assert torch.allclose(q.log_prob(fresh), log_prob, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("name", "logdet"), CASES)
def test_optimizer_steps_change_every_parameter(name, logdet, dtype, device):
    """In the ``--dtype`` and on the ``--device`` of the session."""
    transform, owner, _ = _build(name, logdet, dtype, device)
    base = dist.Normal(torch.zeros(D, device=device, dtype=dtype), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [transform])
    params = [p for p in owner.parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    data = torch.randn(64, D, device=device, dtype=dtype) * 0.5 + 1.0
    for _ in range(3):
        optimizer.zero_grad()
        (-q.log_prob(data).mean()).backward()
        optimizer.step()
    unchanged = [i for i, (p, b) in enumerate(zip(params, before, strict=True)) if torch.equal(p.detach(), b)]
    assert not unchanged, [n for i, (n, _) in enumerate(owner.named_parameters()) if i in unchanged]


# The checks below are written for float64 (its tolerances, its dtype errors), whatever --dtype says


@pytest.mark.float64
def test_context_broadcasts_from_the_right():
    flow = conditional_cpflow(D, C, **SMALL)
    _randomize(flow)
    context = torch.randn(4, C)
    x = torch.randn(6, 4, D)
    y = flow.condition(context)(x)
    for i in range(4):
        assert torch.allclose(y[:, i], flow.condition(context[i])(x[:, i]), atol=1e-12)
    ld = flow.condition(context).log_abs_det_jacobian(x, y)
    assert ld.shape == (6, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        flow.condition(torch.randn(5, C))(x)


@pytest.mark.float64
def test_bad_input_gets_clear_errors():
    flow = cpflow(D, **SMALL)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        flow(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        flow(torch.tensor([[0.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        flow.inv(torch.tensor([[0.0, float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="dtype"):
        flow(torch.randn(4, D, dtype=torch.float32))
    with pytest.raises(TypeError, match="tensor"):
        flow([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="logdet must be one of"):
        flow.logdet = "approximate"
    cflow = conditional_cpflow(D, C, **SMALL)
    with pytest.raises(ValueError, match="context must have shape"):
        cflow.condition(torch.randn(4, C + 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        cflow.condition(torch.tensor([float("nan"), 0.0]))
    with pytest.raises(ValueError, match="context has dtype torch.float32"):
        cflow.condition(torch.randn(4, C, dtype=torch.float32))
    with pytest.raises(TypeError, match="unknown CP-Flow option"):
        cpflow(D, lanczos_steps=10)


@pytest.mark.float64
def test_finite_value_checks_follow_pyro_validation():
    """The NaN/Inf checks read values on the host, so ``pyro.enable_validation(False)`` skips them."""
    flow = cpflow(D, **SMALL)
    cflow = conditional_cpflow(D, C, **SMALL)
    bad = torch.tensor([[0.0, float("nan"), 0.0]])
    with pyro.validation_enabled(False):
        assert torch.isnan(flow(bad)).any()
        cflow.condition(torch.tensor([float("nan"), 0.0]))
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="NaN or Inf"):
        flow(bad.clone())  # a new tensor: the cache would return the last result unchecked


@pytest.mark.float64
def test_inverse_is_a_module_sharing_parameters():
    flow = cpflow(D, **SMALL)
    inverse = flow.inv
    assert isinstance(inverse, torch.nn.Module) and isinstance(inverse, InverseTransformModule)
    assert inverse.inv is flow and flow.inv is inverse
    assert {id(p) for p in inverse.parameters()} == {id(p) for p in flow.parameters()}
    # no submodule cycle: the flow's own state holds only its parameters
    assert not any(k.startswith("_inverse") for k in flow.state_dict())
    stack = cpflow_stack(D, num_blocks=2, **SMALL)
    assert isinstance(stack.inv, torch.nn.Module) and stack.inv.inv is stack
    assert len(list(stack.inv.parameters())) == len(list(stack.parameters()))
    assert isinstance(stack.with_cache(0).inv, torch.nn.Module)
    conditional = conditional_cpflow(D, C, **SMALL)
    assert isinstance(conditional.inv, torch.nn.Module)
    assert len(list(conditional.inv.parameters())) == len(list(conditional.parameters()))


@pytest.mark.float64
def test_cache_is_not_stale_after_an_optimizer_step():
    """Pyro issue #2564: score the same data tensor again after updating the parameters."""
    flow = cpflow(D, **SMALL)
    p = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [flow.inv])
    data = torch.randn(32, D)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        loss = -p.log_prob(data).mean()
        loss.backward()  # would raise "backward through the graph a second time" if stale
        optimizer.step()
    with torch.no_grad():
        assert torch.allclose(flow(data), flow._call(data))
    # while unchanged parameters keep the cache
    y = flow(data)
    assert flow(data) is y
    flow.clear_cache()
    assert flow(data) is not y


@pytest.mark.float64
def test_with_cache_and_deepcopy():
    flow = cpflow(D, **SMALL)
    _randomize(flow)
    uncached = flow.with_cache(0)
    x = torch.randn(4, D)
    assert uncached(x) is not uncached(x)
    assert torch.allclose(uncached(x), flow(x))
    assert flow.with_cache(1) is flow
    clone = copy.deepcopy(flow)
    assert torch.allclose(clone(x), flow(x))
    assert clone.inv.inv is clone
    assert all(a is not b for a, b in zip(clone.parameters(), flow.parameters(), strict=True))


@pytest.mark.float64
def test_actnorm_state_survives_state_dict():
    stack = cpflow_stack(D, num_blocks=2, **SMALL)
    data = 5 * torch.randn(100, D) + 2
    with torch.no_grad():
        stack(data)
    norm = stack[1]
    assert isinstance(norm, ActNorm) and bool(norm.initialized)
    fresh = cpflow_stack(D, num_blocks=2, **SMALL)
    fresh.load_state_dict(stack.state_dict())
    assert bool(fresh[1].initialized)
    assert torch.allclose(fresh[1].loc, norm.loc)
    # loading an uninitialised state makes the next call initialise again
    norm.load_state_dict(ActNorm(D).state_dict())
    other = 3 * torch.randn(100, D) - 4
    y = norm(other)
    assert bool(norm.initialized) and torch.allclose(y.mean(0), torch.zeros(D), atol=1e-10)


@pytest.mark.float64
def test_actnorm_initialises_in_either_direction():
    data = 3 * torch.randn(500, D) - 1
    forward = ActNorm(D)
    y = forward(data)
    assert torch.allclose(y.mean(0), torch.zeros(D), atol=1e-10)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(D), atol=1e-10)
    backward = ActNorm(D)
    x = backward.inv(data)
    assert torch.allclose(x.mean(0), torch.zeros(D), atol=1e-10)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(D), atol=1e-10)
    # one row: the location centres it, the scale stays 1 (no standard deviation from one row)
    single = ActNorm(D)
    row = torch.randn(1, D)
    assert torch.equal(single(row), torch.zeros(1, D))
    assert torch.equal(single.log_scale.detach(), torch.zeros(D)) and single.is_initialized()


@pytest.mark.float64
def test_auto_mode_follows_dimension_and_training_state():
    small = cpflow(2, hidden_dims=(8,), exact_max_dim=4)
    large = cpflow(8, hidden_dims=(8,), exact_max_dim=4)
    assert small.resolve_logdet(2) == "exact" == small.resolve_logdet()
    assert large.resolve_logdet(8) == "stochastic" == large.resolve_logdet()
    large.eval()
    assert large.resolve_logdet(8) == "exact"
    conditional = conditional_cpflow(8, C, hidden_dims=(8,), exact_max_dim=4)
    assert conditional.resolve_logdet(8) == "stochastic"
    # without exact_max_dim, the measured rule decides by dimension and batch size
    measured = cpflow(32, hidden_dims=(8,))
    assert measured.resolve_logdet(batch=8) == "exact"  # a few SVI particles
    assert measured.resolve_logdet(batch=256) == "stochastic"  # a large minibatch
    assert measured.resolve_logdet(2, batch=256) == "exact"
    measured.eval()
    assert measured.resolve_logdet(batch=256) == "exact"


@pytest.mark.float64
def test_scoring_without_a_gradient_is_exact_in_training_mode():
    """Importance weights and log-densities read under no_grad need no eval(): they are exact."""
    torch.manual_seed(0)
    flow = cpflow(24, hidden_dims=(16, 16))  # stochastic while training at this batch
    assert flow.training and flow.resolve_logdet(batch=500) == "stochastic"
    assert flow.resolve_logdet(batch=500, gradient=False) == "exact"
    assert cpflow(65, hidden_dims=(8,)).resolve_logdet(batch=500, gradient=False) == "stochastic"
    x = torch.randn(500, 24)
    with torch.no_grad():
        scored = flow.log_abs_det_jacobian(x, flow(x))
    exact = torch.linalg.slogdet(flow.hessian(x).detach())[1]
    assert torch.allclose(scored, exact, atol=1e-10)


@pytest.mark.float64
def test_eval_mode_beyond_the_exact_cap_estimates_and_says_so(monkeypatch):
    """Above EXACT_EVAL_MAX_DIM, ``auto`` in eval mode is stochastic (exact would not fit in
    memory) and warns once that densities are estimates; an explicit ``exact`` is obeyed."""
    import pyro_cpflow.options as options_module
    from pyro_cpflow import StochasticDensityWarning

    assert cpflow(256, hidden_dims=(8,)).eval().resolve_logdet(batch=100) == "exact"
    assert cpflow(257, hidden_dims=(8,)).eval().resolve_logdet(batch=100) == "stochastic"
    monkeypatch.setattr(options_module, "EXACT_EVAL_MAX_DIM", 4)  # the rule, at a small d
    torch.manual_seed(0)
    flow = cpflow(6, hidden_dims=(8,)).eval()
    x = torch.randn(64, 6)
    with pytest.warns(StochasticDensityWarning, match="logdet='exact'"):
        estimate = flow.log_abs_det_jacobian(x, flow(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StochasticDensityWarning)  # once per flow
        flow.log_abs_det_jacobian(x, flow(x))
        flow.logdet = "exact"
        exact = flow.log_abs_det_jacobian(x, flow(x))
    assert torch.allclose(exact, torch.linalg.slogdet(flow.hessian(x).detach())[1], atol=1e-10)
    assert not torch.allclose(estimate, exact, atol=1e-6)  # an estimate, not the exact value
    assert (estimate - exact).abs().mean() < 0.5  # but an estimate of it


@pytest.mark.float64
def test_stack_actnorm_placements():
    names = {
        placement: [type(t).__name__ for t in cpflow_stack(D, num_blocks=2, actnorm=placement, **SMALL)]
        for placement in ("between", "around", "none")
    }
    assert names["between"] == ["CPFlow", "ActNorm", "CPFlow"]
    assert names["around"] == ["ActNorm", "CPFlow", "ActNorm", "CPFlow", "ActNorm"]
    assert names["none"] == ["CPFlow", "CPFlow"]


@pytest.mark.float64
def test_factory_rejects_bad_options():
    with pytest.raises(ValueError, match="num_blocks"):
        cpflow_stack(D, num_blocks=0)
    with pytest.raises(ValueError, match="actnorm must be one of"):
        cpflow_stack(D, num_blocks=2, actnorm="sometimes")
    with pytest.raises(ValueError, match="on_failure"):
        cpflow(D, on_failure="explode")
    with pytest.raises(ValueError, match="inverse_method"):
        cpflow(D, inverse_method="bisection")
    # and the options the factory does accept reach the flow, the others keep their defaults
    assert cpflow(D).options == FlowOptions()
    flow = cpflow(D, inverse_tol=1e-3, on_failure="raise")
    assert flow.options == replace(FlowOptions(), inverse_tol=1e-3, on_failure="raise")


@pytest.mark.float64
def test_cache_follows_grad_mode_backward_passes_and_solver_options():
    flow = cpflow(D, **SMALL)
    p = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [flow.inv])
    x = torch.randn(8, D)
    # a backward pass frees the graph of the cached output: scoring again must still work
    p.log_prob(x).sum().backward()
    p.log_prob(x).sum().backward()
    # a value cached under no_grad has no graph: grad mode must not reuse it
    with torch.no_grad():
        p.log_prob(x)
    flow.zero_grad()
    p.log_prob(x).sum().backward()
    assert all(param.grad is not None for param in flow.parameters())
    # a cached inverse must follow the solver's settings
    y = torch.randn(4, D)
    with torch.no_grad():
        flow.inv(y)
        first = flow.last_inverse
        flow.inverse_tol = 1e-3
        flow.inv(y)
    assert flow.last_inverse is not first and flow.last_inverse.tol == 1e-3


@pytest.mark.float64
def test_no_graph_when_nothing_requires_grad():
    flow = cpflow(D, **SMALL).requires_grad_(False)
    x = torch.randn(3, D)
    y = flow(x)
    assert not y.requires_grad
    assert not flow.log_abs_det_jacobian(x, y).requires_grad


@pytest.mark.float64
def test_hessian_helper_and_factory_potential_options():
    flow = cpflow(D, hidden_dims=(8, 8), initial_scale=1.0, initial_factor_std=1.5)
    assert abs(float(flow.potential.scale.detach()) - 1.0) < 1e-12
    x = torch.randn(2, 5, D)
    hessian = flow.hessian(x)
    assert hessian.shape == (2, 5, D, D)
    expected = torch.autograd.functional.hessian(lambda v: flow.potential(v[None])[0], x[1, 3])
    assert torch.allclose(hessian[1, 3], expected, atol=1e-12)


@pytest.mark.float64
def test_cache_sees_in_place_edits_of_its_input():
    flow = cpflow(D, **SMALL)
    _randomize(flow)
    x = torch.randn(6, D)
    with torch.no_grad():
        y = flow(x)
        x.mul_(2)
        assert torch.allclose(flow(x), flow._call(x))
        assert not torch.allclose(flow(x), y)
    # the density of edited data is the density of the new values
    p = dist.TransformedDistribution(dist.Normal(torch.zeros(D), 1.0).to_event(1), [flow.inv])
    data = torch.randn(8, D)
    p.log_prob(data)
    data[0] += 5
    assert torch.allclose(p.log_prob(data), p.log_prob(data.clone()), atol=1e-10)
    # and an inverse is solved again for an edited target
    target = torch.randn(4, D)
    with torch.no_grad():
        first = flow.inv(target)
        target.mul_(3)
        second = flow.inv(target)
    assert second is not first and torch.allclose(flow._call(second), target, atol=1e-10)


@pytest.mark.float64
def test_failed_inverse_is_never_served_from_the_cache():
    flow = cpflow(D, **SMALL, inverse_tol=1e-17)  # below float64's resolution: cannot succeed
    _randomize(flow, scale=2.0)
    y = 50 * torch.randn(8, D)
    with torch.no_grad():
        with pytest.warns(NonConvergenceWarning, match="did not converge"):
            flow.inv(y)
        with pytest.warns(NonConvergenceWarning, match="did not converge"):
            flow.inv(y)  # solved (and reported) again, not served silently
        flow.on_failure = "raise"
        with pytest.raises(NonConvergenceError):
            flow.inv(y)
        flow.on_failure, flow.inverse_tol = "warn", None
        x = flow.inv(y)
        assert flow.last_inverse.all_converged and flow.inv(y) is x


@pytest.mark.float64
def test_stochastic_logdet_warns_once_per_setting_and_says_what_to_change():
    flow = cpflow(8, hidden_dims=(16, 16), logdet="stochastic", cg_max_iter=1)
    _randomize(flow, scale=1.0)
    x = 3 * torch.randn(16, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            flow.log_abs_det_jacobian(x, flow(x))
            flow.clear_cache()
        flow.cg_max_iter = 2  # a new setting: a new warning
        flow.log_abs_det_jacobian(x, flow(x))
    messages = [str(w.message) for w in caught if issubclass(w.category, NonConvergenceWarning)]
    assert len(messages) == 2, messages
    assert "raise cg_max_iter (now 1)" in messages[0] and "warned once" in messages[0]
    assert not flow.diagnostics.cg.converged.all()  # the reports keep every miss
    flow.on_failure = "raise"
    with pytest.raises(NonConvergenceError, match="CG of the stochastic log-det"):
        flow.log_abs_det_jacobian(x, flow(x))


@pytest.mark.float64
@pytest.mark.parametrize("logdet", LOGDET_MODES)
def test_nan_with_validation_off_is_called_nan(logdet):
    """Nothing checks values with validation off, but a failure must then name the NaN,
    not positive definiteness or CG iteration caps."""
    flow = cpflow(D, hidden_dims=(8, 8), logdet=logdet)
    bad = torch.tensor([[0.0, float("nan"), 0.0], [1.0, 2.0, 3.0]])
    with pyro.validation_enabled(False):
        if logdet == "exact":
            with pytest.raises(ValueError, match=r"x contains NaN or Inf in 1 of 2 samples") as error:
                flow.log_abs_det_jacobian(bad, flow(bad))
            assert "positive definite" not in str(error.value)
        else:
            with pytest.warns(NonConvergenceWarning, match="x contains NaN or Inf") as caught:
                logdet_value = flow.log_abs_det_jacobian(bad, flow(bad))
            assert "cg_max_iter" not in str(caught[0].message)
            assert torch.isnan(logdet_value[0]) and torch.isfinite(logdet_value[1])
        with torch.no_grad():
            next(flow.parameters()).fill_(float("nan"))
        flow.logdet = "exact"
        good = torch.randn(2, D)
        with pytest.raises(ValueError, match=r"the flow's parameters \[.*\] contain NaN or Inf"):
            flow.log_abs_det_jacobian(good, flow(good))


@pytest.mark.float64
def test_non_tensor_and_integer_arguments_get_clear_errors():
    cflow = conditional_cpflow(D, C, **SMALL)
    with pytest.raises(TypeError, match="context must be a tensor, got list"):
        cflow.condition([0.0, 0.0])
    with pytest.raises(ValueError, match="context has dtype torch.int64"):
        cflow.condition(torch.zeros(C, dtype=torch.long))
    flow = cpflow(D, **SMALL)
    with pytest.raises(ValueError, match="y has dtype torch.int64"):
        flow.inv(torch.zeros(2, D, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a tensor, got float"):
        flow.log_abs_det_jacobian(1.0, torch.zeros(D))
