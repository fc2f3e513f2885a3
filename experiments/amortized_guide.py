r"""Amortized guides for local latents: a VAE on scikit-learn's digits, three guides, one budget.

The model (no download: ``sklearn.datasets.load_digits``, 1797 images of 8x8 pixels with
values 0..16, split into a training and a held-out set):

.. math::

    z_i \sim \mathcal N(0, I_d), \qquad
    x_{ij} \mid z_i \sim \mathrm{Binomial}(16, \sigma(g_j(z_i))),

with a decoder :math:`g` (an MLP, a global parameter of the model) inside
``pyro.plate("data", N, subsample_size=B)``. Three guides for the local :math:`z_i`, each
trained with its own decoder and the same budget (``--steps`` ClippedAdam steps from
``--lr`` decayed to a tenth, minibatches of ``--batch-size``, one particle):

* **AutoAmortizedCPFlow**: an encoder MLP of :math:`x_i/16`, affine heads and a conditional
  CP-Flow of the encoder's features (``pyro_cpflow.AutoAmortizedCPFlow``);
* **AutoAmortizedNormal**: the same encoder and heads without the flow (a plain VAE);
* **AutoNormal**: Pyro's per-datum (non-amortized) diagonal Gaussian, with
  :math:`2 d N` parameters, each row updated only when its datum is in the minibatch. It
  has no posterior for a datum it has not been trained on: no held-out figures.

Evaluation with every guide in eval mode (exact densities), on the full training set and
on the held-out set, from ``--eval-samples`` draws per datum: the **ELBO** per image (nats)
with its Monte Carlo standard error, and the importance-weighted bound
:math:`\log \hat p(x_i) = \log \frac1S \sum_s p(x_i, z_s)/q(z_s \mid x_i)` (IWAE, Burda et
al. 2016), which is tighter; their difference is (in expectation) a lower bound on the gap
:math:`\mathrm{KL}(q \,\|\, p(z \mid x))` of each guide, on the decoder it was trained with.
Time per step is the median after 20 warm-up steps.

Run ``python -m experiments.amortized_guide`` (a few minutes on 2 shared CPU cores);
``--quick`` is a smoke run in seconds that writes nothing. A full run writes
``results/amortized_guide.json`` (refusing to overwrite one unless ``--overwrite``) and the
"Amortized guide for local latents" section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from experiments.common import (
    RESULTS_DIR,
    add_run_options,
    count_parameters,
    markdown_table,
    parse_run_args,
    positive,
    progress,
    run_header,
    save_run,
)
from pyro_cpflow import AutoAmortizedCPFlow, AutoAmortizedNormal

RESULTS_JSON = RESULTS_DIR / "amortized_guide.json"
SECTION = "Amortized guide for local latents"
WARMUP_STEPS = 20
PIXELS, LEVELS = 64, 16


def load_digits(test_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """The digits as float counts ``(N, 64)``, shuffled and split into train and held-out."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = torch.as_tensor(sklearn_digits().data, dtype=torch.get_default_dtype())
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images = images[order]
    return images[test_size:], images[:test_size]


class DigitsVAE:
    """The model: a decoder of ``latent_dim`` latents into Binomial(16, .) pixel counts."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.Softplus(),
            nn.Linear(hidden, hidden),
            nn.Softplus(),
            nn.Linear(hidden, PIXELS),
        )

    def model(self, x: Tensor, subsample_size: int | None = None) -> None:
        decoder = pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x), subsample_size=subsample_size) as index:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))
            pyro.sample("x", dist.Binomial(LEVELS, logits=decoder(z)).to_event(1), obs=x[index])


def data_plate(x: Tensor, subsample_size: int | None = None) -> pyro.plate:
    """The model's plate, for every call (training minibatches, full-data evaluation)."""
    return pyro.plate("data", len(x), subsample_size=subsample_size)


def encoder(hidden: int, context_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(PIXELS, hidden), nn.Softplus(), nn.Linear(hidden, context_dim), nn.Softplus()
    )


def scaled_pixels(x: Tensor, subsample_size: int | None = None) -> Tensor:
    """The encoder's input: every image's pixels in [0, 1]."""
    return x / LEVELS


def build_guide(name: str, vae: DigitsVAE, args: argparse.Namespace) -> Any:
    amortized = {"plate": "data", "data": scaled_pixels, "create_plates": data_plate}
    if name == "AutoAmortizedCPFlow":
        return AutoAmortizedCPFlow(
            vae.model,
            encoder=encoder(args.hidden, args.context_dim),
            hidden_dims=(args.flow_hidden,) * args.flow_layers,
            learn_quadratic=args.learn_quadratic,
            **amortized,
        )
    if name == "AutoAmortizedNormal":
        return AutoAmortizedNormal(vae.model, encoder=encoder(args.hidden, args.context_dim), **amortized)
    return AutoNormal(vae.model, create_plates=data_plate)


