r"""What a parameter tensor costs Pyro's optimiser per step, whatever its size.

:class:`pyro.optim.PyroOptim` keeps one torch optimiser per parameter tensor and steps them
one by one, so a module's SVI step pays a fixed cost per tensor on top of the arithmetic.
This script times ``pyro.optim.Adam`` (and ``ClippedAdam``) stepping the same number of
scalars split into 1, 2, 4 (Pyro's IAF of a 31-d latent) and 11 (a CP-Flow block before
its parameters were packed, :mod:`pyro_cpflow.packing`) tensors, and a packed CP-Flow
block itself, on one thread.

How to run
----------
::

    .venv/bin/python -m experiments.benchmarks.optimizer_overhead          # about 20 s
    .venv/bin/python -m experiments.benchmarks.optimizer_overhead --quick

Results go to ``experiments/benchmarks/results/optimizer_overhead.json`` (``--out``) and ``.md``.
"""

from __future__ import annotations

import time

import pyro
import torch

from experiments.benchmarks.timing import (
    base_parser,
    machine_summary,
    save_results,
    setup,
    time_call,
)
from experiments.common import markdown_table
from pyro_cpflow import cpflow

SCALARS = 31 * 64 * 2 + 64 * 2 + 31 * 31
"""About the size of a CP-Flow block on a 31-d latent with hidden (64, 64)."""


def step_time(tensors: list[torch.Tensor], optimiser: str, device: torch.device, repeats: int) -> float:
    """Median seconds of one optimiser step over ``tensors`` (gradients set once)."""
    pyro.clear_param_store()
    params = [pyro.param(f"p{i}", t.clone().requires_grad_()) for i, t in enumerate(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    optim = getattr(pyro.optim, optimiser)({"lr": 1e-3})
    timing, _ = time_call(lambda: optim(params), device, warmup=5, repeats=repeats)
    return timing.median_s


def split(total: int, pieces: int) -> list[torch.Tensor]:
    sizes = [total // pieces + (1 if i < total % pieces else 0) for i in range(pieces)]
    return [torch.randn(size, dtype=torch.float64) for size in sizes]


def main() -> None:
    started = time.perf_counter()
    parser = base_parser(__file__, __doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    device = setup(args)
    repeats = 20 if args.quick else args.repeats
    block = [p.detach().double() for p in cpflow(31, hidden_dims=(64, 64)).parameters()]
    cases = [(f"{k} tensor(s), {SCALARS} scalars", split(SCALARS, k)) for k in (1, 2, 4, 11)]
    cases.append((f"packed CP-Flow block, d = 31 ({len(block)} tensors)", block))
    rows, records = [], []
    for name, tensors in cases:
        ms = {opt: 1e3 * step_time(tensors, opt, device, repeats) for opt in ("Adam", "ClippedAdam")}
        rows.append(
            [name, f"{ms['Adam']:.3f}", f"{ms['ClippedAdam']:.3f}", f"{ms['Adam'] / len(tensors):.3f}"]
        )
        records.append({"case": name, "tensors": len(tensors), "ms": ms})
    markdown = (
        f"# Pyro optimiser step against the number of parameter tensors\n\n"
        f"{machine_summary(device)}; median of {repeats} steps.\n\n"
        + markdown_table(
            ["parameters", "Adam ms / step", "ClippedAdam ms / step", "Adam ms per tensor"], rows
        )
    )
    print(markdown)
    save_results(args.out, {"cases": records}, markdown, device, args, started)


if __name__ == "__main__":
    main()
