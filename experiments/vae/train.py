r"""Training: KL warm-up, Adamax, early stopping, atomic checkpoints, resume, DDP.

The recipe of the Sylvester-flows / CP-Flow VAE experiments:

* the loss is the negative ELBO of the Pyro model and guide (:func:`~.model.elbo_loss`)
  with the latent site scaled by :math:`\beta = \min(\text{epoch} / \text{warmup}, 1)`
  (epochs count from 1), per image, one sample. ``pyro.infer.SVI(vae.model, vae.guide,
  ...)`` trains the same programs; the trainer takes the same loss as ``vae(x, beta)`` with
  a torch optimizer instead, so that ``DistributedDataParallel`` can wrap it and the
  optimizer state is saved and restored exactly;
* ``torch.optim.Adamax(lr=5e-4, eps=1e-7)``, batches of 100;
* one data-dependent initialisation pass (ActNorm) on the first training batch;
* after every epoch, the negative ELBO of the validation set (``beta = 1``, exact
  log-dets); the best model is kept, and training stops once the validation loss has not
  improved for ``early_stopping`` epochs after the warm-up;
* finally the best model is evaluated on the test set (negative ELBO and IS-NLL).

Engineering:

* a checkpoint ``checkpoint.pt`` after every epoch, written by
  :func:`pyro_cpflow.save_checkpoint` (atomic, with its SHA-256) and read back by
  :func:`pyro_cpflow.load_checkpoint` (hash checked, ``weights_only=True``: no code in the
  file runs), holding the model, the optimizer, the best model, the early-stopping state
  and every RNG state (Python, NumPy, torch CPU and CUDA: Pyro draws from torch) of every
  rank; ``resume=True`` continues from it and ends bit-identical to an uninterrupted run
  (data order and binarisation come from per-epoch seeded generators, evaluations from
  forked RNGs);
* a folder that holds a run is never started over by accident: without ``resume`` or
  ``overwrite`` (which deletes the run's files first) the trainer refuses it;
* ``metrics.jsonl``: one JSON record per epoch (``fsync``-ed before the checkpoint) and a
  final record; on resume the records of epochs after the checkpoint are dropped, as is a
  last line cut off by a kill (with a warning); damage elsewhere is an error naming the
  line;
* ``samples.png`` and ``reconstructions.png`` (torchvision grids) after every epoch and at
  the end;
* the training step itself never waits for the device: losses accumulate on the device and
  are read every ``log_every`` steps and at the end of the epoch, and Pyro's argument
  validation (which checks values on the host, as do the CP-Flow transforms' NaN checks)
  is off unless ``validate``. On a GPU the CP-Flow blocks run a fixed number of CG
  iterations (:meth:`Config.cg_options`), so a training step reads nothing from the
  device (``tests/test_vae.py`` counts the reads); CG misses are counted on the device
  and logged per epoch as ``cg_unconverged`` of ``cg_solves``; an epoch with more than
  :data:`CG_MISS_SHARE` of them missed warns (the log-det gradient is biased) and is
  listed in ``results.json``;
* ``time_limit`` stops training after the epoch that passes that many minutes (training plus
  validation), for fixed compute budgets; where it stops depends on the machine's speed;
* data parallel with ``torch.distributed`` when launched by ``torchrun`` (``WORLD_SIZE`` >
  1): every rank takes a slice of each global batch, gradients are averaged by
  ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA), rank 0 writes the files.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from pyro_cpflow import CheckpointError, NonConvergenceWarning, load_checkpoint, save_checkpoint
from pyro_cpflow.checkpoints import atomic_write, rng_state, set_rng_state

from ..common import read_jsonl
from .config import DTYPES, Config, ConfigError
from .data import ImageDataset, load_dataset
from .evaluate import Bounds, evaluate_bounds
from .model import VAE, Architecture, count_parameters
from .posteriors import PosteriorConfig, build_posterior, cpflow_blocks

__all__ = [
    "CG_MISS_SHARE",
    "Config",
    "RunExistsError",
    "Trainer",
    "build_vae",
    "run",
    "seed_everything",
    "state_dict_equal",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
RUN_FILES = (CHECKPOINT, METRICS, RESULTS, "config.json", "samples.png", "reconstructions.png")
"""The files of a run folder: their presence means the folder holds a run."""
CHECKPOINT_FORMAT = 2  # 2: RNG states as plain data (pyro_cpflow.checkpoints.rng_state)
CG_MISS_SHARE = 0.01
"""Share of an epoch's CG solves that may stop before their tolerance without a warning."""


