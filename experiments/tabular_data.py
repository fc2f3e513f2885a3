r"""The five tabular density sets of Papamakarios et al. (MAF, NeurIPS 2017, arXiv:1705.07057),
read from their preprocessed release in a folder that you supply.

The files are not shipped with this repository and cannot be downloaded here. Unpack the
published archive into one folder ``root``; its layout is::

    root/power/data.npy                 POWER      (UCI household electric power consumption)
    root/gas/ethylene_CO.pickle         GAS        (UCI gas sensor array, ethylene and CO; a pandas pickle)
    root/hepmass/1000_train.csv         HEPMASS    (UCI HEPMASS, the "1000" mass subset)
    root/hepmass/1000_test.csv
    root/miniboone/data.npy             MINIBOONE  (UCI MiniBooNE particle identification)
    root/BSDS300/BSDS300.hdf5           BSDS300    (8x8 patches of the Berkeley segmentation images)

:func:`load_maf` (or one ``load_<name>``) returns a :class:`TabularSplits` of float64 arrays.
What each loader does, written from the MAF paper's appendix and the description of the
published preprocessing (the splits are taken from the end of the rows, in file order unless
said otherwise; "10% test, 10% of the rest validation" means ``n_test = int(0.1 N)`` rows at
the end, then ``n_validation = int(0.1 (N - n_test))`` rows at the end of what is left):

* **POWER** (``data.npy``: 8 columns, global active power, global reactive power, voltage,
  global intensity, sub-meterings 1-3, time of day in minutes; the date is already gone).
  The rows are shuffled by ``numpy.random.RandomState(42)``; global reactive power (many exact
  zeros) and global intensity are dropped; the same generator then draws uniform noise
  ``U(0, 0.01)`` for voltage, ``U(0, 0.001)`` for global active power and ``U(0, 1)`` for each
  sub-metering (in that order, so the draw is the published one), the time column gets none;
  10% test, 10% of the rest validation; standardised by the mean and standard deviation
  (``ddof=0``) of training and validation rows together. ``d = 6``.
* **GAS** (``ethylene_CO.pickle``: a pandas ``DataFrame`` with ``Time``, ``Meth``, ``Eth`` and
  16 sensor columns). ``Time``, ``Meth`` and ``Eth`` are dropped; then, while some column has
  a Pearson correlation above 0.98 with another one, the first such column is dropped and the
  correlations recomputed; standardised by the mean and standard deviation (``ddof=1``) of
  *all* rows; 10% test, 10% of the rest validation. ``d = 8``.
* **HEPMASS** (two CSV files with a header line; first column the class label). Only the
  positive class (label 1, the signal) is kept and the label dropped; the test file has one
  column more than the training file, and its trailing columns are cut to the training
  file's count (the published preprocessing drops the last one); both are standardised by
  the mean and standard deviation (``ddof=1``) of the positive training rows; features whose
  *smallest* value occurs more than 5 times among them are dropped (the published rule for
  "too many repeated values", which catches the discrete features); the validation set is
  the last 10% of the training rows. ``d = 21``.
* **MINIBOONE** (``data.npy``: the published file already lacks 7 of the 50 features and the
  outlier rows). Rows whose first feature is below -100 (the -999 markers) and features
  whose smallest value occurs more than 5 times are removed again, over all rows (both
  remove nothing from the published file: the rules are idempotent); 10% test, 10% of the
  rest validation; standardised by the mean and standard deviation (``ddof=0``) of training
  and validation rows. ``d = 43``.
* **BSDS300** (``BSDS300.hdf5`` with datasets ``train``, ``validation``, ``test``): used as
  given (already centred patches with one pixel dropped). ``d = 63``.

The published sizes (train / validation / test) are in :data:`PUBLISHED_SIZES`, and
:func:`size_differences` compares a loaded set with them.

**Where this implementation may differ from the published numbers.** The normalisation
statistics follow the published preprocessing, which is not "training rows only" everywhere
(POWER and MINIBOONE use training and validation rows, GAS all rows including the test set,
HEPMASS the training file before its validation rows are split off). Standard deviations
and correlations are computed with NumPy, not pandas (the same formulas; the last digits of
floating point may differ, and a GAS correlation within rounding of 0.98 could in principle
flip). The HEPMASS test file is aligned to the training file by cutting its trailing columns,
which is what the published preprocessing does to the published file, but on a differently
damaged file it would not be the same thing. The MAF paper's text says noise was added to
POWER's time feature; the published preprocessing adds none, and neither does this loader.
None of this has been checked against the real files, which are not available here.

**Safety.** ``.npy`` files are read with ``allow_pickle=False``. The GAS file is a pickle, and
unpickling runs whatever code the file holds, so :func:`load_gas` refuses it unless called
with ``allow_pickle=True`` (``--allow-pickle`` in ``experiments/tabular.py``): pass it only for a
file from a source you trust. GAS needs pandas and BSDS300 h5py, both optional imports; their
absence is reported by :class:`MissingDependencyError`. A missing folder or file raises
:class:`MissingDataError`, naming the path expected and the whole layout.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "MAF_DATASETS",
    "MAF_FILES",
    "PUBLISHED_SIZES",
    "MissingDataError",
    "MissingDependencyError",
    "PickleRefusedError",
    "TabularSplits",
    "correlated_columns",
    "load_bsds300",
    "load_gas",
    "load_hepmass",
    "load_maf",
    "load_miniboone",
    "load_power",
    "repeated_minimum_features",
    "size_differences",
    "split_tail",
    "standardise",
]

MAF_FILES: dict[str, tuple[str, ...]] = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
"""The files each set needs, relative to the data folder (the published layout)."""

PUBLISHED_SIZES: dict[str, tuple[int, int, int, int]] = {
    "power": (1_659_917, 184_435, 204_928, 6),
    "gas": (852_174, 94_685, 105_206, 8),
    "hepmass": (315_123, 35_013, 174_987, 21),
    "miniboone": (29_556, 3_284, 3_648, 43),
    "bsds300": (1_000_000, 50_000, 250_000, 63),
}
"""``(train, validation, test, d)`` of each set as published (MAF paper, table of data sets)."""

TEST_FRACTION = 0.1
VALIDATION_FRACTION = 0.1
MAX_MINIMUM_COUNT = 5
GAS_CORRELATION = 0.98
POWER_SEED = 42


# ----------------------------------------------------------------------------- errors


class MissingDataError(FileNotFoundError):
    """A data folder or file that is not where the published layout puts it."""


class MissingDependencyError(ImportError):
    """An optional package (pandas, h5py) that reading a set needs is not installed."""


class PickleRefusedError(PermissionError):
    """A pickle that was not loaded because loading it was not explicitly allowed."""


def _layout() -> str:
    return ", ".join(path for paths in MAF_FILES.values() for path in paths)


def _required_files(name: str, root: str | Path) -> list[Path]:
    """The paths of ``name``'s files under ``root``; :class:`MissingDataError` for any missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingDataError(
            f"the tabular data folder {root} does not exist (or is not a folder). It should hold "
            f"the preprocessed MAF files (Papamakarios et al. 2017) in their published layout: "
            f"{_layout()}"
        )
    paths = [root / relative for relative in MAF_FILES[name]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise MissingDataError(
            f"{name.upper()} needs {', '.join(str(p) for p in paths)}; not found: {', '.join(missing)}. "
            f"The folder {root} should hold the preprocessed MAF files in their published layout: "
            f"{_layout()}"
        )
    return paths


def _optional_import(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{purpose} needs the optional package {module}, which is not installed: pip install {module}"
        ) from None


# ----------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TabularSplits:
    """Training, validation and test rows of one tabular set, ``(N, d)`` float64 each.

    :param dequantization: for sets whose columns are recorded on a grid and dequantised
        afresh for every training batch (see ``tabular_bundled.py``): the width of the
        uniform noise added to each training column, in the units of ``train``; ``None``
        when the training rows are used as they are (the MAF sets).
    :param notes: what the preprocessing did (columns dropped, statistics used...), for the
        record of a run.
    """

    name: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    dequantization: np.ndarray | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dims = {part.shape[1] for part in (self.train, self.validation, self.test)}
        if len(dims) != 1 or any(part.ndim != 2 for part in (self.train, self.validation, self.test)):
            raise ValueError(
                f"{self.name}: the splits must be 2-D with one number of columns, got "
                f"{self.train.shape}, {self.validation.shape}, {self.test.shape}"
            )

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.validation), len(self.test)


