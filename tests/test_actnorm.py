"""ActNorm: initialisation that a bad batch cannot poison, from one row, and that survives reloading."""

import io

import pyro
import pytest
import torch

from pyro_cpflow import ActNorm, cpflow_stack

pytestmark = pytest.mark.float64  # tolerances of float64, whatever --dtype says

D = 3
NAN_ROW = [0.0, float("nan"), 1.0]


@pytest.mark.parametrize("validation", [True, False])
def test_nan_batch_is_rejected_before_initialising(validation):
    stack = cpflow_stack(D, num_blocks=2, hidden_dims=(8, 8), actnorm="around", logdet="exact")
    bad = torch.randn(10, D)
    bad[3] = torch.tensor(NAN_ROW)
    with pyro.validation_enabled(validation):
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            stack(bad)
        assert not stack[0].is_initialized()
        clean = 2 + 3 * torch.randn(100, D)
        y = stack(clean)
        assert torch.isfinite(y).all()
        assert torch.allclose(stack[0].loc, clean.mean(0))


def test_nan_after_initialisation_follows_validation():
    norm = ActNorm(D)
    norm(torch.randn(10, D))
    bad = torch.tensor([NAN_ROW])
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        norm(bad)
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        norm.inv(bad.clone())
    with pyro.validation_enabled(False):
        assert torch.isnan(norm(bad.clone())).any()


def test_bad_arguments_get_clear_errors():
    norm = ActNorm(D)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        norm(torch.randn(4, D, dtype=torch.float32))
    with pytest.raises(TypeError, match="x must be a tensor"):
        norm([[0.0] * D])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        norm(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="no rows"):
        norm(torch.randn(0, D))
    assert not norm.is_initialized()


def test_one_row_sets_the_location_and_keeps_unit_scale():
    for direction in ("forward", "inverse"):
        norm = ActNorm(D)
        row = torch.randn(1, D)
        out = norm(row) if direction == "forward" else norm.inv(row)
        assert torch.allclose(out, torch.zeros(1, D))
        assert torch.equal(norm.log_scale.detach(), torch.zeros(D))
        assert norm.is_initialized()


def test_parameters_set_from_outside_count_as_initialised():
    norm = ActNorm(D)
    with torch.no_grad():
        norm.loc.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(20, D)
    assert torch.allclose(norm(x), x - torch.tensor([1.0, 2.0, 3.0]))
    assert bool(norm.initialized)  # and the flag now says so, for state_dict
    replaced = ActNorm(D)
    replaced._parameters["log_scale"] = torch.nn.Parameter(torch.full((D,), 0.5))
    assert torch.allclose(replaced(x), x * torch.exp(torch.tensor(-0.5)))
    # converting the dtype or device is not setting: the first batch still initialises
    converted = ActNorm(D).float().double()
    assert torch.allclose(converted(x).mean(0), torch.zeros(D), atol=1e-12)


def _trained_stack(seed):
    torch.manual_seed(seed)
    stack = cpflow_stack(D, num_blocks=2, hidden_dims=(8, 8), actnorm="around", logdet="exact")
    with torch.no_grad():
        stack(5 * torch.randn(64, D) + 2)
        for p in stack.parameters():
            p.add_(0.1 * torch.randn_like(p))  # as if trained further
    return stack


def test_state_survives_pyro_param_store_round_trip(tmp_path):
    """The param store holds parameters, not buffers: reloaded ActNorms must not re-initialise."""
    trained = _trained_stack(0)
    x = torch.randn(10, D)
    with torch.no_grad():
        expected = trained(x)
    pyro.clear_param_store()
    pyro.module("stack", trained)
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    torch.manual_seed(1)
    fresh = cpflow_stack(D, num_blocks=2, hidden_dims=(8, 8), actnorm="around", logdet="exact")
    pyro.get_param_store().load(path)
    pyro.module("stack", fresh, update_module_params=True)
    with torch.no_grad():
        assert torch.allclose(fresh(x), expected, atol=1e-12)  # the first call does not initialise
    assert all(bool(part.initialized) for part in fresh if isinstance(part, ActNorm))
    pyro.clear_param_store()


def test_state_survives_state_dict_and_torch_load_weights_only():
    trained = _trained_stack(0)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = cpflow_stack(D, num_blocks=2, hidden_dims=(8, 8), actnorm="around", logdet="exact")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(10, D)
    with torch.no_grad():
        assert torch.allclose(fresh(x), trained(x), atol=1e-12)
    # an uninitialised state loads as uninitialised: the next batch initialises
    norm = fresh[0]
    norm.load_state_dict(ActNorm(D).state_dict())
    data = 4 * torch.randn(50, D) + 1
    assert torch.allclose(norm(data).mean(0), torch.zeros(D), atol=1e-12)


def test_with_cache_views_share_the_initialisation():
    norm = ActNorm(D)
    view = norm.with_cache(0)
    view(torch.randn(10, D) + 3)
    assert norm.is_initialized()
    norm.forget_initialization()
    assert not view.is_initialized()
