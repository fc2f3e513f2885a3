r"""Benchmark of the inverse solvers, and of per-sample against batch-global CG.

What is measured
----------------
**Table 1 - Newton-CG against batch-wide L-BFGS.** :func:`pyro_cpflow.solvers.
solve_gradient_equation` with ``method="newton-cg"`` (the default: per-sample
Hessian-free Newton, CG inner solves preconditioned by the potential's quadratic
:math:`Q^{-1}` as in :class:`~pyro_cpflow.CPFlow`, per-sample backtracking) and ``method="lbfgs"``
(one :class:`torch.optim.LBFGS` with strong-Wolfe line search on the summed objective
:math:`\sum_i F(x_i) - y_i^\top x_i`, the approach of the CP-Flow reference code).
The potential is ``ConvexPotential(ICNN(d, [64, 64], augmented=True), d)`` in float64,

* ``init``: as initialised (a map close to the identity);
* ``randomised``: every parameter perturbed far from its initial value
  (``p += 2 * randn_like(p)``), then the network weight :math:`\sigma` set to 1 -
  otherwise a negative draw of its raw parameter can switch the ICNN off
  (:math:`\sigma = \mathrm{softplus}(\cdot) \approx 4\cdot 10^{-4}`) and leave a
  quadratic. The map is strongly nonlinear and the Hessian ill-conditioned
  (the column :math:`\kappa(H)` gives its condition number at 100 of the points).

For each ``d`` in ``--dims``, ``--points`` points ``x ~ N(0, I)`` are pushed forward,
``y = grad F(x)``, so the true inverse is known. Both solvers start from
``potential.initial_inverse_guess(y)`` (the start :class:`~pyro_cpflow.CPFlow` uses)
with the same tolerance ``--tol`` on :math:`|\nabla F(x) - y|_\infty` (default 1e-10)
and report: wall time (one warm-up solve on 8 points, then the median of up to
``--repeats`` full solves within a time budget), final max residual, max error
:math:`|\hat x - x|_\infty` against the true points, iterations (Newton steps per
sample: max / mean; L-BFGS: its batch-wide count), the work counted by the
:class:`~pyro_cpflow.solvers.InverseReport` (batched Hessian-vector products for
Newton-CG, gradient evaluations for L-BFGS), the number of batched potential
evaluations, the converged fraction, why the solver stopped, and the speed-up
:math:`t_\text{L-BFGS} / t_\text{Newton-CG}`. L-BFGS gets ``--lbfgs-max-iter``
iterations (default 2000); when it stops short of ``tol`` before that, its
strong-Wolfe line search has stopped making progress ("stalled": the summed objective
no longer resolves the remaining decrease in floating point), and the speed-up of
Newton-CG at ``tol`` is only a lower bound (``≥``: L-BFGS never reaches ``tol``).
For an equal-accuracy comparison, Newton-CG is then run a second time with ``tol``
set to the residual L-BFGS reached (row ``newton-cg, tol = L-BFGS resid.``), unless
the full Newton-CG solve took longer than ``--matched-budget`` seconds (default 30).

**Table 2 - per-sample against batch-global CG on mixed batches.**
:func:`pyro_cpflow.linalg.conjugate_gradient` judges convergence per sample; the
batch-global CG implemented below (:func:`batch_global_cg`) is the classic batched
CG of many reference implementations: every sample updates at every iteration until
a batch criterion holds, either ``all`` (every sample below ``rtol``, as
``cg_batch`` of torch_cg) or ``batch-norm`` (:math:`\|R\|_F \le
\mathrm{rtol}\,\|B\|_F` over the flattened batch). Batches:

* ``synthetic``: 95 SPD matrices with condition number 10 and 5 with 1e5
  (eigenvalues log-spaced, random eigenvectors), ``d = --cg-dim`` (64);
* ``flow Hessian``: Hessians of a randomised potential at ``d = --cg-dim``
  (network weights perturbed by ``2 randn``, :math:`\sigma = 1000`): 95 far points,
  where the ICNN is flat and :math:`H \approx Q` (the best-conditioned 95 of 380
  draws from ``N(0, 100^2 I)``), and 5 points near the origin, where its curvature
  dominates (the worst-conditioned 5 of 20 draws from ``N(0, 0.3^2 I)``). The
  condition numbers of both groups are measured and shown.

Reported: iterations per sample (mean / max), their sum (the matrix-vector work a
solver restricted to its unfinished samples would do), the number of batched
mat-vec calls actually made (both solvers run the product on the whole batch, so
wall time follows this number), wall time, the largest true relative residual
:math:`\|b - A w\| / \|b\|` among the well- and the ill-conditioned samples, and the
converged fraction. Right-hand sides are standard normal, ``rtol = --cg-rtol``.

How to run
----------
From the repository root::

    nice -n 10 .venv/bin/python -m experiments.benchmarks.inverse_solvers          # 5-7 minutes
    .venv/bin/python -m experiments.benchmarks.inverse_solvers --dims 2 16 64      # about 1 minute
    .venv/bin/python -m experiments.benchmarks.inverse_solvers --quick             # smoke run, < 30 s
    .venv/bin/python -m experiments.benchmarks.inverse_solvers --dims 2 16 --points 200

The default run takes 5-7 minutes on a shared 2-core machine, most of it the
``d = 256`` randomised problem (condition numbers ~3e4: thousands of batched
Hessian-vector products for Newton-CG, over a thousand L-BFGS iterations).
Results go to ``experiments/benchmarks/results/inverse_solvers.json`` (``--out``)
and the printed tables to the ``.md`` file next to it. ``--threads`` (default 1)
sets torch's intra-op threads: one thread gives stable timings on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

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
from pyro_cpflow.derivatives import PotentialTrace
from pyro_cpflow.linalg import CGResult, conjugate_gradient
from pyro_cpflow.nn import ICNN
from pyro_cpflow.potential import ConvexPotential, inverse_softplus
from pyro_cpflow.solvers import InverseReport, solve_gradient_equation

DTYPE = torch.float64
HIDDEN = [64, 64]
WARMUP_POINTS = 8
CONDITION_POINTS = 100
PERTURBATION_STD = 2.0
MATCHED_LABEL = "newton-cg, tol = L-BFGS resid."
FAR_SCALE, NEAR_SCALE = 100.0, 0.3

MatVec = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------
# potentials and problems
# ---------------------------------------------------------------------------------------


def make_potential(dim: int, device: torch.device) -> ConvexPotential:
    """The benchmark potential at its initialisation, float64, parameters frozen."""
    potential = ConvexPotential(ICNN(dim, HIDDEN, augmented=True), dim).to(device, DTYPE)
    potential.requires_grad_(False)
    return potential


def randomise_(
    potential: ConvexPotential, std: float, network_scale: float, network_only: bool = False
) -> ConvexPotential:
    """Perturb parameters by ``std * randn`` and set :math:`\\sigma` to ``network_scale``."""
    perturbed = potential.network if network_only else potential
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(std * torch.randn_like(parameter))
        potential.raw_scale.fill_(inverse_softplus(network_scale))
    return potential


def hessians(potential: ConvexPotential, x: Tensor) -> Tensor:
    """Dense Hessians ``(N, d, d)`` of the potential at the rows of ``x``."""
    with torch.no_grad():
        return potential.evaluate(x).hessian()


def condition_numbers(matrices: Tensor) -> Tensor:
    """Spectral condition numbers of a batch of SPD matrices."""
    eigenvalues = torch.linalg.eigvalsh(matrices)
    return eigenvalues[:, -1] / eigenvalues[:, 0]


@dataclass
class Problem:
    """``y = grad F(x_true)`` for one potential, with the solvers' starting point."""

    dim: int
    kind: str
    potential: ConvexPotential
    x_true: Tensor
    y: Tensor
    initial: Tensor
    kappa_median: float
    kappa_max: float


