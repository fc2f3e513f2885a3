r"""Autoguides on real models against a long NUTS run: does a Pyro user gain by picking CP-Flow?

Every guide of ``--guides`` is trained on every model of ``--models``
(:mod:`guide_models`: a funnel, a hierarchical model with plates, a linear and a logistic
regression on real data) with the same budget: ``--steps`` steps of ClippedAdam from
``--lr``, decayed geometrically to a tenth, ``--particles`` vectorised ELBO particles,
float64. Then, with the guide in eval mode (exact densities) and ``--eval-samples`` draws:

* the **ELBO** :math:`\mathbb E_q[\log p(x, z) - \log q(z)]` with its standard error;
* the **importance-sampling ESS** :math:`(\sum w)^2 / \sum w^2` of the weights
  :math:`w = p(x, z)/q(z)`, as a share of the draws, and the IS estimate of
  :math:`\log p(x)`;
* the **error of posterior means and standard deviations** against NUTS, coordinate by
  coordinate in the constrained space: the largest :math:`|m_q - m| / s` and the mean of
  :math:`|\log(s_q / s)|`;
* the **time per step** (median, after 20 warm-up steps) and its ratio to AutoIAFNormal's,
  measured in the same run.

The NUTS reference (``--nuts-samples`` after ``--nuts-warmup``, one chain; eight schools
on its non-centred form) is cached in ``results/guide_panel_nuts.json`` and recomputed with
``--refresh-nuts``. A KL gap is reported against the best IS log-evidence of the run.

Run ``python -m experiments.guide_panel`` (14 minutes on 2 shared CPU cores; without the
cached references the NUTS runs add 17 minutes); ``--quick`` runs a smoke version in seconds.
It writes ``results/guide_panel.json`` (refusing to overwrite a full run unless
``--overwrite``) and the "Autoguides on real models" section of ``RESULTS.md``
(``python -c "import guide_panel"`` from ``experiments/`` then ``guide_panel.section(...)``
regenerates it from the JSON).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.importance import vectorized_importance_weights
from torch import Tensor

from experiments.common import (
    RESULTS_DIR,
    add_run_options,
    markdown_table,
    parse_run_args,
    positive,
    progress,
    read_json,
    run_header,
    save_run,
    write_json,
)
from experiments.guide_models import MODEL_NAMES, PanelModel, build
from pyro_cpflow import AutoCPFlow

NUTS_CACHE = RESULTS_DIR / "guide_panel_nuts.json"
PANEL_JSON = RESULTS_DIR / "guide_panel.json"
WARMUP_STEPS = 20


def _spline_flow(dim: int):
    return dist.transforms.iterated(2, dist.transforms.spline_autoregressive, dim)


GUIDES: dict[str, Callable[[Callable[[], None]], Any]] = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": AutoIAFNormal,
    "AutoNormalizingFlow (2 NSF)": lambda model: AutoNormalizingFlow(model, _spline_flow),
    "AutoCPFlow": AutoCPFlow,
}
"""Every guide with its defaults: the panel."""

FORMER_DEFAULT = {"hidden_dims": (64, 64), "affine": "diagonal"}
"""AutoCPFlow's network and affine map before its defaults became one layer of 128 and, for
models without plates, the triangular affine map: the variants below were measured with them,
so they keep them, and their committed results stay reproducible."""


def _variant(**options: Any) -> Callable[[Callable[[], None]], Any]:
    return functools.partial(AutoCPFlow, **{**FORMER_DEFAULT, **options})


CPFLOW_VARIANTS: dict[str, Callable[[Callable[[], None]], Any]] = {
    "AutoCPFlow (two layers of 64)": _variant(),
    "AutoCPFlow (joint)": _variant(structure="joint"),
    "AutoCPFlow (hierarchical, no context diagonal)": _variant(context_diagonal=False),
    "AutoCPFlow (Gaussian local block)": _variant(local_hidden_dims=()),
    "AutoCPFlow (2 blocks)": _variant(num_blocks=2),
    "AutoCPFlow (network scale 0.5)": _variant(initial_scale=0.5),
    "AutoCPFlow (input gain 1)": _variant(input_gain=1.0),
    "AutoCPFlow (hidden 128, gain 2)": _variant(hidden_dims=(128, 128), input_gain=2.0),
    "AutoCPFlow (alpha 1e-3)": _variant(alpha=1e-3),
    "AutoCPFlow (factor std 1)": _variant(initial_factor_std=1.0),
    "AutoCPFlow (init scale 1)": _variant(init_scale=1.0),
    "AutoCPFlow (curvature init)": _variant(init_curvature=True),
    # the affine map, with the default network
    "AutoCPFlow (diagonal affine)": functools.partial(AutoCPFlow, affine="diagonal"),
    "AutoCPFlow (triangular, full-rank quadratic)": functools.partial(AutoCPFlow, quadratic_rank=None),
    "AutoCPFlow (triangular, no quadratic)": functools.partial(AutoCPFlow, quadratic_rank=0),
}
"""Other settings of AutoCPFlow, for ``--guides`` (not in the default panel)."""


# ---------------------------------------------------------------------------- NUTS


def _flatten(sites: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-site samples ``(S, ...)`` as ``(S, k)``."""
    return {name: value.reshape(value.shape[0], -1) for name, value in sites.items()}


