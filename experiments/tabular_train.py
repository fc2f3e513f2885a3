r"""Maximum likelihood with early stopping on a validation set, checkpointed so that a killed
run resumes where it was.

:func:`fit` minimises :math:`-\frac1B \sum_i \log p(x_i)` over minibatches of the training
rows (drawn with replacement by a seeded generator; for a dequantised set each draw adds
fresh noise :math:`\delta \odot u`, :math:`u \sim U(0,1)^d`) with Adam at a constant learning
rate and gradient-norm clipping. Every ``eval_every`` steps it scores the validation rows in
eval mode (for CP-Flow the exact log-det); the best validation state is kept, and training
stops after ``patience`` evaluations without improvement (early stopping, as in MAF,
arXiv:1705.07057) or at ``max_steps``. A non-finite training loss also stops it, and the
best state so far is used (the record says so). The test log-likelihood is that of the
best state, reported as the mean over test points with two standard errors,
:math:`\bar\ell \pm 2 s_\ell / \sqrt{n}`.

**Checkpoints.** After every evaluation :func:`pyro_cpflow.save_checkpoint` writes the model,
the optimiser, the best state, the counters, the batch generator and the global random
states (:func:`pyro_cpflow.checkpoints.rng_state`, for the stochastic log-det's probes)
atomically; the last one also holds the result. :func:`fit` with ``resume=True`` continues
from the checkpoint and ends bit-identical to a run that was never interrupted; a finished
checkpoint returns its result without training. A checkpoint written with other settings is
refused.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from experiments.common import progress
from pyro_cpflow import load_checkpoint, save_checkpoint
from pyro_cpflow.checkpoints import rng_state, set_rng_state

__all__ = ["TensorSplits", "TrainSettings", "fit", "log_likelihoods", "mean_and_two_se"]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation and early-stopping settings of one model's run."""

    batch_size: int = 128
    lr: float = 1e-3
    max_steps: int = 5000
    eval_every: int = 50
    patience: int = 10
    max_grad_norm: float = 100.0
    eval_chunk: int = 1024


@dataclass(frozen=True)
class TensorSplits:
    """A set's rows as tensors (see ``tabular_data.TabularSplits``)."""

    train: Tensor
    validation: Tensor
    test: Tensor
    dequantization: Tensor | None = None


