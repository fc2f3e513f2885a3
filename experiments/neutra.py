r"""NeuTra HMC on the centred eight-schools funnel: does a CP-Flow guide make NUTS cheaper?

NeuTra (Hoffman et al., *NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural
transport*, 2019) runs NUTS not on the latents :math:`z` but on the base variable
:math:`\varepsilon` of a trained flow guide :math:`z = T(\varepsilon)`, whose target

.. math::

    \pi(\varepsilon) \propto p\big(x, T(\varepsilon)\big)\,\big|\det J_T(\varepsilon)\big|

is a standard normal when the guide is the posterior. The better the guide, the rounder the
geometry NUTS sees: larger steps, shorter trajectories. Each gradient is dearer, though: it
differentiates through :math:`T` and its log-determinant.

Three samplers on the centred eight schools (:mod:`guide_models`, 10 latents, a funnel):

* ``NUTS``: plain NUTS on the model;
* ``NeuTra + AutoCPFlow``: NUTS through :class:`pyro.infer.reparam.NeuTraReparam` with a
  trained :class:`pyro_cpflow.AutoCPFlow` (in eval mode, frozen: exact log-det);
* ``NeuTra + AutoIAFNormal``: the same with Pyro's :class:`~pyro.infer.autoguide.AutoIAFNormal`.

Each guide is trained with the guide panel's budget (``guide_panel.train``: ``--steps``
ClippedAdam steps from ``--lr`` decayed to a tenth, ``--particles`` vectorised particles).
Each sampler runs one chain of ``--samples`` draws after ``--warmup`` (Pyro's defaults:
step size and diagonal mass matrix adapted, tree depth up to ``--max-tree-depth``), from the
same seed. A **gradient evaluation** is one evaluation of the model's log density (the
potential energy and its gradient; counted by wrapping the model, phase by phase through
MCMC's ``hook_fn``). Reported per sampler, on the sampling phase:

* effective samples per 1000 gradient evaluations and per second, from the **minimum** ESS
  over the 10 latents (in the model's parameterisation, NeuTra's draws mapped back with
  ``neutra.transform_sample``), and the median ESS;
* the milliseconds per gradient, the mean gradients per draw, the adapted step size, the
  divergences;
* the error of the posterior means and standard deviations against the NUTS reference of
  the guide panel (``results/guide_panel_nuts.json``, 3000 draws on the non-centred form):
  the largest :math:`|m - m_\mathrm{ref}| / s_\mathrm{ref}`, the same error in units of its
  Monte Carlo standard error (:math:`s/\sqrt{\mathrm{ESS}}` and the reference's
  :math:`s_\mathrm{ref}/\sqrt{\mathrm{ESS}_\mathrm{ref}}` combined; values far above 3 mean
  a bias), and the mean :math:`|\log(s / s_\mathrm{ref})|`.

Run ``python -m experiments.neutra`` (a few minutes on 2 shared CPU cores); ``--quick``
is a smoke version of seconds that writes nothing. It writes ``results/neutra.json``
(refusing to overwrite a full run unless ``--overwrite``) and the "NeuTra HMC on the
eight-schools funnel" section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size
from torch import Tensor

from experiments.common import (
    RESULTS_DIR,
    add_run_options,
    markdown_table,
    parse_run_args,
    positive,
    read_json,
    run_header,
    save_run,
)
from experiments.guide_models import build
from experiments.guide_panel import CPFLOW_VARIANTS, NUTS_CACHE, add_svi_budget_options, train

NEUTRA_JSON = RESULTS_DIR / "neutra.json"
MODEL = "eight_schools"
METHODS = {"NUTS": None, "NeuTra + AutoCPFlow": "AutoCPFlow", "NeuTra + AutoIAFNormal": "AutoIAFNormal"}
VARIANT_METHODS = {f"NeuTra + {name}": name for name in CPFLOW_VARIANTS}
"""NeuTra with the guide panel's other settings of AutoCPFlow, for ``--methods`` (not run by default)."""
"""Each sampler and the guide-panel guide its NeuTra map comes from (``None``: plain NUTS)."""
SECTION = "NeuTra HMC on the eight-schools funnel"


class CountedModel:
    """The model, counting its evaluations: one per potential energy (and gradient) in NUTS."""

    def __init__(self, model: Callable[[], None]) -> None:
        self.model = model
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.model()


