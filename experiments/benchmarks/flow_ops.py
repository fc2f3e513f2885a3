r"""What one training step of a flow costs in tensor operations: why a CP-Flow guide costs more
per SVI step than Pyro's IAF on small models.

On the models of the guide panel every tensor is tiny (4 particles, 2 to 31 latents), so a
step costs what its operations cost to dispatch, a few microseconds each, whatever their
size. This script counts the ATen operations (every one PyTorch dispatches, views included)
of one step ``y = f(x); l = log|det J_f(x)|; (y.sum() + l.sum()).backward()`` (what an SVI
step asks of a guide's flow: sample, score, differentiate) and times it, for:

* ``affine_autoregressive(d)``: the transform of Pyro's ``AutoIAFNormal`` (its defaults);
* ``cpflow(d, hidden_dims=(64, 64))``: one CP-Flow block, exact log-det (the mode ``auto``
  takes here): the network, its gradient by the backward sweep, its Hessian by forward
  Jacobian propagation, a Cholesky factorisation, and the backward pass of all of them;
  and the same block with one hidden layer of 128 (``AutoCPFlow``'s default network);
* ``block_triangular_cpflow([2, 8])``: the eight-schools structure of ``AutoCPFlow``, with
  two layers of 64 (the former default) and its conditional local block or the Gaussian one
  (``local_hidden_dims=()``), and with one layer of 128 (the default).

Times are the fastest of ``--rounds`` rounds that step every flow in turn (so the machine's
drift meets each alike), each round ``--steps`` steps. The count does not depend on the
dimension: the CP-Flow's operations are the same at ``d = 2`` and ``d = 31``, the cost per
step too until the matrices grow.

How to run
----------
::

    .venv/bin/python -m experiments.benchmarks.flow_ops          # about 30 s
    .venv/bin/python -m experiments.benchmarks.flow_ops --quick

Results go to ``experiments/benchmarks/results/flow_ops.json`` (``--out``) and ``.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.transforms import affine_autoregressive
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.benchmarks.timing import base_parser, machine_summary, save_results, setup
from experiments.common import markdown_table, positive
from pyro_cpflow import cpflow
from pyro_cpflow.factories import block_triangular_cpflow


class OperationCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active.

    >>> with OperationCounter() as counter:
    ...     _ = torch.ones(3) * 2
    >>> counter.count
    2
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def training_step(flow: Any, x: Tensor) -> None:
    """Sample, score and differentiate: ``y = f(x)``, its log-det, one backward pass."""
    y = flow(x)
    logdet = flow.log_abs_det_jacobian(x, y)
    (y.sum() + logdet.sum()).backward()
    flow.clear_cache()


def operations_per_step(flow: Any, x: Tensor) -> int:
    """ATen operations of one :func:`training_step` (after two untimed ones)."""
    for _ in range(2):
        training_step(flow, x)
    with OperationCounter() as counter:
        training_step(flow, x)
    return counter.count


def fastest_times(steps: dict[str, Callable[[], None]], rounds: int, per_round: int) -> dict[str, float]:
    """Seconds per call of each function: the fastest of ``rounds`` rounds that run each in turn."""
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(3):
                step()
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / per_round)
    return best


def flows() -> dict[str, tuple[Any, int]]:
    """The flows compared, each with its dimension."""
    cases: dict[str, tuple[Any, int]] = {}
    for d in (10, 31):
        cases[f"Pyro IAF, d = {d}"] = affine_autoregressive(d), d
    for d in (2, 10, 31):
        cases[f"CP-Flow block, d = {d}"] = cpflow(d, hidden_dims=(64, 64), logdet="exact"), d
    for d in (10, 31):
        cases[f"CP-Flow block, one layer of 128, d = {d}"] = cpflow(d, hidden_dims=(128,), logdet="exact"), d
    cases["AutoCPFlow hierarchical [2, 8], two layers of 64"] = (
        block_triangular_cpflow([2, 8], hidden_dims=(64, 64)),
        10,
    )
    cases["AutoCPFlow hierarchical [2, 8], Gaussian local block"] = (
        block_triangular_cpflow([2, 8], hidden_dims=(64, 64), local_hidden_dims=()),
        10,
    )
    cases["AutoCPFlow hierarchical [2, 8], one layer of 128 (the default)"] = (
        block_triangular_cpflow([2, 8], hidden_dims=(128,)),
        10,
    )
    return cases


def main() -> None:
    started = time.perf_counter()
    parser = base_parser(__file__, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=positive(int), default=4, help="rows of x: the panel's particles (default 4)"
    )
    parser.add_argument("--rounds", type=positive(int), default=5, help="timing rounds (default 5)")
    parser.add_argument("--steps", type=positive(int), default=200, help="steps per round (default 200)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 5
    device = setup(args)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cases = flows()
        inputs = {name: torch.randn(args.rows, d) for name, (_, d) in cases.items()}
        counts = {name: operations_per_step(flow, inputs[name]) for name, (flow, _) in cases.items()}
        steps = {
            name: (lambda f=flow, x=inputs[name]: training_step(f, x)) for name, (flow, _) in cases.items()
        }
        seconds = fastest_times(steps, args.rounds, args.steps)
    finally:
        torch.set_default_dtype(previous)
    iaf = "Pyro IAF, d = 10"
    rows, records = [], []
    for name in cases:
        microseconds = 1e6 * seconds[name]
        rows.append(
            [
                name,
                counts[name],
                f"{counts[name] / counts[iaf]:.1f}",
                f"{microseconds:.0f}",
                f"{seconds[name] / seconds[iaf]:.1f}",
                f"{microseconds / counts[name]:.1f}",
            ]
        )
        records.append({"flow": name, "operations": counts[name], "seconds": seconds[name]})
    markdown = (
        "# Operations and time of one flow training step (sample, log-det, backward)\n\n"
        f"{machine_summary(device)}; float64, {args.rows} rows; fastest of {args.rounds} rounds of "
        f"{args.steps} steps, the flows in turn.\n\n"
        + markdown_table(
            [
                "flow",
                "ATen operations",
                "operations / IAF's (d = 10)",
                "µs / step",
                "time / IAF's (d = 10)",
                "µs / operation",
            ],
            rows,
        )
    )
    print(markdown)
    save_results(args.out, {"rows": args.rows, "flows": records}, markdown, device, args, started)


if __name__ == "__main__":
    main()
