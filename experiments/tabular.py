r"""Tabular density estimation (Huang et al. 2021, arXiv:2012.05942, table 1): CP-Flow against
Pyro's MAF and NSF of matched size, early stopping on validation, test log-likelihood.

The paper's table uses the five sets of Papamakarios et al. (arXiv:1705.07057), POWER, GAS,
HEPMASS, MINIBOONE and BSDS300, whose preprocessed files are read by ``tabular_data.py``
from a folder you supply (``--maf-root``; they are not shipped or downloadable here). Until
they are available, the default run uses real tabular data that scikit-learn ships
(``tabular_bundled.py``): breast cancer (d = 24 after the MAF rule for repeated values),
wine (13, dequantised) and digits (64, dequantised).

For each set and model (``tabular_models.py``; the baselines' width matched to the CP-Flow's
parameter count, reported), ``tabular_train.py`` trains by maximum likelihood with Adam,
scores the validation rows every ``--eval-every`` steps, keeps the best state and stops after
``--patience`` evaluations without improvement. Reported: the test log-likelihood of the best
state in nats (of the standardised data, as in MAF), mean ± two standard errors over the
test points, with the parameter count, the steps, the training time and the time per step;
and the maximum-likelihood Gaussian as a reference.

Run::

    python -m experiments.tabular                      # the scikit-learn sets (about 25 min)
    python -m experiments.tabular --resume             # continue after a kill
    python -m experiments.tabular --datasets power gas hepmass miniboone bsds300 \
        --maf-root /path/to/maf-data --allow-pickle --out experiments/results/tabular_maf.json

Every model's run is checkpointed after each evaluation in ``--run-dir`` (default
``experiments/runs/tabular``); ``--resume`` continues unfinished ones and reuses finished
ones, ``--overwrite`` deletes them and starts again, and without either a folder holding
checkpoints is refused. A full run writes ``results/tabular.json`` (never replaced without
``--overwrite``) and the "Tabular density" section of ``RESULTS.md`` (``--render-only``
rewrites that section from the JSON). ``--quick`` is a smoke run of a few seconds per set that
checkpoints into a temporary folder and writes nothing else.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch

from experiments.common import (
    EXPERIMENTS_DIR,
    RESULTS_DIR,
    RESULTS_MD,
    add_run_options,
    count_parameters,
    markdown_table,
    positive,
    read_json,
    refuse_overwrite,
    replace_markdown_section,
    run_header,
    save_run,
)
from experiments.tabular_bundled import BUNDLED_DATASETS, load_bundled
from experiments.tabular_data import (
    MAF_DATASETS,
    MAF_FILES,
    MissingDataError,
    MissingDependencyError,
    PickleRefusedError,
    TabularSplits,
    load_maf,
    size_differences,
)
from experiments.tabular_models import BASELINES, MODEL_NAMES, build_cpflow, density, matched_baseline
from experiments.tabular_train import TensorSplits, TrainSettings, fit, mean_and_two_se

RESULTS_JSON = RESULTS_DIR / "tabular.json"
RUN_DIR = EXPERIMENTS_DIR / "runs" / "tabular"
SECTION = "Tabular density"
DEFAULT_DATASETS = ("breast_cancer", "wine", "digits")
QUICK = {"max_steps": 30, "eval_every": 10, "patience": 2}
LAYOUT = ", ".join(path for paths in MAF_FILES.values() for path in paths)


# ------------------------------------------------------------------------------ data


def load(name: str, args: argparse.Namespace) -> TabularSplits:
    """A bundled set, or a MAF set from ``--maf-root``."""
    if name in BUNDLED_DATASETS:
        return load_bundled(name, seed=args.seed)
    return load_maf(name, args.maf_root, allow_pickle=args.allow_pickle)


def as_tensors(splits: TabularSplits, dtype: torch.dtype) -> TensorSplits:
    def tensor(array: Any) -> torch.Tensor:
        return torch.as_tensor(array, dtype=dtype)

    noise = None if splits.dequantization is None else tensor(splits.dequantization)
    return TensorSplits(tensor(splits.train), tensor(splits.validation), tensor(splits.test), noise)


def gaussian_reference(data: TensorSplits) -> dict[str, float]:
    r"""Test log-likelihood of the maximum-likelihood Gaussian of the training distribution
    (for a dequantised set, of its exact moments: mean :math:`\bar x + \delta/2`, covariance
    :math:`S + \mathrm{diag}(\delta^2/12)`)."""
    width = torch.zeros(data.train.shape[1], dtype=data.train.dtype)
    if data.dequantization is not None:
        width = data.dequantization
    mean = data.train.mean(0) + width / 2
    covariance = torch.cov(data.train.T, correction=0) + torch.diag(width**2 / 12)
    values = dist.MultivariateNormal(mean, covariance_matrix=covariance).log_prob(data.test)
    loglik, two_se = mean_and_two_se(values)
    return {"test_loglik": loglik, "test_loglik_2se": two_se}


# ---------------------------------------------------------------------------- models


def model_seed(seed: int, dataset: str, model: str) -> int:
    """A seed of its own for every (data set, model), the same whichever others run."""
    return seed * 1_000_003 + zlib.crc32(f"{dataset}/{model}".encode()) % 1_000_003


def build(
    model: str, dim: int, args: argparse.Namespace, seed: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module (data -> base) and its description; the baselines are matched in size."""
    target = count_parameters(build_cpflow(dim, args.blocks, args.hidden))
    if model == "CP-Flow":
        shape = {"blocks": args.blocks, "hidden": args.hidden}
        factory = lambda: build_cpflow(dim, args.blocks, args.hidden)  # noqa: E731
    else:
        max_layers = args.maf_layers if model == "MAF" else args.nsf_layers
        layers, width = matched_baseline(model, dim, max_layers, target)
        shape = {"layers": layers, "hidden": width}
        factory = lambda: BASELINES[model](dim, layers, width)  # noqa: E731
    torch.manual_seed(seed)
    module = factory().to(torch.get_default_dtype())
    return module, {**shape, "parameters": count_parameters(module), "cpflow_parameters": target}