def size_differences(splits: TabularSplits) -> list[str]:
    """How a loaded MAF set's ``(train, validation, test, d)`` differ from the published ones
    (empty when they agree, or when the set is not one of the five)."""
    published = PUBLISHED_SIZES.get(splits.name)
    if published is None:
        return []
    found = (*splits.sizes, splits.dim)
    names = ("train", "validation", "test", "d")
    return [f"{n}: {f} (published {p})" for n, f, p in zip(names, found, published, strict=True) if f != p]


# ----------------------------------------------------------------------------- steps


def split_tail(data: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(head, tail)`` with the last ``int(fraction * N)`` rows in ``tail``.

    >>> head, tail = split_tail(np.arange(25).reshape(25, 1), 0.1)
    >>> head.shape, tail[:, 0].tolist()
    ((23, 1), [23, 24])
    """
    count = int(fraction * data.shape[0])
    return data[: data.shape[0] - count], data[data.shape[0] - count :]


def _maf_split(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10% test at the end, then 10% of the rest as validation at its end."""
    rest, test = split_tail(data, TEST_FRACTION)
    train, validation = split_tail(rest, VALIDATION_FRACTION)
    return train, validation, test


def standardise(
    parts: Sequence[np.ndarray], reference: np.ndarray, ddof: int
) -> tuple[list[np.ndarray], dict[str, list[float]]]:
    r"""Every part mapped by :math:`x \mapsto (x - \mu) / \sigma`, with the column means
    :math:`\mu` and standard deviations :math:`\sigma` (``ddof``) of ``reference``; also
    the statistics. A constant reference column is refused (its :math:`\sigma` is 0)."""
    mean = reference.mean(axis=0)
    std = reference.std(axis=0, ddof=ddof)
    if np.any(std == 0):
        raise ValueError(f"columns {np.flatnonzero(std == 0).tolist()} are constant: cannot standardise")
    return [(part - mean) / std for part in parts], {"mean": mean.tolist(), "std": std.tolist()}


def repeated_minimum_features(data: np.ndarray, max_count: int = MAX_MINIMUM_COUNT) -> list[int]:
    """Columns whose smallest value occurs more than ``max_count`` times.

    This is the published MAF rule for features "with too many repeated values": it counts
    the repetitions of the *minimum*, which flags discrete features and features with a
    floor (such as many exact zeros), not continuous features with a repeated interior value.

    >>> repeated_minimum_features(np.array([[0.0, 1], [0, 2], [0, 2], [1, 2]]), max_count=2)
    [0]
    """
    smallest = data.min(axis=0)
    counts = (data == smallest).sum(axis=0)
    return np.flatnonzero(counts > max_count).tolist()


def correlated_columns(data: np.ndarray, threshold: float = GAS_CORRELATION) -> list[int]:
    r"""Columns to drop so that no two remaining ones have a correlation above ``threshold``.

    Repeatedly, the first column with a Pearson correlation :math:`> \text{threshold}` with
    another remaining column is dropped and the correlations recomputed. Returns the indices
    (into ``data``) in the order they were dropped.

    >>> x = np.random.default_rng(0).normal(size=(100, 2))
    >>> correlated_columns(np.column_stack([x[:, 0], x[:, 0] + 1e-3 * x[:, 1], x[:, 1]]))
    [0]
    """
    kept = list(range(data.shape[1]))
    dropped = []
    while len(kept) > 1:
        above = np.corrcoef(data[:, kept], rowvar=False) > threshold
        redundant = np.flatnonzero(above.sum(axis=1) > 1)  # the diagonal counts once
        if redundant.size == 0:
            break
        dropped.append(kept.pop(int(redundant[0])))
    return dropped


def _drop_columns(parts: Sequence[np.ndarray], columns: Sequence[int]) -> list[np.ndarray]:
    return [np.delete(part, list(columns), axis=1) for part in parts]


def _as_matrix(array: np.ndarray, path: Path, columns: int | None = None) -> np.ndarray:
    if array.ndim != 2 or (columns is not None and array.shape[1] != columns):
        expected = f"(N, {columns})" if columns is not None else "2-D"
        raise ValueError(f"{path} holds an array of shape {array.shape}; expected {expected}")
    return np.asarray(array, dtype=np.float64)


def _read_npy(path: Path, columns: int | None = None) -> np.ndarray:
    return _as_matrix(np.load(path, allow_pickle=False), path, columns)


def _read_csv(path: Path) -> np.ndarray:
    """A numeric CSV file after its header line, as ``(N, k)``; empty trailing fields (a
    delimiter at the end of each row) are ignored."""
    with path.open() as file:
        file.readline()
        first = file.readline()
    fields = first.rstrip("\r\n").split(",")
    while fields and not fields[-1].strip():
        fields.pop()
    if not fields:
        raise ValueError(f"{path} has no data rows after its header line")
    values = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(len(fields)), ndmin=2)
    return _as_matrix(values, path)


