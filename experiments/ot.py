r"""Does maximum likelihood make CP-Flow learn the optimal transport map? (Huang et al. 2021, fig. 4)

Data :math:`N(m, \Sigma)`, base :math:`N(0, I)`. A CP-Flow block ``f = grad F``, fitted
by maximum likelihood in the density direction, pushes the data to the base; being
the gradient of a convex function it should converge to the Brenier (OT) map

.. math::

    T(x) = \Sigma^{-1/2}(x - m), \qquad
    W_2^2 = \mathbb{E}|x - T(x)|^2 = |m|^2 + \mathrm{tr}\,\Sigma + d - 2\,\mathrm{tr}\,\Sigma^{1/2}.

The comparison is a linear autoregressive flow :math:`f(x) = A x + b` (``A`` lower
triangular, positive diagonal; sampling :math:`x = A^{-1}(z - b)` is a linear inverse
autoregressive flow). It fits the density exactly, but its map is the triangular
(Knothe-Rosenblatt) map :math:`A = \mathrm{chol}(\Sigma)^{-1}`, not the OT map.

Recorded along training, on a fixed held-out sample: :math:`\mathrm{KL}(p_{data}\,\|\,
p_{model})` (closed form for the linear flow, a Monte Carlo average of
:math:`\log p_{data} - \log p_{model}` for CP-Flow), the transport cost
:math:`\mathbb{E}|x - f(x)|^2` and :math:`\text{L2-UVP} = 100\,\mathbb{E}|f(x) - T(x)|^2 / d`
(:math:`d = \mathbb{E}|T(x) - \mathbb{E}T(x)|^2`).

Problems: the paper's case (``d = 2``, ``m = (1.5, 1)``, :math:`\Sigma = [[0.9, -0.75],
[-0.75, 0.9]]`) and random ones in ``d = 2, 4, 8, 16, 32`` (random rotation,
eigenvalues log-uniform in [0.2, 5], ``m ~ N(0, I)``).

Run ``python -m experiments.ot`` (about 6 minutes on 2 CPU cores); it writes
``results/ot.json``, ``results/ot_cost_vs_kl.png`` and the "Optimal transport" section
of ``RESULTS.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from experiments import common
from pyro_cpflow import cpflow

__all__ = [
    "GaussianProblem",
    "LinearIAF",
    "OTConfig",
    "markdown_section",
    "paper_problem",
    "plot_cost_vs_kl",
    "random_problem",
    "run",
]

TITLE = "Optimal transport"


# ------------------------------------------------------------------------ problems


def _symmetric_power(matrix: Tensor, power: float) -> Tensor:
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    return (vectors * eigenvalues.pow(power)) @ vectors.T


@dataclass
class GaussianProblem:
    """Data :math:`N(m, \\Sigma)`, base :math:`N(0, I)`, and the closed-form OT quantities."""

    name: str
    mean: Tensor
    cov: Tensor

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> GaussianProblem:
        return GaussianProblem(self.name, self.mean.to(device, dtype), self.cov.to(device, dtype))

    def distribution(self) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.mean, covariance_matrix=self.cov)

    def sample(self, n: int, seed: int) -> Tensor:
        """``n`` data points from a CPU generator seeded with ``seed`` (reproducible on any device)."""
        z = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        z = z.to(self.mean.device, self.mean.dtype)
        return self.mean + z @ torch.linalg.cholesky(self.cov).T

    def ot_map(self, x: Tensor) -> Tensor:
        """Brenier map :math:`T(x) = \\Sigma^{-1/2}(x - m)` to :math:`N(0, I)`."""
        return (x - self.mean) @ _symmetric_power(self.cov, -0.5)

    def w2_squared(self) -> float:
        """:math:`W_2^2 = |m|^2 + \\mathrm{tr}\\,\\Sigma + d - 2\\,\\mathrm{tr}\\,\\Sigma^{1/2}`."""
        root = _symmetric_power(self.cov, 0.5)
        return float(self.mean.pow(2).sum() + torch.trace(self.cov) + self.dim - 2 * torch.trace(root))


def paper_problem() -> GaussianProblem:
    """The case of the paper's figure 4: ``m = (1.5, 1)``, ``Sigma = [[0.9, -0.75], [-0.75, 0.9]]``."""
    mean = torch.tensor([1.5, 1.0], dtype=torch.float64)
    cov = torch.tensor([[0.9, -0.75], [-0.75, 0.9]], dtype=torch.float64)
    return GaussianProblem("paper (d=2)", mean, cov)


