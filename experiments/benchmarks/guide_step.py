r"""SVI step time of Pyro guides against AutoIAFNormal's, interleaved step by step in one process.

The guide panel (:mod:`experiments.guide_panel`) times each guide in its own training run,
minutes apart from the others, and the engine benchmark (:mod:`experiments.benchmarks.engine`,
part (c)) in separate timed calls; on a shared machine the speed of the whole machine drifts
in between, and the ratio "CP-Flow time vs IAF" moved between 1.7 and 3.4 (panel) and by
±0.2 (engine) for the same model. Here every guide of a model is built and trained side by
side in one process and the steps are interleaved: each round steps every guide once (the
order rotated from round to round), so drift reaches all of them alike. The ratio of a
guide to ``AutoIAFNormal`` is taken per round, and its median and quartiles are reported
with the median step times.

Two settings (``--setting``):

* ``panel`` (default): the panel's step (``Trace_ELBO`` with 4 vectorised particles,
  ClippedAdam from lr 1e-2) on the panel's models (:mod:`experiments.guide_models`), with
  the panel's guides by name (:data:`~experiments.guide_panel.GUIDES`,
  :data:`~experiments.guide_panel.CPFLOW_VARIANTS`); a variant that does not apply to a
  model (the local-block options on a model without plates) is reported as such.
* ``engine``: the engine benchmark's part (c), the target of its issue: the models of
  :mod:`experiments.benchmarks.svi_models`, ``AutoNormalizingFlow`` with one
  ``cpflow(d, hidden_dims=(64, 64))`` (``logdet="auto"``; the network of the engine's training
  benchmark) and with one of ``hidden_dims=(128,)`` (``AutoCPFlow``'s default network) against
  ``AutoIAFNormal``, 1 and 8 vectorised particles, Adam lr 1e-2.

Both in float64 on one thread. Parameters live in Pyro's param store under each guide's
class name, so two settings of one guide class are given distinct subclasses.

How to run
----------
::

    .venv/bin/python -m experiments.benchmarks.guide_step          # about a minute
    .venv/bin/python -m experiments.benchmarks.guide_step --setting engine \
        --out experiments/benchmarks/results/guide_step_engine.json  # about a minute
    .venv/bin/python -m experiments.benchmarks.guide_step --quick  # seconds

Results go to ``experiments/benchmarks/results/guide_step.json`` (``--out``) and ``.md``.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

from experiments import guide_models
from experiments.benchmarks import svi_models
from experiments.benchmarks.timing import base_parser, machine_summary, save_results, setup
from experiments.common import markdown_table, positive
from experiments.guide_panel import CPFLOW_VARIANTS, GUIDES
from pyro_cpflow import cpflow

BASELINE = "AutoIAFNormal"
ENGINE_GUIDE = "AutoNormalizingFlow (CP-Flow)"
ENGINE_NETWORKS = {ENGINE_GUIDE: (64, 64), "AutoNormalizingFlow (CP-Flow, one layer of 128)": (128,)}
"""The engine setting's CP-Flow guides: the training benchmark's network, and AutoCPFlow's."""
LR = 1e-2


@dataclass(frozen=True)
class Setting:
    """Models, default guides, particles and optimiser of one ``--setting``."""

    models: tuple[str, ...]
    build_model: Callable[[str], Callable[[], None]]
    guides: tuple[str, ...]
    particles: tuple[int, ...]
    optimizer: Callable[[dict], Any]


SETTINGS = {
    "panel": Setting(
        guide_models.MODEL_NAMES,
        lambda name: guide_models.build(name).model,
        (
            "AutoIAFNormal",
            "AutoMultivariateNormal",
            "AutoCPFlow",
            "AutoCPFlow (two layers of 64)",
            "AutoCPFlow (Gaussian local block)",
        ),
        (4,),
        pyro.optim.ClippedAdam,
    ),
    "engine": Setting(
        svi_models.MODEL_NAMES,
        svi_models.build_model,
        ("AutoIAFNormal", *ENGINE_NETWORKS),
        (1, 8),
        pyro.optim.Adam,
    ),
}
ALL_GUIDES = (*GUIDES, *CPFLOW_VARIANTS, *ENGINE_NETWORKS)