GUIDES: tuple[str, ...] = ("AutoAmortizedCPFlow", "AutoAmortizedNormal", "AutoNormal")
AMORTIZED = ("AutoAmortizedCPFlow", "AutoAmortizedNormal")


def train(name: str, train_x: Tensor, args: argparse.Namespace) -> tuple[DigitsVAE, Any, dict[str, Any]]:
    """One guide (and its decoder) trained with the shared budget."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = DigitsVAE(args.latent_dim, args.hidden)
    guide = build_guide(name, vae, args)
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1.0 / args.steps)})
    svi = SVI(vae.model, guide, optim, Trace_ELBO(max_plate_nesting=1))
    times, losses = [], []
    bar = progress(args.steps, name, enabled=args.progress)
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(svi.step(train_x, args.batch_size))
        times.append(time.perf_counter() - start)
        bar.update()
    bar.close()
    timed = times[WARMUP_STEPS:] or times
    tenth = max(1, args.steps // 10)
    curve = [
        sum(losses[i : i + tenth]) / len(losses[i : i + tenth]) / len(train_x)
        for i in range(0, args.steps, tenth)
    ]
    return (
        vae,
        guide,
        {
            "ms_per_step": 1e3 * statistics.median(timed),
            "train_loss_per_image_by_tenth": curve,
            "finite": all(math.isfinite(v) for v in losses),
            "guide_parameters": count_parameters(guide),
        },
    )


@torch.no_grad()
def log_weights(
    model: Callable[..., None], guide: Any, x: Tensor, samples: int, chunk: int
) -> tuple[Tensor, Tensor]:
    r""":math:`\log p(x_i, z_s) - \log q(z_s \mid x_i)` for every datum and draw, ``(S, N)``,
    and the draws :math:`z_s` of the latent ``(S, N, d)``."""
    parts, latents = [], []
    for start in range(0, samples, chunk):
        with pyro.plate("draws", min(chunk, samples - start), dim=-2):
            guide_trace = poutine.trace(guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        total = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for site in trace.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    total = total + sign * site["fn"].log_prob(site["value"])
        parts.append(total)
        latents.append(guide_trace.nodes["z"]["value"])
    return torch.cat(parts), torch.cat(latents)


ACTIVE_UNIT = 0.01
"""A latent is active when the variance over the data of its posterior mean exceeds this
(Burda et al. 2016): below it the decoder ignores the latent, whose posterior is the prior."""


def evaluate(vae: DigitsVAE, guide: Any, x: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    r"""ELBO per image with its Monte Carlo standard error, the IWAE bound and, per latent, its
    activity :math:`\operatorname{Var}_i \mathbb E_q[z_{ik}]` and mean posterior standard
    deviation (from the same draws): a collapsed latent has activity near 0 and sd near 1."""
    guide.eval()
    pyro.set_rng_seed(args.seed + 1)
    w, z = log_weights(vae.model, guide, x, args.eval_samples, args.eval_chunk)
    w = w.double()
    elbo = float(w.mean())
    elbo_se = float((w.var(0) / w.shape[0]).mean().sqrt() / math.sqrt(w.shape[1]))
    iwae = float((torch.logsumexp(w, 0) - math.log(w.shape[0])).mean())
    activity = z.mean(0).var(0)
    return {
        "elbo": elbo,
        "elbo_se": elbo_se,
        "iwae": iwae,
        "activity": activity.tolist(),
        "active_latents": int((activity > ACTIVE_UNIT).sum()),
        "posterior_sd": z.std(0).mean(0).tolist(),
    }


# ---------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    """The Markdown table of a run."""
    rows = results["guides"]
    reference = rows.get("AutoAmortizedNormal", {}).get("ms_per_step")

    def cell(row: dict, split: str, key: str) -> str:
        if split not in row:
            return "—"
        values = row[split]
        if key == "elbo":
            return f"{values['elbo']:.2f} ± {values['elbo_se']:.2f}"
        if key == "gap":
            return f"{values['iwae'] - values['elbo']:.2f}"
        return f"{values[key]:.2f}"

    table = [
        [
            name,
            cell(row, "train", "elbo"),
            cell(row, "train", "iwae"),
            cell(row, "train", "gap"),
            cell(row, "test", "elbo"),
            cell(row, "test", "iwae"),
            cell(row, "test", "gap"),
            f"{row['ms_per_step']:.1f}",
            f"{row['ms_per_step'] / reference:.1f}" if reference else "",
            f"{row['guide_parameters']:,}",
            _activity(row["train"]),
        ]
        for name, row in rows.items()
    ]
    return markdown_table(
        [
            "guide",
            "train ELBO ± SE",
            "train log p̂ (IWAE)",
            "train gap",
            "held-out ELBO ± SE",
            "held-out log p̂",
            "held-out gap",
            "ms / step",
            "time vs Gaussian",
            "guide parameters",
            "active latents (activity; train)",
        ],
        table,
    )


def _activity(values: dict[str, Any]) -> str:
    """``"k of d (a_1, ..., a_d)"``, or a dash for a run from before the activity was measured."""
    if "activity" not in values:
        return "—"
    listed = ", ".join(f"{a:.2f}" for a in values["activity"])
    return f"{values['active_latents']} of {len(values['activity'])} ({listed})"


def section(results: dict[str, Any]) -> str:
    """The "Amortized guide for local latents" section of ``RESULTS.md``."""
    s = results["settings"]
    intro = (
        f"Command: `{results['command']}`\n\n"
        f"A VAE on scikit-learn's digits ({s['train_size']} training and {s['test_size']} held-out "
        f"8x8 images, Binomial(16) pixels, {s['latent_dim']} latents, decoder MLP {s['hidden']} wide), "
        "each guide trained with its own decoder and the same budget: "
        f"{s['steps']} ClippedAdam steps from lr {s['lr']:g} decayed to a tenth, minibatches of "
        f"{s['batch_size']} (plate subsampling, ELBO scaled by N/B), one particle, float64. "
        "The amortized guides share the encoder (MLP of the pixels, "
        f"{s['context_dim']} context features); the CP-Flow adds a conditional block with PICNN "
        f"widths {s['flow_hidden']}x{s.get('flow_layers', 2)}. Evaluated in eval mode (exact densities) on "
        f"{s['eval_samples']} draws per image: ELBO per image in nats with its Monte Carlo "
        "standard error; log p̂ the importance-weighted (IWAE) bound from the same draws; gap = "
        "log p̂ − ELBO, in expectation a lower bound on KL(q ‖ posterior) under each guide's own decoder. "
        "Active latents: those whose posterior mean varies over the training images by more than "
        f"{ACTIVE_UNIT} (variance; Burda et al. 2016), with each latent's activity; a collapsed "
        "latent's posterior is the prior. "
        "AutoNormal (per datum) has no posterior for held-out images. Times are medians per step "
        "on a shared 2-core machine (about ±10%)."
    )
    rows = results["guides"]
    curves = markdown_table(
        ["guide", *[f"{10 * (k + 1)}%" for k in range(10)]],
        [[name, *[f"{v:.1f}" for v in row["train_loss_per_image_by_tenth"]]] for name, row in rows.items()],
    )
    reading = (
        "Training loss per image (negative ELBO, minibatch estimates) averaged over each tenth of "
        "the steps: the curves show whether a guide had converged and where the runs part."
    )
    return intro + "\n\n" + report(results) + "\n\n" + reading + "\n\n" + curves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.amortized_guide", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--guides", nargs="+", choices=GUIDES, default=list(GUIDES))
    parser.add_argument("--steps", type=positive(int), default=3000)
    parser.add_argument("--batch-size", type=positive(int), default=100)
    parser.add_argument("--lr", type=positive(float), default=3e-3)
    parser.add_argument("--latent-dim", type=positive(int), default=4)
    parser.add_argument("--hidden", type=positive(int), default=128, help="encoder and decoder width")
    parser.add_argument("--context-dim", type=positive(int), default=32, help="encoder features")
    parser.add_argument("--flow-hidden", type=positive(int), default=64, help="PICNN width")
    parser.add_argument("--flow-layers", type=positive(int), default=2, help="PICNN hidden layers")
    parser.add_argument(
        "--learn-quadratic",
        action="store_true",
        help="learn the flow's quadratic (AutoAmortizedCPFlow's default before 2026-12-03)",
    )
    parser.add_argument("--test-size", type=positive(int), default=297)
    parser.add_argument("--eval-samples", type=positive(int), default=200)
    parser.add_argument("--eval-chunk", type=positive(int), default=25, help="draws per evaluation pass")
    add_run_options(parser, RESULTS_JSON, "smoke run: 30 steps, 4 evaluation draws; writes nothing")
    return parse_run_args(parser, argv, quick={"steps": 30, "eval_samples": 4, "eval_chunk": 4})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    train_x, test_x = load_digits(args.test_size, args.seed)
    header = run_header("experiments.amortized_guide", argv, args)
    results: dict[str, Any] = {
        **header,
        "settings": header["settings"] | {"train_size": len(train_x)},
        "guides": {},
    }
    for name in args.guides:
        vae, guide, record = train(name, train_x, args)
        record["train"] = evaluate(vae, guide, train_x, args)
        if name in AMORTIZED:
            record["test"] = evaluate(vae, guide, test_x, args)
        results["guides"][name] = record
        held_out = f"held-out {record['test']['elbo']:8.2f}" if "test" in record else ""
        print(
            f"{name:20s} train ELBO {record['train']['elbo']:8.2f} ± {record['train']['elbo_se']:.2f} "
            f"{held_out}  {record['ms_per_step']:6.1f} ms/step"
        )
    print(report(results))
    save_run(results, args, RESULTS_JSON, SECTION, section)
    return results


if __name__ == "__main__":
    main()