# ----------------------------------------------------------------------------- loaders


def load_power(root: str | Path) -> TabularSplits:
    """POWER (``d = 6``), as the module docstring describes."""
    (path,) = _required_files("power", root)
    data = _read_npy(path, columns=8)
    rng = np.random.RandomState(POWER_SEED)
    rng.shuffle(data)
    n = data.shape[0]
    data = data[:, [0, 2, 4, 5, 6, 7]]  # drop global reactive power (1) and global intensity (3)
    voltage = 0.01 * rng.rand(n, 1)
    active_power = 0.001 * rng.rand(n, 1)
    sub_metering = rng.rand(n, 3)
    data = data + np.hstack([active_power, voltage, sub_metering, np.zeros((n, 1))])
    train, validation, test = _maf_split(data)
    parts, stats = standardise([train, validation, test], np.vstack([train, validation]), ddof=0)
    notes = {
        "columns": [
            "global active power",
            "voltage",
            "sub-metering 1",
            "sub-metering 2",
            "sub-metering 3",
            "time",
        ],
        "dropped": ["global reactive power", "global intensity"],
        "noise": "U(0, 0.001), U(0, 0.01), U(0, 1) x 3, none (time)",
        "standardised_by": "training and validation rows (ddof=0)",
        **stats,
    }
    return TabularSplits("power", *parts, notes=notes)