def run_chain(
    model: Callable[[], None], counter: CountedModel, args: argparse.Namespace
) -> tuple[MCMC, NUTS, dict[str, Any]]:
    """One NUTS chain; the gradient evaluations and seconds of its warm-up and sampling."""
    pyro.set_rng_seed(args.seed)
    kernel = NUTS(model, max_plate_nesting=1, max_tree_depth=args.max_tree_depth)
    marks: dict[str, tuple[int, float]] = {}

    def hook(_kernel: Any, _samples: Any, stage: str, _i: int) -> None:
        marks[stage] = (counter.calls, time.perf_counter())  # the last draw of each stage wins

    mcmc = MCMC(
        kernel,
        num_samples=args.samples,
        warmup_steps=args.warmup,
        hook_fn=hook,
        disable_progbar=not args.progress,
    )
    counter.calls = 0
    start = time.perf_counter()
    mcmc.run()
    (warm_calls, warm_end), (end_calls, end) = marks["Warmup"], marks["Sample"]
    return (
        mcmc,
        kernel,
        {
            "warmup_gradients": warm_calls,
            "warmup_seconds": warm_end - start,
            "gradients": end_calls - warm_calls,
            "seconds": end - warm_end,
        },
    )


def flatten(sites: dict[str, Tensor]) -> tuple[Tensor, list[str]]:
    """Draws of the sites ``(S, ...)`` as one ``(S, k)`` matrix and its coordinate names."""
    columns, names = [], []
    for name in sorted(sites):
        value = sites[name].detach().double().reshape(sites[name].shape[0], -1)
        columns.append(value)
        names += [name] if value.shape[1] == 1 else [f"{name}[{j}]" for j in range(value.shape[1])]
    return torch.cat(columns, 1), names


def moment_errors(draws: Tensor, names: list[str], ess: Tensor, reference: dict[str, Any]) -> dict[str, Any]:
    """Errors of means and standard deviations against the reference, per coordinate."""
    ref_mean = torch.cat([torch.tensor(reference["mean"][name]) for name in sorted(reference["mean"])])
    ref_std = torch.cat([torch.tensor(reference["std"][name]) for name in sorted(reference["std"])])
    mean, std = draws.mean(0), draws.std(0)
    error = (mean - ref_mean).abs()
    standard_error = torch.sqrt(std**2 / ess + ref_std**2 / reference["min_ess"])
    in_se = error / standard_error
    worst = int(in_se.argmax())
    return {
        "max_mean_error": float((error / ref_std).max()),
        "max_mean_error_in_se": float(in_se.max()),
        "worst_coordinate": names[worst],
        "mean_abs_log_sd_ratio": float((std / ref_std).log().abs().mean()),
        "mean": dict(zip(names, mean.tolist(), strict=True)),
        "std": dict(zip(names, std.tolist(), strict=True)),
    }


def sample(method: str, args: argparse.Namespace, reference: dict[str, Any]) -> dict[str, Any]:
    """Train the method's guide (if any), run its chain and measure it."""
    panel = build(MODEL)
    counter = CountedModel(panel.model)
    record: dict[str, Any] = {}
    guide_name = {**METHODS, **VARIANT_METHODS}[method]
    if guide_name is None:
        mcmc, kernel, cost = run_chain(counter, counter, args)
        sites = mcmc.get_samples()
    else:
        guide, record["training"] = train(guide_name, panel, args)
        guide.eval()  # a CP-Flow's exact log-det; no effect on the IAF
        guide.requires_grad_(False)
        neutra = NeuTraReparam(guide)
        mcmc, kernel, cost = run_chain(poutine.reparam(counter, config=lambda _: neutra), counter, args)
        (latent,) = mcmc.get_samples().values()  # the one site: the base variable
        with torch.no_grad():  # the draws' dimension left of the model's plate (dim -1)
            sites = neutra.transform_sample(latent.unsqueeze(-2))
    draws, names = flatten(sites)
    ess = effective_sample_size(draws[None], chain_dim=0, sample_dim=1)
    min_ess, median_ess = float(ess.min()), float(ess.median())
    record |= cost | {
        "min_ess": min_ess,
        "median_ess": median_ess,
        "min_ess_coordinate": names[int(ess.argmin())],
        "ess_per_1000_gradients": 1e3 * min_ess / cost["gradients"],
        "median_ess_per_1000_gradients": 1e3 * median_ess / cost["gradients"],
        "ess_per_second": min_ess / cost["seconds"],
        "ms_per_gradient": 1e3 * cost["seconds"] / cost["gradients"],
        "gradients_per_draw": cost["gradients"] / args.samples,
        "step_size": float(kernel.step_size),
        "divergences": len(mcmc.diagnostics()["divergences"]["chain 0"]),
        "ess": dict(zip(names, ess.tolist(), strict=True)),
    }
    return record | moment_errors(draws, names, ess, reference)


# ---------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    """The Markdown table of a run."""
    rows = []
    for method, row in results["methods"].items():
        rows.append(
            [
                method,
                f"{row['ess_per_1000_gradients']:.1f}",
                f"{row['ess_per_second']:.1f}",
                f"{row['min_ess']:.0f} ({row['min_ess_coordinate']})",
                f"{row['median_ess']:.0f}",
                f"{row['gradients_per_draw']:.1f}",
                f"{row['step_size']:.3f}",
                f"{row['ms_per_gradient']:.2f}",
                str(row["divergences"]),
                f"{row['max_mean_error']:.2f} ({row['max_mean_error_in_se']:.1f} SE)",
                f"{row['mean_abs_log_sd_ratio']:.3f}",
                f"{row['training']['ms_per_step']:.1f}" if "training" in row else "",
            ]
        )
    return markdown_table(
        [
            "sampler",
            "min ESS / 1000 grads",
            "min ESS / s",
            "min ESS",
            "median ESS",
            "grads / draw",
            "step size",
            "ms / grad",
            "divergences",
            r"max \|mean err\| / sd",
            "mean abs log sd ratio",
            "guide ms / SVI step",
        ],
        rows,
    )


