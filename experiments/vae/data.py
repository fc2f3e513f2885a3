"""The VAE benchmark image sets, loaded offline from ``experiments/data`` with checksums.

Every file is verified against the sha256 recorded in :data:`FILES` before it is read;
a mismatch raises :class:`ChecksumError`. The splits follow the Sylvester-flows / CP-Flow
VAE code:

=================  ==========================  ====================  ============  =========
name               splits (train/valid/test)   pixels                likelihood    reported
=================  ==========================  ====================  ============  =========
freyfaces          1565 / 200 / 200 (shuffled  28x20, 256 levels     categorical   bits/dim
                   with ``np.random`` seed 123)                       (256-way)
caltech101         4100 / 2264 / 2307 (split1) 28x28, static binary  Bernoulli     nats
binarized_mnist    50000 / 10000 / 10000       28x28, static binary  Bernoulli     nats
mnist              50000 / 10000 / 10000       28x28, dynamic binar. Bernoulli     nats
omniglot           23000 / 1345 / 8115         28x28, dynamic binar. Bernoulli     nats
=================  ==========================  ====================  ============  =========

*Dynamic binarisation*: the training images keep their grey levels and are binarised afresh
for every batch (:meth:`ImageDataset.batch`); validation and test images are binarised once,
with a fixed seed (777, as in the Sylvester-flows code). ``mnist`` takes the last 10,000
training images for validation. ``omniglot`` is the 28x28 set built by
``experiments/data/build_omniglot28.py`` from all 32,460 full-size images, shuffled with a
fixed seed: it is **not directly comparable** with published Omniglot numbers, which use the
24,345 / 8,070 ``chardata.mat`` split.

Images are kept as ``uint8`` tensors ``(N, C, H, W)``; :meth:`ImageDataset.batch` returns
floats in ``[0, 1]``: binary images for the Bernoulli sets, ``level / 255`` for Frey Faces.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DATA_DIR",
    "FILES",
    "ChecksumError",
    "ImageDataset",
    "load_dataset",
    "verify_file",
]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

FILES: dict[str, str] = {
    "frey_rawface.mat": "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64",
    "caltech101_silhouettes_28_split1.mat": (
        "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"
    ),
    "binarized_mnist.npz": "350243cb824d66d022e0c3e87cac231231668817ff03f5f6d7b6533017d56b4b",
    # gzipped IDX files; their uncompressed contents are ba8910... and 0fa789... (see data/README.md)
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    # derived: experiments/data/build_omniglot28.py
    "omniglot28.npz": "b355a5bc63859cc1dabf248df00e7a262e6e5d36f6986683e84315982d201a87",
}
"""sha256 of every data file the loaders read."""

DATASETS = ("freyfaces", "caltech101", "binarized_mnist", "mnist", "omniglot")

FREY_SEED = 123  # the Sylvester-flows / CP-Flow default (``--freyseed``)
BINARIZATION_SEED = 777  # fixed binarisation of validation and test images (Sylvester flows)
OMNIGLOT_SPLIT_SEED = 0
OMNIGLOT_SIZES = (23000, 1345)  # train, validation; the remaining 8115 images are the test set


class ChecksumError(RuntimeError):
    """A data file's sha256 differs from the one recorded in :data:`FILES`."""


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(name: str, root: Path = DATA_DIR) -> Path:
    """The path of data file ``name`` after checking its sha256; raises on any problem."""
    if name not in FILES:
        raise KeyError(f"no checksum recorded for {name!r}; known files: {sorted(FILES)}")
    path = Path(root) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} is missing; it is part of the repository (experiments/data/), "
            "see experiments/data/README.md for its origin"
        )
    found = sha256_of_file(path)
    if found != FILES[name]:
        raise ChecksumError(
            f"{path} is corrupt or not the expected file: sha256 {found}, expected {FILES[name]} "
            "(restore it from the repository; see experiments/data/README.md)"
        )
    return path


@dataclass(frozen=True)
class ImageDataset:
    """Three splits of ``uint8`` images ``(N, C, H, W)`` and how to model them.

    :param name: one of :data:`DATASETS`.
    :param train: training images; grey levels when ``dynamic_binarization``.
    :param valid: validation images (binarised once for the dynamic sets).
    :param test: test images (likewise).
    :param likelihood: ``"bernoulli"`` or ``"categorical"`` (256-way per pixel).
    :param levels: the largest pixel value of the stored images (1 or 255).
    :param dynamic_binarization: binarise training batches afresh.
    :param note: a caveat to print wherever results are reported.
    """

    name: str
    train: Tensor
    valid: Tensor
    test: Tensor
    likelihood: str
    levels: int
    dynamic_binarization: bool = False
    note: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    @property
    def num_pixels(self) -> int:
        return math.prod(self.image_shape)

    @property
    def units(self) -> str:
        """The unit the literature reports for this set: ``"bits/dim"`` or ``"nats"``."""
        return "bits/dim" if self.likelihood == "categorical" else "nats"

    def to_reported(self, nats: float) -> float:
        """A per-image negative log-likelihood in nats, converted to :attr:`units`."""
        return nats / (self.num_pixels * math.log(2.0)) if self.units == "bits/dim" else nats

    def split(self, name: str) -> Tensor:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {name!r}")
        return getattr(self, name)

    def batch(
        self,
        images: Tensor,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
        binarize: bool = False,
    ) -> Tensor:
        """Float images in ``[0, 1]`` from stored ``uint8`` ones (on their device).

        With ``binarize`` (training batches of the dynamic sets) each pixel is drawn from
        a Bernoulli with its grey level as the probability, using ``generator``.
        """
        x = images.to(dtype) / self.levels
        if binarize and self.dynamic_binarization:
            x = torch.bernoulli(x, generator=generator)
        return x


