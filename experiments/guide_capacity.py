r"""Why a CP-Flow guide trails AutoIAFNormal on the eight-schools funnel: capacity or optimisation?

On the centred eight schools (:mod:`guide_models`, 10 latents) the guide panel finds the CP-Flow
autoguide 0.5 nats of ELBO behind Pyro's IAF, whatever its settings. Two explanations predict
different things. If one CP-Flow block *cannot represent* the funnel, no training reaches the
IAF; if it can but SVI does not find it, a guide fitted to the posterior's own draws scores far
better. So each guide family is fitted three ways, from the same NUTS draws and budgets:

* ``svi``: the panel's SVI budget (``guide_panel.fit_svi``: reverse KL, from the defaults);
* ``mle``: maximum likelihood on NUTS draws of the posterior (forward KL,
  :math:`\max_q \mathbb E_p[\log q(z)]`), in the guide's own parameters, with the CP-Flow's
  exact log-det and its Newton inverse (implicit gradients);
* ``mle+svi``: the panel's SVI budget started from the ``mle`` fit.

For each fit it reports the ELBO with its standard error (``guide_panel.evaluate``, eval mode,
exact densities), the importance-sampling ESS, the **held-out log-likelihood** of NUTS draws
under the guide, :math:`\mathbb E_p[\log q(z)]` (so :math:`-\mathrm{KL}(p\|q)` up to the
posterior's entropy, which is the same for every guide), and the spread of
:math:`\log\tau` against NUTS (a funnel's neck). The draws come from NUTS on the non-centred
form, mapped to the guide's unconstrained coordinates by the guide's own site transforms;
half of them fit, the other half score.

Run ``python -m experiments.guide_capacity`` (about ten minutes on 2 shared CPU cores);
``--quick`` is a smoke run of seconds that writes nothing. It writes
``results/guide_capacity.json`` (refusing to overwrite a full run unless ``--overwrite``) and the
"Funnel: capacity or optimisation" section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoIAFNormal
from torch import Tensor
from torch.distributions import biject_to

from experiments.common import (
    RESULTS_DIR,
    add_run_options,
    markdown_table,
    parse_run_args,
    positive,
    progress,
    run_header,
    save_run,
)
from experiments.guide_models import PanelModel, build
from experiments.guide_panel import add_svi_budget_options, evaluate, fit_svi, nuts_draws
from pyro_cpflow import AutoCPFlow

OUT_JSON = RESULTS_DIR / "guide_capacity.json"
SECTION = "Funnel: capacity or optimisation"
FAMILIES: dict[str, Callable[[Callable[[], None]], Any]] = {
    # the network and affine map of the measured run (AutoCPFlow's defaults then)
    "AutoCPFlow": lambda model: AutoCPFlow(
        model, hidden_dims=(64, 64), structure="joint", affine="diagonal", logdet="exact"
    ),
    "AutoIAFNormal": AutoIAFNormal,
}
"""The guide families compared: one CP-Flow gradient map of all coordinates (the joint
structure, whose capacity is in question; the autoguide's default on this model is now the
block-triangular one), with its exact log-det (d = 10, every fit exact), and the IAF."""


def unconstrained_draws(guide: Any, draws: dict[str, Tensor]) -> Tensor:
    """Posterior draws per site ``(S, ...)`` as the guide's latent vectors ``(S, d)``: each site
    mapped to the unconstrained space by its support's bijection, in the guide's order."""
    columns = []
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        if site["is_observed"] or name not in draws:
            continue
        value = biject_to(site["fn"].support).inv(draws[name])
        columns.append(value.reshape(value.shape[0], -1))
    latent = torch.cat(columns, -1)
    if latent.shape[-1] != guide.latent_dim:
        raise RuntimeError(
            f"draws give {latent.shape[-1]} latent coordinates, the guide has {guide.latent_dim}"
        )
    return latent


def fit_maximum_likelihood(
    guide: Any, train: Tensor, steps: int, lr: float, batch: int, seed: int, show: bool
) -> list[float]:
    """``steps`` Adam steps on :math:`-\\mathbb E[\\log q(z)]` over minibatches of ``train``; the losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
    losses = []
    bar = progress(steps, "maximum likelihood", enabled=show)
    for _ in range(steps):
        rows = torch.randint(0, train.shape[0], (batch,), generator=generator)
        loss = -guide.get_posterior().log_prob(train[rows]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update()
    bar.close()
    return losses


@torch.no_grad()
def held_out(guide: Any, test: Tensor, log_tau: int) -> dict[str, float]:
    """Held-out :math:`\\mathbb E_p[\\log q(z)]` with its standard error, and the guide's spread
    of coordinate ``log_tau`` over that of the draws."""
    guide.eval()
    log_q = guide.get_posterior().log_prob(test)
    spread = guide.get_posterior().sample((test.shape[0],))[:, log_tau].std() / test[:, log_tau].std()
    return {
        "heldout_loglik": float(log_q.mean()),
        "heldout_loglik_se": float(log_q.std() / math.sqrt(len(log_q))),
        "log_tau_spread_ratio": float(spread),
    }


def run_family(
    family: str,
    panel: PanelModel,
    train: dict[str, Tensor],
    test: dict[str, Tensor],
    reference: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The three fits of one guide family, each scored."""
    records: dict[str, Any] = {}
    for fit in ("svi", "mle", "mle+svi"):
        if fit != "mle+svi":  # mle+svi continues the mle guide
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            guide = FAMILIES[family](panel.model)
            guide()  # builds the prototype and the parameters
            train_z, test_z = unconstrained_draws(guide, train), unconstrained_draws(guide, test)
        guide.train()
        record: dict[str, Any] = {}
        if fit == "mle":
            losses = fit_maximum_likelihood(
                guide, train_z, args.mle_steps, args.mle_lr, args.batch, args.seed, args.progress
            )
            record["final_nll"] = losses[-1]
        else:
            record |= fit_svi(guide, panel, args, f"{family}: {fit}")
        record |= evaluate(guide, panel, reference, args.eval_samples, args.seed)
        record |= held_out(guide, test_z, args.log_tau_index)
        records[fit] = record
        print(
            f"{family:14s} {fit:8s} ELBO {record['elbo']:8.3f} ± {record['elbo_se']:.3f}  "
            f"IS-ESS {100 * record['is_ess']:5.1f}%  held-out log q {record['heldout_loglik']:8.3f}"
            f" ± {record['heldout_loglik_se']:.3f}  log tau spread {record['log_tau_spread_ratio']:.2f}"
        )
    return records


def report(results: dict[str, Any]) -> str:
    """The table of a run."""
    rows = []
    for family, fits in results["families"].items():
        for fit, r in fits.items():
            rows.append(
                [
                    family,
                    fit,
                    f"{r['elbo']:.3f} ± {r['elbo_se']:.3f}",
                    f"{100 * r['is_ess']:.1f}%",
                    f"{r['heldout_loglik']:.3f} ± {r['heldout_loglik_se']:.3f}",
                    f"{r['log_tau_spread_ratio']:.2f}",
                ]
            )
    return markdown_table(
        ["guide", "fit", "ELBO", "IS-ESS", "held-out E_p[log q]", "log τ spread / NUTS"], rows, "llrrrr"
    )


def section(results: dict[str, Any]) -> str:
    settings = results["settings"]
    return (
        f"Command: `{results['command']}`\n\n"
        f"Centred eight schools; {settings['nuts_samples']} NUTS draws (non-centred form, after "
        f"{settings['nuts_warmup']} warm-up), half to fit and half to score; SVI: "
        f"{settings['steps']} ClippedAdam steps from lr {settings['lr']:g}, {settings['particles']} "
        f"particles; maximum likelihood: {settings['mle_steps']} Adam steps at lr {settings['mle_lr']:g}, "
        f"batch {settings['batch']}; ELBO on {settings['eval_samples']} draws in eval mode.\n\n"
        + report(results)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.guide_capacity", description=__doc__.split("\n")[0]
    )
    add_svi_budget_options(parser)
    parser.add_argument("--mle-steps", type=positive(int), default=3000)
    parser.add_argument("--mle-lr", type=positive(float), default=3e-3)
    parser.add_argument("--batch", type=positive(int), default=100)
    parser.add_argument("--eval-samples", type=positive(int), default=5000)
    parser.add_argument("--nuts-samples", type=positive(int), default=8000)
    parser.add_argument("--nuts-warmup", type=positive(int), default=1000)
    add_run_options(parser, OUT_JSON, "smoke run: a few steps and draws; writes nothing")
    quick = {"steps": 5, "mle_steps": 5, "eval_samples": 100, "nuts_samples": 60, "nuts_warmup": 40}
    args = parse_run_args(parser, argv, quick)
    args.log_tau_index = 1  # latents in site order: mu, log tau, theta
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    panel = build("eight_schools")
    draws, _ = nuts_draws(panel, args.nuts_samples, args.nuts_warmup, args.seed, show=args.progress)
    order = torch.randperm(args.nuts_samples, generator=torch.Generator().manual_seed(args.seed))
    half = args.nuts_samples // 2
    train = {k: v[order[:half]] for k, v in draws.items()}
    test = {k: v[order[half:]] for k, v in draws.items()}
    flat = {k: v.reshape(v.shape[0], -1) for k, v in test.items()}
    reference = {
        "mean": {k: v.mean(0).tolist() for k, v in flat.items()},
        "std": {k: v.std(0).tolist() for k, v in flat.items()},
    }
    results: dict[str, Any] = {**run_header("experiments.guide_capacity", argv, args), "families": {}}
    for family in FAMILIES:
        results["families"][family] = run_family(family, panel, train, test, reference, args)
    print(report(results))
    save_run(results, args, OUT_JSON, SECTION, section)
    return results


if __name__ == "__main__":
    main()