def make_problem(dim: int, kind: str, points: int, device: torch.device) -> Problem:
    potential = make_potential(dim, device)
    if kind == "randomised":
        randomise_(potential, PERTURBATION_STD, network_scale=1.0)
    x_true = torch.randn(points, dim, dtype=DTYPE, device=device)
    y = potential.gradient(x_true)
    kappa = condition_numbers(hessians(potential, x_true[:CONDITION_POINTS]))
    return Problem(
        dim,
        kind,
        potential,
        x_true,
        y,
        potential.initial_inverse_guess(y),
        float(kappa.median()),
        float(kappa.max()),
    )


# ---------------------------------------------------------------------------------------
# table 1: Newton-CG against L-BFGS
# ---------------------------------------------------------------------------------------


class CountingPotential:
    """Wraps a potential and counts its batched evaluations (through the library's engine)."""

    def __init__(self, potential: ConvexPotential) -> None:
        self.potential = potential
        self.calls = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.potential(x)

    def evaluate(self, x: Tensor, context: Tensor | None = None, derivatives: bool = True) -> PotentialTrace:
        self.calls += 1
        return self.potential.evaluate(x, context, derivatives)


def stop_reason(report: InverseReport, max_iter: int) -> str:
    if report.all_converged:
        return "converged"
    if int(report.iterations.max()) >= max_iter:
        return "max_iter"
    return "stalled"


