r"""Image density: a convolutional multiscale CP-Flow against Pyro affine couplings of equal size.

Data: MNIST from the bundled IDX files (``experiments/data``, sha256-checked by
``experiments/vae/data.py``), all 60,000 training and 10,000 test images. On a CPU the images
are **downsampled to 14x14** (``--size 14``, the mean of each 2x2 patch rounded to the nearest
of the 256 levels), so the numbers are not those of 28x28 MNIST. CIFAR-10 is not bundled:
``--dataset cifar10 --data-root DIR`` reads a folder in torchvision's format
(``DIR/cifar-10-batches-py``), and stops with a clear error when it is absent.

Pipeline (:mod:`pyro_cpflow.preprocessing`): 8-bit levels :math:`k`, uniform dequantisation
:math:`u = (k + \varepsilon)/256`, the logit transform :math:`y = \mathrm{logit}(\lambda + (1 -
2\lambda) u)` (``--margin`` :math:`\lambda`, 1e-6 for MNIST as in the CP-Flow code, 0.05 for
CIFAR-10), then a flow :math:`z = f(y)` to a standard normal, ``TransformedDistribution(base,
[flow.inv])``. Bits per dimension, trained and reported:

.. math::

    \mathrm{bpd} = \frac{-\log p_Y(y) - \log|\det \partial y/\partial u| + D \log 256}{D \ln 2}.

Models (:mod:`pyro_cpflow.multiscale`), the same layout for both: levels of blocks with a
squeeze and a split of half the channels between levels (14x14: ``(1, 14, 14)`` then
``(2, 7, 7)``).

* **cpflow**: each block a per-channel ActNorm and a convolutional CP-Flow block
  (:func:`pyro_cpflow.conv.conv_cpflow`: input-augmented convolutional ICNN, ``--depth``
  hidden layers of ``--channels`` channels per level, 3x3 kernels), trained with the
  stochastic log-det (CG to ``--cg-rtol``) and evaluated with it (one probe per image; the
  JSON also compares it with the exact log-det on ``--exact-images`` test images).
* **coupling**: each block a per-channel ActNorm and two of Pyro's
  ``affine_coupling`` (dense hypernets with two hidden layers) with fixed random
  permutations after each; the hidden width is chosen so that the parameter count is the
  closest to the CP-Flow's.

Both train for ``--steps`` Adam steps on batches of ``--batch-size`` (learning rate ``--lr``
after a linear warm-up, cosine decay to a tenth; gradient norm clipped at ``--clip``), with
the same data order and dequantisation noise (per-step seeded generators), in float32 on one
thread. Test bits/dim are computed on the whole test set with one fixed dequantisation;
samples (PNG grids) come from the inverse (Newton-CG for CP-Flow, analytic for couplings).

Runs: ``python -m experiments.image_density`` (about 25 minutes on one CPU core in all)
writes ``results/image_density.json``, the grids ``results/image_density_*.png`` and the
"Image density" section of ``RESULTS.md``; checkpoints (``pyro_cpflow.save_checkpoint``,
every ``--checkpoint-every`` steps) go to ``--run-dir``; ``--resume`` continues a killed run
from them, ``--overwrite`` replaces a finished one (never silently). ``--quick`` is a smoke
run under a minute that writes only into ``--run-dir``.

The paper's settings (Huang et al. 2021: MNIST 1.02 bits/dim with 2.9M parameters,
CIFAR-10 3.40 with 1.9M), prepared for a GPU and not run here::

    python -m experiments.image_density --preset paper-mnist --device cuda \
        --out experiments/results/image_density_paper_mnist.json \
        --run-dir experiments/runs/image-density-paper-mnist
    python -m experiments.image_density --preset paper-cifar10 --data-root /path/to/cifar \
        --device cuda --out experiments/results/image_density_paper_cifar10.json \
        --run-dir experiments/runs/image-density-paper-cifar10

(28x28 or 32x32 images, three levels, model widths giving 2.9M and 1.9M parameters, batch
64, lr 1e-3, 100 epochs; see :data:`PRESETS`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import Permute, affine_coupling
from torch import Tensor

from experiments.common import (
    EXPERIMENTS_DIR,
    RESULTS_DIR,
    RESULTS_MD,
    add_run_options,
    count_parameters,
    markdown_table,
    positive,
    progress,
    read_json,
    refuse_overwrite,
    replace_markdown_section,
    run_header,
    write_json,
)
from experiments.vae.data import _read_idx_images, verify_file
from pyro_cpflow import CheckpointError, load_checkpoint, save_checkpoint
from pyro_cpflow.checkpoints import rng_state, set_rng_state
from pyro_cpflow.conv import conv_cpflow
from pyro_cpflow.multiscale import ChannelActNorm, MultiscaleFlow, level_shapes
from pyro_cpflow.preprocessing import LogitTransform, bits_per_dim, dequantize

ROOT = EXPERIMENTS_DIR.parent
RESULTS_JSON = RESULTS_DIR / "image_density.json"
EQUAL_TIME_JSON = RESULTS_DIR / "image_density_coupling_equal_time.json"
RUN_DIR = EXPERIMENTS_DIR / "runs" / "image-density"
SECTION = "Image density (MNIST 14x14)"
MODELS = ("cpflow", "coupling")
CHECKPOINT_FORMAT = 1
LEVELS = 256
# a training step's CP-Flow solver settings (float32): CG of the stochastic log-det
TEST_SEED_OFFSET = 7919

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults of the options
    "paper-mnist": {
        "dataset": "mnist",
        "size": 28,
        "blocks": (4, 4, 4),
        "channels": (96, 128, 160),
        "depth": 4,
        "steps": 93750,
        "batch_size": 64,
        "lr": 1e-3,
        "margin": 1e-6,
        "dtype": "float32",
        "checkpoint_every": 1000,
    },
    "paper-cifar10": {
        "dataset": "cifar10",
        "size": 32,
        "blocks": (4, 4, 4),
        "channels": (64, 96, 124),
        "depth": 4,
        "steps": 78125,
        "batch_size": 64,
        "lr": 1e-3,
        "margin": 0.05,
        "dtype": "float32",
        "checkpoint_every": 1000,
    },
}
"""Named settings; options given explicitly on the command line win. ``paper-*`` are the
GPU runs of the paper's sizes (100 epochs of batch 64; CP-Flow parameters 2,926,384 for
MNIST and 1,922,896 for CIFAR-10, against the paper's 2.9M and 1.9M), not run here."""


