r"""Noise of the stochastic log-det: the preconditioned estimator against plain Rademacher probes.

What is measured
----------------
A flow ``cpflow(d, hidden_dims=(64, 64))`` is trained for ``--train-steps`` maximum-likelihood
steps (Adam 3e-3, batch 100, float64) on the anisotropic Gaussian of ``engine.py`` (log-uniform
variances in [0.1, 10], randomly rotated; its training code), so that its quadratic ``Q`` has
learnt the data's covariance.
At a fixed batch of 100 data points, ``--repeats`` independent draws of the mean stochastic
log-det and of its gradient with respect to every parameter are taken with

* **preconditioned** (the library): probes with covariance ``Q``, the value
  ``log det Q`` + the Lanczos quadrature of ``Q⁻¹H``, the gradient surrogate
  ``wᵀHv − vᵀQv + log det Q`` (:func:`~pyro_cpflow.linalg.stochastic_logdet`);
* **plain**: Rademacher probes, no preconditioner, the surrogate ``wᵀHv`` (the estimator of the
  library before the engine and of the paper's code; both values come from the same CG solve
  here, so only the estimator differs).

Reported: the standard deviation of the mean log-det over the draws, and the root mean square
over parameters of the standard deviation of the gradient, relative to the norm of the exact
gradient (from ``logdet="exact"``); both estimators' averages are checked against the exact
values: the value's bias in standard errors, and for the gradient the mean over parameters of
the squared bias in standard errors, about 1 for an unbiased estimator.

How to run
----------
::

    .venv/bin/python -m experiments.benchmarks.logdet_variance          # about a minute
    .venv/bin/python -m experiments.benchmarks.logdet_variance --quick
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from experiments.benchmarks.engine_harness import fixed_batch, make_flow, task_train
from experiments.benchmarks.timing import (
    base_parser,
    fmt,
    machine_summary,
    save_results,
    setup,
)
from experiments.common import markdown_table
from pyro_cpflow.linalg import cholesky_logdet, stochastic_logdet

HIDDEN = (64, 64)
LEARNING_RATE = 3e-3


def trained_flow(dim: int, steps: int, seed: int, folder: str):
    """The flow of ``engine.py`` (a) trained the same way, and a fixed data batch of 100."""
    state = str(Path(folder) / f"trained-{dim}.pt")
    task_train(dim, list(HIDDEN), "stochastic", steps, LEARNING_RATE, 100, seed, state, "cpu")
    flow = make_flow(dim, list(HIDDEN), state, "cpu", logdet="stochastic")
    return flow, fixed_batch(dim, 100, seed + 1, "cpu")


def draws(flow, x: Tensor, preconditioned: bool, repeats: int) -> tuple[Tensor, Tensor]:
    """``repeats`` values and flattened parameter gradients of the mean stochastic log-det."""
    params = list(flow.parameters())
    values, grads = [], []
    for _ in range(repeats):
        trace = flow.potential.evaluate(x)
        factor = flow.potential.factorize(trace.quadratic) if preconditioned else None
        estimate = stochastic_logdet(trace, factor, rtol=1e-10).combined().mean()
        grad = torch.autograd.grad(estimate, params, allow_unused=True)
        values.append(estimate.detach())
        grads.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).flatten()
                    for p, g in zip(params, grad, strict=True)
                ]
            )
        )
    return torch.stack(values), torch.stack(grads)


def main() -> None:
    parser = base_parser(__file__, __doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    if args.quick:
        args.dims, args.train_steps, args.repeats = [8], 20, 10
    started = time.perf_counter()
    device = setup(args)
    rows, records = [], []
    folder = tempfile.TemporaryDirectory()
    for dim in args.dims:
        flow, x = trained_flow(dim, args.train_steps, args.seed, folder.name)
        params = list(flow.parameters())
        exact = cholesky_logdet(flow.potential.evaluate(x).hessian()).mean()
        exact_grads = torch.autograd.grad(exact, params, allow_unused=True)
        exact_grad = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).flatten()
                for p, g in zip(params, exact_grads, strict=True)
            ]
        )
        for preconditioned in (True, False):
            values, grads = draws(flow, x, preconditioned, args.repeats)
            value_sd = float(values.std())
            value_z = float((values.mean() - exact) / (values.std() / args.repeats**0.5))
            grad_sd = float(
                grads.std(0).pow(2).mean().sqrt() / exact_grad.norm() * math.sqrt(exact_grad.numel())
            )
            spread = grads.std(0) / args.repeats**0.5
            known = spread > 0  # parameters the log-det does not depend on have no noise and no error
            grad_z = float((((grads.mean(0) - exact_grad)[known] / spread[known]) ** 2).mean())
            name = "preconditioned (library)" if preconditioned else "plain Rademacher"
            rows.append(
                [
                    dim,
                    name,
                    fmt(value_sd, ".3g"),
                    fmt(value_z, ".2f"),
                    fmt(grad_sd, ".3g"),
                    fmt(grad_z, ".2f"),
                ]
            )
            records.append(
                {
                    "dim": dim,
                    "estimator": name,
                    "value_sd": value_sd,
                    "value_bias_over_se": value_z,
                    "relative_gradient_sd": grad_sd,
                    "gradient_mean_squared_z": grad_z,
                }
            )
            print(records[-1], flush=True)
    folder.cleanup()
    table = markdown_table(
        [
            "d",
            "estimator",
            "sd of the mean log-det",
            "bias / SE",
            "relative sd of the gradient",
            "mean (bias / SE)² over parameters (≈ 1 if unbiased)",
        ],
        rows,
    )
    text = (
        f"# Noise of the stochastic log-det\n\n{machine_summary(device)}; flows trained "
        f"{args.train_steps} steps, batch 100, {args.repeats} draws.\n\n{table}"
    )
    print(text)
    save_results(args.out, {"rows": records}, text, device, args, started)


if __name__ == "__main__":
    main()
