"""Build ``omniglot28.npz``: all 32,460 Omniglot images, area-downsampled to 28x28.

The VAE literature (IWAE, VampPrior, Sylvester flows, CP-Flow) uses a 28x28 Omniglot file
(``chardata.mat``, 24,345 train / 8,070 test images) that is not available offline. This
script makes a 28x28 version from the full 105x105 images of Lake et al. instead; numbers
on it are **not directly comparable** with published Omniglot numbers.

Recipe: every image of ``images_background.npz`` and ``images_evaluation.npz`` (True = white
background) is turned into stroke intensity ``1 - image`` and area-averaged to 28x28
(``torch.nn.functional.interpolate(mode="area")``); the grey level is stored as
``round(255 * intensity)`` in ``uint8``. The split into train / validation / test and the
binarisation happen at load time (``experiments/vae/data.py``).

Usage (the source folder holds the two npz files; their checksums are verified)::

    python -m experiments.data.build_omniglot28 --source /work/shared/data/omniglot

The output's sha256 is recorded in ``experiments/vae/data.py``; the build is deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.vae.data import sha256_of_file

SOURCES = {
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
}
OUTPUT = Path(__file__).resolve().parent / "omniglot28.npz"


def downsample(images: np.ndarray, size: int = 28, chunk: int = 2048) -> np.ndarray:
    """``(N, 105, 105)`` bool (True = background) to ``(N, size, size)`` uint8 stroke intensity."""
    out = np.empty((images.shape[0], size, size), dtype=np.uint8)
    for start in range(0, images.shape[0], chunk):
        block = torch.from_numpy(~images[start : start + chunk]).to(torch.float64)[:, None]
        pooled = F.interpolate(block, size=(size, size), mode="area")[:, 0]
        out[start : start + chunk] = torch.round(255.0 * pooled).to(torch.uint8).numpy()
    return out


def build(source: Path, output: Path = OUTPUT) -> str:
    """Write ``output`` from the two source files; returns its sha256."""
    images, labels, alphabets = [], [], []
    for part, (name, sha256) in enumerate(SOURCES.items()):
        path = source / name
        found = sha256_of_file(path)
        if found != sha256:
            raise RuntimeError(f"{path}: sha256 {found} differs from the recorded {sha256}")
        with np.load(path) as archive:
            raw = archive["images"]  # (characters, drawers, 105, 105)
            label = archive["labels"]
        images.append(downsample(raw.reshape(-1, *raw.shape[-2:])))
        labels.append(label.reshape(-1).astype(np.int32))
        alphabets.append(np.full(labels[-1].shape, part, dtype=np.uint8))
    np.savez_compressed(
        output,
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        background_set=np.concatenate(alphabets) == 0,
    )
    return sha256_of_file(output)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.data.build_omniglot28",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", type=Path, default=Path("/work/shared/data/omniglot"))
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    print(f"wrote {args.output} (sha256 {build(args.source, args.output)})")


if __name__ == "__main__":
    main()