# ----------------------------------------------------------------------------- data


def downsample(images: np.ndarray, size: int) -> Tensor:
    """``(N, S, S)`` uint8 images to ``(N, 1, size, size)``: the mean of each patch, rounded to a level."""
    n, side, _ = images.shape
    if side % size:
        raise ValueError(f"--size must divide {side}, got {size}")
    factor = side // size
    patches = images.reshape(n, size, factor, size, factor).astype(np.int64).sum((2, 4))
    area = factor * factor
    levels = (patches + area // 2) // area  # round half up
    return torch.from_numpy(levels.astype(np.uint8))[:, None]


def load_mnist(size: int) -> tuple[Tensor, Tensor]:
    """MNIST training and test images, uint8 ``(N, 1, size, size)``, from the checked IDX files."""
    train = _read_idx_images(verify_file("train-images-idx3-ubyte.gz"))
    test = _read_idx_images(verify_file("t10k-images-idx3-ubyte.gz"))
    return downsample(train, size), downsample(test, size)


def load_cifar10(root: Path | None) -> tuple[Tensor, Tensor]:
    """CIFAR-10 training and test images, uint8 ``(N, 3, 32, 32)``, from a folder in torchvision's format."""
    from torchvision.datasets import CIFAR10

    expected = "DIR/cifar-10-batches-py/ with data_batch_1 ... data_batch_5 and test_batch"
    if root is None:
        raise FileNotFoundError(
            f"CIFAR-10 is not bundled with this repository: pass --data-root DIR ({expected})"
        )
    try:
        train, test = CIFAR10(str(root), train=True), CIFAR10(str(root), train=False)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"no CIFAR-10 in torchvision's format under {root} ({error}); expected {expected}, as "
            "torchvision.datasets.CIFAR10(root, download=True) writes it on a machine with a network"
        ) from None
    return (torch.from_numpy(part.data).permute(0, 3, 1, 2).contiguous() for part in (train, test))  # type: ignore[return-value]


