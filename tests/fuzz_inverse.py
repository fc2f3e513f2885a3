"""Fuzzing CP-Flow for silent failures: inverses of random flows, and bad arguments.

Two counts, printed as tables:

* **Inverses.** Random single blocks and stacks (dimension, widths, curvature of the
  weights, ActNorm placement and the scale of the data it is fitted to), targets with
  :math:`|y|_\\infty` log-uniform from 1e-3 to 1e4, inverted in float32 and float64 with
  ``on_failure="ignore"``. Every answer is checked afresh in float64, with the flow's own
  parameter values: *silently wrong* means reported converged while :math:`|f(x) -
  y|_\\infty > 10\\, \\mathrm{tol} \\max(1, |y|_\\infty)`, or a NaN/Inf answer reported
  converged. Float64 answers are checked in float64 too (nothing more precise is at hand),
  so for them the count tests the report against a fresh evaluation, not against exact
  arithmetic. A float32 flow is the map of its float32 parameters; *off the original*
  also counts the converged float32 answers more than 10 tol from the float64 flow they
  were rounded from (that gap is the rounding of the parameters, which no inverse can see).
* **Bad arguments.** NaN, Inf, wrong shape, dtype, device, integer tensors and non-tensors
  to every public entry point, with Pyro's validation on and off; bad options to the
  factories. An outcome is *clear* (an error, or a warning, of the right type that names
  the argument and the problem), *misleading* (any other error or message), *silent*
  (accepted without a word; with validation off a NaN passing through is *allowed*).

``.venv/bin/python tests/fuzz_inverse.py [--full] [--seed S]`` prints the tables; the
fast subset runs in the test suite (``tests/test_fuzz.py``), the full one is marked slow.
"""

from __future__ import annotations

import argparse
import copy
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch

from pyro_cpflow import ActNorm, conditional_cpflow, conditional_cpflow_stack, cpflow, cpflow_stack
from pyro_cpflow.solvers import default_tolerance, residual_scale

DIMS = (1, 2, 3, 5, 8, 16)
CURVATURES = (0.0, 0.5, 1.0, 2.0)  # standard deviation of the random change to every weight


