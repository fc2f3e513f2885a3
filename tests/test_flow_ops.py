"""The operation-count benchmark: its counter counts what runs, and its claims hold on the flows."""

import json
import sys

import pytest
import torch
from pyro.distributions.transforms import affine_autoregressive

from experiments.benchmarks import flow_ops
from pyro_cpflow import cpflow

pytestmark = pytest.mark.float64  # the flows are built in the default dtype


def test_the_counter_counts_every_dispatched_operation():
    x = torch.ones(3, requires_grad=True)
    with flow_ops.OperationCounter() as counter:
        y = (x * 2).sum()
    forward = counter.count
    assert forward == 2  # mul, sum
    with flow_ops.OperationCounter() as counter:
        y.backward()
    assert counter.count > 0 and torch.equal(x.grad, torch.full((3,), 2.0))


def test_a_cpflow_step_has_as_many_operations_at_every_dimension_and_more_than_an_iaf():
    counts = {
        d: flow_ops.operations_per_step(cpflow(d, hidden_dims=(8, 8), logdet="exact"), torch.randn(4, d))
        for d in (2, 5)
    }
    iaf = flow_ops.operations_per_step(affine_autoregressive(5), torch.randn(4, 5))
    assert counts[2] == counts[5] > 3 * iaf


def test_quick_run_writes_a_table_for_every_flow(tmp_path, monkeypatch):
    out = tmp_path / "flow_ops.json"
    monkeypatch.setattr(sys, "argv", ["flow_ops", "--quick", "--out", str(out)])
    flow_ops.main()
    records = json.loads(out.read_text())["flows"]
    assert {r["flow"] for r in records} == set(flow_ops.flows())
    assert all(r["operations"] > 0 and r["seconds"] > 0 for r in records)


@pytest.mark.parametrize("option", ["--rows", "--rounds", "--steps"])
def test_a_count_that_is_not_positive_is_refused_by_name(option, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flow_ops", option, "0"])
    with pytest.raises(SystemExit) as exit_:
        flow_ops.main()
    assert exit_.value.code == 2
    assert f"argument {option}: must be positive, got 0" in capsys.readouterr().err