@dataclass
class SolverRow:
    dim: int
    potential: str
    kappa_median: float
    kappa_max: float
    method: str
    label: str
    time_s: float
    timed_runs: int
    max_residual: float
    max_error: float
    iterations_max: int
    iterations_mean: float
    work: int
    work_kind: str
    potential_evaluations: int
    converged_fraction: float
    stop: str
    tol: float
    max_iter: int
    speedup: float | None = None


def run_solver(
    problem: Problem,
    method: str,
    tol: float,
    max_iter: int,
    args: argparse.Namespace,
    device: torch.device,
    label: str | None = None,
) -> SolverRow:
    """Time one solver on one problem and summarise its report."""

    def solve(points: slice = slice(None)) -> tuple[Tensor, InverseReport, int]:
        counted = CountingPotential(problem.potential)
        # Newton-CG preconditions its CG solves by Q^{-1}, as CPFlow does
        preconditioner = problem.potential.factorize().solve if method == "newton-cg" else None
        x, report = solve_gradient_equation(
            counted,
            problem.y[points],
            initial=problem.initial[points],
            method=method,
            tol=tol,
            max_iter=max_iter,
            on_failure="ignore",
            preconditioner=preconditioner,
        )
        return x, report, counted.calls

    solve(slice(0, WARMUP_POINTS))  # warm-up on a few points: cheap even when slow
    timing, (x, report, calls) = time_call(
        solve, device, warmup=0, repeats=args.repeats, budget_s=args.budget
    )
    return SolverRow(
        dim=problem.dim,
        potential=problem.kind,
        kappa_median=problem.kappa_median,
        kappa_max=problem.kappa_max,
        method=method,
        label=label or method,
        time_s=timing.median_s,
        timed_runs=timing.repeats,
        max_residual=float(report.residual.max()),
        max_error=float((x - problem.x_true).abs().max()),
        iterations_max=int(report.iterations.max()),
        iterations_mean=float(report.iterations.double().mean()),
        work=report.hessian_products,
        work_kind="HVP" if method == "newton-cg" else "grad",
        potential_evaluations=calls,
        converged_fraction=float(report.converged.double().mean()),
        stop=stop_reason(report, max_iter),
        tol=report.tol,
        max_iter=max_iter,
    )


def solver_rows(args: argparse.Namespace, device: torch.device) -> list[SolverRow]:
    rows: list[SolverRow] = []
    for dim in args.dims:
        for kind in ("init", "randomised"):
            problem = make_problem(dim, kind, args.points, device)
            newton = run_solver(problem, "newton-cg", args.tol, args.newton_max_iter, args, device)
            lbfgs = run_solver(problem, "lbfgs", args.tol, args.lbfgs_max_iter, args, device)
            group = [newton]
            if lbfgs.stop != "converged" and newton.time_s <= args.matched_budget:
                # Newton-CG once more, to the accuracy L-BFGS reached
                group.append(
                    run_solver(
                        problem,
                        "newton-cg",
                        max(lbfgs.max_residual, args.tol),
                        args.newton_max_iter,
                        args,
                        device,
                        label=MATCHED_LABEL,
                    )
                )
            for row in group:
                row.speedup = lbfgs.time_s / row.time_s
            rows += group + [lbfgs]
            print(
                f"  d={dim:<4} {kind:<10} newton-cg {newton.time_s:8.3f}s  "
                f"lbfgs {lbfgs.time_s:8.3f}s ({lbfgs.stop})",
                flush=True,
            )
    return rows


def speedup_cell(row: SolverRow, rows: list[SolverRow]) -> str:
    """``t_lbfgs / t_row``; a lower bound (≥) when only the Newton-CG row reached ``tol``."""
    if row.speedup is None:
        return ""
    partner = next(r for r in rows if (r.dim, r.potential, r.method) == (row.dim, row.potential, "lbfgs"))
    lower_bound = row.label == "newton-cg" and partner.stop != "converged" and row.stop == "converged"
    return f"{'≥ ' if lower_bound else ''}{row.speedup:.1f}×"


