r"""Does ``torch.compile`` speed up a CP-Flow training step? Eager against compiled, side by side.

What is measured
----------------
The maximum-likelihood loss of the density direction, written on the library's engine,

.. code-block:: python

    trace = flow.potential.evaluate(x)          # value, gradient, curvatures
    y = trace.gradient                          # f(x) = grad F(x)
    logdet = exact (Cholesky of trace.hessian()) or stochastic_logdet(trace, Q, ...)
    loss = (0.5 |y|^2 - logdet).mean(); loss.backward()

for ``cpflow(d, hidden_dims=(64, 64))`` at initialisation, batch ``--batch``, in the
exact mode and in the stochastic mode with a fixed number of CG iterations and no
convergence test (``check_every=0``: no host synchronisation, the setting that lets a
compiler see one graph). Each is timed eagerly and after ``torch.compile`` (default
mode; the compile time of the first call is reported separately), median of
``--repeats`` steps after warm-up. The compiled loss is checked against the eager one: equal
in the exact mode; in the stochastic mode the compiled code draws its Rademacher probes from
another generator (inductor's), so the two differ by the probe noise. The parameters are
checked to be unchanged by the compiled steps (no optimiser runs): with torch 2.14 a compiled
pass wrote into the packed parameters until :meth:`~pyro_cpflow.packing.PackedParameters.unpacked`
cut its views by ``narrow`` under compilation.

How to run
----------
::

    .venv/bin/python -m experiments.benchmarks.compile_step                 # CPU, a few minutes (compilation)
    .venv/bin/python -m experiments.benchmarks.compile_step --device cuda   # part of experiments/gpu_check.sh
    .venv/bin/python -m experiments.benchmarks.compile_step --quick

Results go to ``experiments/benchmarks/results/compile_step.json`` (``--out``) and ``.md``.
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
from pyro_cpflow.linalg import stochastic_logdet

CG_ITERATIONS = 8


def make_loss(
    dim: int, mode: str, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[Tensor], Tensor], torch.nn.Module]:
    torch.manual_seed(0)
    potential = cpflow(dim, hidden_dims=(64, 64)).to(device, dtype).potential

    def loss(x: Tensor) -> Tensor:
        trace = potential.evaluate(x)
        y = trace.gradient
        if mode == "exact":
            # not cholesky_logdet: its positive-definiteness check reads a flag on the host,
            # which would split the compiled graph
            logdet = 2.0 * torch.linalg.cholesky(trace.hessian()).diagonal(dim1=-2, dim2=-1).log().sum(-1)
        else:
            logdet = stochastic_logdet(
                trace,
                potential.factorize(trace.quadratic),
                rtol=0.0,
                max_iter=CG_ITERATIONS,
                check_every=0,
            ).combined()
        return (0.5 * (y * y).sum(-1) - logdet).mean()

    return loss, potential


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    rows = []
    for dim in args.dims:
        for mode in ("exact", "stochastic"):
            if mode == "exact" and dim > args.max_exact_dim:
                continue
            loss, potential = make_loss(dim, mode, device, dtype)
            x = torch.randn(args.batch, dim, device=device, dtype=dtype)

            # timed within this iteration: the loop's values are bound as defaults
            def step(
                fn: Callable[[Tensor], Tensor], potential: torch.nn.Module = potential, x: Tensor = x
            ) -> Tensor:
                potential.zero_grad(set_to_none=True)
                torch.manual_seed(1)  # the same probes in both versions
                value = fn(x)
                value.backward()
                return value.detach()

            eager_timing, eager_value = time_call(
                functools.partial(step, loss), device, warmup=2, repeats=args.repeats
            )
            before = [t.detach().clone() for t in potential.state_dict().values()]
            compiled = torch.compile(loss)
            start = time.perf_counter()
            step(compiled)
            compile_s = time.perf_counter() - start
            compiled_timing, compiled_value = time_call(
                functools.partial(step, compiled), device, warmup=2, repeats=args.repeats
            )
            # no step changes a parameter: a compiled pass that writes into one is a defect
            after = potential.state_dict().values()
            unchanged = all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
            rows.append(
                {
                    "dim": dim,
                    "mode": mode,
                    "eager_ms": 1e3 * eager_timing.median_s,
                    "compiled_ms": 1e3 * compiled_timing.median_s,
                    "compile_s": compile_s,
                    "loss_difference": float((compiled_value - eager_value).abs()),
                    "parameters_unchanged": unchanged,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = base_parser(__file__, __doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--max-exact-dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = parser.parse_args()
    if args.quick:
        args.dims, args.repeats = [2], 3
    started = time.perf_counter()
    device = setup(args)
    rows = measure(args, device)
    table = markdown_table(
        [
            "d",
            "log-det",
            "eager ms",
            "compiled ms",
            "compiled / eager",
            "compile time s",
            "|loss difference|",
            "parameters unchanged",
        ],
        [
            [
                r["dim"],
                r["mode"],
                fmt(r["eager_ms"]),
                fmt(r["compiled_ms"]),
                fmt(r["compiled_ms"] / r["eager_ms"], ".2f"),
                fmt(r["compile_s"], ".1f"),
                fmt(r["loss_difference"], ".1e"),
                fmt(r["parameters_unchanged"]),
            ]
            for r in rows
        ],
    )
    text = (
        f"# torch.compile of the training step\n\n{machine_summary(device)}, {args.dtype}, "
        f"batch {args.batch}, stochastic CG fixed at {CG_ITERATIONS} iterations\n\n{table}"
    )
    print(text)
    save_results(args.out, {"rows": rows}, text, device, args, started)


if __name__ == "__main__":
    main()