def load_images(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    if args.dataset == "mnist":
        return load_mnist(args.size)
    if args.size != 32:
        raise ValueError("CIFAR-10 is read at 32x32 (--size 32)")
    return load_cifar10(args.data_root)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The random stream of one training step (batch and dequantisation): the same on a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream) % (2**63))


# --------------------------------------------------------------------------- models


def build_cpflow(shape: tuple[int, int, int], args: argparse.Namespace) -> MultiscaleFlow:
    """Levels of ``[ChannelActNorm, conv_cpflow]`` blocks."""
    levels = []
    for level_shape, blocks, width in zip(
        level_shapes(shape, len(args.blocks)), args.blocks, args.channels, strict=True
    ):
        level = []
        for _ in range(blocks):
            level.append(ChannelActNorm(level_shape))
            level.append(
                conv_cpflow(
                    level_shape,
                    (width,) * args.depth,
                    logdet="stochastic",
                    cg_rtol=args.cg_rtol,
                    cg_max_iter=args.cg_max_iter,
                    input_gain=args.input_gain,
                    initial_scale=args.initial_scale,
                )
            )
        levels.append(level)
    return MultiscaleFlow(shape, levels)


def build_coupling(shape: tuple[int, int, int], args: argparse.Namespace, hidden: int) -> MultiscaleFlow:
    """Levels of ``[ChannelActNorm, coupling, permutation, coupling, permutation]`` blocks; the
    permutations are drawn from a generator seeded by ``--seed`` (rebuilt identically on a resume)."""
    generator = torch.Generator().manual_seed(args.seed)
    levels = []
    for level_shape, blocks in zip(level_shapes(shape, len(args.blocks)), args.blocks, strict=True):
        d = math.prod(level_shape)
        level: list = []
        for _ in range(blocks):
            level.append(ChannelActNorm(level_shape))
            for _ in range(2):
                level.append(affine_coupling(d, hidden_dims=[hidden, hidden]))
                level.append(Permute(torch.randperm(d, generator=generator).to(args.device)))
        levels.append(level)
    return MultiscaleFlow(shape, levels)


def matched_coupling_width(shape: tuple[int, int, int], args: argparse.Namespace, target: int) -> int:
    """The hidden width whose coupling model has the parameter count closest to ``target``."""

    def count(width: int) -> int:
        return count_parameters(build_coupling(shape, args, width))

    low, high = 1, 2
    while count(high) < target:
        low, high = high, 2 * high
    while high - low > 1:  # the count grows with the width
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target else (low, middle)
    return min((low, high), key=lambda width: abs(count(width) - target))


def density(flow: MultiscaleFlow, dtype: torch.dtype, device: torch.device) -> dist.TransformedDistribution:
    zeros = torch.zeros(flow.input_dim, dtype=dtype, device=device)
    return dist.TransformedDistribution(dist.Normal(zeros, 1.0).to_event(1), [flow.inv])


def cpflow_blocks(flow: MultiscaleFlow) -> list:
    return [block for block in flow.blocks() if hasattr(block, "logdet")]


# ------------------------------------------------------------------------ training