def nuts_draws(
    panel: PanelModel, samples: int, warmup: int, seed: int, show: bool
) -> tuple[dict[str, Tensor], MCMC]:
    """One NUTS chain on the model's reference form: its draws per site ``(S, ...)``, and the run."""
    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(panel.nuts_model), num_samples=samples, warmup_steps=warmup, disable_progbar=not show)
    mcmc.run()
    return panel.to_sites({k: v.double() for k, v in mcmc.get_samples().items()}), mcmc


def nuts_reference(panel: PanelModel, samples: int, warmup: int, seed: int, show: bool) -> dict[str, Any]:
    """Means and standard deviations of every site coordinate from one NUTS chain."""
    start = time.perf_counter()
    draws, mcmc = nuts_draws(panel, samples, warmup, seed, show)
    sites = _flatten(draws)
    diagnostics = mcmc.diagnostics()
    ess = [float(v["n_eff"].min()) for k, v in diagnostics.items() if isinstance(v, dict) and "n_eff" in v]
    return {
        "mean": {k: v.mean(0).tolist() for k, v in sites.items()},
        "std": {k: v.std(0).tolist() for k, v in sites.items()},
        "samples": samples,
        "warmup": warmup,
        "seed": seed,
        "min_ess": min(ess) if ess else None,
        "divergences": int(sum(len(v) for v in mcmc.diagnostics()["divergences"].values())),
        "seconds": time.perf_counter() - start,
    }


def load_references(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cache = read_json(NUTS_CACHE) if NUTS_CACHE.exists() else {}
    changed = False
    for name in names:
        if name in cache and not args.refresh_nuts:
            continue
        print(f"NUTS reference for {name} ({args.nuts_samples} samples after {args.nuts_warmup})")
        cache[name] = nuts_reference(
            build(name), args.nuts_samples, args.nuts_warmup, args.seed, show=args.progress
        )
        changed = True
    if changed and not args.quick:
        write_json(NUTS_CACHE, cache)
    return cache


# ---------------------------------------------------------------------------- guides


def train(guide_name: str, panel: PanelModel, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train one guide with the shared budget; the guide and its training record."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = {**GUIDES, **CPFLOW_VARIANTS}[guide_name](panel.model)
    return guide, fit_svi(guide, panel, args, f"{panel.name}: {guide_name}")


def add_svi_budget_options(parser: argparse.ArgumentParser) -> None:
    """``--steps``, ``--particles`` and ``--lr``: the budget of :func:`fit_svi`, the panel's by
    default, for every script that trains guides through it."""
    parser.add_argument("--steps", type=positive(int), default=3000, help="SVI steps per guide")
    parser.add_argument("--particles", type=positive(int), default=4, help="vectorised ELBO particles")
    parser.add_argument("--lr", type=positive(float), default=1e-2, help="ClippedAdam's starting lr")


def fit_svi(guide: Any, panel: PanelModel, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """``args.steps`` ClippedAdam steps from ``args.lr`` decayed to a tenth, ``args.particles``
    vectorised particles, from wherever ``guide`` stands; the training record."""
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1.0 / args.steps)})
    elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(panel.model, guide, optim, elbo)
    times, losses = [], []
    bar = progress(args.steps, label, enabled=args.progress)
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(svi.step())
        times.append(time.perf_counter() - start)
        bar.update()
    bar.close()
    timed = times[WARMUP_STEPS:] or times
    return {
        "ms_per_step": 1e3 * statistics.median(timed),
        "final_loss": losses[-1],
        "finite": all(math.isfinite(v) for v in losses),
    }


@torch.no_grad()
def evaluate(
    guide: Any, panel: PanelModel, reference: dict[str, Any], samples: int, seed: int
) -> dict[str, Any]:
    """ELBO, IS-ESS, IS log-evidence and moment errors of a trained guide."""
    guide.eval()
    pyro.set_rng_seed(seed + 1)
    log_weights, _, guide_trace = vectorized_importance_weights(
        panel.model, guide, num_samples=samples, max_plate_nesting=1
    )
    log_weights = log_weights.double()
    finite = torch.isfinite(log_weights)
    w = log_weights[finite]
    elbo = float(w.mean())
    elbo_se = float(w.std() / math.sqrt(w.numel()))
    ess = float(torch.exp(2 * torch.logsumexp(w, 0) - torch.logsumexp(2 * w, 0))) / samples
    log_evidence = float(torch.logsumexp(w, 0) - math.log(samples))
    z_errors, log_sd_ratios = [], []
    for name, mean in reference["mean"].items():
        values = guide_trace.nodes[name]["value"].double().reshape(samples, -1)
        ref_mean, ref_std = torch.tensor(mean), torch.tensor(reference["std"][name])
        z_errors.append((values.mean(0) - ref_mean).abs() / ref_std)
        log_sd_ratios.append((values.std(0) / ref_std).log().abs())
    record = {
        "elbo": elbo,
        "elbo_se": elbo_se,
        "is_ess": ess,
        "log_evidence": log_evidence,
        "non_finite_weights": int((~finite).sum()),
    }
    if z_errors:
        record["max_mean_error"] = float(torch.cat(z_errors).max())
        record["mean_abs_log_sd_ratio"] = float(torch.cat(log_sd_ratios).mean())
    return record