def log_likelihoods(distribution: dist.Distribution, module: nn.Module, x: Tensor, chunk: int) -> Tensor:
    """``log p(x_i)`` of every row, in eval mode and without gradients (``module`` back in
    the mode it was in)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return torch.cat([distribution.log_prob(part) for part in x.split(chunk)])
    finally:
        module.train(was_training)


def mean_and_two_se(values: Tensor) -> tuple[float, float]:
    """Mean and two standard errors of the mean."""
    return float(values.mean()), float(2 * values.std() / math.sqrt(values.numel()))


def _state_copy(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


class _Run:
    """The mutable state of one :func:`fit`, as saved in its checkpoint."""

    def __init__(self, module: nn.Module, settings: TrainSettings, seed: int, identity: dict[str, Any]):
        self.module = module
        self.settings = settings
        self.identity = identity
        self.optimizer = torch.optim.Adam(module.parameters(), lr=settings.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.best_state: dict[str, Tensor] | None = None
        self.best_step = 0
        self.best_value = -math.inf
        self.bad_evaluations = 0
        self.history: list[list[float]] = []  # [step, mean training loss since the last, validation]
        self.train_seconds = 0.0
        self.step_seconds = 0.0
        self.stop_reason: str | None = None
        self.warnings: list[str] = []
        self.result: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "counters": {
                "step": self.step,
                "best_step": self.best_step,
                "best_value": self.best_value,
                "bad_evaluations": self.bad_evaluations,
                "train_seconds": self.train_seconds,
                "step_seconds": self.step_seconds,
                "stop_reason": self.stop_reason,
            },
            "best_state": self.best_state,
            "history": self.history,
            "warnings": self.warnings,
            "result": self.result,
        }

    def restore(self, path: Path, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{path}: unknown checkpoint format {state.get('format')!r}")
        if state["identity"] != self.identity:
            changed = sorted(
                key
                for key in {*state["identity"], *self.identity}
                if state["identity"].get(key) != self.identity.get(key)
            )
            raise RuntimeError(
                f"{path} was written with other settings ({', '.join(changed)}): "
                "resume with the original options, or pass --overwrite to start again"
            )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        for key, value in state["counters"].items():
            setattr(self, key, value)
        self.best_state = state["best_state"]
        self.history = state["history"]
        self.warnings = state["warnings"]
        self.result = state["result"]


def fit(
    module: nn.Module,
    distribution: dist.Distribution,
    data: TensorSplits,
    settings: TrainSettings,
    seed: int,
    checkpoint: Path | None = None,
    *,
    resume: bool = False,
    identity: dict[str, Any] | None = None,
    desc: str = "fit",
    show_progress: bool = True,
    callback: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``module`` (the model ``distribution``'s parameters) as the module docstring says.

    :param checkpoint: file written after every evaluation (``None``: none).
    :param resume: continue from ``checkpoint`` when it exists.
    :param identity: plain data that names the run (data set, model, sizes); a checkpoint
        with another identity or other ``settings`` is refused on resume.
    :param callback: called with the step count after every evaluation and its checkpoint.
    :returns: test and validation log-likelihoods of the best state (mean and two standard
        errors; also every test point's, for paired comparisons), the step it was reached
        at, why training stopped, the steps, the training time (with and without the
        evaluations), the validation curve and any warnings.
    """
    run = _Run(module, settings, seed, {**(identity or {}), **asdict(settings), "seed": seed})
    if resume and checkpoint is not None and checkpoint.is_file():
        run.restore(checkpoint, load_checkpoint(checkpoint, map_location="cpu"))
        if run.result is not None:
            return run.result
    module.train()
    n = data.train.shape[0]
    losses: list[float] = []
    bar = progress(settings.max_steps, desc, show_progress)
    with bar, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        bar.update(run.step)
        while run.stop_reason is None:
            start = time.perf_counter()
            index = torch.randint(n, (settings.batch_size,), generator=run.generator)
            batch = data.train[index]
            if data.dequantization is not None:
                noise = torch.rand(batch.shape, generator=run.generator, dtype=batch.dtype)
                batch = batch + data.dequantization * noise
            loss = -distribution.log_prob(batch).mean()
            if not torch.isfinite(loss):
                run.stop_reason = f"non-finite training loss at step {run.step + 1}"
                break
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), settings.max_grad_norm)
            run.optimizer.step()
            run.step += 1
            losses.append(float(loss.detach()))
            run.step_seconds += time.perf_counter() - start
            bar.update()
            if run.step % settings.eval_every == 0 or run.step == settings.max_steps:
                scores = log_likelihoods(distribution, module, data.validation, settings.eval_chunk)
                value = float(scores.mean())
                run.history.append([run.step, sum(losses) / len(losses), value])
                losses.clear()
                bar.set_postfix(validation=f"{value:.3f}", best=f"{max(value, run.best_value):.3f}")
                if value > run.best_value:
                    run.best_value, run.best_step, run.bad_evaluations = value, run.step, 0
                    run.best_state = _state_copy(module)
                else:
                    run.bad_evaluations += 1
                if run.bad_evaluations >= settings.patience:
                    run.stop_reason = f"early stopping: no improvement in {settings.patience} evaluations"
                elif run.step >= settings.max_steps:
                    run.stop_reason = "max_steps"
                run.train_seconds += time.perf_counter() - start
                run.warnings = sorted({*run.warnings, *(str(w.message) for w in seen)})
                if checkpoint is not None:
                    save_checkpoint(checkpoint, run.state())
                if callback is not None:
                    callback(run.step)
            else:
                run.train_seconds += time.perf_counter() - start
        run.warnings = sorted({*run.warnings, *(str(w.message) for w in seen)})
    run.result = _result(run, distribution, data)
    if checkpoint is not None:
        save_checkpoint(checkpoint, run.state())
    return run.result


def _result(run: _Run, distribution: dist.Distribution, data: TensorSplits) -> dict[str, Any]:
    """Scores of the best state (``NaN`` when no evaluation came before a failure)."""
    settings = run.settings
    scores: dict[str, Any] = {}
    if run.best_state is not None:
        run.module.load_state_dict(run.best_state)
        for split in ("validation", "test"):
            values = log_likelihoods(distribution, run.module, getattr(data, split), settings.eval_chunk)
            scores[f"{split}_loglik"], scores[f"{split}_loglik_2se"] = mean_and_two_se(values)
        scores["test_logliks"] = values.tolist()
    else:
        scores = {
            key: math.nan
            for key in ("validation_loglik", "validation_loglik_2se", "test_loglik", "test_loglik_2se")
        }
        scores["test_logliks"] = []
    return {
        **scores,
        "best_step": run.best_step,
        "steps": run.step,
        "stop_reason": run.stop_reason,
        "train_seconds": run.train_seconds,
        "ms_per_step": 1e3 * run.step_seconds / max(run.step, 1),
        "validation_curve": [[int(step), value] for step, _, value in run.history],
        "train_loss_curve": [[int(step), loss] for step, loss, _ in run.history],
        "warnings": run.warnings,
    }