class RunExistsError(FileExistsError):
    """The output folder already holds a run, and neither resuming nor overwriting was asked."""


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA): Pyro's RNG is torch's."""
    pyro.set_rng_seed(seed)  # random, numpy and torch.manual_seed (which seeds CUDA too)


def build_vae(config: Config, data: ImageDataset) -> VAE:
    """The VAE of ``config`` for ``data`` (parameters drawn from the current RNG state)."""
    arch = Architecture(
        data.image_shape, data.likelihood, config.latent_dim, config.feature_dim, config.channels,
        config.head_channels,
    )
    posterior = build_posterior(
        PosteriorConfig(
            config.flow, config.latent_dim, config.feature_dim, config.flow_steps,
            config.flow_hidden, config.logdet, config.actnorm, tuple(config.cg_options().items()),
        )
    )
    return VAE(arch, posterior)


def warmup_beta(epoch: int, warmup: int) -> float:
    """KL weight of epoch ``epoch`` (from 1): ``min(epoch / warmup, 1)``, 1 without warm-up."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


@dataclass
class EarlyStopping:
    """Best validation loss so far and epochs without improvement (after the warm-up)."""

    patience: int
    warmup: int
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, epoch: int, value: float) -> bool:
        """Record epoch ``epoch``'s validation loss; True if it is the best so far."""
        if value < self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        if self.patience > 0 and epoch >= self.warmup:
            self.bad_epochs += 1
            self.stopped = self.bad_epochs > self.patience
        return False