class Run:
    """One model's training, checkpoints and evaluation in ``run_dir/<name>/``."""

    def __init__(
        self,
        name: str,
        flow: MultiscaleFlow,
        images: Tensor,
        test: Tensor,
        args: argparse.Namespace,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name, self.flow, self.args = name, flow.to(device), args
        self.images, self.test = images, test
        self.device, self.dtype = device, dtype
        self.folder = args.run_dir / name
        self.model = density(self.flow, dtype, device)
        self.logit = LogitTransform(args.margin)
        self.dims = flow.input_dim
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=args.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.train_seconds, self.losses = 0, 0.0, []

    def _lr_factor(self, step: int) -> float:
        warmup = min(self.args.warmup, self.args.steps)
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, self.args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def bits(self, levels: Tensor, generator: torch.Generator) -> Tensor:
        """Bits/dim of each image in ``levels`` under one draw of dequantisation noise."""
        u = dequantize(levels.reshape(levels.shape[0], -1), LEVELS, generator, self.dtype).to(self.device)
        y = self.logit(u)
        log_density = self.model.log_prob(y) + self.logit.log_abs_det_jacobian(u, y).sum(-1)
        return bits_per_dim(log_density, self.dims, LEVELS)

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint.pt"

    def initialise(self) -> None:
        """The data-dependent ActNorm initialisation, from ``--init-images`` training images."""
        generator = step_generator(self.args.seed, -1)
        index = torch.randperm(len(self.images), generator=generator)[: self.args.init_images]
        with torch.no_grad():
            self.bits(self.images[index], generator)

    def save(self) -> None:
        save_checkpoint(
            self.checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "settings": _settings(self.args),
                "step": self.step,
                "model": self.flow.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "losses": self.losses,
                "train_seconds": self.train_seconds,
                "rng": rng_state(),
            },
        )

    def load(self) -> None:
        try:
            state = load_checkpoint(self.checkpoint_path, map_location="cpu")
        except CheckpointError as error:
            raise CheckpointError(f"{error}. To start again instead: --overwrite") from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{self.checkpoint_path}: unknown checkpoint format {state.get('format')!r}")
        changed = sorted(k for k, v in _settings(self.args).items() if state["settings"].get(k) != v)
        if changed:
            raise RuntimeError(
                f"{self.checkpoint_path} was written with other settings "
                f"({', '.join(changed)}): resume with the original options, or --overwrite"
            )
        self.flow.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.losses, self.train_seconds = state["step"], state["losses"], state["train_seconds"]
        set_rng_state(state["rng"])
        print(f"{self.name}: resumed {self.checkpoint_path} at step {self.step}", flush=True)

    def train(self) -> None:
        args = self.args
        self.flow.train()
        bar = progress(args.steps, self.name, args.progress)
        bar.update(self.step)
        while self.step < args.steps:
            start = time.perf_counter()
            generator = step_generator(args.seed, self.step)
            index = torch.randint(len(self.images), (args.batch_size,), generator=generator)
            loss = self.bits(self.images[index], generator).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.name}: non-finite loss at step {self.step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.flow.parameters(), args.clip)
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
            self.train_seconds += time.perf_counter() - start
            self.losses.append(float(loss.detach()))
            bar.update()
            if self.step % args.log_every == 0 or self.step == args.steps:
                recent = self.losses[-args.log_every :]
                mean, extra = sum(recent) / len(recent), self._cg_note()
                print(
                    f"{self.name} step {self.step}/{args.steps}: train bits/dim {mean:.4f} "
                    f"({1e3 * self.train_seconds / self.step:.0f} ms/step{extra})",
                    flush=True,
                )
            if self.step % args.checkpoint_every == 0 or self.step == args.steps:
                self.save()
        bar.close()

    def _cg_note(self) -> str:
        blocks = [block for block in cpflow_blocks(self.flow) if block.last_cg is not None]
        iterations = [int(block.last_cg.iterations.max()) for block in blocks]
        return f", CG iterations per block up to {max(iterations)}" if iterations else ""

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Test bits/dim (stochastic log-det for CP-Flow), exact-vs-stochastic on a subset, samples."""
        args = self.args
        self.flow.eval()
        blocks = cpflow_blocks(self.flow)
        for block in blocks:
            block.logdet, block.cg_rtol, block.num_probes = "stochastic", args.eval_cg_rtol, 1
        test = self.test if args.test_images == 0 else self.test[: args.test_images]
        generator = step_generator(args.seed + TEST_SEED_OFFSET, 0)
        start = time.perf_counter()
        bits = torch.cat([self.bits(chunk, generator).cpu() for chunk in test.split(args.eval_batch)])
        bits = bits.double()
        result: dict[str, Any] = {
            "test_bits_per_dim": float(bits.mean()),
            "test_bits_per_dim_se": float(bits.std() / math.sqrt(len(bits))),
            "test_images": len(bits),
            "eval_seconds": time.perf_counter() - start,
        }
        if blocks and args.exact_images:
            subset = self.test[: args.exact_images]
            stochastic = torch.cat([self.bits(c, step_generator(args.seed, 0, 1)) for c in subset.split(4)])
            for block in blocks:
                block.logdet = "exact"
            exact = torch.cat([self.bits(c, step_generator(args.seed, 0, 1)) for c in subset.split(4)])
            difference = (stochastic - exact).double().cpu()
            result["exact_check"] = {
                "images": len(subset),
                "exact_bits_per_dim": float(exact.mean()),
                "stochastic_bits_per_dim": float(stochastic.mean()),
                "mean_difference": float(difference.mean()),
                "rms_difference": float(difference.pow(2).mean().sqrt()),
            }
            for block in blocks:
                block.logdet = "stochastic"
        start = time.perf_counter()
        torch.manual_seed(args.seed + 1)
        y = self.model.sample((args.samples,))
        images = self.logit.inv(y).clamp(0, 1).reshape(args.samples, *self.images.shape[1:]).float().cpu()
        result["sample_seconds"] = time.perf_counter() - start
        reports = self.flow.last_inverse_reports
        if reports:
            result["samples_converged"] = all(report.all_converged for report in reports)
            result["inverse_newton_steps_max"] = max(int(report.iterations.max()) for report in reports)
        result["samples"] = images
        return result


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options a checkpoint must agree with to be resumed."""
    keys = (
        "dataset",
        "size",
        "blocks",
        "channels",
        "depth",
        "steps",
        "batch_size",
        "lr",
        "warmup",
        "clip",
        "margin",
        "seed",
        "dtype",
        "cg_rtol",
        "cg_max_iter",
        "input_gain",
        "initial_scale",
        "coupling_hidden",
    )
    return {key: list(v) if isinstance(v := getattr(args, key), tuple) else v for key in keys}