# ---------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    """The Markdown tables of a panel run."""
    lines = []
    for name, rows in results["models"].items():
        best = max(row["elbo"] for row in rows.values())
        best_se = next(row["elbo_se"] for row in rows.values() if row["elbo"] == best)
        evidence = max(row["log_evidence"] for row in rows.values())
        iaf = rows.get("AutoIAFNormal", {}).get("ms_per_step")
        table = []
        for guide, row in rows.items():
            within = row["elbo"] >= best - 2 * math.hypot(row["elbo_se"], best_se)
            elbo = f"{row['elbo']:.2f} ± {row['elbo_se']:.2f}"
            table.append(
                [
                    guide,
                    f"**{elbo}**" if within else elbo,
                    f"{evidence - row['elbo']:.2f}",
                    f"{100 * row['is_ess']:.1f}%",
                    f"{row['max_mean_error']:.2f}",
                    f"{row['mean_abs_log_sd_ratio']:.3f}",
                    f"{row['ms_per_step']:.1f}",
                    f"{row['ms_per_step'] / iaf:.2f}" if iaf else "",
                ]
            )
        ref = results["nuts"][name]
        lines += [
            f"**{name}** (NUTS: {ref['samples']} draws, min ESS {ref['min_ess']:.0f}, "
            f"{ref['divergences']} divergences)",
            "",
            markdown_table(
                [
                    "guide",
                    "ELBO ± SE",
                    "KL gap",
                    "IS-ESS",
                    "max \\|mean err\\| / sd",
                    "mean abs log sd ratio",
                    "ms / step",
                    "time vs IAF",
                ],
                table,
            ),
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.guide_panel", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--guides", nargs="+", choices=[*GUIDES, *CPFLOW_VARIANTS], default=list(GUIDES))
    add_svi_budget_options(parser)
    parser.add_argument("--eval-samples", type=positive(int), default=5000)
    parser.add_argument("--nuts-samples", type=positive(int), default=3000)
    parser.add_argument("--nuts-warmup", type=positive(int), default=1000)
    parser.add_argument("--refresh-nuts", action="store_true")
    add_run_options(
        parser, PANEL_JSON, "smoke run: 30 steps, 200 evaluation draws, short NUTS; writes nothing"
    )
    quick = {"steps": 30, "eval_samples": 200, "nuts_samples": 100, "nuts_warmup": 100}
    return parse_run_args(parser, argv, quick)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    references = load_references(args.models, args)
    results: dict[str, Any] = {
        **run_header("experiments.guide_panel", argv, args),
        "nuts": {
            name: {k: v for k, v in references[name].items() if k not in ("mean", "std")}
            for name in args.models
        },
        "models": {},
    }
    for name in args.models:
        panel = build(name)
        results["models"][name] = {}
        for guide_name in args.guides:
            guide, record = train(guide_name, panel, args)
            record |= evaluate(guide, panel, references[name], args.eval_samples, args.seed)
            results["models"][name][guide_name] = record
            print(
                f"{name:14s} {guide_name:28s} ELBO {record['elbo']:9.2f} ± {record['elbo_se']:.2f}  "
                f"IS-ESS {100 * record['is_ess']:5.1f}%  {record['ms_per_step']:6.1f} ms/step"
            )
    print(report(results))
    save_run(results, args, PANEL_JSON, "Autoguides on real models", section)
    return results


def section(results: dict[str, Any]) -> str:
    """The "Autoguides on real models" section of ``RESULTS.md`` for a panel run."""
    settings = results["settings"]
    intro = (
        f"Command: `{results['command']}`\n\n"
        f"Every guide with its defaults; {settings['steps']} ClippedAdam steps from lr "
        f"{settings['lr']:g} decayed to a tenth, {settings['particles']} vectorised particles, "
        f"float64; evaluated in eval mode on {settings['eval_samples']} draws. Bold: an ELBO within "
        "two standard errors (of the difference) of the best. KL gap: the best importance-sampling "
        "log-evidence of the model minus the ELBO. Moment errors against NUTS, coordinate-wise in "
        "the constrained space. Times are medians per step of the same run (on a shared 2-core "
        "machine: about ±10%)."
    )
    return intro + "\n\n" + report(results)


if __name__ == "__main__":
    main()