def load_gas(root: str | Path, allow_pickle: bool = False) -> TabularSplits:
    """GAS (``d = 8``), as the module docstring describes.

    :param allow_pickle: the file is a pandas pickle, and unpickling runs any code it holds;
        without ``True`` it is refused (:class:`PickleRefusedError`) and nothing is read.
    """
    (path,) = _required_files("gas", root)
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} is a pickle (a pandas DataFrame): loading a pickle runs whatever code it "
            "holds. It was not opened. Pass allow_pickle=True (--allow-pickle) only if the file "
            "comes from a source you trust, such as the published MAF data release"
        )
    pandas = _optional_import("pandas", f"reading GAS ({path}, a pandas pickle)")
    frame = pandas.read_pickle(path)
    if not isinstance(frame, pandas.DataFrame):
        raise ValueError(f"{path} holds a {type(frame).__name__}; expected a pandas DataFrame")
    missing = [name for name in ("Time", "Meth", "Eth") if name not in frame.columns]
    if missing:
        raise ValueError(f"{path}: the DataFrame lacks the columns {missing} of the published file")
    frame = frame.drop(columns=["Time", "Meth", "Eth"])
    names = [str(name) for name in frame.columns]
    data = _as_matrix(frame.to_numpy(dtype=np.float64), path)
    dropped = correlated_columns(data)
    (data,) = _drop_columns([data], dropped)
    (data,), stats = standardise([data], data, ddof=1)
    train, validation, test = _maf_split(data)
    notes = {
        "dropped": ["Time", "Meth", "Eth", *[names[i] for i in dropped]],
        "columns": [name for i, name in enumerate(names) if i not in dropped],
        "standardised_by": "all rows, test included (ddof=1), as published",
        **stats,
    }
    return TabularSplits("gas", train, validation, test, notes=notes)