def solver_table(rows: list[SolverRow]) -> str:
    headers = [
        "d",
        "potential",
        "κ(H) median / max",
        "method",
        "time (s)",
        "max resid.",
        "max err. vs x",
        "iters max / mean",
        "work (batched)",
        "F evals",
        "converged",
        "stop",
        "Newton-CG speed-up",
    ]
    cells = [
        [
            r.dim,
            r.potential,
            f"{fmt(r.kappa_median)} / {fmt(r.kappa_max)}",
            r.label,
            fmt(r.time_s, ".3f"),
            fmt(r.max_residual, ".1e"),
            fmt(r.max_error, ".1e"),
            f"{r.iterations_max} / {fmt(r.iterations_mean, '.1f')}",
            f"{r.work} {r.work_kind}",
            r.potential_evaluations,
            fmt(r.converged_fraction, ".0%"),
            r.stop,
            speedup_cell(r, rows),
        ]
        for r in rows
    ]
    return markdown_table(headers, cells)


# ---------------------------------------------------------------------------------------
# table 2: per-sample against batch-global CG
# ---------------------------------------------------------------------------------------


def batch_global_cg(
    matvec: MatVec, rhs: Tensor, rtol: float, max_iter: int, criterion: str = "all"
) -> CGResult:
    """Classic batched CG: every sample updates every iteration until a batch criterion holds.

    ``criterion="all"``: every sample has :math:`|r_i| \\le \\mathrm{rtol} |b_i|`;
    ``"batch-norm"``: :math:`\\|R\\|_F \\le \\mathrm{rtol} \\|B\\|_F`. Each sample's
    iteration count is the global count. Divisions are guarded so that samples that
    have converged exactly do not produce NaN.
    """
    if criterion not in ("all", "batch-norm"):
        raise ValueError(f"unknown criterion {criterion!r}")
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    residual_sq = (residual * residual).sum(-1)
    rhs_norm = rhs.norm(dim=-1)

    def finished() -> bool:
        if criterion == "all":
            return bool((residual_sq.sqrt() <= rtol * rhs_norm).all())
        return float(residual_sq.sum().sqrt()) <= rtol * float(rhs_norm.square().sum().sqrt())

    count = 0
    while count < max_iter and not finished():
        product = matvec(direction)
        curvature = (direction * product).sum(-1)
        step = torch.where(curvature > 0, residual_sq / curvature.clamp_min(1e-300), 0.0)
        solution = solution + step[:, None] * direction
        residual = residual - step[:, None] * product
        new_residual_sq = (residual * residual).sum(-1)
        ratio = torch.where(residual_sq > 0, new_residual_sq / residual_sq.clamp_min(1e-300), 0.0)
        direction = residual + ratio[:, None] * direction
        residual_sq = new_residual_sq
        count += 1
    iterations = torch.full(rhs.shape[:1], count, dtype=torch.long, device=rhs.device)
    norm = residual_sq.sqrt()
    return CGResult(solution, iterations, norm, norm <= rtol * rhs_norm)


class CountingMatVec:
    """Wraps a batched mat-vec and counts its calls."""

    def __init__(self, matvec: MatVec) -> None:
        self.matvec = matvec
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.matvec(v)


@dataclass
class MixedBatch:
    """A batch of SPD operators, given by a mat-vec, with a mask of its ill-conditioned samples."""

    name: str
    matvec: MatVec
    ill: Tensor
    kappa: Tensor

    def kappa_range(self, mask: Tensor) -> str:
        values = self.kappa[mask]
        return f"{fmt(float(values.min()))}–{fmt(float(values.max()))}"


def random_spd(conditions: Tensor, dim: int, device: torch.device) -> Tensor:
    """SPD matrices with eigenvalues log-spaced in ``[1, condition]``, random eigenvectors."""
    n = conditions.shape[0]
    basis, _ = torch.linalg.qr(torch.randn(n, dim, dim, dtype=DTYPE, device=device))
    steps = torch.linspace(0.0, 1.0, dim, dtype=DTYPE, device=device)
    eigenvalues = conditions[:, None] ** steps[None, :]
    return basis @ torch.diag_embed(eigenvalues) @ basis.transpose(-1, -2)