@dataclass
class InverseCounts:
    """Counts over the targets of one kind of flow in one dtype."""

    targets: int = 0
    converged: int = 0
    flagged: int = 0
    unresolved: int = 0  # flagged because the dtype's rounding of the residual exceeds tol
    silent: int = 0
    nonfinite_unreported: int = 0
    off_original: int = 0
    worst_ratio: float = 0.0  # max over converged targets of relative round-trip error / tol

    def add(self, other: InverseCounts) -> None:
        for name in (
            "targets",
            "converged",
            "flagged",
            "unresolved",
            "silent",
            "nonfinite_unreported",
            "off_original",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.worst_ratio = max(self.worst_ratio, other.worst_ratio)


def _randomize(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "loc" not in name and "log_scale" not in name:  # ActNorm is fitted to data
                p.add_(std * torch.randn_like(p))


def random_flow(kind: str, generator: torch.Generator) -> tuple[torch.nn.Module, str]:
    """A random float64 block or stack (ActNorms fitted to data) and its description."""

    def pick(options):  # type: ignore[no-untyped-def]
        return options[int(torch.randint(len(options), (), generator=generator))]

    d, curvature = pick(DIMS), pick(CURVATURES)
    hidden = pick(((8,), (16, 16), (32, 32), (64, 64)))
    torch.manual_seed(int(torch.randint(2**31, (), generator=generator)))
    if kind == "block":
        flow = cpflow(d, hidden_dims=hidden, on_failure="ignore")
        _randomize(flow, curvature)
        return flow, f"block d={d} hidden={hidden} curvature={curvature}"
    blocks, placement = pick((2, 3, 4)), pick(("between", "around", "none"))
    data_scale = 10 ** float(4 * torch.rand((), generator=generator) - 2)
    flow = cpflow_stack(d, blocks, actnorm=placement, hidden_dims=hidden, on_failure="ignore")
    _randomize(flow, curvature)
    with torch.no_grad():
        flow(data_scale * torch.randn(256, d, generator=generator) + torch.randn(d, generator=generator))
    flow.clear_cache()
    return (
        flow,
        f"stack d={d} blocks={blocks} actnorm={placement} data scale={data_scale:.2g} curvature={curvature}",
    )


def random_targets(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` targets with |y|_inf log-uniform in [1e-3, 1e4], in random directions."""
    direction = torch.randn(n, d, generator=generator, dtype=torch.float64)
    direction = direction / direction.abs().amax(-1, keepdim=True)
    return direction * 10 ** (7 * torch.rand(n, 1, generator=generator, dtype=torch.float64) - 3)


def fuzz_inverse(kind: str, dtype: torch.dtype, models: int, targets: int, seed: int = 0) -> InverseCounts:
    """Invert ``targets`` random targets through each of ``models`` random flows of ``kind``."""
    generator = torch.Generator().manual_seed(seed)
    total = InverseCounts()
    for _ in range(models):
        original, _ = random_flow(kind, generator)
        flow = copy.deepcopy(original).to(dtype)
        own = copy.deepcopy(flow).double()  # the same parameter values, evaluated in float64
        y = random_targets(
            targets, original.parts[0].input_dim if kind == "stack" else original.input_dim, generator
        )
        with torch.no_grad():
            x = flow.inv(y.to(dtype))
            report = flow.diagnostics.inverse
            own.clear_cache()
            error = (own(x.double()) - y).abs().amax(-1) / residual_scale(y)
            original.clear_cache()
            gap = (original(x.double()) - y).abs().amax(-1) / residual_scale(y)
        tol = default_tolerance(dtype)
        converged = report.converged.reshape(-1)
        finite = torch.isfinite(x).all(-1)
        counts = InverseCounts(
            targets=targets,
            converged=int(converged.sum()),
            flagged=int((~converged).sum()),
            unresolved=int((~converged & report.unresolved.reshape(-1)).sum()),
            silent=int((converged & ((error > 10 * tol) | ~finite)).sum()),
            nonfinite_unreported=int((converged & ~finite).sum()),
            off_original=int((converged & (gap > 10 * tol)).sum()),
            worst_ratio=float((error[converged] / tol).max()) if bool(converged.any()) else 0.0,
        )
        total.add(counts)
    return total


# ---------------------------------------------------------------------------------------
# Bad arguments

BAD_VALUES: dict[str, tuple[Callable[[int], object], str]] = {
    # kind: (value of the right batch shape for dimension d, what the message must say)
    "nan": (lambda d: torch.tensor([[0.5] * (d - 1) + [float("nan")], [0.1] * d]), "NaN or Inf"),
    "inf": (lambda d: torch.tensor([[0.5] * (d - 1) + [float("inf")], [0.1] * d]), "NaN or Inf"),
    "shape": (lambda d: torch.zeros(2, d + 1), "shape"),
    "scalar": (lambda d: torch.tensor(0.5), "shape"),
    "float32": (lambda d: torch.zeros(2, d, dtype=torch.float32), "dtype torch.float32"),
    "int64": (lambda d: torch.zeros(2, d, dtype=torch.long), "dtype torch.int64"),
    "device": (lambda d: torch.zeros(2, d, device="meta"), "on meta"),
    "list": (lambda d: [[0.0] * d] * 2, "must be a tensor"),
    "float": (lambda d: 0.5, "must be a tensor"),
    "none": (lambda d: None, "must be a tensor"),
}
NON_FINITE = ("nan", "inf")


@dataclass
class Outcomes:
    """Outcomes of bad arguments, by entry point and validation setting."""

    counts: Counter = field(default_factory=Counter)
    misleading: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)


def _entry_points(d: int = 3, c: int = 2) -> dict[str, tuple[str, Callable[[object], object]]]:
    """Each public entry point as ``name -> (argument name, call with a bad argument)``."""
    torch.manual_seed(0)
    exact = cpflow(d, hidden_dims=(8, 8), logdet="exact")
    stochastic = cpflow(d, hidden_dims=(8, 8), logdet="stochastic")
    conditional = conditional_cpflow(d, c, hidden_dims=(8, 8))
    stack = cpflow_stack(d, 2, hidden_dims=(8, 8), actnorm="around")
    conditional_stack = conditional_cpflow_stack(d, c, 2, hidden_dims=(8, 8), actnorm="around")
    good = torch.randn(2, d)
    context = torch.randn(c)
    with torch.no_grad():
        stack(torch.randn(20, d))
        conditional_stack.condition(context)(torch.randn(20, d))

    def fresh(transform, value):  # type: ignore[no-untyped-def]
        transform.clear_cache()  # a bad value must not be answered from the cache
        return transform(value)

    return {
        "flow(x)": ("x", lambda v: fresh(exact, v)),
        "flow.inv(y)": ("y", lambda v: fresh(exact.inv, v)),
        "exact log_abs_det_jacobian(x, y)": ("x", lambda v: exact.log_abs_det_jacobian(v, good)),
        "stochastic log_abs_det_jacobian(x, y)": ("x", lambda v: stochastic.log_abs_det_jacobian(v, good)),
        "condition(context)": ("context", lambda v: conditional.condition(v)(good)),
        "condition(c)(x)": ("x", lambda v: fresh(conditional.condition(context), v)),
        "condition(c).inv(y)": ("y", lambda v: fresh(conditional.condition(context).inv, v)),
        "stack(x)": ("x", lambda v: fresh(stack, v)),
        "stack.inv(y)": ("y", lambda v: fresh(stack.inv, v)),
        "conditional stack.condition(c).inv(y)": ("y", lambda v: conditional_stack.condition(context).inv(v)),
        "conditional stack.condition(context)": ("context", lambda v: conditional_stack.condition(v)(good)),
        "ActNorm(x), first call": ("x", lambda v: ActNorm(d)(v)),
    }


def _judge(outcomes: Outcomes, where: str, argument: str, kind: str, validation: bool, call) -> None:  # type: ignore[no-untyped-def]
    value_of, expected = BAD_VALUES[kind]
    names = re.compile(rf"\b{argument} (contains|has|must)|\b{argument}\b.*NaN")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call(value_of(3 if argument != "context" else 2))
        except (TypeError, ValueError) as error:
            message = str(error)
            clear = expected in message and (names.search(message) is not None)
            outcomes.counts[(where, validation, "clear" if clear else "misleading")] += 1
            if not clear:
                outcomes.misleading.append(
                    f"{where} [{kind}, validation={validation}]: {type(error).__name__}: {message}"
                )
            return
        except Exception as error:  # any other failure is a misleading one
            outcomes.counts[(where, validation, "misleading")] += 1
            outcomes.misleading.append(
                f"{where} [{kind}, validation={validation}]: {type(error).__name__}: {error}"
            )
            return
    said = [str(w.message) for w in caught]
    if kind in NON_FINITE and not validation:
        bad_words = [m for m in said if "NaN" not in m]
        if bad_words:
            outcomes.counts[(where, validation, "misleading")] += 1
            outcomes.misleading.append(f"{where} [{kind}, validation off]: warned {bad_words}")
        else:
            outcomes.counts[(where, validation, "allowed")] += 1
        return
    outcomes.counts[(where, validation, "silent")] += 1
    shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
    outcomes.silent.append(f"{where} [{kind}, validation={validation}]: returned {shape}, warnings {said}")


def fuzz_arguments() -> Outcomes:
    """Every bad value to every entry point, with validation on and off."""
    outcomes = Outcomes()
    for validation in (True, False):
        with pyro.validation_enabled(validation):
            for where, (argument, call) in _entry_points().items():
                for kind in BAD_VALUES:
                    _judge(outcomes, where, argument, kind, validation, call)
    return outcomes


BAD_OPTIONS: list[tuple[str, Callable[[], object], str]] = [
    ("logdet", lambda: cpflow(3, logdet="approximate"), "logdet"),
    ("inverse_method", lambda: cpflow(3, inverse_method="bisection"), "inverse_method"),
    ("on_failure", lambda: cpflow(3, on_failure="explode"), "on_failure"),
    ("num_probes", lambda: cpflow(3, num_probes=0), "num_probes"),
    ("cg_rtol < 0", lambda: cpflow(3, cg_rtol=-1.0), "cg_rtol"),
    ("cg_rtol nan", lambda: cpflow(3, cg_rtol=float("nan")), "cg_rtol"),
    ("cg_max_iter", lambda: cpflow(3, cg_max_iter=0), "cg_max_iter"),
    ("cg_check_every", lambda: cpflow(3, cg_check_every=-1), "cg_check_every"),
    ("inverse_tol 0", lambda: cpflow(3, inverse_tol=0.0), "inverse_tol"),
    ("inverse_tol nan", lambda: cpflow(3, inverse_tol=float("nan")), "inverse_tol"),
    ("inverse_max_iter", lambda: cpflow(3, inverse_max_iter=0), "inverse_max_iter"),
    ("unknown option", lambda: cpflow(3, lanczos_steps=10), "lanczos_steps"),
    ("alpha", lambda: cpflow(3, alpha=0.0), "alpha"),
    ("quadratic_rank", lambda: cpflow(3, quadratic_rank=4), "quadratic_rank"),
    ("num_blocks", lambda: cpflow_stack(3, 0), "num_blocks"),
    ("actnorm", lambda: cpflow_stack(3, 2, actnorm="sometimes"), "actnorm"),
    ("refine_max_iter", lambda: cpflow_stack(3, 2, refine_max_iter=0), "refine_max_iter"),
    ("stack on_failure", lambda: setattr(cpflow_stack(3, 2), "on_failure", "explode"), "on_failure"),
    ("flow attribute", lambda: setattr(cpflow(3), "logdet", "approximate"), "logdet"),
]


def fuzz_options() -> Outcomes:
    outcomes = Outcomes()
    for name, make, expected in BAD_OPTIONS:
        try:
            make()
        except (TypeError, ValueError) as error:
            clear = expected in str(error)
            outcomes.counts[("options", True, "clear" if clear else "misleading")] += 1
            if not clear:
                outcomes.misleading.append(f"option {name}: {error}")
            continue
        outcomes.counts[("options", True, "silent")] += 1
        outcomes.silent.append(f"option {name}: accepted")
    return outcomes


# ---------------------------------------------------------------------------------------
# Tables


def inverse_table(models: int, targets: int, seed: int) -> tuple[str, dict]:
    rows, results = [], {}
    header = (
        f"{'flow':6} {'dtype':8} {'tol':>7} {'targets':>8} {'converged':>9} {'flagged':>8} "
        f"{'unresolved':>10} {'silent':>7} {'NaN unreported':>15} {'worst err/tol':>13} {'off original':>12}"
    )
    for kind in ("block", "stack"):
        for dtype in (torch.float64, torch.float32):
            counts = fuzz_inverse(kind, dtype, models, targets, seed)
            results[(kind, dtype)] = counts
            rows.append(
                f"{kind:6} {str(dtype).replace('torch.', ''):8} {default_tolerance(dtype):7.0e} "
                f"{counts.targets:8d} {counts.converged:9d} {counts.flagged:8d} {counts.unresolved:10d} "
                f"{counts.silent:7d} {counts.nonfinite_unreported:15d} "
                f"{counts.worst_ratio:13.2f} {counts.off_original:12d}"
            )
    return "\n".join([header, *rows]), results


def argument_table(outcomes: Outcomes) -> str:
    entries = sorted({(where, validation) for where, validation, _ in outcomes.counts})
    lines = [
        f"{'entry point':40} {'validation':10} {'clear':>6} {'misleading':>10} {'silent':>7} {'allowed':>8}"
    ]
    for where, validation in entries:
        c = [outcomes.counts[(where, validation, k)] for k in ("clear", "misleading", "silent", "allowed")]
        lines.append(
            f"{where:40} {'on' if validation else 'off':10} {c[0]:6d} {c[1]:10d} {c[2]:7d} {c[3]:8d}"
        )
    lines += [f"  misleading: {m}" for m in outcomes.misleading]
    lines += [f"  silent: {m}" for m in outcomes.silent]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="40 flows x 1000 targets per kind and dtype")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    models, targets = (40, 1000) if args.full else (4, 100)
    table, _ = inverse_table(models, targets, args.seed)
    print(
        f"Inverses: {models} random flows x {targets} targets per row, |y|_inf from 1e-3 to 1e4, "
        f"seed {args.seed}"
    )
    print("silent = reported converged but |f(x) - y|_inf > 10 tol max(1, |y|_inf) in float64, or NaN/Inf;")
    print("unresolved = flagged because the rounding error of the residual itself exceeds tol\n")
    print(table)
    outcomes = fuzz_arguments()
    for key, value in fuzz_options().counts.items():
        outcomes.counts[key] += value
    print(f"\nBad arguments ({len(BAD_VALUES)} kinds per entry point) and {len(BAD_OPTIONS)} bad options\n")
    print(argument_table(outcomes))
    total = Counter()
    for (_, _, outcome), count in outcomes.counts.items():
        total[outcome] += count
    print(f"\ntotal: {dict(total)}")


if __name__ == "__main__":
    main()