# -------------------------------------------------------------------------- output


def save_grid(images: Tensor, path: Path, zoom: int = 3) -> Path:
    """A square grid of ``images`` ``(N, C, H, W)`` in [0, 1], each pixel shown as ``zoom`` x ``zoom``."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(images, nrow=int(math.sqrt(len(images))) or 1, padding=1, pad_value=0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2), path)
    return path


def _listed(values: Any) -> str:
    return ", ".join(map(str, values))


def section(results: dict[str, Any], equal_time: dict[str, Any] | None = None) -> str:
    """The "Image density" section of ``RESULTS.md``; ``equal_time``, if given, is a coupling run
    trained for about the CP-Flow's time (:data:`EQUAL_TIME_JSON`)."""
    s = results["settings"]
    rows = []
    labels = {"cpflow": "CP-Flow (conv ICNN)", "coupling": "affine coupling (Pyro)"}
    runs = list(results["models"].items())
    if equal_time is not None:
        labels["coupling, equal time"] = f"affine coupling, {equal_time['settings']['steps']} steps"
        runs.append(("coupling, equal time", equal_time["models"]["coupling"]))
    for name, row in runs:
        check = row.get("exact_check")
        rows.append(
            [
                labels[name],
                f"{row['test_bits_per_dim']:.3f} ± {row['test_bits_per_dim_se']:.3f}",
                f"{row['final_train_bits_per_dim']:.3f}",
                f"{row['parameters']:,}",
                f"{row['ms_per_step']:.0f}",
                f"{row['train_seconds'] / 60:.1f}",
                "—"
                if check is None
                else f"{check['exact_bits_per_dim']:.3f} / {check['stochastic_bits_per_dim']:.3f}",
            ]
        )
    table = markdown_table(
        [
            "model",
            "test bits/dim ± SE",
            "train bits/dim (last 100 steps)",
            "parameters",
            "ms / step",
            "train min",
            "exact / stochastic on a subset",
        ],
        rows,
    )
    first = next(iter(results["models"].values()))
    layout = " → ".join("x".join(map(str, shape)) for shape in first["level_shapes"])
    intro = (
        f"Command: `{results['command']}`\n\n"
        f"MNIST downsampled to {s['size']}x{s['size']} (2x2 means rounded to 8-bit levels; not comparable "
        "with 28x28 numbers such as the paper's 1.02), uniform dequantisation, logit with "
        f"λ = {s['margin']:g}; multiscale layout {layout} (squeeze and half the channels factored out "
        f"between levels), blocks per level: {_listed(s['blocks'])}. "
        f"{s['steps']} Adam steps of {s['batch_size']} images (lr {s['lr']:g}, cosine to a tenth), float32, "
        "one CPU thread, same data order and noise for both models. CP-Flow: convolutional "
        f"input-augmented ICNN, {s['depth']} hidden layers of {_listed(s['channels'])} channels per level, "
        f"stochastic log-det (CG rtol {s['cg_rtol']:g}); coupling: two Pyro `affine_coupling` per block "
        f"(hidden width {results['coupling_hidden']}, matched parameter count) with random permutations. "
        f"Test bits/dim on {first['test_images']} test images, one dequantisation; the last column "
        "compares the exact log-det with the one-probe stochastic estimate used for the test number, on the "
        "same images."
    )
    figures = "\n\n".join(
        f"![{name} samples](results/{Path(row['samples_png']).name})"
        for name, row in results["models"].items()
    )
    if equal_time is not None:
        intro += (
            f" The last row is the coupling model trained for {equal_time['settings']['steps']} steps "
            f"(command `{equal_time['command']}`), for a training time closer to the CP-Flow's (the minutes "
            "are wall time on a machine shared with other jobs); its learning rate decays over those steps."
        )
    caption = "Figure: samples of each model (CP-Flow first), each pixel shown 3x3."
    return intro + "\n\n" + table + "\n\n" + figures + "\n\n" + caption


