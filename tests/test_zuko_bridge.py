"""CP-Flow inside zuko (pyro_cpflow.zuko_bridge): densities, round trips, one potential
evaluation per call_and_ladj, conditioning, training, gradients and errors."""

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch

zuko = pytest.importorskip("zuko")

from pyro_cpflow import conditional_cpflow, cpflow  # noqa: E402  (after the zuko skip)
from pyro_cpflow.zuko_bridge import CPF, ConvexPotentialTransform, ZukoCPFlow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = (8, 8)


def _standard_normal(d):
    return zuko.lazy.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(d), torch.ones(d), buffer=True
    )


def _perturb(module, std=0.3):
    """Move the parameters off their near-identity start, so that every term matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def _exact_log_prob(transform, x):
    """log N(f(x); 0, I) + log|det J_f(x)|, the Jacobian by autograd, row by row."""
    rows = []
    for row in x.reshape(-1, x.shape[-1]):
        jacobian = torch.autograd.functional.jacobian(lambda v: transform(v.unsqueeze(0)).squeeze(0), row)
        z = transform(row.unsqueeze(0)).squeeze(0)
        base = -0.5 * (z**2).sum() - 0.5 * len(z) * math.log(2 * math.pi)
        rows.append(base + torch.linalg.slogdet(jacobian)[1])
    return torch.stack(rows).reshape(x.shape[:-1])


def _count_evaluations(flow, monkeypatch):
    calls = []
    evaluate = flow.potential.evaluate

    def counted(*args, **kwargs):
        calls.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(flow.potential, "evaluate", counted)
    return calls


@pytest.mark.parametrize("d", [2, 3])
def test_log_prob_matches_pyro_and_autograd_jacobian(d):
    lazy = ZukoCPFlow(d, hidden_features=HIDDEN, logdet="exact")
    _perturb(lazy)
    flow = zuko.lazy.Flow(lazy, _standard_normal(d))
    x = 1.5 * torch.randn(6, d)
    ours = flow().log_prob(x)
    base = dist.Normal(torch.zeros(d), 1.0).to_event(1)
    pyro_log_prob = dist.TransformedDistribution(base, [lazy.flow.inv]).log_prob(x)
    assert ours.shape == (6,)
    assert torch.allclose(ours, pyro_log_prob, atol=1e-12, rtol=0)
    assert torch.allclose(ours, _exact_log_prob(lazy.flow, x), atol=1e-10, rtol=0)


def test_stochastic_logdet_mode_is_used_and_close():
    """The block's ``logdet`` option holds inside zuko: in the stochastic mode (training in
    larger d) the log-density is an estimate, close to the exact one (measured within 2e-3
    here) but not equal to it."""
    lazy = ZukoCPFlow(3, hidden_features=HIDDEN, logdet="stochastic", num_probes=64)
    _perturb(lazy, 0.1)
    x = torch.randn(4, 3)
    estimate = zuko.lazy.Flow(lazy, _standard_normal(3))().log_prob(x)
    exact = _exact_log_prob(lazy.flow, x)
    assert torch.allclose(estimate, exact, atol=0.02, rtol=0)
    assert not torch.allclose(estimate, exact, atol=1e-8, rtol=0)
    assert lazy.flow.diagnostics.cg is not None  # the CG report of the estimate


def test_sample_and_rsample_round_trip():
    lazy = _perturb(ZukoCPFlow(2, hidden_features=HIDDEN, logdet="exact"))
    flow = zuko.lazy.Flow(lazy, _standard_normal(2))
    torch.manual_seed(1)
    z = flow().base.rsample((50,))  # the draws behind sample and rsample
    torch.manual_seed(1)
    x = flow().sample((50,))
    assert x.shape == (50, 2) and not x.requires_grad
    assert not torch.allclose(x, z, atol=1e-2)  # the flow is not the identity
    # a fresh tensor, so that the flow's cached pair (x, z) cannot answer
    assert torch.allclose(lazy.flow(x.clone()), z, atol=1e-10, rtol=0)
    assert bool(lazy.flow.diagnostics.inverse.all_converged)
    torch.manual_seed(2)
    z = flow().base.rsample((7,))
    torch.manual_seed(2)
    xr = flow().rsample((7,))
    assert xr.requires_grad  # implicit gradients through the solver
    assert torch.allclose(lazy.flow(xr.detach().clone()), z, atol=1e-10, rtol=0)
    x, log_prob = flow().rsample_and_log_prob((5,))
    assert torch.allclose(log_prob, flow().log_prob(x.detach().clone()), atol=1e-10, rtol=0)


def test_call_and_ladj_is_one_evaluation_and_equals_separate_calls(monkeypatch):
    lazy = _perturb(ZukoCPFlow(3, hidden_features=HIDDEN, logdet="exact"))
    x = torch.randn(5, 3)
    y_separate = lazy.flow(x.clone())
    ladj_separate = lazy.flow.log_abs_det_jacobian(x.clone(), y_separate)  # fresh tensor: evaluates again
    calls = _count_evaluations(lazy.flow, monkeypatch)
    transform = lazy()
    assert isinstance(transform, ConvexPotentialTransform)
    y, ladj = transform.call_and_ladj(x)
    assert len(calls) == 1
    assert torch.allclose(y, y_separate, atol=1e-14) and torch.allclose(ladj, ladj_separate, atol=1e-12)
    assert ladj.shape == (5,)
    assert torch.allclose(transform.log_abs_det_jacobian(x, y), ladj)
    assert torch.allclose(transform.inv(y.clone()), x, atol=1e-10)  # a solve, not the cache


def test_conditional_flow_with_context(monkeypatch):
    lazy = _perturb(ZukoCPFlow(3, context=2, hidden_features=HIDDEN, logdet="exact"))
    assert (lazy.features, lazy.context) == (3, 2)
    flow = zuko.lazy.Flow(lazy, _standard_normal(3))
    c = torch.randn(5, 2)
    x = torch.randn(5, 3)
    ours = flow(c).log_prob(x)
    base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    pyro_log_prob = dist.TransformedDistribution(base, [lazy.flow.condition(c).inv]).log_prob(x)
    assert torch.allclose(ours, pyro_log_prob, atol=1e-12, rtol=0)
    for i in range(5):  # row i against the map conditioned on c[i] alone
        single = _exact_log_prob(lazy.flow.condition(c[i]), x[i : i + 1])
        assert torch.allclose(ours[i : i + 1], single, atol=1e-10, rtol=0)
    # the context changes the density
    assert not torch.allclose(ours, flow(torch.randn(5, 2)).log_prob(x))
    # sampling broadcasts (sample, batch) against the context
    samples = flow(c).sample((4,))
    assert samples.shape == (4, 5, 3)
    z = lazy(c)(samples)
    assert torch.allclose(lazy(c).inv(z), samples, atol=1e-10)
    # one evaluation per call_and_ladj here too
    calls = _count_evaluations(lazy.flow, monkeypatch)
    lazy(c).call_and_ladj(x)
    assert len(calls) == 1


def test_composes_with_zuko_transforms_in_a_conditional_flow():
    blocks = [
        ZukoCPFlow(2, hidden_features=HIDDEN, logdet="exact"),  # unconditional: c is ignored
        zuko.flows.MaskedAutoregressiveTransform(2, context=3, hidden_features=(8,)),
        ZukoCPFlow(2, context=3, hidden_features=HIDDEN, logdet="exact"),
    ]
    flow = zuko.lazy.Flow(blocks, _standard_normal(2))
    c = torch.randn(3)
    x = flow(c).sample((6,))
    log_prob = flow(c).log_prob(x)
    assert log_prob.shape == (6,) and bool(torch.isfinite(log_prob).all())
    z = flow(c).transform(x)
    assert torch.allclose(flow(c).transform.inv(z), x, atol=1e-8)


def test_short_training_lowers_the_nll_of_an_anisotropic_gaussian():
    torch.manual_seed(0)
    scale = torch.tensor([[1.5, 0.0], [1.2, 0.4]])
    data = torch.randn(256, 2) @ scale.T + torch.tensor([1.0, -0.5])
    target = dist.MultivariateNormal(torch.tensor([1.0, -0.5]), scale_tril=scale)
    optimum = -target.log_prob(data).mean().item()  # the NLL of the data's own law
    flow = CPF(2, hidden_features=HIDDEN, logdet="exact")
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-2)
    with torch.no_grad():
        start = -flow().log_prob(data).mean().item()
    for _ in range(100):
        loss = -flow().log_prob(data).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = -flow().log_prob(data).mean().item()
    # from about 4.3 nats to within 0.1 of the NLL under the data's own law (measured: 0.03 below it)
    assert start - end > 1.5, (start, end, optimum)
    assert end < optimum + 0.1, (start, end, optimum)


@pytest.mark.parametrize("context", [0, 2])
def test_gradients_reach_every_parameter(context):
    flow = CPF(2, context=context, hidden_features=HIDDEN, logdet="exact")
    _perturb(flow.transform, 0.1)
    c = torch.randn(4, 2, requires_grad=True) if context else None
    x = torch.randn(4, 2)
    loss = -flow(c).log_prob(x).mean() - flow(c).rsample().sum()
    loss.backward()
    named = list(flow.transform.named_parameters())
    assert named
    for name, p in named:
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    if context:
        assert c.grad is not None and bool(c.grad.abs().sum() > 0)


def test_from_flow_shares_parameters():
    block = cpflow(2, hidden_dims=HIDDEN)
    lazy = ZukoCPFlow.from_flow(block)
    assert lazy.flow is block and list(lazy.parameters()) == list(block.parameters())
    conditional = ZukoCPFlow.from_flow(conditional_cpflow(2, 4, hidden_dims=HIDDEN))
    assert conditional.context == 4
    assert conditional(torch.randn(4))(torch.randn(3, 2)).shape == (3, 2)


def test_bad_arguments_name_the_argument():
    conditional = ZukoCPFlow(2, context=3, hidden_features=HIDDEN)
    with pytest.raises(ValueError, match=r"c is required.*\(\.\.\., 3\)"):
        conditional()
    with pytest.raises(ValueError, match=r"c must have shape \(\.\.\., 3\), got \(5, 4\)"):
        conditional(torch.randn(5, 4))
    with pytest.raises(TypeError, match="c must be a tensor"):
        conditional([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="c has dtype torch.float32"):
        conditional(torch.randn(3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"context of shape \(5, 3\) does not broadcast with x"):
        conditional(torch.randn(5, 3))(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        ZukoCPFlow(2, hidden_features=HIDDEN)()(torch.randn(4, 3))
    with pytest.raises(ValueError, match="features must be at least 1"):
        ZukoCPFlow(0)
    with pytest.raises(TypeError, match="context must be an int"):
        ZukoCPFlow(2, context=2.0)
    with pytest.raises(ValueError, match="transforms must be at least 1"):
        CPF(2, transforms=0)
    with pytest.raises(TypeError, match="flow must be a CPFlow or a ConditionalCPFlow"):
        ZukoCPFlow.from_flow(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="flow must be a CPFlow or a ConditionedCPFlow"):
        ConvexPotentialTransform(conditional.flow)


def test_eval_mode_and_options_reach_the_block():
    flow = CPF(2, hidden_features=HIDDEN)
    block = flow.transform.transforms[0].flow
    flow.eval()
    assert not block.training
    block.logdet = "stochastic"
    assert flow.transform.transforms[0]().flow.options.logdet == "stochastic"


def test_without_zuko_the_bridge_says_what_to_install(monkeypatch):
    """In process, quick: with zuko blocked, importing the bridge names the extra to install
    (the subprocess test below also checks ``import pyro_cpflow`` and the doctest collection)."""
    for name in [n for n in sys.modules if n == "zuko" or n.startswith("zuko.")]:
        monkeypatch.setitem(sys.modules, name, None)  # imported submodules would still be found
    monkeypatch.delitem(sys.modules, "pyro_cpflow.zuko_bridge", raising=False)
    with pytest.raises(ImportError, match=re.escape("pip install pyro-cpflow[zuko]")):
        importlib.import_module("pyro_cpflow.zuko_bridge")


@pytest.mark.slow  # a subprocess that imports torch and collects the package: about 20 s
def test_without_zuko_the_package_imports_and_the_bridge_says_what_to_install():
    """zuko blocked from importing (sys.modules entry None): ``import pyro_cpflow`` works, the
    bridge raises an ImportError naming the extra, and pytest's collection of the package
    (its doctests) leaves the bridge out instead of erroring."""
    script = (
        "import sys\n"
        "sys.modules['zuko'] = None\n"
        "import pyro_cpflow\n"
        "try:\n"
        "    import pyro_cpflow.zuko_bridge\n"
        "except ImportError as error:\n"
        "    assert 'pip install pyro-cpflow[zuko]' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('the bridge imported without zuko')\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:xdist', '-p', 'no:cacheprovider',\n"
        "                      '--collect-only', 'pyro_cpflow']))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "zuko_bridge" not in run.stdout
    assert "pyro_cpflow/transforms.py" in run.stdout  # the other doctests are still collected
