r"""Why CP-Flow NeuTra needs small steps: the curvature of the warped potential in the base space.

NeuTra runs HMC on :math:`U(\varepsilon) = -\log p(T(\varepsilon), y) - \log|\det T'(\varepsilon)|`,
with :math:`T` the trained guide's map from its base :math:`\mathcal N(0, I)`. Where the
guide is the posterior, :math:`U = \tfrac12|\varepsilon|^2 + \text{const}` and every Hessian
eigenvalue is 1; NUTS adapts its step size to the largest curvature it meets, so an
:math:`\varepsilon` where :math:`\nabla^2 U` has a large eigenvalue forces small steps. For
each guide, trained with the guide panel's budget on the centred eight schools and frozen in
eval mode, this script draws ``--points`` base points and reports the quantiles of the
largest and smallest eigenvalues of :math:`\nabla^2 U` (by autograd: the exact log-dets are
twice differentiable), and of the two parts of :math:`U`: the model's
:math:`-\log p(T(\varepsilon), y)` and the guide's :math:`-\log|\det T'|`.

Run ``python -m experiments.neutra_geometry`` (4 minutes); it writes
``results/neutra_geometry.json`` and the "NeuTra: the warped geometry" section of
``RESULTS.md``. ``--quick`` trains 30 steps and checks 5 points, writing nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch import Tensor

from experiments.common import (
    RESULTS_DIR,
    add_run_options,
    markdown_table,
    parse_run_args,
    positive,
    run_header,
    save_run,
)
from experiments.guide_models import build
from experiments.guide_panel import CPFLOW_VARIANTS, GUIDES, add_svi_budget_options, train
from pyro_cpflow.autoguide import negative_log_density

OUT_JSON = RESULTS_DIR / "neutra_geometry.json"
SECTION = "NeuTra: the warped geometry"
MODEL = "eight_schools"
QUANTILES = (0.5, 0.9, 0.99, 1.0)


def warped_parts(guide: Any) -> dict[str, Callable[[Tensor], Tensor]]:
    r"""The model part :math:`-\log p(T(\varepsilon), y)`, the guide part
    :math:`-\log|\det T'(\varepsilon)|` and their sum, each a function of one base point."""
    transform = guide.get_transform()

    def model_part(eps: Tensor) -> Tensor:
        return negative_log_density(guide, transform(eps[None])[0])

    def guide_part(eps: Tensor) -> Tensor:
        z = transform(eps[None])
        return -transform.log_abs_det_jacobian(eps[None], z).sum()

    return {"model": model_part, "guide": guide_part, "total": lambda e: model_part(e) + guide_part(e)}


def curvature(function: Callable[[Tensor], Tensor], points: Tensor) -> dict[str, list[float]]:
    """Quantiles over ``points`` of the largest and smallest Hessian eigenvalue of ``function``."""
    largest, smallest = [], []
    for point in points:
        hessian = torch.autograd.functional.hessian(function, point)
        eigenvalues = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
        largest.append(float(eigenvalues[-1]))
        smallest.append(float(eigenvalues[0]))
    levels = torch.tensor(QUANTILES)
    return {
        "largest": torch.tensor(largest).quantile(levels).tolist(),
        "smallest": torch.tensor(smallest).quantile(1 - levels).tolist(),
    }


def measure(guide_name: str, args: argparse.Namespace) -> dict[str, Any]:
    panel = build(MODEL)
    guide, training = train(guide_name, panel, args)
    guide.eval()
    guide.requires_grad_(False)
    pyro.set_rng_seed(args.seed + 1)
    points = torch.randn(args.points, guide.latent_dim)
    parts = warped_parts(guide)
    return {"training": training, **{name: curvature(f, points) for name, f in parts.items()}}


def report(results: dict[str, Any]) -> str:
    rows = []
    for guide, record in results["guides"].items():
        for part in ("total", "model", "guide"):
            largest, smallest = record[part]["largest"], record[part]["smallest"]
            rows.append(
                [guide if part == "total" else "", part]
                + [f"{v:.1f}" for v in largest]
                + [f"{smallest[0]:.1f}", f"{smallest[-1]:.1f}"]
            )
    header = ["guide", "part of U"] + [f"largest eig., q{q:g}" for q in QUANTILES]
    return markdown_table(header + ["smallest eig., median", "smallest eig., min"], rows)


def section(results: dict[str, Any]) -> str:
    s = results["settings"]
    return (
        f"Command: `{results['command']}`\n\n"
        f"Centred eight schools; each guide trained as in the guide panel ({s['steps']} steps), frozen "
        f"in eval mode; {s['points']} base points from N(0, I). Quantiles over the points of the "
        "largest (and median and least of the smallest) eigenvalue of the Hessian of NeuTra's warped "
        "potential U and of its two parts. For a guide equal to the posterior every eigenvalue of U "
        "is 1.\n\n" + report(results)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.neutra_geometry", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--guides",
        nargs="+",
        choices=[*GUIDES, *CPFLOW_VARIANTS],
        default=["AutoIAFNormal", "AutoCPFlow", "AutoCPFlow (input gain 1)"],
    )
    add_svi_budget_options(parser)
    parser.add_argument("--points", type=positive(int), default=100)
    add_run_options(parser, OUT_JSON, "smoke run: 30 steps, 5 points; writes nothing")
    return parse_run_args(parser, argv, quick={"steps": 30, "points": 5})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    results: dict[str, Any] = {**run_header("experiments.neutra_geometry", argv, args), "guides": {}}
    for name in args.guides:
        results["guides"][name] = measure(name, args)
        print(f"{name:30s} largest eigenvalue of U: {results['guides'][name]['total']['largest']}")
    print(report(results))
    save_run(results, args, OUT_JSON, SECTION, section)
    return results


if __name__ == "__main__":
    main()
