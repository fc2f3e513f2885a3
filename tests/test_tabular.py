"""The tabular density experiment: the MAF loaders on small synthetic files of the published
formats, the bundled scikit-learn sets, the early-stopping trainer (resume is bit-identical)
and a quick run of ``experiments/tabular.py``."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import tabular, tabular_bundled, tabular_data, tabular_models, tabular_train
from experiments.tabular_data import MissingDataError, MissingDependencyError, PickleRefusedError

# ------------------------------------------------------------------ synthetic files


def write_power(root: Path, rows: int = 200) -> np.ndarray:
    rng = np.random.default_rng(1)
    data = np.column_stack(
        [
            rng.gamma(2.0, 1.0, rows).round(3),  # global active power
            np.where(rng.random(rows) < 0.3, 0.0, rng.random(rows)).round(3),  # reactive: many zeros
            (240 + rng.normal(0, 3, rows)).round(2),  # voltage
            rng.gamma(2.0, 4.0, rows).round(1),  # global intensity
            rng.integers(0, 3, (rows, 3)).astype(float),  # sub-meterings (integers)
            rng.integers(0, 1440, rows).astype(float),  # minute of the day
        ]
    )
    (root / "power").mkdir(parents=True)
    np.save(root / "power" / "data.npy", data)
    return data


def write_hepmass(root: Path, rows: int = 300, trailing_comma: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)

    def table(n: int, extra: bool) -> np.ndarray:
        label = rng.integers(0, 2, n).astype(float)
        f0, f1, mass = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
        discrete = rng.integers(0, 3, n).astype(float)  # its minimum repeats: dropped
        columns = [label, f0, discrete, f1, mass] + ([rng.normal(size=n)] if extra else [])
        return np.column_stack(columns)

    train, test = table(rows, extra=False), table(rows // 2, extra=True)
    (root / "hepmass").mkdir(parents=True)
    ending = "," if trailing_comma else ""
    for name, values, header in (
        ("1000_train.csv", train, "# label,f0,f1,f2,mass"),
        ("1000_test.csv", test, "# label,f0,f1,f2,mass"),
    ):
        lines = [header] + [",".join(f"{v:.6f}" for v in row) + ending for row in values]
        (root / "hepmass" / name).write_text("\n".join(lines) + "\n")
    return train, test


def write_miniboone(root: Path, rows: int = 250) -> np.ndarray:
    rng = np.random.default_rng(3)
    data = rng.normal(size=(rows, 6))
    data[:, 4] = np.maximum(data[:, 4], 0.0)  # a floor at 0 repeated: dropped
    data[7, 0] = -999.0  # an outlier marker row: removed
    (root / "miniboone").mkdir(parents=True)
    np.save(root / "miniboone" / "data.npy", data)
    return data


def write_gas(root: Path, rows: int = 300) -> None:
    pandas = pytest.importorskip("pandas")
    rng = np.random.default_rng(4)
    base = rng.normal(size=(rows, 4))
    frame = pandas.DataFrame(
        {
            "Time": np.arange(rows, dtype=float),
            "Meth": rng.random(rows),
            "Eth": rng.random(rows),
            "s1": base[:, 0],
            "s2": base[:, 0] + 1e-3 * base[:, 1],
            "s3": base[:, 1],
            "s4": base[:, 2],
            "s5": base[:, 3],
        }
    )
    (root / "gas").mkdir(parents=True)
    frame.to_pickle(root / "gas" / "ethylene_CO.pickle")


# ------------------------------------------------------------------ MAF loaders


def test_power_shuffles_drops_two_columns_adds_noise_and_standardises(tmp_path):
    data = write_power(tmp_path)
    splits = tabular_data.load_power(tmp_path)
    assert splits.dim == 6 and splits.sizes == (162, 18, 20)
    both = np.vstack([splits.train, splits.validation])
    np.testing.assert_allclose(both.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(both.std(0), 1, atol=1e-12)
    mean, std = np.array(splits.notes["mean"]), np.array(splits.notes["std"])
    raw = np.vstack([splits.train, splits.validation, splits.test]) * std + mean
    order = np.random.RandomState(42).permutation(len(data))
    np.testing.assert_allclose(raw[:, 5], data[order, 7], atol=1e-9)  # time: no noise
    noise = raw[:, :5] - data[order][:, [0, 2, 4, 5, 6]]
    assert np.all(noise >= 0) and np.all(noise < [0.001, 0.01, 1, 1, 1]) and np.all(noise.max(0) > 0)
    again = tabular_data.load_power(tmp_path)
    assert np.array_equal(again.test, splits.test)


def test_power_with_the_wrong_number_of_columns_is_refused(tmp_path):
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.zeros((10, 7)))
    with pytest.raises(ValueError, match=r"shape \(10, 7\); expected \(N, 8\)"):
        tabular_data.load_power(tmp_path)


@pytest.mark.parametrize("trailing_comma", [False, True])
def test_hepmass_keeps_the_signal_drops_discrete_features_and_aligns_the_test_file(tmp_path, trailing_comma):
    train, test = write_hepmass(tmp_path, trailing_comma=trailing_comma)
    splits = tabular_data.load_hepmass(tmp_path)
    positives = int((train[:, 0] == 1).sum())
    assert splits.dim == 3 and splits.notes["dropped_features"] == [1]
    assert splits.notes["test_columns_cut"] == 1
    assert len(splits.validation) == int(0.1 * positives)
    assert len(splits.train) + len(splits.validation) == positives
    assert len(splits.test) == int((test[:, 0] == 1).sum())
    both = np.vstack([splits.train, splits.validation])
    np.testing.assert_allclose(both.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(both.std(0, ddof=1), 1, atol=1e-9)
    mean, std = np.array(splits.notes["mean"]), np.array(splits.notes["std"])
    expected = test[test[:, 0] == 1][:, [1, 3, 4]]
    np.testing.assert_allclose(splits.test * std[[0, 2, 3]] + mean[[0, 2, 3]], expected, atol=1e-6)


def test_miniboone_removes_outlier_rows_and_repeated_minimum_features(tmp_path):
    write_miniboone(tmp_path)
    splits = tabular_data.load_miniboone(tmp_path)
    assert splits.notes["outlier_rows_removed"] == 1 and splits.notes["dropped_features"] == [4]
    assert splits.dim == 5 and splits.sizes == (203, 22, 24)  # 249 rows: 24 test, 22 validation


def test_gas_drops_the_label_columns_and_one_of_each_correlated_pair(tmp_path):
    write_gas(tmp_path)
    splits = tabular_data.load_gas(tmp_path, allow_pickle=True)
    assert splits.notes["dropped"] == ["Time", "Meth", "Eth", "s1"]
    assert splits.notes["columns"] == ["s2", "s3", "s4", "s5"]
    every = np.vstack([splits.train, splits.validation, splits.test])
    np.testing.assert_allclose(every.mean(0), 0, atol=1e-12)  # all rows, as published
    assert splits.sizes == (243, 27, 30)
    assert tabular_data.load_maf("gas", tmp_path, allow_pickle=True).dim == 4


class _Touch:
    """A pickle that creates a file when it is loaded (as any code could run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_the_gas_pickle_is_not_opened_without_allow_pickle(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(PickleRefusedError, match="runs whatever code it holds.*allow_pickle=True"):
        tabular_data.load_gas(tmp_path)
    with pytest.raises(PickleRefusedError):
        tabular_data.load_maf("gas", tmp_path)
    assert not marker.exists()


def test_bsds300_is_read_as_given(tmp_path):
    h5py = pytest.importorskip("h5py")
    (tmp_path / "BSDS300").mkdir()
    parts = {
        name: np.random.default_rng(5).normal(size=(n, 63))
        for name, n in (("train", 40), ("validation", 10), ("test", 20))
    }
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as file:
        for name, values in parts.items():
            file.create_dataset(name, data=values)
    splits = tabular_data.load_bsds300(tmp_path)
    assert np.array_equal(splits.validation, parts["validation"]) and splits.dim == 63


def test_bsds300_without_its_datasets_is_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as file:
        file.create_dataset("train", data=np.zeros((3, 63)))
    with pytest.raises(ValueError, match=r"lacks the datasets \['validation', 'test'\]"):
        tabular_data.load_bsds300(tmp_path)


@pytest.mark.parametrize(
    "module, name, kwargs", [("h5py", "bsds300", {}), ("pandas", "gas", {"allow_pickle": True})]
)
def test_a_missing_optional_package_is_named(tmp_path, monkeypatch, module, name, kwargs):
    (path,) = [tmp_path / relative for relative in tabular_data.MAF_FILES[name]]
    path.parent.mkdir()
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    message = f"needs the optional package {module}.*pip install {module}"
    with pytest.raises(MissingDependencyError, match=message):
        tabular_data.load_maf(name, tmp_path, **kwargs)


def test_a_missing_folder_or_file_names_what_is_expected(tmp_path):
    with pytest.raises(MissingDataError, match="does not exist.*power/data.npy, gas/ethylene_CO.pickle"):
        tabular_data.load_maf("power", tmp_path / "nowhere")
    (tmp_path / "hepmass").mkdir()
    (tmp_path / "hepmass" / "1000_train.csv").write_text("# label,f0\n1,0.5\n")
    with pytest.raises(MissingDataError, match=f"not found: {tmp_path / 'hepmass' / '1000_test.csv'}"):
        tabular_data.load_hepmass(tmp_path)
    with pytest.raises(ValueError, match="unknown MAF data set"):
        tabular_data.load_maf("mnist", tmp_path)


def test_correlated_columns_are_dropped_until_none_is_left():
    x = np.random.default_rng(6).normal(size=(200, 2))
    data = np.column_stack([x[:, 0], x[:, 0] + 1e-3 * x[:, 1], x[:, 0] - 1e-3 * x[:, 1], x[:, 1]])
    assert tabular_data.correlated_columns(data) == [0, 1]


def test_size_differences_name_the_published_sizes():
    splits = tabular_data.TabularSplits("miniboone", np.zeros((5, 43)), np.zeros((2, 43)), np.zeros((3, 43)))
    assert tabular_data.size_differences(splits) == [
        "train: 5 (published 29556)",
        "validation: 2 (published 3284)",
        "test: 3 (published 3648)",
    ]


# ------------------------------------------------------------------ bundled sets


@pytest.mark.parametrize(
    "name, dim, dequantised", [("breast_cancer", 24, False), ("wine", 13, True), ("digits", 64, True)]
)
def test_bundled_sets_are_split_dequantised_and_standardised(name, dim, dequantised):
    splits = tabular_bundled.load_bundled(name, seed=0)
    assert splits.dim == dim and (splits.dequantization is not None) == dequantised
    width = 0 if splits.dequantization is None else splits.dequantization
    np.testing.assert_allclose(splits.train.mean(0) + width / 2, 0, atol=1e-9)
    np.testing.assert_allclose(splits.train.var(0) + width**2 / 12, 1, atol=1e-9)
    assert sum(splits.sizes) == {"breast_cancer": 569, "wine": 178, "digits": 1797}[name]
    assert np.array_equal(tabular_bundled.load_bundled(name, seed=0).test, splits.test)


def test_digits_test_pixels_are_dequantised_within_their_unit_cells():
    splits = tabular_bundled.load_bundled("digits", seed=0)
    raw = splits.test * splits.dequantization  # in pixel units, up to the shift
    offsets = raw - np.floor(raw)
    assert 0.45 < offsets.mean() < 0.55 and len(np.unique(offsets.round(6))) > 1000


# ------------------------------------------------------------------ trainer


def _small_problem(batch: int = 128):
    torch.manual_seed(0)
    x = torch.randn(300, 3, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0], [0, 1, 0.3], [0, 0, 0.5]], dtype=torch.float64
    )
    data = tabular_train.TensorSplits(x[:200], x[200:250], x[250:])
    settings = tabular_train.TrainSettings(batch_size=batch, lr=5e-3, max_steps=20, eval_every=5, patience=50)
    return data, settings