# ---------------------------------------------------------------------------- main


def _tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.image_density", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    parser.add_argument("--data-root", type=Path, default=None, help="CIFAR-10 in torchvision's format")
    parser.add_argument("--size", type=positive(int), default=14, help="image side (MNIST: 28 or a divisor)")
    parser.add_argument("--blocks", type=_tuple, default=(2, 2), help="blocks per level")
    parser.add_argument("--channels", type=_tuple, default=(16, 32), help="CP-Flow ICNN channels per level")
    parser.add_argument("--depth", type=positive(int), default=3, help="hidden layers of each ICNN")
    parser.add_argument("--input-gain", type=positive(float), default=4.0)
    parser.add_argument(
        "--initial-scale",
        type=positive(float),
        default=1.0,
        help="initial sigma of F (1 trains faster here than the library's 0.1)",
    )
    parser.add_argument("--coupling-hidden", type=int, default=0, help="0: match the CP-Flow's parameters")
    parser.add_argument("--steps", type=positive(int), default=800)
    parser.add_argument("--batch-size", type=positive(int), default=64)
    parser.add_argument("--lr", type=positive(float), default=1e-2)
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--clip", type=positive(float), default=10.0, help="gradient norm clip")
    parser.add_argument("--margin", type=float, default=1e-6, help="logit margin lambda")
    parser.add_argument("--cg-rtol", type=positive(float), default=1e-4, help="training CG tolerance")
    parser.add_argument("--cg-max-iter", type=positive(int), default=50)
    parser.add_argument("--eval-cg-rtol", type=positive(float), default=1e-5)
    parser.add_argument("--test-images", type=int, default=0, help="0: the whole test set")
    parser.add_argument(
        "--exact-images", type=int, default=100, help="test images for the exact log-det check"
    )
    parser.add_argument("--eval-batch", type=positive(int), default=500)
    parser.add_argument("--init-images", type=positive(int), default=500, help="ActNorm initialisation batch")
    parser.add_argument("--samples", type=positive(int), default=64)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive(int), default=1)
    parser.add_argument("--checkpoint-every", type=positive(int), default=100)
    parser.add_argument("--log-every", type=positive(int), default=50)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="checkpoints and per-model results")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="no training: rewrite the RESULTS.md section from the JSON files",
    )
    add_run_options(
        parser, RESULTS_JSON, "smoke run under a minute: tiny models, 20 steps; writes only into --run-dir"
    )
    defaults = parser.parse_args([])
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():  # a preset replaces defaults, not explicit options
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)
    if args.quick:
        args.blocks, args.channels, args.depth, args.steps = (1, 1), (4, 4), 2, 20
        args.test_images, args.exact_images, args.samples, args.log_every = 200, 8, 16, 10
        args.checkpoint_every, args.init_images, args.warmup = 10, 100, 5
    if len(args.channels) != len(args.blocks):
        parser.error(f"--channels needs one width per level ({len(args.blocks)}), got {args.channels}")
    if not 0 <= args.margin < 0.5:
        parser.error(f"--margin must lie in [0, 1/2), got {args.margin}")
    if args.render_only:
        return args
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    refuse_overwrite(parser, args)
    found = (
        sorted(str(p.relative_to(args.run_dir)) for p in args.run_dir.glob("*/*") if p.is_file())
        if args.run_dir.is_dir()
        else []
    )
    if found and not (args.resume or args.overwrite):
        parser.error(
            f"{args.run_dir} holds a run ({', '.join(found[:4])}): --resume to continue it, "
            "--overwrite to start again, or another --run-dir"
        )
    return args