def synthetic_batch(dim: int, n_well: int, n_ill: int, device: torch.device) -> MixedBatch:
    conditions = torch.tensor([10.0] * n_well + [1e5] * n_ill, dtype=DTYPE, device=device)
    matrices = random_spd(conditions, dim, device)
    ill = torch.arange(n_well + n_ill, device=device) >= n_well
    return MixedBatch(
        f"synthetic (κ 10 ×{n_well}, 1e5 ×{n_ill})",
        lambda v: torch.einsum("nij,nj->ni", matrices, v),
        ill,
        condition_numbers(matrices),
    )


def select_by_condition(
    potential: ConvexPotential, scale: float, count: int, largest: bool, device: torch.device
) -> Tensor:
    """Of ``4 count`` points ``x ~ N(0, scale^2 I)``, the ``count`` with the smallest
    (or largest) condition number of the Hessian."""
    pool = scale * torch.randn(4 * count, potential.input_dim, dtype=DTYPE, device=device)
    order = condition_numbers(hessians(potential, pool)).argsort(descending=largest)
    return pool[order[:count]]


def flow_hessian_batch(dim: int, n_far: int, n_near: int, device: torch.device) -> MixedBatch:
    """Hessians of a randomised potential: flat far away, strongly curved near 0."""
    potential = randomise_(make_potential(dim, device), PERTURBATION_STD, 1000.0, network_only=True)
    far = select_by_condition(potential, FAR_SCALE, n_far, largest=False, device=device)
    near = select_by_condition(potential, NEAR_SCALE, n_near, largest=True, device=device)
    with torch.no_grad():
        trace = potential.evaluate(torch.cat([far, near]))
        kappa = condition_numbers(trace.hessian())
    ill = torch.arange(n_far + n_near, device=device) >= n_far
    return MixedBatch(
        f"flow Hessian ({n_far} far + {n_near} near points)",
        trace.hvp,
        ill,
        kappa,
    )


CGSolver = Callable[[MatVec, Tensor], CGResult]


def cg_solvers(rtol: float, max_iter: int) -> dict[str, CGSolver]:
    return {
        "per-sample (library)": lambda mv, b: conjugate_gradient(mv, b, rtol=rtol, max_iter=max_iter),
        "global: all below rtol": lambda mv, b: batch_global_cg(mv, b, rtol, max_iter, "all"),
        "global: batch norm": lambda mv, b: batch_global_cg(mv, b, rtol, max_iter, "batch-norm"),
    }


@dataclass
class CGRow:
    batch: str
    kappa_well: str
    kappa_ill: str
    solver: str
    rtol: float
    iterations_mean: float
    iterations_max: int
    iterations_sum: int
    matvec_calls: int
    time_ms: float
    max_rel_residual_well: float
    max_rel_residual_ill: float
    converged_fraction: float


def run_cg(
    batch: MixedBatch,
    solver_name: str,
    solver: CGSolver,
    rhs: Tensor,
    rtol: float,
    device: torch.device,
) -> CGRow:
    counter = CountingMatVec(batch.matvec)
    timing, result = time_call(lambda: solver(counter, rhs), device, warmup=1, repeats=5, budget_s=2.0)
    calls = counter.calls // (timing.warmup + timing.repeats)
    with torch.no_grad():
        true_residual = (rhs - batch.matvec(result.solution)).norm(dim=-1) / rhs.norm(dim=-1)
    return CGRow(
        batch=batch.name,
        kappa_well=batch.kappa_range(~batch.ill),
        kappa_ill=batch.kappa_range(batch.ill),
        solver=solver_name,
        rtol=rtol,
        iterations_mean=float(result.iterations.double().mean()),
        iterations_max=int(result.iterations.max()),
        iterations_sum=int(result.iterations.sum()),
        matvec_calls=calls,
        time_ms=1e3 * timing.median_s,
        max_rel_residual_well=float(true_residual[~batch.ill].max()),
        max_rel_residual_ill=float(true_residual[batch.ill].max()),
        converged_fraction=float(result.converged.double().mean()),
    )


def cg_rows(args: argparse.Namespace, device: torch.device) -> list[CGRow]:
    n_ill = max(1, round(args.cg_batch * 0.05))
    n_well = args.cg_batch - n_ill
    batches = [
        synthetic_batch(args.cg_dim, n_well, n_ill, device),
        flow_hessian_batch(args.cg_dim, n_well, n_ill, device),
    ]
    max_iter = 10 * args.cg_dim
    rows = []
    for batch in batches:
        rhs = torch.randn(args.cg_batch, args.cg_dim, dtype=DTYPE, device=device)
        for name, solver in cg_solvers(args.cg_rtol, max_iter).items():
            rows.append(run_cg(batch, name, solver, rhs, args.cg_rtol, device))
    return rows