def random_problem(dim: int, seed: int, low: float = 0.2, high: float = 5.0) -> GaussianProblem:
    """Random rotation, eigenvalues log-uniform in ``[low, high]``, ``m ~ N(0, I)``.

    >>> problem = random_problem(4, seed=0)
    >>> eigenvalues = torch.linalg.eigvalsh(problem.cov)
    >>> bool(torch.allclose(problem.cov, problem.cov.T)) and bool((eigenvalues >= 0.2 - 1e-9).all())
    True
    """
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    log_eigen = math.log(low) + (math.log(high) - math.log(low)) * torch.rand(
        dim, generator=g, dtype=torch.float64
    )
    cov = (rotation * log_eigen.exp()) @ rotation.T
    cov = 0.5 * (cov + cov.T)
    mean = torch.randn(dim, generator=g, dtype=torch.float64)
    return GaussianProblem(f"random d={dim}", mean, cov)


# --------------------------------------------------------------------- linear flow


class LinearIAF(TransformModule):
    r"""Linear autoregressive flow :math:`f(x) = A x + b` from data to base, ``A`` lower triangular.

    The diagonal of ``A`` is :math:`e^{\ell} > 0`. The model density is
    :math:`N(-A^{-1} b, (A^\top A)^{-1})`; sampling :math:`x = A^{-1}(z - b)` is the
    linear inverse autoregressive flow (:math:`x_i` depends on :math:`z_{\le i}`).
    Parametrised in the density direction, the negative log-likelihood is convex in
    ``(A, b)``, so the fit is well conditioned. Starts at the identity; use
    ``TransformedDistribution(base, [flow.inv])``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, dim: int) -> None:
        super().__init__(cache_size=0)  # no (x, y) cache: it would go stale after optimiser steps
        self.dim = dim
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.lower = nn.Parameter(torch.zeros(dim * (dim - 1) // 2))

    def matrix(self) -> Tensor:
        """The lower-triangular ``A``."""
        rows, cols = torch.tril_indices(self.dim, self.dim, -1, device=self.shift.device)
        return torch.diag(self.log_diag.exp()).index_put((rows, cols), self.lower)

    def _call(self, x: Tensor) -> Tensor:
        return x @ self.matrix().T + self.shift

    def _inverse(self, z: Tensor) -> Tensor:
        rhs = (z - self.shift).reshape(-1, self.dim).T
        return torch.linalg.solve_triangular(self.matrix(), rhs, upper=False).T.reshape(z.shape)

    def log_abs_det_jacobian(self, x: Tensor, z: Tensor) -> Tensor:
        return self.log_diag.sum().expand(x.shape[:-1])

    def closed_form(self, problem: GaussianProblem) -> dict[str, float]:
        """Exact KL(data || model), transport cost and L2-UVP of ``f(x) = A x + b``."""
        with torch.no_grad():
            a, b = self.matrix(), self.shift
            eye = torch.eye(self.dim, dtype=a.dtype, device=a.device)
            model_scale = torch.linalg.solve_triangular(a, eye, upper=False)  # model cov = A^-1 A^-T
            model = dist.MultivariateNormal(-model_scale @ b, scale_tril=model_scale)
            kl = float(torch.distributions.kl_divergence(problem.distribution(), model))
            m, cov = problem.mean, problem.cov
            residual = eye - a  # x - f(x) = (I - A) x - b
            cost = (residual @ m - b).pow(2).sum() + torch.trace(residual @ cov @ residual.T)
            root_inv = _symmetric_power(cov, -0.5)
            error = a - root_inv  # f(x) - T(x) = (A - S) x + b + S m
            uvp = (error @ m + b + root_inv @ m).pow(2).sum() + torch.trace(error @ cov @ error.T)
        return {"kl": kl, "cost": float(cost), "l2_uvp": float(100 * uvp / self.dim)}


# ----------------------------------------------------------------------- metrics


def _batched(fn, x: Tensor, chunk: int = 4096) -> Tensor:
    return torch.cat([fn(part).detach() for part in x.split(chunk)])


def map_metrics(
    to_base, log_prob, problem: GaussianProblem, x: Tensor, data_log_prob: Tensor
) -> dict[str, float]:
    """Monte Carlo KL(data || model), transport cost and L2-UVP on the held-out sample ``x``."""
    with torch.no_grad():
        fx = _batched(to_base, x)
        model_log_prob = _batched(log_prob, x)
        target = problem.ot_map(x)
    cost = (x - fx).pow(2).sum(-1)
    return {
        "kl": float((data_log_prob - model_log_prob).mean()),
        "cost": float(cost.mean()),
        # the same sample's cost under the true OT map subtracted: a low-variance excess cost
        "paired_excess_cost": float((cost - (x - target).pow(2).sum(-1)).mean()),
        "l2_uvp": float(100 * (fx - target).pow(2).sum(-1).mean() / problem.dim),
    }


# ---------------------------------------------------------------------- experiment


@dataclass
class OTConfig:
    """Settings of one run (the defaults are those of the committed results)."""

    dims: Sequence[int] = (2, 4, 8, 16, 32)
    paper_case: bool = True
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-2
    linear_lr: float = 5e-2
    hidden: int = 32
    seed: int = 0
    n_eval: int = 20000
    n_curve: int = 4000
    evals: int = 15
    device: str = "cpu"
    dtype: str = "float64"
    show_progress: bool = True

    def problems(self) -> list[GaussianProblem]:
        problems = [paper_problem()] if self.paper_case else []
        return problems + [random_problem(d, seed=1000 * self.seed + d) for d in self.dims]


def _fit(
    name: str,
    module: nn.Module,
    distribution: dist.Distribution,
    problem: GaussianProblem,
    config: OTConfig,
    lr: float,
    train_seed: int,
    evaluate: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    curve: list[dict[str, float]] = []

    def record(step: int) -> None:
        curve.append({"step": step, **evaluate()})

    start = time.perf_counter()
    losses = common.fit_density(
        module,
        distribution,
        lambda step: problem.sample(config.batch_size, seed=train_seed + step),
        config.steps,
        lr,
        callback=record,
        callback_every=max(1, config.steps // max(config.evals, 1)),
        desc=f"{problem.name} | {name}",
        show_progress=config.show_progress,
    )
    seconds = time.perf_counter() - start
    window = max(1, min(50, len(losses) // 5))
    return {
        "curve": curve,
        "seconds": seconds,
        "parameters": common.count_parameters(module),
        "train_loss_start": sum(losses[:window]) / window,
        "train_loss_end": sum(losses[-window:]) / window,
    }


def run_problem(problem: GaussianProblem, index: int, config: OTConfig) -> dict[str, Any]:
    """Fit CP-Flow and the linear IAF to one problem; return curves and final metrics."""
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    problem = problem.to(device, dtype)
    d = problem.dim
    held_out = problem.sample(config.n_eval, seed=7_000_000 + 1000 * config.seed + index)
    curve_set = held_out[: config.n_curve]
    data_log_prob = problem.distribution().log_prob(held_out)
    base = common.standard_normal(d, device, dtype)
    train_seed = 1_000_000 * (config.seed + 1) + 10_000 * index
    ot_cost_sample = float((held_out - problem.ot_map(held_out)).pow(2).sum(-1).mean())
    entry: dict[str, Any] = {
        "dim": d,
        "w2_squared": problem.w2_squared(),
        "ot_map_cost_on_held_out": ot_cost_sample,
        "mean": problem.mean.tolist(),
        "cov_eigenvalues": torch.linalg.eigvalsh(problem.cov).tolist(),
    }

    torch.manual_seed(1000 * config.seed + index)
    flow = cpflow(d, hidden_dims=(config.hidden, config.hidden), logdet="exact").to(device, dtype)
    cp_dist = dist.TransformedDistribution(base, [flow.inv])

    def cp_metrics(x: Tensor, lp: Tensor) -> dict[str, float]:
        return map_metrics(flow, cp_dist.log_prob, problem, x, lp)

    entry["cpflow"] = _fit(
        "CP-Flow",
        flow,
        cp_dist,
        problem,
        config,
        config.lr,
        train_seed,
        lambda: cp_metrics(curve_set, data_log_prob[: config.n_curve]),
    )
    entry["cpflow"]["final"] = cp_metrics(held_out, data_log_prob)

    torch.manual_seed(1000 * config.seed + index)
    linear = LinearIAF(d).to(device, dtype)
    lin_dist = dist.TransformedDistribution(base, [linear.inv])
    entry["linear_iaf"] = _fit(
        "linear IAF",
        linear,
        lin_dist,
        problem,
        config,
        config.linear_lr,
        train_seed,
        lambda: linear.closed_form(problem),
    )
    entry["linear_iaf"]["final"] = linear.closed_form(problem)
    entry["linear_iaf"]["final_monte_carlo"] = map_metrics(
        linear, lin_dist.log_prob, problem, held_out, data_log_prob
    )
    return entry


def run(config: OTConfig) -> dict[str, Any]:
    """Run every problem of ``config``; return the JSON-able record."""
    config_record = asdict(config) | {"dims": list(config.dims)}
    record: dict[str, Any] = {"config": config_record, "problems": {}}
    for index, problem in enumerate(config.problems()):
        record["problems"][problem.name] = run_problem(problem, index, config)
    return record


# -------------------------------------------------------------------------- output


def plot_cost_vs_kl(record: dict[str, Any], path: Path) -> Path:
    """One panel per problem: transport cost against KL along training, W2^2 as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = record["problems"]
    cols = min(3, len(problems))
    rows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, entry) in zip(axes.flat, problems.items(), strict=False):  # spare panels stay empty
        for key, label, color in (("cpflow", "CP-Flow", "C0"), ("linear_iaf", "linear IAF", "C1")):
            curve = entry[key]["curve"]
            kl = [point["kl"] for point in curve]
            cost = [point["cost"] for point in curve]
            ax.plot(kl, cost, "o-", ms=3, color=color, label=label)
            ax.plot(kl[-1:], cost[-1:], "*", ms=10, color=color)
        w2 = entry["w2_squared"]
        ax.axhline(w2, color="k", ls="--", lw=1, label=r"$W_2^2$")
        # symlog: Monte Carlo KL estimates of a near-perfect fit can be slightly negative
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlim(-1e-3, None)
        ax.set_xlabel("KL(data || model)  (linear below 1e-3)")
        ax.set_ylabel(r"transport cost $E|x - f(x)|^2$")
        ax.set_title(name)
        top = max(p["cost"] for k in ("cpflow", "linear_iaf") for p in entry[k]["curve"])
        ax.set_ylim(0.0, 1.15 * max(top, w2))
        cp, lin = entry["cpflow"]["final"], entry["linear_iaf"]["final"]
        summary = (
            f"CP-Flow: gap {100 * (cp['cost'] - w2) / w2:+.1f}%, L2-UVP {cp['l2_uvp']:.2f}%\n"
            f"linear IAF: gap {100 * (lin['cost'] - w2) / w2:+.1f}%, L2-UVP {lin['l2_uvp']:.1f}%"
        )
        ax.text(0.03, 0.04, summary, transform=ax.transAxes, fontsize=7, va="bottom")
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    fig.suptitle(
        "Transport cost vs KL during maximum-likelihood training (both start near the identity; star: end)",
        fontsize=10,
    )
    return common.save_figure(fig, path)


