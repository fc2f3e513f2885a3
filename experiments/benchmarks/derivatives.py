r"""Ways to get second derivatives of the potential: the analytic engine against ``torch.func`` and autograd.

What is measured
----------------
For ``cpflow(d, hidden_dims=(64, 64))`` at initialisation with its parameters perturbed
(float64, one thread), at ``batch`` rows ``x``, the time of:

* **Hessian-vector product** :math:`\nabla^2 F(x)\, v` (constant, no graph), given the
  potential already evaluated at ``x`` where a method allows it (as inside CG):
  ``analytic`` (:meth:`~pyro_cpflow.derivatives.NetworkTrace.hvp`: forward tangent and one
  backward sweep), ``func.jvp`` (``torch.func.jvp`` of the analytic gradient: forward-mode
  AD through the explicit backward sweep) and ``double backward`` (``autograd.grad`` of the
  autograd gradient, the reference code's way);
* **dense Hessian** :math:`\nabla^2 F(x)` with its graph, then a backward pass through
  its log-determinant (what an exact-mode training step needs): ``analytic`` (forward
  Jacobian propagation), ``func.jacfwd`` (``vmap(jacfwd)`` of the analytic gradient) and
  ``double backward`` (``d`` vector-Jacobian products with ``is_grads_batched``).

Every method is checked against the analytic one (max abs difference in the table). The
library keeps whichever is fastest per regime; the table says which that is.

How to run
----------
::

    .venv/bin/python -m experiments.benchmarks.derivatives           # about 1 minute
    .venv/bin/python -m experiments.benchmarks.derivatives --quick

Results go to ``experiments/benchmarks/results/derivatives.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from torch import Tensor

from experiments.benchmarks.timing import (
    base_parser,
    fmt,
    machine_summary,
    save_results,
    setup,
    time_call,
)
from experiments.common import markdown_table
from pyro_cpflow import cpflow
from pyro_cpflow.derivatives import AutogradTrace
from pyro_cpflow.potential import ConvexPotential

DTYPE = torch.float64


def make_potential(dim: int, seed: int) -> ConvexPotential:
    torch.manual_seed(seed)
    potential = cpflow(dim, hidden_dims=(64, 64)).to(DTYPE).potential
    with torch.no_grad():
        for parameter in potential.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return potential


def hvp_methods(potential: ConvexPotential, x: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """Constant Hessian-vector products at ``x``, each with its one-off preparation done."""
    with torch.no_grad():
        analytic = potential.evaluate(x).detach()

    def func_jvp(v: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.func.jvp(lambda z: potential.evaluate(z).gradient, (x,), (v,))[1]

    autograd = AutogradTrace(lambda z: potential(z), x).detach()
    return {"analytic": analytic.hvp, "func.jvp": func_jvp, "double backward": autograd.hvp}


def hessian_methods(potential: ConvexPotential) -> dict[str, Callable[[Tensor], Tensor]]:
    """Dense Hessians with their graph, from scratch at ``x``."""

    def func_jacfwd(x: Tensor) -> Tensor:
        row_gradient = lambda z: potential.evaluate(z[None]).gradient[0]  # noqa: E731
        return torch.func.vmap(torch.func.jacfwd(row_gradient))(x)

    return {
        "analytic": lambda x: potential.evaluate(x).hessian(),
        "func.jacfwd": func_jacfwd,
        "double backward": lambda x: AutogradTrace(lambda z: potential(z), x).hessian(),
    }


def measure(args: argparse.Namespace, device: torch.device) -> list[list]:
    rows = []
    for dim in args.dims:
        potential = make_potential(dim, args.seed).to(device)
        for batch in args.batches:
            x = torch.randn(batch, dim, dtype=DTYPE, device=device)
            v = torch.randn(batch, dim, dtype=DTYPE, device=device)
            reference_hvp = reference_hessian = None
            for name, hvp in hvp_methods(potential, x).items():
                timing, value = time_call(
                    functools.partial(hvp, v),
                    device,
                    warmup=2,
                    repeats=args.repeats,
                    budget_s=args.budget,
                    min_repeats=3,
                )
                reference_hvp = value if reference_hvp is None else reference_hvp
                error = float((value - reference_hvp).abs().max())
                rows.append(["HVP", dim, batch, name, 1e3 * timing.median_s, error])
            for name, hessian in hessian_methods(potential).items():
                # timed within this iteration: the loop's values are bound as defaults
                def step(
                    potential: ConvexPotential = potential,
                    hessian: Callable[[Tensor], Tensor] = hessian,
                    x: Tensor = x,
                ) -> Tensor:
                    potential.zero_grad(set_to_none=True)
                    matrix = hessian(x)
                    torch.linalg.cholesky(matrix).diagonal(dim1=-2, dim2=-1).log().sum().backward()
                    return matrix.detach()

                timing, value = time_call(
                    step, device, warmup=2, repeats=args.repeats, budget_s=args.budget, min_repeats=3
                )
                reference_hessian = value if reference_hessian is None else reference_hessian
                error = float((value - reference_hessian).abs().max())
                rows.append(["Hessian + log-det backward", dim, batch, name, 1e3 * timing.median_s, error])
    return rows


def table(rows: list[list]) -> str:
    fastest: dict[tuple, float] = {}
    for kind, dim, batch, _, ms, _ in rows:
        fastest[kind, dim, batch] = min(ms, fastest.get((kind, dim, batch), float("inf")))
    cells = [
        [kind, dim, batch, name, fmt(ms), fmt(ms / fastest[kind, dim, batch], ".2f"), fmt(error, ".1e")]
        for kind, dim, batch, name, ms, error in rows
    ]
    return markdown_table(
        ["quantity", "d", "batch", "method", "ms", "/ fastest", "max diff. to analytic"], cells
    )


def main() -> None:
    parser = base_parser(__file__, __doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per timed method")
    args = parser.parse_args()
    if args.quick:
        args.dims, args.batches, args.repeats, args.budget = [4], [8], 3, 0.2
    started = time.perf_counter()
    device = setup(args)
    rows = measure(args, device)
    text = f"# Second derivatives of the potential\n\n{machine_summary(device)}\n\n{table(rows)}"
    print(text)
    payload = {
        "rows": [
            dict(zip(["quantity", "dim", "batch", "method", "ms", "max_diff"], r, strict=True)) for r in rows
        ]
    }
    save_results(args.out, payload, text, device, args, started)


if __name__ == "__main__":
    main()