def _cpflow(seed: int = 3):
    torch.manual_seed(seed)
    module = tabular_models.build_cpflow(3, 2, 8).double()  # batch 128, d = 3: stochastic log-det
    return module, tabular_models.density(module, 3)


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    data, settings = _small_problem()
    module, model = _cpflow()
    whole = tabular_train.fit(
        module, model, data, settings, seed=1, checkpoint=tmp_path / "a.pt", show_progress=False
    )

    def kill(step: int) -> None:
        if step == 10:
            raise KeyboardInterrupt

    module, model = _cpflow()
    with pytest.raises(KeyboardInterrupt):
        tabular_train.fit(
            module,
            model,
            data,
            settings,
            seed=1,
            checkpoint=tmp_path / "b.pt",
            show_progress=False,
            callback=kill,
        )
    module, model = _cpflow()
    resumed = tabular_train.fit(
        module, model, data, settings, seed=1, checkpoint=tmp_path / "b.pt", resume=True, show_progress=False
    )
    for key in ("test_loglik", "validation_loglik", "validation_curve", "train_loss_curve", "best_step"):
        assert resumed[key] == whole[key], key
    calls = []
    again = tabular_train.fit(
        *_cpflow(),
        data,
        settings,
        seed=1,
        checkpoint=tmp_path / "b.pt",
        resume=True,
        show_progress=False,
        callback=calls.append,
    )
    assert again == resumed and not calls  # a finished checkpoint is not trained again


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    data, settings = _small_problem(batch=16)
    tabular_train.fit(*_cpflow(), data, settings, seed=1, checkpoint=tmp_path / "c.pt", show_progress=False)
    other = tabular_train.TrainSettings(**{**settings.__dict__, "lr": 1e-2})
    with pytest.raises(RuntimeError, match=r"other settings \(lr\)"):
        tabular_train.fit(
            *_cpflow(), data, other, seed=1, checkpoint=tmp_path / "c.pt", resume=True, show_progress=False
        )