def make_guide(label: str, index: int, model: Any) -> Any:
    """The guide ``label`` for ``model``, its class renamed when it is a CP-Flow setting, so
    that its parameters do not share names with another setting's in Pyro's param store."""
    if label in ENGINE_NETWORKS:
        renamed_flow = type(f"AutoNormalizingFlow{index}", (AutoNormalizingFlow,), {})
        return renamed_flow(model, functools.partial(cpflow, hidden_dims=ENGINE_NETWORKS[label]))
    factory = {**GUIDES, **CPFLOW_VARIANTS}[label]
    if not label.startswith("AutoCPFlow"):
        return factory(model)
    from pyro_cpflow import AutoCPFlow

    renamed = type(f"AutoCPFlow{index}", (AutoCPFlow,), {})
    keywords = getattr(factory, "keywords", {})
    return renamed(model, **keywords)


def build_svis(
    setting: Setting, model_name: str, labels: list[str], particles: int, seed: int
) -> tuple[dict[str, SVI], dict[str, str]]:
    """One SVI per guide (initialised by a first step), and the reason for each guide left out."""
    model = setting.build_model(model_name)
    svis, skipped = {}, {}
    for index, label in enumerate(labels):
        pyro.set_rng_seed(seed)
        guide = make_guide(label, index, model)
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        svi = SVI(model, guide, setting.optimizer({"lr": LR}), elbo)
        try:
            svi.step()
        except ValueError as error:  # an option that does not apply to this model
            skipped[label] = str(error).split(";")[0]
            continue
        svis[label] = svi
    return svis, skipped


def interleaved_times(svis: dict[str, SVI], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each guide's step over ``rounds`` rounds, after ``warmup`` untimed ones."""
    labels = list(svis)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for round_ in range(warmup + rounds):
        shift = round_ % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            svis[label].step()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[label].append(elapsed)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median ms per guide and, against :data:`BASELINE`, the per-round ratio's quartiles."""
    base = times.get(BASELINE)
    summary = {}
    for label, values in times.items():
        entry = {"ms": 1e3 * statistics.median(values)}
        if base is not None:
            ratios = [a / b for a, b in zip(values, base, strict=True)]
            low, _, high = statistics.quantiles(ratios, n=4)
            entry.update({"ratio_median": statistics.median(ratios), "ratio_q1": low, "ratio_q3": high})
        summary[label] = entry
    return summary


def main() -> None:
    started = time.perf_counter()
    parser = base_parser(__file__, __doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="panel", help="(default panel)")
    parser.add_argument("--models", nargs="+", help="default: every model of the setting")
    parser.add_argument("--guides", nargs="+", choices=ALL_GUIDES, help="default: the setting's")
    parser.add_argument("--rounds", type=positive(int), default=300, help="timed rounds (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds first (default 30)")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    args.models = args.models or list(setting.models)
    args.guides = args.guides or list(setting.guides)
    if args.quick:
        args.models, args.rounds, args.warmup = args.models[:1], 8, 2
    unknown = sorted(set(args.models) - set(setting.models))
    if unknown:
        parser.error(f"--models: {unknown} are not models of --setting {args.setting}: {setting.models}")
    if BASELINE not in args.guides:
        parser.error(f"--guides must include {BASELINE}, the baseline of the ratios")
    device = setup(args)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    rows, records = [], []
    try:
        for model_name in args.models:
            for particles in setting.particles:
                pyro.clear_param_store()
                svis, skipped = build_svis(setting, model_name, args.guides, particles, args.seed)
                summary = summarise(interleaved_times(svis, args.warmup, args.rounds))
                records.append(
                    {"model": model_name, "particles": particles, "guides": summary, "skipped": skipped}
                )
                for label in args.guides:
                    if label in skipped:
                        rows.append([model_name, particles, label, "—", "—", f"not built: {skipped[label]}"])
                        continue
                    entry = summary[label]
                    rows.append(
                        [
                            model_name,
                            particles,
                            label,
                            f"{entry['ms']:.2f}",
                            f"{entry['ratio_median']:.2f}",
                            f"{entry['ratio_q1']:.2f}–{entry['ratio_q3']:.2f}",
                        ]
                    )
    finally:
        torch.set_default_dtype(previous)
    headers = [
        "model",
        "particles",
        "guide",
        "ms / step (median)",
        f"ratio to {BASELINE} (median)",
        "quartiles",
    ]
    markdown = (
        f"# SVI step time against {BASELINE}, interleaved (setting {args.setting!r})\n\n"
        f"{machine_summary(device)}; float64, Trace_ELBO with vectorised particles, "
        f"{setting.optimizer.__name__} lr {LR}; {args.warmup} untimed rounds, then {args.rounds} rounds that "
        f"step every guide once (order rotated). Ratio: this guide's step over {BASELINE}'s in the "
        "same round.\n\n" + markdown_table(headers, rows)
    )
    print(markdown)
    save_results(args.out, {"setting": args.setting, "runs": records}, markdown, device, args, started)


if __name__ == "__main__":
    main()