def load_hepmass(root: str | Path) -> TabularSplits:
    """HEPMASS (``d = 21``), as the module docstring describes."""
    train_path, test_path = _required_files("hepmass", root)
    train, test = _read_csv(train_path), _read_csv(test_path)
    train = train[train[:, 0] == 1, 1:]
    test = test[test[:, 0] == 1, 1:]
    if test.shape[1] < train.shape[1]:
        raise ValueError(
            f"{test_path} has {test.shape[1]} feature columns, fewer than the "
            f"{train.shape[1]} of {train_path}"
        )
    cut = test.shape[1] - train.shape[1]
    test = test[:, : train.shape[1]]
    (train, test), stats = standardise([train, test], train, ddof=1)
    dropped = repeated_minimum_features(train)
    train, test = _drop_columns([train, test], dropped)
    train, validation = split_tail(train, VALIDATION_FRACTION)
    notes = {
        "kept": "positive class (label 1)",
        "test_columns_cut": cut,
        "dropped_features": dropped,
        "standardised_by": "positive training rows, validation included (ddof=1)",
        **stats,
    }
    return TabularSplits("hepmass", train, validation, test, notes=notes)


def load_miniboone(root: str | Path) -> TabularSplits:
    """MINIBOONE (``d = 43``), as the module docstring describes."""
    (path,) = _required_files("miniboone", root)
    data = _read_npy(path)
    outliers = data[:, 0] < -100
    data = data[~outliers]
    dropped = repeated_minimum_features(data)
    (data,) = _drop_columns([data], dropped)
    train, validation, test = _maf_split(data)
    parts, stats = standardise([train, validation, test], np.vstack([train, validation]), ddof=0)
    notes = {
        "outlier_rows_removed": int(outliers.sum()),
        "dropped_features": dropped,
        "standardised_by": "training and validation rows (ddof=0)",
        **stats,
    }
    return TabularSplits("miniboone", *parts, notes=notes)


def load_bsds300(root: str | Path) -> TabularSplits:
    """BSDS300 (``d = 63``), the three datasets of the HDF5 file as given."""
    (path,) = _required_files("bsds300", root)
    h5py = _optional_import("h5py", f"reading BSDS300 ({path}, an HDF5 file)")
    with h5py.File(path, "r") as file:
        missing = [name for name in ("train", "validation", "test") if name not in file]
        if missing:
            raise ValueError(f"{path} lacks the datasets {missing}; expected train, validation, test")
        parts = [_as_matrix(np.asarray(file[name]), path) for name in ("train", "validation", "test")]
    return TabularSplits("bsds300", *parts, notes={"standardised_by": "none: used as given"})


MAF_DATASETS: dict[str, Callable[..., TabularSplits]] = {
    "power": load_power,
    "gas": load_gas,
    "hepmass": load_hepmass,
    "miniboone": load_miniboone,
    "bsds300": load_bsds300,
}
"""Name -> loader ``(root)`` (GAS also takes ``allow_pickle``)."""


def load_maf(name: str, root: str | Path, allow_pickle: bool = False) -> TabularSplits:
    """The MAF set ``name`` (``power``, ``gas``, ``hepmass``, ``miniboone``, ``bsds300``) from
    the folder ``root``; ``allow_pickle`` is passed to :func:`load_gas` only."""
    if name not in MAF_DATASETS:
        raise ValueError(f"unknown MAF data set {name!r}; one of {sorted(MAF_DATASETS)}")
    if name == "gas":
        return load_gas(root, allow_pickle=allow_pickle)
    return MAF_DATASETS[name](root)
