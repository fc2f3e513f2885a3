"""Train and evaluate a VAE with a CP-Flow (or another) amortized posterior.

The model, data and recipe are those of the Sylvester-flows / CP-Flow VAE experiments (see
``experiments/vae/``). Two presets set the run length; any option given explicitly wins:

* ``--preset demo`` (default): the README's main job, a few minutes on a CPU: 2 epochs of 3
  batches, short warm-up, test ELBO and a 10-sample IS-NLL on 100 test images. Its numbers
  only show that the pipeline works.
* ``--preset paper``: the published protocol: up to 2000 epochs, 100 epochs of KL warm-up,
  early stopping after 100 epochs without validation improvement, every batch, IS-NLL with
  5000 samples (2000 for Caltech 101) on the whole test set.

Examples (from the repository root; ``experiments/vae/__main__.py`` calls :func:`main`)::

    python -m experiments.vae --dataset freyfaces --flow cpflow            # the demo
    python -m experiments.vae --dataset binarized_mnist --flow iaf --preset paper --device cuda
    python -m experiments.vae ... --resume                                 # continue after a kill
    python -m experiments.vae ... --overwrite                              # replace the run
    torchrun --nproc_per_node 2 -m experiments.vae ...                     # data parallel

Outputs go to ``experiments/runs/<dataset>-<flow>-s<seed>/`` unless ``--out-dir`` is given:
``metrics.jsonl``, ``results.json``, ``checkpoint.pt``, ``config.json``, ``samples.png``
and ``reconstructions.png``. A folder that already holds a run is refused unless
``--resume`` (continue it) or ``--overwrite`` (delete its files and start again) is given.
Every value is checked: one outside its range is refused with the range it must lie in.
"""

from __future__ import annotations

import argparse

from experiments.vae.config import CHOICES, Config, ConfigError
from experiments.vae.run_folder import RunExistsError
from experiments.vae.train import run
from pyro_cpflow import CheckpointError

PRESETS: dict[str, dict] = {
    "demo": {
        "epochs": 2,
        "max_batches": 3,
        "warmup": 2,
        "early_stopping": 0,
        "is_samples": 10,
        "test_images": 100,
        "valid_images": 0,
    },
    "paper": {
        "epochs": 2000,
        "max_batches": 0,
        "warmup": 100,
        "early_stopping": 100,
        "is_samples": 5000,
        "test_images": 0,
        "valid_images": 0,
    },
}
PAPER_IS_SAMPLES = {"caltech101": 2000}


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths, got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.vae",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", choices=CHOICES["dataset"], default="freyfaces")
    add(
        "--flow",
        choices=CHOICES["flow"],
        default="cpflow",
        help="posterior: cpflow = input-augmented PICNN blocks, cpflow-vanilla = plain PICNN",
    )
    add(
        "--preset",
        choices=sorted(PRESETS),
        default="demo",
        help="run length and evaluation protocol (options below override it)",
    )
    group = parser.add_argument_group("training (defaults from the preset)")
    group.add_argument("--epochs", type=int, help="maximum number of epochs")
    group.add_argument("--max-batches", type=int, help="batches per epoch (0 = all)")
    group.add_argument("--warmup", type=int, help="KL warm-up epochs: beta = min(epoch / warmup, 1)")
    group.add_argument(
        "--early-stopping",
        type=int,
        help="stop after this many epochs without validation improvement (0 = never)",
    )
    group.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="stop after the epoch that passes this many minutes (0 = no limit)",
    )
    group.add_argument("--batch-size", type=int, default=100)
    group.add_argument("--lr", type=float, default=5e-4, help="Adamax learning rate")
    group = parser.add_argument_group("model")
    group.add_argument("--latent-dim", type=int, default=64)
    group.add_argument("--feature-dim", type=int, default=256, help="encoder features (flow context)")
    group.add_argument("--channels", type=int, default=32, help="base width of the convolutions")
    group.add_argument(
        "--head-channels",
        type=int,
        default=256,
        help="width of the last convolution before categorical logits (Frey Faces)",
    )
    group.add_argument("--flow-steps", type=int, help="flow steps / CP-Flow blocks (default 4)")
    group.add_argument(
        "--flow-hidden", type=_hidden, help="hidden widths inside a flow step, e.g. 64,64,64,64,64"
    )
    group.add_argument(
        "--logdet",
        choices=CHOICES["logdet"],
        default="auto",
        help="CP-Flow log-det while training (evaluation is always exact)",
    )
    group.add_argument(
        "--actnorm",
        choices=CHOICES["actnorm"],
        default="between",
        help="CP-Flow ActNorm layers between blocks, or also before the first and "
        "after the last (around; the reference code)",
    )
    group.add_argument(
        "--cg-max-iter",
        type=int,
        help="CG iterations of the stochastic log-det gradient: a cap, or the "
        "fixed count when --cg-check-every 0 (default 2 x latent dim on CPU, "
        "16 on CUDA)",
    )
    group.add_argument(
        "--cg-check-every",
        type=int,
        help="test CG convergence every N iterations, a host sync on CUDA; 0 = "
        "never (default 1 on CPU, 0 on CUDA)",
    )
    group = parser.add_argument_group("evaluation (defaults from the preset)")
    group.add_argument("--is-samples", type=int, help="importance samples of the test NLL (0 = skip)")
    group.add_argument("--elbo-samples", type=int, default=1, help="samples per image of the ELBO")
    group.add_argument("--test-images", type=int, help="evaluate the first N test images (0 = all)")
    group.add_argument("--valid-images", type=int, help="validate on the first N images (0 = all)")
    group.add_argument(
        "--chunk", type=int, default=500, help="rows (samples x images) per evaluation pass: bounds memory"
    )
    group = parser.add_argument_group("engineering")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    group.add_argument(
        "--dtype",
        choices=CHOICES["dtype"],
        default="float32",
        help="float32 for speed; the paper used float64",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch's default; 1 per process under torchrun)",
    )
    group.add_argument("--out-dir", default="", help="default: experiments/runs/<dataset>-<flow>-s<seed>")
    again = group.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    again.add_argument(
        "--overwrite", action="store_true", help="delete the run already in OUT_DIR and start again"
    )
    group.add_argument("--log-every", type=int, default=10, help="steps between loss read-outs")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--validate", action="store_true", help="Pyro's argument validation (slower)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """A :class:`Config` from parsed options, filling unset ones from the preset."""
    preset = dict(PRESETS[args.preset])
    if args.preset == "paper":
        preset["is_samples"] = PAPER_IS_SAMPLES.get(args.dataset, preset["is_samples"])
    values = {key: getattr(args, key) for key in preset}
    values = {key: preset[key] if value is None else value for key, value in values.items()}
    return Config(
        dataset=args.dataset,
        flow=args.flow,
        batch_size=args.batch_size,
        lr=args.lr,
        time_limit=args.time_limit,
        latent_dim=args.latent_dim,
        feature_dim=args.feature_dim,
        channels=args.channels,
        head_channels=args.head_channels,
        flow_steps=args.flow_steps,
        flow_hidden=args.flow_hidden,
        logdet=args.logdet,
        actnorm=args.actnorm,
        cg_max_iter=args.cg_max_iter,
        cg_check_every=args.cg_check_every,
        elbo_samples=args.elbo_samples,
        chunk=args.chunk,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        out_dir=args.out_dir,
        log_every=args.log_every,
        progress=not args.no_progress,
        validate=args.validate,
        **values,
    )


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train and test; a refused value or run folder exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    except ConfigError as error:
        parser.error(f"argument --{error.option.replace('_', '-')}: {error.message}")
    except (RunExistsError, CheckpointError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