def cg_table(rows: list[CGRow]) -> str:
    headers = [
        "batch",
        "κ well",
        "κ ill",
        "CG",
        "iters mean / max",
        "Σ iters (active work)",
        "batched mat-vecs",
        "time (ms)",
        "max rel. resid. well",
        "max rel. resid. ill",
        "converged",
    ]
    cells = [
        [
            r.batch,
            r.kappa_well,
            r.kappa_ill,
            r.solver,
            f"{fmt(r.iterations_mean, '.1f')} / {r.iterations_max}",
            r.iterations_sum,
            r.matvec_calls,
            fmt(r.time_ms, ".1f"),
            fmt(r.max_rel_residual_well, ".1e"),
            fmt(r.max_rel_residual_ill, ".1e"),
            fmt(r.converged_fraction, ".0%"),
        ]
        for r in rows
    ]
    return markdown_table(headers, cells)


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = base_parser(__file__, __doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64, 256])
    parser.add_argument("--points", type=int, default=1000, help="points per problem")
    parser.add_argument("--tol", type=float, default=1e-10, help="|grad F(x) - y|_inf tolerance")
    parser.add_argument("--newton-max-iter", type=int, default=100)
    parser.add_argument("--lbfgs-max-iter", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="timed solves at most")
    parser.add_argument(
        "--budget", type=float, default=10.0, help="stop repeating a configuration after this many seconds"
    )
    parser.add_argument(
        "--matched-budget",
        type=float,
        default=30.0,
        help="rerun Newton-CG to L-BFGS's residual only when its full solve took at most this many seconds",
    )
    parser.add_argument("--cg-dim", type=int, default=64)
    parser.add_argument("--cg-batch", type=int, default=100)
    parser.add_argument("--cg-rtol", type=float, default=1e-8)
    args = parser.parse_args()
    if args.quick:
        args.dims, args.points, args.lbfgs_max_iter = [2, 16], 100, 300
        args.repeats, args.cg_dim, args.cg_batch = 1, 16, 40
    return args


def summary(rows: list[SolverRow], dim: int = 64) -> str:
    lines = []
    for row in rows:
        if row.method == "newton-cg" and row.dim == dim:
            lines.append(
                f"- d = {dim}, {row.potential}, {row.label} (tol {row.tol:.1e}): speed-up over "
                f"L-BFGS {speedup_cell(row, rows)}, residual {row.max_residual:.1e}"
            )
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    device = setup(args)
    conditions = machine_summary(device)
    print("Table 1: Newton-CG vs L-BFGS ...", flush=True)
    solver_results = solver_rows(args, device)
    print("Table 2: per-sample vs batch-global CG ...", flush=True)
    cg_results = cg_rows(args, device)
    tol_used = solver_results[0].tol
    markdown = "\n\n".join(
        part
        for part in [
            f"## Inverse solvers: Newton-CG vs batch-wide L-BFGS\n\n{args.points} points per problem, "
            f"float64, tol = {tol_used:g} on |grad F(x) - y|_inf, L-BFGS max_iter = "
            f"{args.lbfgs_max_iter}, Newton max_iter = {args.newton_max_iter}; {conditions}. "
            "Work: batched Hessian-vector products "
            "(Newton-CG) or gradient evaluations (L-BFGS); F evals: batched potential evaluations.",
            solver_table(solver_results),
            "Speed-up = L-BFGS time / the row's time. ≥: a lower bound, because L-BFGS "
            "stalled above tol (its strong-Wolfe line search stopped making progress) while "
            "Newton-CG reached tol; the row `newton-cg, tol = L-BFGS resid.` compares at equal "
            "accuracy.",
            summary(solver_results) if 64 in args.dims else "",
            f"## Per-sample vs batch-global CG on mixed batches\n\nd = {args.cg_dim}, batch "
            f"{args.cg_batch}, rtol = {args.cg_rtol:g}, max_iter = {10 * args.cg_dim}.",
            cg_table(cg_results),
        ]
        if part
    )
    print("\n" + markdown)
    payload: dict[str, Any] = {
        "tol": tol_used,
        "solvers": [asdict(r) for r in solver_results],
        "cg": [asdict(r) for r in cg_results],
    }
    save_results(args.out, payload, markdown, device, args, started)


if __name__ == "__main__":
    main()
