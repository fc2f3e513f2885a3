r"""Training: KL warm-up, Adamax, early stopping, resume: the :class:`Trainer` and :func:`run`.

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

Engineering, each in a module of its own:

* the run folder (:mod:`~.run_folder`): never started over by accident, ``metrics.jsonl``
  (one record per epoch, on disk before the checkpoint) and ``results.json``;
* a checkpoint after every epoch (:mod:`~.checkpoints`); ``resume=True`` continues from it
  and ends bit-identical to an uninterrupted run (data order and binarisation come from
  per-epoch seeded generators, evaluations from forked RNGs);
* ``samples.png`` and ``reconstructions.png`` after every epoch and at the end, and the
  printed lines (:mod:`~.outputs`);
* the training step itself never waits for the device: losses accumulate on the device and
  are read every ``log_every`` steps and at the end of the epoch, and Pyro's argument
  validation (which checks values on the host, as do the CP-Flow transforms' NaN checks)
  is off unless ``validate``; CG misses are counted on the device (:mod:`~.cg_monitor`);
* ``time_limit`` stops training after the epoch that passes that many minutes (training plus
  validation), for fixed compute budgets; where it stops depends on the machine's speed;
* data parallel with ``torch.distributed`` when launched by ``torchrun`` (:mod:`~.distributed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from experiments.common import count_parameters, seed_everything
from experiments.vae.cg_monitor import CGMisses, EpochCGCount
from experiments.vae.checkpoints import load_training_state, save_training_state
from experiments.vae.config import DTYPES, Config, ConfigError
from experiments.vae.data import ImageDataset, load_dataset
from experiments.vae.distributed import Distributed
from experiments.vae.evaluate import Bounds, evaluate_bounds
from experiments.vae.model import VAE, Architecture
from experiments.vae.outputs import epoch_summary, final_summary, write_images
from experiments.vae.posteriors import PosteriorConfig, build_posterior, cpflow_blocks
from experiments.vae.run_folder import RunFolder
from pyro_cpflow.checkpoints import rng_state, set_rng_state

__all__ = ["EarlyStopping", "Trainer", "build_vae", "run", "warmup_beta"]


def build_vae(config: Config, data: ImageDataset) -> VAE:
    """The VAE of ``config`` for ``data`` (parameters drawn from the current RNG state)."""
    arch = Architecture(
        data.image_shape,
        data.likelihood,
        config.latent_dim,
        config.feature_dim,
        config.channels,
        config.head_channels,
    )
    posterior = build_posterior(
        PosteriorConfig(
            config.flow,
            config.latent_dim,
            config.feature_dim,
            config.flow_steps,
            config.flow_hidden,
            config.logdet,
            config.actnorm,
            tuple(config.cg_options().items()),
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
class Trainer:
    """One training run: set up from a :class:`Config`, then :meth:`fit` and :meth:`test`.

    :param resume: continue the run in the output folder from its checkpoint.
    :param overwrite: delete the run files in the output folder and start again. Without
        either, a folder that holds a run (any of :data:`~.run_folder.RUN_FILES`) raises
        :class:`~.run_folder.RunExistsError` and is left as it is.
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
                "batch_size",
                f"must be at least the number of processes ({self.ddp.world}), got {config.batch_size}",
            )
        self.device = self._device()
        self.dtype = DTYPES[config.dtype]
        threads = config.threads or (1 if self.ddp.world > 1 and self.device.type == "cpu" else 0)
        if threads:
            torch.set_num_threads(threads)
        pyro.clear_param_store()
        self.out = config.output
        self.folder = RunFolder(self.out, main=self.ddp.main)
        self.folder.claim(self.ddp.gather(self.folder.found())[0], self.resume, self.overwrite)
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
        self.cg = CGMisses()
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
        self.folder.start(self.config.to_dict())

    def _permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(_epoch_seed(self.config.seed, epoch, 0))
        return torch.randperm(self.train_images.shape[0], generator=generator).to(self.device)

    def _binarizer(self, epoch: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_epoch_seed(self.config.seed, epoch, 1 + self.ddp.rank))
        return generator

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (rank 0), with the RNG states of every rank."""
        states = self.ddp.gather(rng_state())
        if not self.ddp.main:
            return
        save_training_state(
            self.folder.checkpoint,
            {
                "config": self.config.to_dict(),
                "epoch": self.epoch,
                "world_size": self.ddp.world,
                "model": self.vae.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "best_model": self.best_model,
                "early_stopping": asdict(self.stopping),
                "train_seconds": self.train_seconds,
                "wall_seconds": self.wall_seconds,
                "cg": self.cg.state,
                "rng": states,
            },
        )

    def _load_checkpoint(self) -> bool:
        path = self.folder.checkpoint
        if not path.is_file():
            if self.ddp.main:
                print(f"--resume: no checkpoint at {path}; starting from scratch")
            return False
        state = load_training_state(path, self.config, self.ddp.world)
        self.vae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        best = state["best_model"]
        self.best_model = None if best is None else {k: v.to(self.device) for k, v in best.items()}
        self.stopping = EarlyStopping(**state["early_stopping"])
        self.epoch = state["epoch"]
        self.train_seconds = state["train_seconds"]
        self.wall_seconds = state["wall_seconds"]
        self.cg = CGMisses(state["cg"])
        set_rng_state(state["rng"][self.ddp.rank])
        if self.ddp.main:
            self.folder.truncate_metrics(self.epoch)
            print(f"resumed {path} after epoch {self.epoch}")
        return True

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
        cg = EpochCGCount(cpflow_blocks(self.vae.posterior), self.device)
        window = torch.zeros((), dtype=torch.float64, device=self.device)
        bar = tqdm(
            total=len(batches),
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not (config.progress and self.ddp.main),
            leave=False,
        )
        start = time.perf_counter()
        for step, indices in enumerate(batches, 1):
            x = self.data.batch(self.train_images[indices], self.dtype, binarizer, binarize=True)
            loss = self.model(x, beta)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
            window += loss.detach()
            cg.update()  # CG misses, counted without waiting for the device
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
        record.update(cg.record(self.ddp))  # on every rank: the sums are collective
        return record

    def validate(self) -> Bounds:
        return evaluate_bounds(
            self.vae,
            self.data,
            self.valid_images,
            dtype=self.dtype,
            elbo_samples=self.config.elbo_samples,
            chunk=self.config.chunk,
            max_images=self.config.valid_images,
            seed=_epoch_seed(self.config.seed, 0, 2),
            progress=self.config.progress and self.ddp.main,
            description="validation",
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
            self.cg.add(record, cap=config.cg_options()["cg_max_iter"], warn=self.ddp.main)
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
            self.folder.log(record)
            self.save_checkpoint()
            self.write_images()
            if self.ddp.main:
                tqdm.write(epoch_summary(record, self.data))

    def out_of_time(self) -> bool:
        """Whether ``time_limit`` minutes of training and validation have passed (rank 0 decides)."""
        limit = self.config.time_limit
        return bool(limit) and self.ddp.gather(self.wall_seconds >= 60 * limit)[0]

    # ------------------------------------------------------------------ results

    def write_images(self) -> None:
        """``samples.png`` and ``reconstructions.png`` of the current model (rank 0)."""
        if self.ddp.main:
            write_images(
                self.vae,
                self.data,
                self.test_images,
                self.out,
                seed=self.config.seed,
                latent_dim=self.config.latent_dim,
                dtype=self.dtype,
                device=self.device,
            )

    def test(self) -> dict[str, Any]:
        """Evaluate the best model on the test set (and validation set); log and return it."""
        with pyro.validation_enabled(self.config.validate):
            return self._test()

    def _test(self) -> dict[str, Any]:
        config = self.config
        identical = self.ddp.identical(self.vae.state_dict())  # the trained parameters, before the best
        if self.best_model is not None:
            self.vae.load_state_dict(self.best_model)
        is_samples = config.is_samples
        start = time.perf_counter()
        valid = self.validate()
        test = evaluate_bounds(
            self.vae,
            self.data,
            self.test_images,
            dtype=self.dtype,
            elbo_samples=config.elbo_samples,
            is_samples=is_samples,
            chunk=config.chunk,
            max_images=config.test_images,
            seed=_epoch_seed(config.seed, 0, 3),
            progress=config.progress and self.ddp.main,
            description=f"test (IS {is_samples})",
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
        record.update(self.cg.summary())
        record.update(valid.reported(self.data, "valid"))
        record.update(test.reported(self.data, "test"))
        if self.data.note:
            record["note"] = self.data.note
        self.folder.log(record)
        self.folder.write_results(record)
        self.write_images()
        return record


def run(config: Config, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train and test one configuration; returns the final record (see :class:`Trainer`)."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    try:
        trainer.fit()
        record = trainer.test()
        if trainer.ddp.main:
            print(final_summary(record, trainer.data, trainer.out))
        return record
    finally:
        trainer.ddp.close()