@dataclass
class Distributed:
    """Rank, world size and local rank; ``torch.distributed`` is set up when ``world > 1``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device_type: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        if world > 1:
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean(self, value: Tensor) -> Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value


@dataclass
class Trainer:
    """One training run: set up from a :class:`Config`, then :meth:`fit` and :meth:`test`.

    :param resume: continue the run in the output folder from its checkpoint.
    :param overwrite: delete the run files in the output folder and start again. Without
        either, a folder that holds a run (any of :data:`RUN_FILES`) raises
        :class:`RunExistsError` and is left as it is.
    """

    config: Config
    resume: bool = False
    overwrite: bool = False
    data: ImageDataset = field(init=False)
    vae: VAE = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
        self.ddp = Distributed.from_environment(torch.device(config.device).type)
        if config.batch_size < self.ddp.world:
            raise ConfigError(
                "batch_size", f"must be at least the number of processes ({self.ddp.world}), "
                f"got {config.batch_size}",
            )
        self.device = self._device()
        self.dtype = DTYPES[config.dtype]
        threads = config.threads or (1 if self.ddp.world > 1 and self.device.type == "cpu" else 0)
        if threads:
            torch.set_num_threads(threads)
        pyro.clear_param_store()
        self.out = config.output
        self._claim_folder()
        self.data = load_dataset(config.dataset)
        self.train_images = self.data.train.to(self.device)
        self.valid_images = self.data.valid.to(self.device)
        self.test_images = self.data.test.to(self.device)
        seed_everything(config.seed)  # identical initial parameters on every rank
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # initial values independent of the caller's default
        try:
            self.vae = build_vae(config, self.data).to(self.device, self.dtype)
        finally:
            torch.set_default_dtype(previous)
        self.optimizer = torch.optim.Adamax(self.vae.parameters(), lr=config.lr, eps=1e-7)
        self.stopping = EarlyStopping(config.early_stopping, config.warmup)
        self.best_model: dict[str, Tensor] | None = None
        self.cg = {"unconverged": 0, "solves": 0, "warned_epochs": []}
        self.epoch = 0
        self.train_seconds = 0.0
        self.wall_seconds = 0.0
        if not (self.resume and self._load_checkpoint()):
            self._start()
        self.model: nn.Module = self.vae
        if self.ddp.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.vae, device_ids=device_ids, broadcast_buffers=False)

    # ------------------------------------------------------------------ setup

    def _claim_folder(self) -> None:
        """Create the output folder; refuse one holding a run unless resuming or overwriting."""
        found = self.ddp.gather([name for name in RUN_FILES if (self.out / name).exists()])[0]
        if self.resume and found and CHECKPOINT not in found:
            raise RunExistsError(
                f"{self.out} holds a run ({', '.join(found)}) but no {CHECKPOINT} to resume "
                "from: pass --overwrite (without --resume) to delete its files and start again, "
                "or choose another --out-dir"
            )
        if found and not (self.resume or self.overwrite):
            raise RunExistsError(
                f"{self.out} already holds a run ({', '.join(found)}): pass --resume to continue "
                "it, or --overwrite to delete its files and start again (or choose another "
                "--out-dir)"
            )
        if self.ddp.main:
            if self.overwrite:
                for name in found:
                    (self.out / name).unlink()
            self.out.mkdir(parents=True, exist_ok=True)

    def _device(self) -> torch.device:
        device = torch.device(self.config.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda requested but CUDA is not available")
            index = self.ddp.local_rank if self.ddp.world > 1 else (device.index or 0)
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
        return device

    def _start(self) -> None:
        """A fresh run: data-dependent initialisation, per-rank RNG streams, empty log."""
        first = self._permutation(0)[: self.config.batch_size]
        x = self.data.batch(self.train_images[first], self.dtype, self._binarizer(0), binarize=True)
        with torch.no_grad():
            self.vae.approximate_posterior(x).rsample()  # initialises ActNorm from this batch
        if self.ddp.rank:
            seed_everything(self.config.seed + 104729 * self.ddp.rank)
        if self.ddp.main:
            (self.out / METRICS).write_text("")
            config_json = json.dumps(self.config.to_dict(), indent=2) + "\n"
            atomic_write(self.out / "config.json", config_json.encode())

    def _permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(_epoch_seed(self.config.seed, epoch, 0))
        return torch.randperm(self.train_images.shape[0], generator=generator).to(self.device)

    def _binarizer(self, epoch: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_epoch_seed(self.config.seed, epoch, 1 + self.ddp.rank))
        return generator

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0), with the RNG states of every rank."""
        states = self.ddp.gather(rng_state())
        if not self.ddp.main:
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": self.config.to_dict(),
                "epoch": self.epoch,
                "world_size": self.ddp.world,
                "model": self.vae.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "best_model": self.best_model,
                "early_stopping": asdict(self.stopping),
                "train_seconds": self.train_seconds,
                "wall_seconds": self.wall_seconds,
                "cg": self.cg,
                "rng": states,
            },
        )

    def _load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if not path.is_file():
            if self.ddp.main:
                print(f"--resume: no checkpoint at {path}; starting from scratch")
            return False
        try:  # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest
            state = load_checkpoint(path, map_location="cpu")
        except CheckpointError as error:
            raise CheckpointError(
                f"{error}. To start this run again instead: drop --resume, pass --overwrite"
            ) from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{path}: unknown checkpoint format {state.get('format')!r}")
        changed = self.config.differences(state["config"])
        if changed:
            raise RuntimeError(
                f"{path} was written with different settings ({', '.join(changed)}); "
                "resume with the original options or use another --out-dir"
            )
        if state["world_size"] != self.ddp.world:
            raise RuntimeError(
                f"{path} was written by {state['world_size']} processes, not {self.ddp.world}: "
                "resume with the same number of processes"
            )
        self.vae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        best = state["best_model"]
        self.best_model = None if best is None else {k: v.to(self.device) for k, v in best.items()}
        self.stopping = EarlyStopping(**state["early_stopping"])
        self.epoch = state["epoch"]
        self.train_seconds = state["train_seconds"]
        self.wall_seconds = state["wall_seconds"]
        self.cg = state["cg"]
        set_rng_state(state["rng"][self.ddp.rank])
        if self.ddp.main:
            self._truncate_metrics()
            print(f"resumed {path} after epoch {self.epoch}")
        return True

    def _truncate_metrics(self) -> None:
        """Drop the records of epochs the checkpoint does not contain (and final records)."""
        path = self.out / METRICS
        records = read_jsonl(path) if path.is_file() else []
        kept = [r for r in records if r.get("event") == "epoch" and r["epoch"] <= self.epoch]
        missing = sorted(set(range(1, self.epoch + 1)) - {r["epoch"] for r in kept})
        if missing:
            warnings.warn(f"{path} lacks the records of epochs {missing} of the checkpoint", stacklevel=2)
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl``, on disk before the next checkpoint is."""
        if self.ddp.main:
            with (self.out / METRICS).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    # ------------------------------------------------------------------ training

    def _batches(self, epoch: int) -> Iterator[Tensor]:
        """This rank's slice of every global batch of epoch ``epoch``."""
        order = self._permutation(epoch)
        size, world = self.config.batch_size, self.ddp.world
        count = math.ceil(order.shape[0] / size)
        if self.config.max_batches:
            count = min(count, self.config.max_batches)
        for step in range(count):
            batch = order[step * size : (step + 1) * size]
            if batch.shape[0] < world:
                return  # too small to give every rank an image
            yield batch[self.ddp.rank :: world]

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training set; returns the epoch's training record."""
        config = self.config
        beta = warmup_beta(epoch, config.warmup)
        binarizer = self._binarizer(epoch)
        batches = list(self._batches(epoch))
        self.model.train()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        blocks = cpflow_blocks(self.vae.posterior)
        counted = [block.last_cg for block in blocks]  # an exact log-det leaves the last CG result
        unconverged = torch.zeros((), dtype=torch.long, device=self.device)
        solves = 0
        window = torch.zeros((), dtype=torch.float64, device=self.device)
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{config.epochs}",
                   disable=not (config.progress and self.ddp.main), leave=False)
        start = time.perf_counter()
        for step, indices in enumerate(batches, 1):
            x = self.data.batch(self.train_images[indices], self.dtype, binarizer, binarize=True)
            loss = self.model(x, beta)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
            window += loss.detach()
            for index, block in enumerate(blocks):  # CG misses, counted without waiting for the device
                cg = block.last_cg
                if cg is not None and cg is not counted[index]:
                    unconverged += (~cg.converged).sum()
                    solves += cg.converged.numel()
                    counted[index] = cg
            bar.update()
            if step % config.log_every == 0 or step == len(batches):
                # the only host synchronisation of the loop
                bar.set_postfix(loss=f"{float(window) / ((step - 1) % config.log_every + 1):.2f}")
                window.zero_()
        bar.close()
        train_loss = float(self.ddp.mean(total / max(len(batches), 1)))
        seconds = time.perf_counter() - start
        record: dict[str, Any] = {
            "event": "epoch",
            "epoch": epoch,
            "beta": beta,
            "steps": len(batches),
            "train_loss": train_loss,
            "epoch_seconds": seconds,
        }
        if blocks:  # on every rank: the sums are collective
            counts = torch.stack([unconverged.double(), unconverged.new_tensor(solves).double()])
            misses, solves = (round(v) for v in (self.ddp.mean(counts) * self.ddp.world).tolist())
            if solves:
                last = [int(cg.iterations.max()) for cg in counted if cg is not None]
                record.update(cg_iterations_max=max(last, default=0), cg_unconverged=misses, cg_solves=solves)
        return record

    def _check_cg(self, record: dict[str, Any]) -> None:
        """Count an epoch's CG misses; warn if more than :data:`CG_MISS_SHARE` of its solves missed."""
        solves = record.get("cg_solves", 0)
        if not solves:
            return
        misses = record["cg_unconverged"]
        self.cg["unconverged"] += misses
        self.cg["solves"] += solves
        if misses <= CG_MISS_SHARE * solves:
            return
        self.cg["warned_epochs"].append(record["epoch"])
        if self.ddp.main:
            cap = self.config.cg_options()["cg_max_iter"]
            warnings.warn(
                f"epoch {record['epoch']}: the CG solves of the stochastic log-det stopped before "
                f"their tolerance in {misses} of {solves} cases ({misses / solves:.1%}, more than "
                f"{CG_MISS_SHARE:.0%}), so the log-det gradient is biased: raise --cg-max-iter "
                f"(now {cap or '2 x latent dim'}) or use --logdet exact",
                NonConvergenceWarning, stacklevel=2,
            )

    def validate(self) -> Bounds:
        return evaluate_bounds(
            self.vae, self.data, self.valid_images, dtype=self.dtype,
            elbo_samples=self.config.elbo_samples, chunk=self.config.chunk,
            max_images=self.config.valid_images, seed=_epoch_seed(self.config.seed, 0, 2),
            progress=self.config.progress and self.ddp.main, description="validation",
        )

    def fit(self) -> None:
        """Train until ``epochs`` or early stopping, checkpointing after every epoch."""
        with pyro.validation_enabled(self.config.validate):
            self._fit()

    def _fit(self) -> None:
        config = self.config
        if self.ddp.main and self.epoch == 0:
            print(
                f"training {config.flow} VAE on {config.dataset}: {count_parameters(self.vae):,} "
                f"parameters ({count_parameters(self.vae.posterior):,} in the flow), "
                f"{config.dtype} on {self.device}, {self.ddp.world} process(es)"
            )
        while self.epoch < config.epochs and not self.stopping.stopped and not self.out_of_time():
            epoch = self.epoch + 1
            start = time.perf_counter()
            record = self.train_epoch(epoch)
            self._check_cg(record)
            valid = self.validate()
            elapsed = time.perf_counter() - start
            record["valid_seconds"] = elapsed - record["epoch_seconds"]
            self.wall_seconds += elapsed
            if self.stopping.update(epoch, valid.nelbo):
                self.best_model = {k: v.detach().clone() for k, v in self.vae.state_dict().items()}
            self.epoch = epoch
            self.train_seconds += record["epoch_seconds"]
            record.update(valid.reported(self.data, "valid"))
            record.update(best_epoch=self.stopping.best_epoch, bad_epochs=self.stopping.bad_epochs)
            # log first: a kill between the two leaves a record that resuming drops and redoes
            self.log(record)
            self.save_checkpoint()
            self.write_images()
            if self.ddp.main:
                tqdm.write(self._summary(record))

    def out_of_time(self) -> bool:
        """Whether ``time_limit`` minutes of training and validation have passed (rank 0 decides)."""
        limit = self.config.time_limit
        return bool(limit) and self.ddp.gather(self.wall_seconds >= 60 * limit)[0]

    def ranks_identical(self) -> bool:
        """Whether every rank holds bit-identical parameters and buffers (True for one process)."""
        if self.ddp.world == 1:
            return True
        flat = torch.cat([t.detach().double().flatten() for t in self.vae.state_dict().values()])
        gathered = [torch.empty_like(flat) for _ in range(self.ddp.world)]
        dist.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], other) for other in gathered[1:])

    def _summary(self, record: dict[str, Any]) -> str:
        unit = self.data.units
        valid = record["valid_nelbo"]
        shown = f"{self.data.to_reported(valid):.4f} {unit}" if unit != "nats" else f"{valid:.2f} nats"
        return (
            f"epoch {record['epoch']:4d}  beta {record['beta']:.3f}  train loss "
            f"{record['train_loss']:.2f}  valid -ELBO {shown}  ({record['epoch_seconds']:.1f} s, "
            f"best epoch {record['best_epoch']})"
        )

    # ------------------------------------------------------------------ results

    @torch.no_grad()
    def write_images(self, count: int = 8) -> None:
        """``samples.png`` (prior samples) and ``reconstructions.png`` (test images, top row)."""
        if not self.ddp.main:
            return
        was_training = self.vae.training
        self.vae.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            z = torch.randn(count * count, self.config.latent_dim, dtype=self.dtype, device=self.device)
            samples = self.vae.mean_image(z)
            x = self.data.batch(self.test_images[:count], self.dtype)
            reconstructions = self.vae.mean_image(self.vae.approximate_posterior(x).rsample())
        self.vae.train(was_training)
        save_image(make_grid(samples.float().cpu(), nrow=count, pad_value=1.0), self.out / "samples.png")
        pairs = torch.cat([x, reconstructions]).float().cpu()
        save_image(make_grid(pairs, nrow=count, pad_value=1.0), self.out / "reconstructions.png")

    def test(self) -> dict[str, Any]:
        """Evaluate the best model on the test set (and validation set); log and return it."""
        with pyro.validation_enabled(self.config.validate):
            return self._test()

    def _test(self) -> dict[str, Any]:
        config = self.config
        identical = self.ranks_identical()  # the trained parameters, before the best are loaded
        if self.best_model is not None:
            self.vae.load_state_dict(self.best_model)
        is_samples = config.is_samples
        start = time.perf_counter()
        valid = self.validate()
        test = evaluate_bounds(
            self.vae, self.data, self.test_images, dtype=self.dtype,
            elbo_samples=config.elbo_samples, is_samples=is_samples, chunk=config.chunk,
            max_images=config.test_images, seed=_epoch_seed(config.seed, 0, 3),
            progress=config.progress and self.ddp.main, description=f"test (IS {is_samples})",
        )
        record: dict[str, Any] = {
            "event": "final",
            "dataset": config.dataset,
            "flow": config.flow,
            "epochs_trained": self.epoch,
            "best_epoch": self.stopping.best_epoch,
            "early_stopped": self.stopping.stopped,
            "time_limit_reached": self.epoch < config.epochs and not self.stopping.stopped,
            "is_samples": is_samples,
            "units": self.data.units,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "eval_seconds": time.perf_counter() - start,
            "parameters": count_parameters(self.vae),
            "world_size": self.ddp.world,
            "ranks_identical": identical,
        }
        if self.cg["solves"]:
            record.update(
                cg_unconverged=self.cg["unconverged"], cg_solves=self.cg["solves"],
                cg_unconverged_share=self.cg["unconverged"] / self.cg["solves"],
                cg_warned_epochs=self.cg["warned_epochs"],
            )
        record.update(valid.reported(self.data, "valid"))
        record.update(test.reported(self.data, "test"))
        if self.data.note:
            record["note"] = self.data.note
        self.log(record)
        if self.ddp.main:
            atomic_write(self.out / RESULTS, (json.dumps(record, indent=2) + "\n").encode())
        self.write_images()
        return record


