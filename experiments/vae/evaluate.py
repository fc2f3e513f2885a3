r"""Evaluation as in the VAE literature: negative ELBO and importance-sampled NLL.

For images :math:`x` and :math:`z_k \sim q(z \mid x)` let
:math:`w_k = \log p(x, z_k) - \log q(z_k \mid x)` (:meth:`VAE.log_weights`; the CP-Flow
log-determinant is exact in eval mode). Then

* the negative ELBO is :math:`-\frac1L \sum_{k \le L} w_k` (``elbo_samples = L``, 1 in the
  literature), averaged over the images;
* the importance-sampled negative log-likelihood is
  :math:`-(\mathrm{logsumexp}_{k \le K} w_k - \log K)` (``is_samples = K``: 5000, or 2000 for
  Caltech 101 in the published tables). It never exceeds the negative ELBO in expectation:
  :math:`\log p(x) \ge \mathbb{E}\,\mathrm{IS}_K \ge \mathrm{ELBO}`.

Both are in nats per image; :meth:`~experiments.vae.data.ImageDataset.to_reported` converts
Frey Faces to bits per dimension. The ``K`` samples are drawn in chunks of at most ``chunk``
rows (samples x images) with a running log-sum-exp, so memory does not grow with ``K``.
With ``torch.distributed`` initialised every rank takes every ``world``-th image and the sums
are all-reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from experiments.vae.data import ImageDataset
from experiments.vae.model import VAE

__all__ = ["Bounds", "evaluate_bounds", "importance_sampled_log_likelihood"]


@dataclass(frozen=True)
class Bounds:
    """Averages over the evaluated images, in nats per image (``nll`` is ``None`` if not run)."""

    nelbo: float
    nll: float | None
    images: int

    def reported(self, data: ImageDataset, prefix: str) -> dict[str, float | int | None]:
        """A metrics record: nats, plus bits/dim for the categorical data set."""
        record: dict[str, float | int | None] = {
            f"{prefix}_nelbo": self.nelbo,
            f"{prefix}_nll": self.nll,
            f"{prefix}_images": self.images,
        }
        if data.units == "bits/dim":
            record[f"{prefix}_nelbo_bpd"] = data.to_reported(self.nelbo)
            record[f"{prefix}_nll_bpd"] = None if self.nll is None else data.to_reported(self.nll)
        return record


def importance_sampled_log_likelihood(vae: VAE, x: Tensor, num_samples: int, chunk: int) -> Tensor:
    r""":math:`\log \frac1K \sum_k e^{w_k}` per image of ``x``, drawing ``chunk // B`` samples at a time."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    per_pass = max(1, chunk // x.shape[0])
    total = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    for start in range(0, num_samples, per_pass):
        weights = vae.log_weights(x, min(per_pass, num_samples - start))
        total = torch.logaddexp(total, weights.logsumexp(0))
    return total - math.log(num_samples)


@torch.no_grad()
def evaluate_bounds(
    vae: VAE,
    data: ImageDataset,
    images: Tensor,
    *,
    dtype: torch.dtype,
    elbo_samples: int = 1,
    is_samples: int = 0,
    chunk: int = 500,
    max_images: int = 0,
    seed: int = 0,
    progress: bool = False,
    description: str = "eval",
) -> Bounds:
    """Negative ELBO and (if ``is_samples``) IS-NLL of ``images`` (``uint8``, on the device).

    The model is put in eval mode (exact log-dets) and restored afterwards. Sampling uses
    a forked RNG seeded with ``seed`` (common random numbers across epochs; the training
    RNG stream is untouched). ``max_images`` > 0 evaluates only the first images.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if max_images:
        images = images[:max_images]
    count = images.shape[0]
    mine = images[rank::world]
    device = images.device
    was_training = vae.training
    vae.eval()
    devices = [device] if device.type == "cuda" else []
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    elbo_batch = max(1, chunk // elbo_samples)
    is_batch = max(1, chunk // is_samples) if is_samples else 1
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + rank)
            bar = tqdm(total=mine.shape[0], desc=description, disable=not progress, leave=False)
            for start in range(0, mine.shape[0], elbo_batch):
                x = data.batch(mine[start : start + elbo_batch], dtype)
                sums[0] -= vae.log_weights(x, elbo_samples).mean(0).sum().double()
                if not is_samples:
                    bar.update(x.shape[0])
            for start in range(0, mine.shape[0] if is_samples else 0, is_batch):
                x = data.batch(mine[start : start + is_batch], dtype)
                sums[1] -= importance_sampled_log_likelihood(vae, x, is_samples, chunk).sum().double()
                bar.update(x.shape[0])
            bar.close()
    finally:
        vae.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    nelbo, nll = (sums / count).tolist()
    return Bounds(nelbo=nelbo, nll=nll if is_samples else None, images=count)
