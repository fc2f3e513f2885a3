"""What a VAE run depends on (:class:`Config`), and the accepted range of every value.

A value outside its range raises :class:`ConfigError`, naming the option and the range;
``python -m experiments.vae`` reports it as an error of that command-line option.

>>> try:
...     Config(epochs=0)
... except ConfigError as error:
...     print(error)
epochs must be an integer >= 1, got 0
>>> Config(device="cuda").cg_options()["cg_max_iter"]
16
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from experiments.vae.data import DATASETS
from experiments.vae.posteriors import POSTERIORS
from pyro_cpflow.factories import ACTNORM_PLACEMENTS
from pyro_cpflow.options import LOGDET_MODES

__all__ = ["Config", "ConfigError", "DTYPES", "RUNS_DIR"]

RUNS_DIR = Path(__file__).resolve().parents[1] / "runs"
DTYPES = {"float32": torch.float32, "float64": torch.float64}

INTEGERS: dict[str, tuple[int, int | None]] = {
    "epochs": (1, None),
    "max_batches": (0, None),
    "batch_size": (1, None),
    "warmup": (0, None),
    "early_stopping": (0, None),
    "latent_dim": (1, None),
    "feature_dim": (1, None),
    "channels": (1, None),
    "head_channels": (1, None),
    "flow_steps": (1, None),
    "cg_max_iter": (1, None),
    "cg_check_every": (0, None),
    "elbo_samples": (1, None),
    "is_samples": (0, None),
    "test_images": (0, None),
    "valid_images": (0, None),
    "chunk": (1, None),
    "seed": (0, 2**32 - 1),  # NumPy's seed range
    "threads": (0, None),
    "log_every": (1, None),
}
"""``(least, greatest)`` of each integer option; ``None``: no upper bound."""

OPTIONAL = ("flow_steps", "flow_hidden", "cg_max_iter", "cg_check_every")
"""Options whose ``None`` means "the default of the flow or the device"."""

RATES: dict[str, bool] = {"lr": False, "time_limit": True}
"""Finite non-negative float options: whether 0 is accepted (``time_limit`` 0: no limit)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS,
    "flow": POSTERIORS,
    "logdet": LOGDET_MODES,
    "actnorm": ACTNORM_PLACEMENTS,
    "dtype": tuple(DTYPES),
}


class ConfigError(ValueError):
    """A :class:`Config` value outside its accepted range; ``option`` names the field."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option} {message}")
        self.option = option
        self.message = message


@dataclass
class Config:
    """Everything a run depends on (the CLI's options; see ``python -m experiments.vae --help``)."""

    dataset: str = "freyfaces"
    flow: str = "cpflow"
    epochs: int = 2000
    max_batches: int = 0
    batch_size: int = 100
    lr: float = 5e-4
    warmup: int = 100
    early_stopping: int = 100
    time_limit: float = 0.0
    latent_dim: int = 64
    feature_dim: int = 256
    channels: int = 32
    head_channels: int = 256
    flow_steps: int | None = None
    flow_hidden: tuple[int, ...] | None = None
    logdet: str = "auto"
    actnorm: str = "between"
    cg_max_iter: int | None = None
    cg_check_every: int | None = None
    elbo_samples: int = 1
    is_samples: int = 5000
    test_images: int = 0
    valid_images: int = 0
    chunk: int = 500
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    out_dir: str = ""
    log_every: int = 10
    progress: bool = True
    validate: bool = False

    # options that may change between a run and its resumption
    RESUMABLE = (
        "epochs",
        "time_limit",
        "device",
        "threads",
        "out_dir",
        "log_every",
        "progress",
        "validate",
    )

    def __post_init__(self) -> None:
        if self.flow_hidden is not None:
            self.flow_hidden = tuple(self.flow_hidden)
        self._check()

    def _check(self) -> None:
        """Raise :class:`ConfigError` for the first value outside its range."""
        for name, (least, greatest) in INTEGERS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            span = f">= {least}" if greatest is None else f"in [{least}, {greatest}]"
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(name, f"must be an integer {span}, got {value!r}")
            if value < least or (greatest is not None and value > greatest):
                raise ConfigError(name, f"must be an integer {span}, got {value}")
        for name, zero in RATES.items():
            value = getattr(self, name)
            span = ">= 0" if zero else "> 0"
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value > 0 or (zero and value == 0))):
                raise ConfigError(name, f"must be a finite number {span}, got {value!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.flow_hidden is not None and (
            not self.flow_hidden
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.flow_hidden)
        ):
            raise ConfigError("flow_hidden", f"must be positive integer widths, got {self.flow_hidden!r}")
        if self.batch_size < 2 and self.flow.startswith("cpflow") and self.actnorm != "none":
            raise ConfigError(
                "batch_size",
                f"must be >= 2 with actnorm {self.actnorm!r}: ActNorm initialises "
                f"from the statistics of the first batch, got {self.batch_size}",
            )
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(
                "device", f"must name a torch device (cpu, cuda, cuda:1, ...), got {self.device!r}"
            ) from None
        if self.out_dir and Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ConfigError("out_dir", f"must be a folder, but {self.out_dir} is a file")
        self.cg_options()  # the CG settings this device gets must be complete

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.flow}-s{self.seed}"

    @property
    def output(self) -> Path:
        return Path(self.out_dir) if self.out_dir else RUNS_DIR / self.name

    def cg_options(self) -> dict[str, Any]:
        """CP-Flow CG settings for this run's device.

        On a GPU the default is a fixed-length CG (16 iterations, converged samples frozen)
        that never waits for the device; on a CPU, where waiting costs nothing, CG stops as
        soon as every sample has converged (cap ``2 d``). Misses are counted on the device
        and logged per epoch (``cg_unconverged``) instead of warned about per step; the
        trainer warns once per epoch when they pass a small share.
        """
        gpu = torch.device(self.device).type == "cuda"
        check_every = self.cg_check_every if self.cg_check_every is not None else (0 if gpu else 1)
        max_iter = self.cg_max_iter if self.cg_max_iter is not None else (16 if gpu else None)
        if check_every == 0 and max_iter is None:
            raise ConfigError(
                "cg_check_every",
                "0 (never test convergence) needs cg_max_iter: the number of CG iterations to run",
            )
        return {"cg_max_iter": max_iter, "cg_check_every": check_every, "on_failure": "ignore"}

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["flow_hidden"] = list(self.flow_hidden) if self.flow_hidden else None
        return record

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Fields (outside :attr:`RESUMABLE`) whose values differ from ``other``'s."""
        mine, defaults = self.to_dict(), Config().to_dict()
        return [  # an option missing from ``other`` (an older run) had its default value
            f.name
            for f in fields(self)
            if f.name not in self.RESUMABLE and mine[f.name] != other.get(f.name, defaults[f.name])
        ]