def markdown_section(record: dict[str, Any], markdown_path: Path = common.RESULTS_MD) -> str:
    """The "Optimal transport" section of RESULTS.md, generated from the JSON record."""
    config = record["config"]
    lines = [
        f"Command: `{record['command']}`  ",
        f"Run time: {record['seconds'] / 60:.1f} min on {record['environment']['device']} "
        f"({record['environment']['torch_threads']} torch thread(s), {config['dtype']}).  ",
        f"One CP-Flow block (ICNN hidden ({config['hidden']}, {config['hidden']}), exact log-det) "
        f"and a linear IAF (lower-triangular affine map), each {config['steps']} Adam steps (cosine "
        f"decay from lr {config['lr']:g} for CP-Flow, {config['linear_lr']:g} for the linear IAF, which "
        f"is slow to converge at the smaller rate) on batches of {config['batch_size']} fresh samples. "
        f"CP-Flow metrics are Monte Carlo averages over a fixed held-out sample of {config['n_eval']}; "
        "the linear IAF's are closed-form. "
        "Gap = (cost - W2^2) / W2^2 with the closed-form W2^2. The plain Monte Carlo cost carries the "
        "sampling error of the held-out set (the true OT map's cost on that set differs from W2^2 by "
        "up to about 1%); the paired gap = mean(|x - f(x)|^2 - |x - T(x)|^2) / W2^2 over the same points "
        "removes most of it.",
        "",
    ]
    rows = []
    for name, entry in record["problems"].items():
        w2 = entry["w2_squared"]
        cp, lin = entry["cpflow"]["final"], entry["linear_iaf"]["final"]
        rows.append(
            [
                name,
                f"{w2:.4f}",
                f"{cp['cost']:.4f}",
                f"{100 * (cp['cost'] - w2) / w2:+.2f}%",
                f"{100 * cp['paired_excess_cost'] / w2:+.3f}%",
                f"{cp['l2_uvp']:.3f}",
                f"{cp['kl']:.1e}",
                f"{lin['cost']:.4f}",
                f"{100 * (lin['cost'] - w2) / w2:+.2f}%",
                f"{lin['l2_uvp']:.2f}",
                f"{lin['kl']:.1e}",
                f"{entry['cpflow']['seconds']:.0f} s",
            ]
        )
    headers = [
        "problem",
        "W2^2",
        "CP-Flow cost",
        "gap",
        "paired gap",
        "L2-UVP %",
        "KL",
        "linear IAF cost",
        "gap",
        "L2-UVP %",
        "KL",
        "CP-Flow time",
    ]
    lines.append(common.markdown_table(headers, rows))
    lines += ["", f"![cost vs KL]({common.link(record['figure'], markdown_path)})", ""]
    lines.append(
        "Figure: transport cost against KL along training for each problem (the paper's figure 4); "
        "the dashed line is the closed-form W2^2."
    )
    return "\n".join(lines)