def section(results: dict[str, Any]) -> str:
    """The "NeuTra HMC on the eight-schools funnel" section of ``RESULTS.md``."""
    s = results["settings"]
    intro = (
        f"Command: `{results['command']}`\n\n"
        f"Centred eight schools (10 latents). One chain per sampler, seed {s['seed']}: {s['samples']} "
        f"draws after {s['warmup']} warm-up steps, Pyro's NUTS with its adaptation and tree depth up "
        f"to {s['max_tree_depth']}. Each guide trained with the guide panel's budget ({s['steps']} "
        f"ClippedAdam steps from lr {s['lr']:g} decayed to a tenth, {s['particles']} vectorised "
        "particles), then frozen (CP-Flow in eval mode: exact log-det). A gradient is one "
        "evaluation of the model's log density; gradients, seconds and ESS are those of the "
        "sampling phase. ESS over the 10 latents in the model's parameterisation (min, with its "
        "coordinate, and median). Mean errors against the guide panel's NUTS reference (3000 "
        "draws on the non-centred form), in reference sds and in Monte Carlo standard errors "
        "(well above 3: a bias). Times on a shared 2-core machine (about ±10%)."
    )
    return intro + "\n\n" + report(results) + "\n\n" + results.get("reading", "")


def reading(results: dict[str, Any]) -> str:
    """Whether the target (CP-Flow NeuTra's ESS per gradient at least the IAF's) is met, and
    each sampler's slowest coordinate and step size."""
    rows = results["methods"]
    cp, iaf, plain = (
        rows[m]["ess_per_1000_gradients"] for m in ("NeuTra + AutoCPFlow", "NeuTra + AutoIAFNormal", "NUTS")
    )
    verdict = "meets" if cp >= iaf else "misses"
    worst = "; ".join(
        f"{m}: min ESS on {rows[m]['min_ess_coordinate']} ({rows[m]['min_ess']:.0f}, median "
        f"{rows[m]['median_ess']:.0f}), step size {rows[m]['step_size']:.3f}"
        for m in rows
    )
    return (
        f"CP-Flow NeuTra {verdict} the target of at least the IAF's effective samples per "
        f"gradient: {cp:.1f} against {iaf:.1f} per 1000 gradients (plain NUTS {plain:.1f}). "
        f"The slowest coordinate and the adapted step size of each sampler: {worst}."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.neutra", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=[*METHODS, *VARIANT_METHODS],
        default=list(METHODS),
        metavar="METHOD",
        help=f"samplers to run (default: {', '.join(METHODS)}); also 'NeuTra + <V>' for V an "
        "AutoCPFlow setting of the guide panel's CPFLOW_VARIANTS",
    )
    add_svi_budget_options(parser)
    parser.add_argument("--samples", type=positive(int), default=1000, help="NUTS draws per chain")
    parser.add_argument("--warmup", type=positive(int), default=500, help="NUTS warm-up steps")
    parser.add_argument("--max-tree-depth", type=positive(int), default=10)
    add_run_options(
        parser,
        NEUTRA_JSON,
        "smoke run: 30 SVI steps, 30 draws after 30 warm-up, tree depth 4; writes nothing",
    )
    return parse_run_args(parser, argv, quick={"steps": 30, "samples": 30, "warmup": 30, "max_tree_depth": 4})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    if not NUTS_CACHE.exists():
        raise FileNotFoundError(f"{NUTS_CACHE} is missing: run python -m experiments.guide_panel first")
    reference = read_json(NUTS_CACHE)[MODEL]
    results: dict[str, Any] = {
        **run_header("experiments.neutra", argv, args),
        "methods": {},
    }
    start = time.perf_counter()
    for method in args.methods:
        record = sample(method, args, reference)
        results["methods"][method] = record
        print(
            f"{method:24s} min ESS {record['min_ess']:7.1f}"
            f"  per 1000 grads {record['ess_per_1000_gradients']:6.2f}"
            f"  per s {record['ess_per_second']:6.2f}  {record['ms_per_gradient']:.2f} ms/grad"
            f"  {record['divergences']} divergent"
        )
    results["seconds"] = time.perf_counter() - start
    if set(METHODS) <= set(args.methods):
        results["reading"] = reading(results)
    print(report(results))
    print(results.get("reading", ""))
    save_run(results, args, NEUTRA_JSON, SECTION, section)
    return results


if __name__ == "__main__":
    main()