def run_model(
    name: str,
    args: argparse.Namespace,
    images: Tensor,
    test: Tensor,
    shape: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    hidden: int,
) -> dict[str, Any]:
    """Train (or resume) and evaluate one model; its result is kept in ``run_dir/<name>/result.json``."""
    folder = args.run_dir / name
    result_path = folder / "result.json"
    if args.resume and result_path.is_file():
        print(f"{name}: finished earlier, result read from {result_path}", flush=True)
        return read_json(result_path)
    torch.manual_seed(args.seed)  # the same initial parameters on every run
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        flow = build_cpflow(shape, args) if name == "cpflow" else build_coupling(shape, args, hidden)
    finally:
        torch.set_default_dtype(previous)
    run = Run(name, flow, images, test, args, device, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    if args.resume and run.checkpoint_path.is_file():
        run.load()  # the ActNorms' values and their initialised flags come with the state dict
    else:
        run.initialise()
    run.train()
    evaluation = run.evaluate()
    samples = evaluation.pop("samples")
    # beside the JSON (a quick run's in its own folder)
    target = folder / "samples.png" if args.quick else args.out.with_name(f"{args.out.stem}_{name}.png")
    png = save_grid(samples, target)
    tail = run.losses[-100:]
    result = {
        "parameters": count_parameters(flow),
        "level_shapes": [list(s) for s in flow.level_shapes],
        "steps": run.step,
        "train_seconds": run.train_seconds,
        "ms_per_step": 1e3 * run.train_seconds / run.step,
        "final_train_bits_per_dim": sum(tail) / len(tail),
        "train_bits_per_dim_by_tenth": [sum(part) / len(part) for part in _tenths(run.losses)],
        **evaluation,
        "samples_png": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png),
    }
    write_json(result_path, result)
    print(
        f"{name}: test bits/dim {result['test_bits_per_dim']:.4f} ± {result['test_bits_per_dim_se']:.4f} "
        f"({result['parameters']:,} parameters, {result['ms_per_step']:.0f} ms/step)",
        flush=True,
    )
    return result


def _tenths(values: list[float]) -> list[list[float]]:
    size = max(1, len(values) // 10)
    return [values[i : i + size] for i in range(0, len(values), size)]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.render_only:
        render_section()
        return None
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    device = torch.device(args.device)
    if args.overwrite and args.run_dir.is_dir():
        for name in MODELS:
            shutil.rmtree(args.run_dir / name, ignore_errors=True)
    images, test = load_images(args)
    shape = tuple(images.shape[1:])
    torch.manual_seed(args.seed)
    with torch.random.fork_rng():
        reference = count_parameters(build_cpflow(shape, args))
    hidden = args.coupling_hidden or matched_coupling_width(shape, args, reference)
    header = run_header("experiments.image_density", argv, args)
    results: dict[str, Any] = {**header, "coupling_hidden": hidden, "models": {}}
    for name in args.models:
        results["models"][name] = run_model(name, args, images, test, shape, device, dtype, hidden)
    print(json.dumps({name: row["test_bits_per_dim"] for name, row in results["models"].items()}))
    if not args.quick:
        write_json(args.out, results)
        if args.out.resolve() in (RESULTS_JSON, EQUAL_TIME_JSON):
            render_section()
    return results


def render_section() -> None:
    """(Re)write the section of ``RESULTS.md`` from the JSON files of the runs (when there)."""
    if RESULTS_JSON.is_file():
        equal_time = read_json(EQUAL_TIME_JSON) if EQUAL_TIME_JSON.is_file() else None
        replace_markdown_section(RESULTS_MD, SECTION, section(read_json(RESULTS_JSON), equal_time))


if __name__ == "__main__":
    main()
