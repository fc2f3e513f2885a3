"""What the generic transform suite does not cover of the block-triangular flow: its structure
and its argument checks."""

import pytest
import torch

from pyro_cpflow import BlockTriangularCPFlow, block_triangular_cpflow, conditional_cpflow, cpflow

pytestmark = pytest.mark.float64


def test_each_group_depends_only_on_itself_and_the_groups_before():
    torch.manual_seed(0)
    flow = block_triangular_cpflow([2, 1, 3], hidden_dims=(8, 8))
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    x = torch.randn(6)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], x)
    upper = torch.ones(6, 6, dtype=torch.bool).triu(1)
    blocks = torch.zeros(6, 6, dtype=torch.bool)
    for start, size in [(0, 2), (2, 1), (3, 3)]:
        blocks[start : start + size, start : start + size] = True
    assert jacobian[upper & ~blocks].abs().max() == 0  # nothing flows back to an earlier group
    assert jacobian[~upper & ~blocks].abs().max() > 1e-3  # later groups follow earlier ones
    for start, size in [(0, 2), (2, 1), (3, 3)]:  # each diagonal block is a Hessian: symmetric PD
        block = jacobian[start : start + size, start : start + size]
        assert torch.allclose(block, block.T, atol=1e-12)
        assert float(torch.linalg.eigvalsh(block).min()) > 0


def test_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="sizes"):
        block_triangular_cpflow([])
    with pytest.raises(ValueError, match="sizes"):
        block_triangular_cpflow([2, 0])
    with pytest.raises(TypeError, match="first must be a CPFlow"):
        BlockTriangularCPFlow(conditional_cpflow(2, 1), [])
    with pytest.raises(ValueError, match=r"rest\[0\] takes a context of dimension 3.*have 2"):
        BlockTriangularCPFlow(cpflow(2), [conditional_cpflow(2, 3)])
    with pytest.raises(ValueError, match=r"hidden_dims=\(\) leaves only the quadratic"):
        conditional_cpflow(2, 1, hidden_dims=())
    flow = block_triangular_cpflow([1, 2], hidden_dims=(8,))
    with pytest.raises(ValueError, match="x"):
        flow(torch.randn(4, 2))
