r"""Real tabular data that ships inside scikit-learn (no download), prepared like the MAF sets.

Stand-ins for the five sets of Papamakarios et al. (arXiv:1705.07057), whose files are not
available here (see ``tabular_data.py``). Each set is shuffled by
``numpy.random.RandomState(seed)``, 20% of the rows are the test set and 20% of the rest
the validation set (more than MAF's 10%: these sets have hundreds of rows, not millions).

* ``breast_cancer``: the Wisconsin diagnostic breast cancer features (569 rows, 30 columns,
  recorded to about four significant digits). Features whose smallest value occurs more than
  5 times among the training rows are dropped, the MAF rule for "too many repeated values"
  (:func:`tabular_data.repeated_minimum_features`): with the default seed, the six
  concavity and concave-points columns, which are exactly 0 for 13 of the 569 cells, a point
  mass that no density can score. The rest is used as continuous. ``d = 24``.
* ``wine``: 13 chemical measurements of 178 wines, each column recorded on a decimal grid
  (integers for magnesium and proline, two decimals for most). Dequantised (below) at each
  column's grid. ``d = 13``.
* ``digits``: 8x8 images of handwritten digits (1797 rows, 64 pixels with integer values
  0..16). Dequantised with width 1. Three pixels are 0 in every image; dequantised they are
  ``U(0, 1)``. ``d = 64``.

**Dequantisation** (Theis, van den Oord & Bethge 2016, arXiv:1511.01844). A column recorded
on a grid of spacing :math:`\delta_j` has no density; :math:`y = x + \delta \odot u`,
:math:`u \sim U(0, 1)^d`, has one, and for any density :math:`p` on :math:`y`,

.. math::

    \log P(x) \ge \mathbb E_u \log p(x + \delta \odot u) + \textstyle\sum_j \log \delta_j ,

so maximising the dequantised likelihood maximises a bound on the likelihood of the
recorded values. Every training batch draws fresh noise (the ``dequantization`` widths of
:class:`~tabular_data.TabularSplits`); the validation and test rows are dequantised once,
by ``RandomState(seed + 1)``, so every model is scored on the same points. The grid of a
column is :func:`grid_resolution`: the coarsest :math:`10^{-k}` that holds at least 99% of
its values (wine has one value with more digits than the rest of its column; it is
dequantised with the same width).

**Standardisation** by the training split's statistics: the mean and standard deviation of
the *dequantised* training distribution, exactly (:math:`\bar x_j + \delta_j/2` and
:math:`(s_j^2 + \delta_j^2/12)^{1/2}`, ``ddof=0``), so no noise draw enters them.
Log-likelihoods are those of the standardised data, the MAF convention; those of the data in
their recorded units are lower by :math:`\sum_j \log \sigma_j` (``notes["log_scale"]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.tabular_data import TabularSplits, repeated_minimum_features, split_tail

__all__ = ["BUNDLED_DATASETS", "grid_resolution", "load_bundled"]

TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
GRID_COVERAGE = 0.99


def grid_resolution(column: np.ndarray, coverage: float = GRID_COVERAGE, max_decimals: int = 6) -> float:
    """The coarsest spacing :math:`10^{-k}` (``k = 0..max_decimals``) on whose grid at least
    ``coverage`` of the values lie; 0 when there is none (a continuous column).

    >>> grid_resolution(np.array([1.25, 2.5, 3.75])), grid_resolution(np.array([70.0, 162.0]))
    (0.01, 1.0)
    >>> grid_resolution(np.random.default_rng(0).normal(size=50))
    0.0
    """
    for k in range(max_decimals + 1):
        scaled = column * 10.0**k
        on_grid = np.abs(scaled - np.round(scaled)) <= 1e-6 * np.maximum(1.0, np.abs(scaled))
        if on_grid.mean() >= coverage:
            return 10.0**-k
    return 0.0


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn import datasets

        return np.asarray(getattr(datasets, f"load_{name}")().data, dtype=np.float64)

    return load


BUNDLED_DATASETS: dict[str, dict[str, Any]] = {
    "breast_cancer": {"load": _sklearn("breast_cancer"), "drop_repeated_minimum": True, "grid": "none"},
    "wine": {"load": _sklearn("wine"), "drop_repeated_minimum": False, "grid": "detect"},
    "digits": {"load": _sklearn("digits"), "drop_repeated_minimum": False, "grid": "integer"},
}
"""Name -> how it is loaded and prepared (see the module docstring)."""


def load_bundled(name: str, seed: int = 0) -> TabularSplits:
    """The scikit-learn set ``name`` (one of :data:`BUNDLED_DATASETS`) prepared as the module
    docstring describes."""
    if name not in BUNDLED_DATASETS:
        raise ValueError(f"unknown bundled data set {name!r}; one of {sorted(BUNDLED_DATASETS)}")
    spec = BUNDLED_DATASETS[name]
    data = spec["load"]()
    data = data[np.random.RandomState(seed).permutation(len(data))]
    rest, test = split_tail(data, TEST_FRACTION)
    train, validation = split_tail(rest, VALIDATION_FRACTION)
    dropped = repeated_minimum_features(train) if spec["drop_repeated_minimum"] else []
    train, validation, test = (np.delete(part, dropped, axis=1) for part in (train, validation, test))
    if spec["grid"] == "integer":
        width = np.ones(train.shape[1])
    elif spec["grid"] == "detect":
        width = np.array([grid_resolution(column) for column in np.vstack([train, validation, test]).T])
    else:
        width = np.zeros(train.shape[1])
    noise = np.random.RandomState(seed + 1)
    validation = validation + width * noise.rand(*validation.shape)
    test = test + width * noise.rand(*test.shape)
    mean = train.mean(axis=0) + width / 2
    std = np.sqrt(train.var(axis=0) + width**2 / 12)
    if np.any(std == 0):
        raise ValueError(f"{name}: columns {np.flatnonzero(std == 0).tolist()} are constant")
    train, validation, test = ((part - mean) / std for part in (train, validation, test))
    notes = {
        "source": f"sklearn.datasets.load_{name}",
        "dropped_features": dropped,
        "dequantization_width": width.tolist(),
        "log_scale": float(np.log(std).sum()),
        "standardised_by": "training split, moments of its dequantised distribution (ddof=0)",
    }
    dequantization = width / std if np.any(width > 0) else None
    return TabularSplits(name, train, validation, test, dequantization=dequantization, notes=notes)
