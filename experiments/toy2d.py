r"""CP-Flow against Pyro's flows on the 2-D toy densities (Huang et al. 2021, figure 3).

Every model is fitted by maximum likelihood in the density direction: a module ``m``
maps data to the base :math:`N(0, I)` and the model is
``TransformedDistribution(base, [m.inv])``, so ``log_prob`` evaluates only ``m``
(for CP-Flow the gradient map :math:`\nabla F` and its Hessian log-determinant).
Training draws a fresh batch from the toy sampler at every step; the held-out
log-likelihood is the mean over a separate fixed sample (another seed).

Models, all with about 7-8k parameters, each after an :class:`~pyro_cpflow.ActNorm`
that standardises the data (as in the reference CP-Flow code):

* ``CP-Flow (1 block)``: ``cpflow(2, hidden_dims=(112, 112))``;
* ``CP-Flow (3 blocks)``: ``cpflow_stack(2, 3, hidden_dims=(64, 64))``;
* ``MAF (affine AR)``: 6 :class:`~pyro.distributions.transforms.AffineAutoregressive`
  layers (hidden 32, 32) with reversals between them;
* ``NAF``: 3 :class:`~pyro.distributions.transforms.NeuralAutoregressive` layers;
* ``NSF (spline coupling)``: 4 :func:`~pyro.distributions.transforms.spline_coupling`
  layers (8 bins) with reversals.

The CP-Flow networks use the library's ``input_gain`` (``--cpflow-input-gain``, default
the library's 4). With gain 1 (PyTorch's plain initialisation) CP-Flow stayed at or near
the Gaussian fit on these data: after 600 steps, held-out log-likelihoods of -4.14 (one
block) and -3.88 (three blocks) on 8 gaussians, whose Gaussian fit scores -4.26, and
exactly the Gaussian fit's -3.59 on rings.

Run ``python -m experiments.toy2d`` (7-10 minutes on 2 shared CPU cores); it writes
``results/toy2d.json``, ``results/toy2d.png`` and the "Toy densities" section of
``RESULTS.md``. This is one short budget and one seed; ``toy2d_convergence.py`` trains
until the held-out curves flatten, from several seeds, with tuned learning rates.
"""

from __future__ import annotations

import functools
import math
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN
from torch import Tensor, nn

from experiments import common
from experiments.toy_data import TOY_DATASETS, sample_toy
from pyro_cpflow import ActNorm, cpflow, cpflow_stack
from pyro_cpflow.nn import DEFAULT_INPUT_GAIN

__all__ = [
    "MODELS",
    "ToyConfig",
    "build_model",
    "cpflow_model",
    "held_out_loglik",
    "markdown_section",
    "plot_grid",
    "run",
]

TITLE = "Toy densities"


# -------------------------------------------------------------------------- models


def _reverse(dim: int) -> T.Permute:
    return T.Permute(torch.arange(dim - 1, -1, -1))


def _standardised(parts: Sequence[nn.Module], dim: int) -> T.ComposeTransformModule:
    """``ActNorm`` (initialised on the first batch) followed by ``parts``, as one module."""
    return T.ComposeTransformModule([ActNorm(dim), *parts])


def _interleave(layers: Sequence[nn.Module], dim: int) -> T.ComposeTransformModule:
    """``ActNorm, layer, reverse, layer, ...`` as one module mapping data to the base."""
    parts: list = []
    for i, layer in enumerate(layers):
        if i:
            parts.append(_reverse(dim))
        parts.append(layer)
    return _standardised(parts, dim)


