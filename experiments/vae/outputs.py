"""What a VAE run shows besides its records: image grids, the epoch line, the final summary.

``samples.png`` (prior samples) and ``reconstructions.png`` (test images, top row, over their
reconstructions) are torchvision grids written after every epoch and at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from experiments.vae.cg_monitor import CG_MISS_SHARE
from experiments.vae.data import ImageDataset
from experiments.vae.model import VAE
from experiments.vae.run_folder import CHECKPOINT, METRICS, RESULTS

__all__ = ["epoch_summary", "final_summary", "write_images"]


@torch.no_grad()
def write_images(
    vae: VAE,
    data: ImageDataset,
    test_images: Tensor,
    out: Path,
    *,
    seed: int,
    latent_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    count: int = 8,
) -> None:
    """``samples.png`` and ``reconstructions.png`` in ``out``, from forked RNGs seeded by ``seed``."""
    was_training = vae.training
    vae.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        z = torch.randn(count * count, latent_dim, dtype=dtype, device=device)
        samples = vae.mean_image(z)
        x = data.batch(test_images[:count], dtype)
        reconstructions = vae.mean_image(vae.approximate_posterior(x).rsample())
    vae.train(was_training)
    save_image(make_grid(samples.float().cpu(), nrow=count, pad_value=1.0), out / "samples.png")
    pairs = torch.cat([x, reconstructions]).float().cpu()
    save_image(make_grid(pairs, nrow=count, pad_value=1.0), out / "reconstructions.png")


def epoch_summary(record: dict[str, Any], data: ImageDataset) -> str:
    """The printed line of an epoch's record."""
    unit = data.units
    valid = record["valid_nelbo"]
    shown = f"{data.to_reported(valid):.4f} {unit}" if unit != "nats" else f"{valid:.2f} nats"
    return (
        f"epoch {record['epoch']:4d}  beta {record['beta']:.3f}  train loss "
        f"{record['train_loss']:.2f}  valid -ELBO {shown}  ({record['epoch_seconds']:.1f} s, "
        f"best epoch {record['best_epoch']})"
    )


def final_summary(record: dict[str, Any], data: ImageDataset, out: Path) -> str:
    """The printed report of a run's final record: test values and where the files are."""
    lines = [
        f"\n{record['flow']} VAE on {record['dataset']}: {record['epochs_trained']} epochs "
        f"(best {record['best_epoch']}), {record['train_seconds']:.0f} s training"
    ]
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
        lines.append(
            f"  warning: CG missed on more than {CG_MISS_SHARE:.0%} of the solves of "
            f"epochs {record['cg_warned_epochs']} (biased gradients; see the warnings)"
        )
    lines += [
        f"  metrics:         {out / METRICS}",
        f"  results:         {out / RESULTS}",
        f"  checkpoint:      {out / CHECKPOINT}",
        f"  samples:         {out / 'samples.png'}",
        f"  reconstructions: {out / 'reconstructions.png'}",
    ]
    return "\n".join(lines)