def run(config: Config, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train and test one configuration; returns the final record (see :class:`Trainer`)."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    try:
        trainer.fit()
        record = trainer.test()
        if trainer.ddp.main:
            _print_report(trainer, record)
        return record
    finally:
        if trainer.ddp.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _print_report(trainer: Trainer, record: dict[str, Any]) -> None:
    data, out = trainer.data, trainer.out
    lines = [f"\n{record['flow']} VAE on {record['dataset']}: {record['epochs_trained']} epochs "
             f"(best {record['best_epoch']}), {record['train_seconds']:.0f} s training"]
    for key in ("test_nelbo", "test_nll"):
        value = record[key]
        if value is None:
            continue
        label = "negative ELBO" if key == "test_nelbo" else f"IS-NLL ({record['is_samples']} samples)"
        text = f"{value:.2f} nats"
        if data.units == "bits/dim":
            text = f"{data.to_reported(value):.4f} bits/dim ({text})"
        lines.append(f"  test {label}: {text} on {record['test_images']} images")
    if data.note:
        lines.append(f"  note: {data.note}")
    if record.get("cg_warned_epochs"):
        lines.append(f"  warning: CG missed on more than {CG_MISS_SHARE:.0%} of the solves of "
                     f"epochs {record['cg_warned_epochs']} (biased gradients; see the warnings)")
    lines += [
        f"  metrics:         {out / METRICS}",
        f"  results:         {out / RESULTS}",
        f"  checkpoint:      {out / CHECKPOINT}",
        f"  samples:         {out / 'samples.png'}",
        f"  reconstructions: {out / 'reconstructions.png'}",
    ]
    print("\n".join(lines))


def state_dict_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Whether two state dicts hold bit-identical tensors (for tests and checks)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)