def _binarize_fixed(grey: np.ndarray, seed: int = BINARIZATION_SEED) -> np.ndarray:
    """One fixed Bernoulli draw of ``uint8`` grey images (values 0..255) as ``uint8`` {0, 1}."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.from_numpy(grey).to(torch.float64) / 255.0
    return torch.bernoulli(probabilities, generator=generator).to(torch.uint8).numpy()


def _as_images(array: np.ndarray, height: int, width: int) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).reshape(-1, 1, height, width))


def _load_freyfaces(root: Path) -> ImageDataset:
    from scipy.io import loadmat

    faces = loadmat(verify_file("frey_rawface.mat", root))["ff"].T.reshape(-1, 28, 20)
    faces = np.array(faces, dtype=np.uint8)
    np.random.RandomState(FREY_SEED).shuffle(faces)  # = np.random.seed(123); np.random.shuffle
    images = _as_images(faces, 28, 20)
    return ImageDataset("freyfaces", images[:1565], images[1565:1765], images[1765:1965], "categorical", 255)


def _load_caltech(root: Path) -> ImageDataset:
    from scipy.io import loadmat

    raw = loadmat(verify_file("caltech101_silhouettes_28_split1.mat", root))

    def split(key: str) -> Tensor:
        # column-major 28x28 images, 1 = white background: model the silhouette 1 - x
        images = raw[key].reshape(-1, 28, 28).transpose(0, 2, 1)
        return _as_images((1 - images).astype(np.uint8), 28, 28)

    return ImageDataset(
        "caltech101", split("train_data"), split("val_data"), split("test_data"), "bernoulli", 1
    )


def _load_binarized_mnist(root: Path) -> ImageDataset:
    with np.load(verify_file("binarized_mnist.npz", root)) as raw:
        train, valid, test = (_as_images(raw[key], 28, 28) for key in ("train", "valid", "test"))
    return ImageDataset("binarized_mnist", train, valid, test, "bernoulli", 1)


def _read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, count, rows, cols = np.frombuffer(data[:16], dtype=">i4")
    if magic != 2051:
        raise ValueError(f"{path} is not an IDX image file (magic {magic})")
    return np.frombuffer(data[16:], dtype=np.uint8).reshape(count, rows, cols).copy()


def _load_mnist(root: Path) -> ImageDataset:
    train = _read_idx_images(verify_file("train-images-idx3-ubyte.gz", root))
    test = _read_idx_images(verify_file("t10k-images-idx3-ubyte.gz", root))
    return ImageDataset(
        "mnist",
        _as_images(train[:50000], 28, 28),
        _as_images(_binarize_fixed(train[50000:]), 28, 28),
        _as_images(_binarize_fixed(test), 28, 28),
        "bernoulli",
        255,
        dynamic_binarization=True,
    )


def _load_omniglot(root: Path) -> ImageDataset:
    with np.load(verify_file("omniglot28.npz", root)) as raw:
        images = raw["images"]
    order = np.random.RandomState(OMNIGLOT_SPLIT_SEED).permutation(len(images))
    images = images[order]
    n_train, n_valid = OMNIGLOT_SIZES
    return ImageDataset(
        "omniglot",
        _as_images(images[:n_train], 28, 28),
        _as_images(_binarize_fixed(images[n_train : n_train + n_valid]), 28, 28),
        _as_images(_binarize_fixed(images[n_train + n_valid :], BINARIZATION_SEED + 1), 28, 28),
        "bernoulli",
        255,
        dynamic_binarization=True,
        note=(
            "28x28 Omniglot built from the full-size images (23000/1345/8115 split): "
            "not directly comparable with published Omniglot numbers (chardata.mat split)"
        ),
    )


_LOADERS = {
    "freyfaces": _load_freyfaces,
    "caltech101": _load_caltech,
    "binarized_mnist": _load_binarized_mnist,
    "mnist": _load_mnist,
    "omniglot": _load_omniglot,
}


@cache
def load_dataset(name: str, root: Path = DATA_DIR) -> ImageDataset:
    """Load (and cache) data set ``name`` from ``root``, verifying every file's checksum.

    >>> frey = load_dataset("freyfaces")
    >>> frey.image_shape, len(frey.train), len(frey.valid), len(frey.test), frey.units
    ((1, 28, 20), 1565, 200, 200, 'bits/dim')
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    return _LOADERS[name](Path(root))