def cpflow_model(
    dim: int,
    gain: float,
    blocks: int = 1,
    hidden_dims: Sequence[int] = (112, 112),
    last_block_hidden_dims: Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    """``ActNorm``, then one CP-Flow block (``blocks=1``) or a :func:`~pyro_cpflow.cpflow_stack`
    of ``blocks`` with ActNorm between them; exact log-dets, networks of input gain ``gain``.

    Every block has ``hidden_dims``, except the last when ``last_block_hidden_dims`` is given
    (``blocks >= 2``). ``options`` go to :func:`~pyro_cpflow.cpflow` (``activation``,
    ``alpha``, ``initial_scale``...).
    """
    options = dict(logdet="exact", input_gain=gain, **options)
    if last_block_hidden_dims is not None and blocks < 2:
        raise ValueError(f"last_block_hidden_dims needs blocks >= 2, got blocks={blocks}")
    if blocks == 1:
        return _standardised([cpflow(dim, hidden_dims=tuple(hidden_dims), **options)], dim)
    last = hidden_dims if last_block_hidden_dims is None else last_block_hidden_dims
    widths = [tuple(hidden_dims)] * (blocks - 1) + [tuple(last)]
    return _standardised(list(cpflow_stack(dim, blocks, block_hidden_dims=widths, **options)), dim)


_cpflow_one = functools.partial(cpflow_model, blocks=1, hidden_dims=(112, 112))
_cpflow_three = functools.partial(cpflow_model, blocks=3, hidden_dims=(64, 64))


def _maf(dim: int, gain: float) -> nn.Module:
    return _interleave(
        [
            T.AffineAutoregressive(AutoRegressiveNN(dim, [32, 32], permutation=torch.arange(dim)))
            for _ in range(6)
        ],
        dim,
    )


def _naf(dim: int, gain: float) -> nn.Module:
    layers = [
        T.NeuralAutoregressive(
            AutoRegressiveNN(dim, [32, 32], param_dims=[8, 8, 8], permutation=torch.arange(dim)),
            hidden_units=8,
        )
        for _ in range(3)
    ]
    return _interleave(layers, dim)


def _nsf(dim: int, gain: float) -> nn.Module:
    return _interleave(
        [T.spline_coupling(dim, hidden_dims=[30, 30], count_bins=8, bound=5.0) for _ in range(4)], dim
    )


MODELS: dict[str, Callable[[int, float], nn.Module]] = {
    "CP-Flow (1 block)": _cpflow_one,
    "CP-Flow (3 blocks)": _cpflow_three,
    "MAF (affine AR)": _maf,
    "NAF": _naf,
    "NSF (spline coupling)": _nsf,
}
"""Model name -> factory ``(dim, cpflow_input_gain)`` of a module mapping data to the base."""


def build_model(
    name: str,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    dim: int = 2,
    cpflow_input_gain: float = DEFAULT_INPUT_GAIN,
    models: Mapping[str, Callable[[int, float], nn.Module]] = MODELS,
) -> tuple[nn.Module, dist.TransformedDistribution]:
    """The module (data -> base) and its density-direction distribution, initialised from ``seed``.

    ``name`` is looked up in ``models`` (default :data:`MODELS`). Every model starts with an
    :class:`~pyro_cpflow.ActNorm` that standardises the data (initialised on the first batch
    it sees).
    """
    torch.manual_seed(seed)
    module = models[name](dim, cpflow_input_gain).to(device=device, dtype=dtype)
    distribution = dist.TransformedDistribution(common.standard_normal(dim, device, dtype), [module.inv])
    return module, distribution


# ---------------------------------------------------------------------- evaluation


def pointwise_loglik(distribution: dist.Distribution, x: Tensor, chunk: int = 4096) -> Tensor:
    """The log-likelihood of each point of ``x`` (no graph; in chunks of ``chunk`` points)."""
    with torch.no_grad():
        return torch.cat([distribution.log_prob(part).detach() for part in x.split(chunk)])


def mean_and_stderr_of(values: Tensor) -> tuple[float, float]:
    """The mean of per-point log-likelihoods and its standard error over the points."""
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def held_out_loglik(distribution: dist.Distribution, x: Tensor) -> tuple[float, float]:
    """Mean held-out log-likelihood (nats) and its standard error."""
    return mean_and_stderr_of(pointwise_loglik(distribution, x))


def gaussian_fit(x: Tensor) -> dist.MultivariateNormal:
    """The maximum-likelihood Gaussian of a sample: the reference a flow must beat."""
    return dist.MultivariateNormal(x.mean(0), covariance_matrix=torch.cov(x.T, correction=0))


def density_grid(
    distribution: dist.Distribution, limit: float, size: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """The density on a ``size x size`` grid over ``[-limit, limit]^2``; rows index y (bottom first)."""
    axis = torch.linspace(-limit, limit, size, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    return pointwise_loglik(distribution, points).exp().reshape(size, size).cpu()


# ---------------------------------------------------------------------- experiment


@dataclass
class ToyConfig:
    """Settings of one run (the defaults are those of the committed results)."""

    datasets: Sequence[str] = tuple(TOY_DATASETS)
    models: Sequence[str] = tuple(MODELS)
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-2
    seed: int = 0
    n_test: int = 10000
    grid_size: int = 100
    cpflow_input_gain: float = DEFAULT_INPUT_GAIN
    limit: float = 4.0
    device: str = "cpu"
    dtype: str = "float64"
    show_progress: bool = True


@dataclass
class ToyResult:
    """What :func:`run` returns: the JSON-able record and the density grids for the figure."""

    record: dict[str, Any]
    grids: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    samples: dict[str, Tensor] = field(default_factory=dict)


def _summarise_losses(losses: list[float], points: int = 50) -> list[float]:
    """Means of ``points`` consecutive windows of the training losses (for plotting)."""
    values = torch.tensor(losses, dtype=torch.float64)
    return [float(part.mean()) for part in values.tensor_split(min(points, len(losses)))]


def _sample_batch(
    data_name: str, batch_size: int, train_seed: int, step: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Training batch ``step`` of a data set: its seed is ``train_seed + step``."""
    return sample_toy(data_name, batch_size, seed=train_seed + step, device=device, dtype=dtype)


def run(config: ToyConfig) -> ToyResult:
    """Fit every model to every data set; return held-out log-likelihoods and density grids."""
    device = torch.device(config.device)
    dtype = getattr(torch, config.dtype)
    settings = asdict(config) | {"datasets": list(config.datasets), "models": list(config.models)}
    result = ToyResult(record={"config": settings, "datasets": {}})
    for i, data_name in enumerate(config.datasets):
        test = sample_toy(
            data_name, config.n_test, seed=10_000 + 100 * config.seed + i, device=device, dtype=dtype
        )
        result.samples[data_name] = test[:5000].cpu()
        result.grids[data_name] = {}
        entries: dict[str, Any] = {}
        reference_seed = 20_000 + 100 * config.seed + i
        reference = gaussian_fit(
            sample_toy(data_name, 100_000, seed=reference_seed, device=device, dtype=dtype)
        )
        for j, model_name in enumerate(config.models):
            seed = 1000 * config.seed + 10 * i + j
            module, distribution = build_model(
                model_name, seed, device, dtype, cpflow_input_gain=config.cpflow_input_gain
            )
            train_seed = 100_000 * (config.seed + 1) + 1000 * i
            sample_batch = functools.partial(
                _sample_batch, data_name, config.batch_size, train_seed, device=device, dtype=dtype
            )
            start = time.perf_counter()
            losses = common.fit_density(
                module,
                distribution,
                sample_batch,
                config.steps,
                config.lr,
                desc=f"{data_name} | {model_name}",
                show_progress=config.show_progress,
            )
            seconds = time.perf_counter() - start
            loglik, stderr = held_out_loglik(distribution, test)
            grid = density_grid(distribution, config.limit, config.grid_size, device, dtype)
            result.grids[data_name][model_name] = grid
            window = max(1, min(50, len(losses) // 5))
            entries[model_name] = {
                "test_loglik": loglik,
                "test_loglik_stderr": stderr,
                "parameters": common.count_parameters(module),
                "train_seconds": seconds,
                "seconds_per_step": seconds / max(config.steps, 1),
                "train_loss_start": sum(losses[:window]) / window,
                "train_loss_end": sum(losses[-window:]) / window,
                "train_loss_curve": _summarise_losses(losses),
            }
        result.record["datasets"][data_name] = entries
        result.record.setdefault("gaussian_fit_loglik", {})[data_name] = float(
            reference.log_prob(test).mean()
        )
    return result


# -------------------------------------------------------------------------- output


def plot_grid(result: ToyResult, path: Path, limit: float) -> Path:
    """Rows: data sets; columns: held-out samples, then each model's density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result.grids)
    models = list(next(iter(result.grids.values()))) if datasets else []
    rows, cols = len(datasets), 1 + len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows), squeeze=False)
    extent = (-limit, limit, -limit, limit)
    for r, data_name in enumerate(datasets):
        x = result.samples[data_name]
        axes[r, 0].hist2d(
            x[:, 0].numpy(), x[:, 1].numpy(), bins=100, range=[[-limit, limit]] * 2, cmap="viridis"
        )
        for c, model_name in enumerate(models, start=1):
            density = result.grids[data_name][model_name].numpy()
            axes[r, c].imshow(
                density, origin="lower", extent=extent, cmap="viridis", interpolation="bilinear"
            )
            loglik = result.record["datasets"][data_name][model_name]["test_loglik"]
            axes[r, c].text(
                0.03, 0.04, f"{loglik:.3f}", color="white", fontsize=7, transform=axes[r, c].transAxes
            )
        axes[r, 0].set_ylabel(data_name)
    for c, title in enumerate(["data", *models]):
        axes[0, c].set_title(textwrap.fill(title, 24), fontsize=9)  # long variant names wrap
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    return common.save_figure(fig, path)


def markdown_section(record: dict[str, Any], markdown_path: Path = common.RESULTS_MD) -> str:
    """The "Toy densities" section of RESULTS.md, generated from the JSON record.

    ``markdown_path`` is where the section goes (the figure link is relative to it).
    """
    config = record["config"]
    models = config["models"]
    largest_stderr = max(e[m]["test_loglik_stderr"] for e in record["datasets"].values() for m in models)
    lines = [
        f"Command: `{record['command']}`  ",
        f"Run time: {record['seconds'] / 60:.1f} min on {record['environment']['device']} "
        f"({record['environment']['torch_threads']} torch thread(s), {config['dtype']}).  ",
        f"Each model: {config['steps']} Adam steps (cosine decay from lr {config['lr']:g}), batches of "
        f"{config['batch_size']} fresh samples; held-out set of {config['n_test']} samples (another seed). "
        "Every model starts with a data-initialised ActNorm; the CP-Flow networks use "
        f"`input_gain={config.get('cpflow_input_gain', DEFAULT_INPUT_GAIN):g}` "
        "(`--cpflow-input-gain`; with 1, "
        "plain PyTorch initialisation, CP-Flow stays at or near the Gaussian fit).",
        "",
        "Held-out log-likelihood (nats, higher is better; best per data set in bold; the largest "
        f"standard error is {largest_stderr:.3f}):",
        "",
    ]
    rows = []
    for data_name, entries in record["datasets"].items():
        best = max(entries[m]["test_loglik"] for m in models)
        values = [entries[m]["test_loglik"] for m in models]
        cells = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in values]
        rows.append([data_name, *cells, f"{record['gaussian_fit_loglik'][data_name]:.3f}"])
    first = next(iter(record["datasets"].values()))
    rows.append(["parameters", *[str(first[m]["parameters"]) for m in models], "5"])
    per_step = [
        sum(entries[m]["seconds_per_step"] for entries in record["datasets"].values())
        / len(record["datasets"])
        for m in models
    ]
    rows.append(["ms / step", *[f"{1000 * s:.0f}" for s in per_step], ""])
    lines.append(common.markdown_table(["data set", *models, "Gaussian fit (reference)"], rows))
    lines += ["", f"![toy densities]({common.link(record['figure'], markdown_path)})", ""]
    lines.append(
        "Figure: held-out samples (left) and each model's density on [-4, 4]^2; the number is the "
        "held-out log-likelihood."
    )
    return "\n".join(lines)


QUICK = dict(datasets=["8gaussians", "moons"], steps=40, batch_size=256, lr=1e-2, n_test=1000, grid_size=24)
"""Defaults of ``--quick``: a run of a few seconds for smoke tests."""


def config_from_args(argv: Sequence[str]) -> tuple[ToyConfig, Any]:
    """Parse the command line into a :class:`ToyConfig` (and the raw namespace)."""
    parser = common.build_parser(
        "python -m experiments.toy2d",
        __doc__.split("\n\n")[0],
        steps=ToyConfig.steps,
        batch_size=ToyConfig.batch_size,
        lr=ToyConfig.lr,
    )
    parser.add_argument("--datasets", nargs="+", choices=list(TOY_DATASETS), default=list(TOY_DATASETS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--n-test", type=int, default=ToyConfig.n_test, help="held-out samples per data set")
    parser.add_argument("--grid-size", type=int, default=ToyConfig.grid_size, help="heat-map resolution")
    parser.add_argument(
        "--cpflow-input-gain",
        type=float,
        default=ToyConfig.cpflow_input_gain,
        help="input_gain of the CP-Flow networks (1 = plain PyTorch initialisation)",
    )
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    config = ToyConfig(
        datasets=tuple(args.datasets),
        models=tuple(args.models),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        n_test=args.n_test,
        grid_size=args.grid_size,
        device=args.device,
        dtype=args.dtype,
        show_progress=not args.no_progress,
        cpflow_input_gain=args.cpflow_input_gain,
    )
    return config, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the JSON record."""
    argv = list(common.script_argv() if argv is None else argv)
    config, args = config_from_args(argv)
    json_path = args.out_dir / "toy2d.json"
    if args.render_only:
        record = common.read_json(json_path)
    else:
        common.setup_torch(args.device, args.dtype, args.threads, args.seed)
        with common.stopwatch() as clock:
            result = run(config)
        record = result.record
        figure = plot_grid(result, args.out_dir / "toy2d.png", config.limit)
        record.update(
            command=common.format_command("experiments.toy2d", argv),
            seconds=clock["seconds"],
            environment=common.environment(torch.device(args.device)),
            figure=common.relative_to_repo(figure),
        )
        common.write_json(json_path, record)
    if args.results_md is not None:
        common.replace_markdown_section(args.results_md, TITLE, markdown_section(record, args.results_md))
    return record


if __name__ == "__main__":
    main()