def checkpoint_path(run_dir: Path, dataset: str, model: str) -> Path:
    return run_dir / f"{dataset}-{model.lower().replace('-', '')}.pt"


# ------------------------------------------------------------------------------- run


def run_one(dataset: str, model: str, data: TensorSplits, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model on one set (or take its finished checkpoint); its record."""
    seed = model_seed(args.seed, dataset, model)
    module, shape = build(model, data.train.shape[1], args, seed)
    settings = TrainSettings(
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.max_steps,
        eval_every=args.eval_every,
        patience=args.patience,
    )
    identity = {"dataset": dataset, "model": model, **shape, "dtype": args.dtype}
    result = fit(
        module,
        density(module, data.train.shape[1]),
        data,
        settings,
        seed,
        checkpoint_path(args.run_dir, dataset, model),
        resume=args.resume,
        identity=identity,
        desc=f"{dataset} | {model}",
        show_progress=args.progress,
    )
    return {**shape, **result}


def claim_run_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse checkpoints of the selected runs unless ``--resume`` or ``--overwrite``
    (which deletes them)."""
    found = [
        path
        for d in args.datasets
        for m in args.models
        if (path := checkpoint_path(args.run_dir, d, m)).exists()
    ]
    if found and not (args.resume or args.overwrite):
        parser.error(
            f"{args.run_dir} holds checkpoints of these runs ({', '.join(p.name for p in found)}): "
            "pass --resume to continue them, --overwrite to delete them and start again, "
            "or another --run-dir"
        )
    if args.overwrite:
        for path in found:
            path.unlink()
    args.run_dir.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Every selected model on every selected set; the JSON record."""
    header = run_header("experiments.tabular", argv, args)
    record: dict[str, Any] = {**header, "datasets": {}}
    start = time.perf_counter()
    for dataset in args.datasets:
        splits = load(dataset, args)
        data = as_tensors(splits, torch.get_default_dtype())
        entry: dict[str, Any] = {
            "dim": splits.dim,
            "sizes": dict(zip(("train", "validation", "test"), splits.sizes, strict=True)),
            "size_differences_from_published": size_differences(splits),
            "notes": {k: v for k, v in splits.notes.items() if k not in ("mean", "std")},
            "gaussian": gaussian_reference(data),
            "models": {},
        }
        for model in args.models:
            entry["models"][model] = row = run_one(dataset, model, data, args)
            print(
                f"{dataset:14s} {model:8s} test {row['test_loglik']:9.3f} ± {row['test_loglik_2se']:.3f} "
                f"({row['parameters']} parameters, best step {row['best_step']} of {row['steps']}, "
                f"{row['train_seconds']:.0f} s)",
                flush=True,
            )
        record["datasets"][dataset] = entry
    record["seconds"] = time.perf_counter() - start
    return record


# ---------------------------------------------------------------------------- report


def _cell(row: dict[str, Any], best: float) -> str:
    text = f"{row['test_loglik']:.2f} ± {row['test_loglik_2se']:.2f}"
    return f"**{text}**" if row["test_loglik"] == best else text


def paired_difference(first: list[float], second: list[float]) -> tuple[float, float]:
    """Mean and two standard errors of ``first - second`` over the same test points."""
    return mean_and_two_se(torch.tensor(first).double() - torch.tensor(second).double())


def report(record: dict[str, Any]) -> str:
    """Markdown tables: test log-likelihoods; CP-Flow's paired differences; sizes, steps and times."""
    models = list(next(iter(record["datasets"].values()))["models"]) if record["datasets"] else []
    scores, costs, pairs = [], [], []
    for name, entry in record["datasets"].items():
        rows = entry["models"]
        best = max(rows[m]["test_loglik"] for m in models)
        gaussian = entry["gaussian"]
        scores.append(
            [
                f"{name} (d = {entry['dim']}, test {entry['sizes']['test']})",
                *[_cell(rows[m], best) for m in models],
                f"{gaussian['test_loglik']:.2f} ± {gaussian['test_loglik_2se']:.2f}",
            ]
        )
        if "CP-Flow" in rows:
            others = [m for m in models if m != "CP-Flow"]
            differences = [
                paired_difference(rows["CP-Flow"]["test_logliks"], rows[m]["test_logliks"]) for m in others
            ]
            pairs.append([name, *[f"{mean:+.2f} ± {two_se:.2f}" for mean, two_se in differences]])
        for m in models:
            row = rows[m]
            shape = (
                f"{row['blocks']} blocks" if "blocks" in row else f"{row['layers']} layers"
            ) + f", width {row['hidden']}"
            costs.append(
                [
                    name,
                    m,
                    shape,
                    f"{row['parameters']:,}",
                    f"{row['best_step']} / {row['steps']}",
                    f"{row['train_seconds']:.0f}",
                    f"{row['ms_per_step']:.1f}",
                ]
            )
    first = markdown_table(["data set", *models, "Gaussian"], scores)
    second = markdown_table(
        ["data set", "model", "shape", "parameters", "best step / steps", "training s", "ms / step"], costs
    )
    tables = [first]
    if pairs:
        others = [m for m in models if m != "CP-Flow"]
        tables.append(
            "CP-Flow minus each baseline, paired over the same test points (mean ± two standard "
            "errors; positive: CP-Flow better):\n\n"
            + markdown_table(["data set", *[f"CP-Flow − {m}" for m in others]], pairs)
        )
    return "\n\n".join([*tables, second])


def _data_description(record: dict[str, Any]) -> str:
    if all(name in BUNDLED_DATASETS for name in record["datasets"]):
        return (
            "Data: scikit-learn's bundled sets (`experiments/tabular_bundled.py`), shuffled, 20% test "
            "and 20% of the rest validation; breast cancer without the six features whose minimum "
            "repeats (MAF's rule), wine and digits dequantised (uniform noise of each column's grid "
            "width, fresh for every training batch)."
        )
    return (
        "Data: the preprocessed sets of Papamakarios et al. (2017) as `experiments/tabular_data.py` "
        "describes, with the bundled ones as `experiments/tabular_bundled.py` does."
    )


def section(record: dict[str, Any]) -> str:
    """The "Tabular density" section of ``RESULTS.md``."""
    s = record["settings"]
    intro = (
        f"Command: `{record['command']}` ({record['seconds'] / 60:.1f} min on "
        f"{record['environment']['torch_threads']} torch thread(s), {s['dtype']}).\n\n"
        "Test log-likelihood in nats of the standardised data (higher is better; mean ± two standard "
        "errors over the test points; best in bold), of the state with the best validation score. "
        f"Adam, lr {s['lr']:g}, batches of {s['batch_size']}, validation every {s['eval_every']} "
        f"steps, early stopping after {s['patience']} evaluations without improvement, at most "
        f"{s['max_steps']} steps. CP-Flow: `cpflow_stack` of {s['blocks']} blocks, ICNN widths "
        f'({s["hidden"]}, {s["hidden"]}), `logdet="auto"` (stochastic while training at these '
        "batch sizes and dimensions, exact in evaluation); MAF (`affine_autoregressive`) and NSF "
        "(`spline_coupling`, 4 bins) with the width that matches the CP-Flow's parameter count. "
        f"{_data_description(record)} The Gaussian is the maximum-likelihood fit of the training "
        "distribution."
    )
    capped = [
        f"{name} {model}"
        for name, entry in record["datasets"].items()
        for model, row in entry["models"].items()
        if row["stop_reason"] == "max_steps"
    ]
    notes = (
        "One seed; the test sets are small (the two standard errors say how small). "
        + (f"Stopped by the step limit, not by early stopping: {', '.join(capped)}. " if capped else "")
        + "No model was tuned beyond these shared settings."
    )
    return intro + "\n\n" + report(record) + "\n\n" + notes


# ------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.tabular", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--datasets", nargs="+", choices=[*BUNDLED_DATASETS, *MAF_DATASETS], default=list(DEFAULT_DATASETS)
    )
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--maf-root", type=Path, help=f"folder of the preprocessed MAF files ({LAYOUT})")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow unpickling GAS's pickle (pickles run code: trusted files only)",
    )
    parser.add_argument("--blocks", type=positive(int), default=4, help="CP-Flow blocks")
    parser.add_argument("--hidden", type=positive(int), default=64, help="CP-Flow ICNN width")
    parser.add_argument("--maf-layers", type=positive(int), default=5, help="most MAF layers")
    parser.add_argument("--nsf-layers", type=positive(int), default=3, help="most NSF layers")
    parser.add_argument("--batch-size", type=positive(int), default=128)
    parser.add_argument("--lr", type=positive(float), default=1e-3)
    parser.add_argument("--max-steps", type=positive(int), default=4000)
    parser.add_argument("--eval-every", type=positive(int), default=50)
    parser.add_argument("--patience", type=positive(int), default=10, help="evaluations without improvement")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument(
        "--run-dir", type=Path, help=f"checkpoints (default {RUN_DIR}; --quick: a temporary one)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the checkpointed runs in --run-dir")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="no training: print the report of the JSON in --out (and, for the default "
        "--out, rewrite the RESULTS.md section)",
    )
    add_run_options(parser, RESULTS_JSON, "smoke run: 30 steps per model; writes no results")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other: continue the runs or replace them")
    if any(name in MAF_DATASETS for name in args.datasets) and args.maf_root is None:
        parser.error(f"the MAF sets need --maf-root, the folder holding {LAYOUT}")
    if not args.render_only:
        refuse_overwrite(parser, args)
    return parser, args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, args = parse_args(argv)
    if args.render_only:
        record = read_json(args.out)
        print(section(record))
        if args.out == RESULTS_JSON:
            replace_markdown_section(RESULTS_MD, SECTION, section(record))
        return record
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tabular-quick-") as scratch:
        if args.run_dir is None:
            args.run_dir = Path(scratch) if args.quick else RUN_DIR
        claim_run_dir(parser, args)
        try:
            record = run(args, argv)
        except (MissingDataError, MissingDependencyError, PickleRefusedError) as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(report(record))
    save_run(record, args, RESULTS_JSON, SECTION, section)
    return record


if __name__ == "__main__":
    main()