def test_training_stops_after_patience_evaluations_without_improvement():
    data, settings = _small_problem(batch=16)
    frozen = tabular_train.TrainSettings(**{**settings.__dict__, "lr": 0.0, "patience": 2})
    result = tabular_train.fit(*_cpflow(), data, frozen, seed=1, show_progress=False)
    assert result["steps"] == 15 and result["best_step"] == 5
    assert result["stop_reason"].startswith("early stopping")
    assert np.isfinite(result["test_loglik"]) and result["test_loglik_2se"] > 0


# ------------------------------------------------------------------ the script


def test_matched_baselines_are_within_five_percent_of_the_cpflow():
    target = tabular_models.count_parameters(tabular_models.build_cpflow(13, 4, 64))
    for name, layers in (("MAF", 5), ("NSF", 3)):
        depth, width = tabular_models.matched_baseline(name, 13, layers, target)
        size = tabular_models.count_parameters(tabular_models.BASELINES[name](13, depth, width))
        assert abs(size - target) < 0.05 * target


def test_quick_run_reports_every_model_and_writes_nothing(tmp_path):
    out = tmp_path / "tabular.json"
    record = tabular.main(
        [
            "--quick",
            "--no-progress",
            "--datasets",
            "wine",
            "--models",
            "CP-Flow",
            "MAF",
            "--run-dir",
            str(tmp_path / "run"),
            "--out",
            str(out),
        ]
    )
    entry = record["datasets"]["wine"]
    assert entry["dim"] == 13 and set(entry["models"]) == {"CP-Flow", "MAF"}
    for row in entry["models"].values():
        assert np.isfinite(row["test_loglik"]) and row["test_loglik_2se"] > 0 and row["steps"] == 30
    assert np.isfinite(entry["gaussian"]["test_loglik"]) and not out.exists()
    text = tabular.section(record)
    assert "| wine (d = 13, test 35) |" in text and "| data set | CP-Flow − MAF |" in text
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["wine-cpflow.pt", "wine-maf.pt"]
    with pytest.raises(SystemExit):  # the checkpoints are not started over silently
        tabular.main(
            [
                "--quick",
                "--no-progress",
                "--datasets",
                "wine",
                "--models",
                "MAF",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
    resumed = tabular.main(
        [
            "--quick",
            "--no-progress",
            "--datasets",
            "wine",
            "--models",
            "MAF",
            "--resume",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert resumed["datasets"]["wine"]["models"]["MAF"] == entry["models"]["MAF"]


def test_quick_run_on_a_maf_folder(tmp_path):
    write_miniboone(tmp_path / "maf")
    record = tabular.main(
        [
            "--quick",
            "--no-progress",
            "--datasets",
            "miniboone",
            "--models",
            "MAF",
            "--maf-root",
            str(tmp_path / "maf"),
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    entry = record["datasets"]["miniboone"]
    assert entry["dim"] == 5 and entry["size_differences_from_published"][0].startswith("train: 203")


def test_the_script_names_missing_files_and_refuses_to_overwrite(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tabular.parse_args(["--datasets", "power"])
    assert "need --maf-root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tabular.main(
            [
                "--quick",
                "--no-progress",
                "--datasets",
                "power",
                "--maf-root",
                str(tmp_path),
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
    assert f"not found: {tmp_path / 'power' / 'data.npy'}" in capsys.readouterr().err
    out = tmp_path / "done.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        tabular.parse_args(["--out", str(out)])
    assert tabular.parse_args(["--out", str(out), "--overwrite"])[1].overwrite
