"""The core checks on the device given by ``--device`` (cpu by default, e.g. ``--device cuda``;
the ``device`` fixture skips when CUDA is asked for and absent), in both dtypes."""

import pyro.distributions as dist
import pytest
import torch

from pyro_cpflow import conditional_cpflow, cpflow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flow_on_device(device, dtype):
    flow = cpflow(3, hidden_dims=(16, 16), logdet="exact").to(device=device, dtype=dtype)
    x = torch.randn(8, 3, device=device, dtype=dtype)
    y = flow(x)
    assert y.device.type == device.type and y.dtype == dtype
    jacobian = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: flow._call(v[None])[0], xi) for xi in x]
    )
    tolerance = 1e-8 if dtype == torch.float64 else 1e-3
    assert torch.allclose(flow.log_abs_det_jacobian(x, y), torch.linalg.slogdet(jacobian)[1], atol=tolerance)
    flow.clear_cache()
    assert torch.allclose(flow.inv(y), x, atol=tolerance)
    flow.logdet = "stochastic"
    base = dist.Normal(torch.zeros(3, device=device, dtype=dtype), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    z = q.rsample((16,))
    loss = (z**2).sum(-1).mean() + q.log_prob(z).mean()  # a reverse KL to N(0, I)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())


def test_conditional_flow_on_device(device, dtype):
    """In the ``--dtype`` of the session (float64 unless given)."""
    assert torch.get_default_dtype() == dtype
    flow = conditional_cpflow(2, 4, hidden_dims=(8, 8)).to(device)
    context = torch.randn(5, 4, device=device)
    transform = flow.condition(context)
    x = torch.randn(5, 2, device=device)
    y = transform(x).detach().clone()
    assert y.device.type == device.type and y.dtype == dtype
    tolerance = 1e-8 if dtype == torch.float64 else 1e-4
    assert torch.allclose(transform.inv(y), x, atol=tolerance)
