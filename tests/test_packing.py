"""Packed parameters: one tensor for the optimiser, named entries for the state dict."""

import copy
import io

import pyro
import pytest
import torch

from pyro_cpflow import cpflow
from pyro_cpflow.packing import PackedParameters


def _state(flow):
    return {k: v.clone() for k, v in flow.state_dict().items()}


def test_a_flow_has_two_parameter_tensors_and_named_state():
    flow = cpflow(4, hidden_dims=(8, 6))
    names = [name for name, _ in flow.named_parameters()]
    assert names == ["potential.packed", "potential.network.packed"]
    state = flow.state_dict()
    assert "potential.network.first.weight" in state and "potential.factor" in state
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in flow.parameters())


def test_views_share_the_packed_storage_and_follow_updates():
    flow = cpflow(3, hidden_dims=(8,))
    potential = flow.potential
    with torch.no_grad():
        potential.factor.fill_(0.5)  # an in-place edit of a view edits the parameter
        potential.packed.add_(1.0)  # and an update of the parameter shows in every view
    assert torch.equal(potential.factor, torch.full((3, 3), 1.5))
    assert torch.equal(
        potential.network.unpacked()["first.bias"], potential.network.state_dict()["first.bias"]
    )


def test_state_dict_round_trip_through_weights_only_load():
    torch.manual_seed(0)
    flow = cpflow(3, hidden_dims=(8, 8))
    x = torch.randn(5, 3)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    fresh = cpflow(3, hidden_dims=(8, 8))
    assert not torch.allclose(fresh(x), flow(x))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), flow(x))


def test_loading_reports_missing_unexpected_and_misshaped_entries():
    flow = cpflow(3, hidden_dims=(8,))
    state = _state(flow)
    del state["potential.network.first.bias"]
    state["potential.network.spurious"] = torch.zeros(1)
    result = flow.load_state_dict(state, strict=False)
    assert result.missing_keys == ["potential.network.first.bias"]
    assert result.unexpected_keys == ["potential.network.spurious"]
    with pytest.raises(RuntimeError, match="first.bias"):
        flow.load_state_dict(state)
    state = _state(flow)
    state["potential.factor"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="size mismatch for potential.factor"):
        flow.load_state_dict(state)


def test_dtype_conversion_copy_and_param_store_round_trip(tmp_path):
    torch.manual_seed(0)
    flow = cpflow(3, hidden_dims=(8,)).float()
    x = torch.randn(4, 3, dtype=torch.float64)
    double = copy.deepcopy(flow).to(torch.float64)
    assert double.potential.factor.dtype == torch.float64
    assert flow.potential.network.unpacked()["first.weight"].dtype == torch.float32
    assert torch.allclose(double(x), flow(x.float()).double(), atol=1e-4)
    pyro.clear_param_store()
    pyro.module("flow", double)
    pyro.get_param_store().save(tmp_path / "params.pt")
    expected = double(x)
    with torch.no_grad():
        double.potential.packed.zero_()
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    pyro.module("flow", double, update_module_params=True)
    assert torch.equal(double(x), expected)


def test_packing_validates_its_names():
    class Bad(PackedParameters):
        def __init__(self):
            super().__init__()
            self.child = torch.nn.Linear(1, 1)
            self.pack({"child.weight": torch.zeros(1)})

    with pytest.raises(ValueError, match="clash with child modules"):
        Bad()


def test_a_compiled_training_loss_leaves_the_parameters_alone_and_equals_the_eager_one():
    """``torch.compile`` of a loss on the flow (its views cut by ``narrow`` when compiling): the
    parameters are unchanged by compiled forward and backward passes, which wrote the scale's
    softplus into the packed tensor when the views came from ``split``, and the compiled loss
    and gradients equal the eager ones."""
    torch.manual_seed(0)
    flow = cpflow(3, hidden_dims=(8, 8), logdet="exact").double()
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss(rows):
        y = flow(rows)
        value = (0.5 * (y * y).sum(-1) - flow.log_abs_det_jacobian(rows, y)).mean()
        flow.clear_cache()
        return value

    def step(fn):
        flow.zero_grad(set_to_none=True)
        value = fn(x)
        value.backward()
        return value.detach(), [p.grad.clone() for p in flow.parameters()]

    before = _state(flow)
    eager_value, eager_grads = step(loss)
    compiled = torch.compile(loss)
    for _ in range(2):
        compiled_value, compiled_grads = step(compiled)
        after = _state(flow)
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert torch.allclose(compiled_value, eager_value, atol=1e-12, rtol=0)
        for ours, theirs in zip(compiled_grads, eager_grads, strict=True):
            assert torch.allclose(ours, theirs, atol=1e-10, rtol=1e-10)