QUICK = dict(dims=[2], steps=300, batch_size=256, lr=2e-2, linear_lr=1e-1, n_eval=4000, n_curve=1000, evals=6)
"""Defaults of ``--quick``: a run of a few seconds for smoke tests."""


def config_from_args(argv: Sequence[str]) -> tuple[OTConfig, Any]:
    """Parse the command line into an :class:`OTConfig` (and the raw namespace)."""
    parser = common.build_parser(
        "python -m experiments.ot",
        __doc__.split("\n\n")[0],
        steps=OTConfig.steps,
        batch_size=OTConfig.batch_size,
        lr=OTConfig.lr,
    )
    parser.add_argument("--dims", type=int, nargs="*", default=list(OTConfig.dims), help="random problems")
    parser.add_argument("--no-paper-case", action="store_true", help="skip the paper's d=2 problem")
    parser.add_argument("--hidden", type=int, default=OTConfig.hidden, help="ICNN width (two layers)")
    parser.add_argument(
        "--linear-lr",
        type=float,
        default=OTConfig.linear_lr,
        help="peak learning rate of the linear IAF (it converges slowly at --lr)",
    )
    parser.add_argument("--n-eval", type=int, default=OTConfig.n_eval, help="held-out sample size")
    parser.add_argument(
        "--n-curve", type=int, default=OTConfig.n_curve, help="held-out points for the curves"
    )
    parser.add_argument("--evals", type=int, default=OTConfig.evals, help="evaluations along training")
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    config = OTConfig(
        dims=tuple(args.dims),
        paper_case=not args.no_paper_case,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        linear_lr=args.linear_lr,
        hidden=args.hidden,
        seed=args.seed,
        n_eval=args.n_eval,
        n_curve=args.n_curve,
        evals=args.evals,
        device=args.device,
        dtype=args.dtype,
        show_progress=not args.no_progress,
    )
    return config, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the JSON record."""
    argv = list(common.script_argv() if argv is None else argv)
    config, args = config_from_args(argv)
    json_path = args.out_dir / "ot.json"
    if args.render_only:  # the figure and the section come from the JSON alone
        record = common.read_json(json_path)
        plot_cost_vs_kl(record, args.out_dir / "ot_cost_vs_kl.png")
    else:
        common.setup_torch(args.device, args.dtype, args.threads, args.seed)
        with common.stopwatch() as clock:
            record = run(config)
        record.update(
            command=common.format_command("experiments.ot", argv),
            seconds=clock["seconds"],
            environment=common.environment(torch.device(args.device)),
        )
        figure = plot_cost_vs_kl(record, args.out_dir / "ot_cost_vs_kl.png")
        record["figure"] = common.relative_to_repo(figure)
        common.write_json(json_path, record)
    if args.results_md is not None:
        common.replace_markdown_section(args.results_md, TITLE, markdown_section(record, args.results_md))
    return record


if __name__ == "__main__":
    main()
