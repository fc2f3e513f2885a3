"""experiments/image_density.py: the quick run, overwrite refusal, a bit-identical resume, the data."""

import numpy as np
import pytest
import torch

from experiments import image_density
from pyro_cpflow import load_checkpoint


def test_quick_run_trains_evaluates_and_samples_both_models(tmp_path):
    results = image_density.main(["--quick", "--no-progress", "--run-dir", str(tmp_path)])
    for name, row in results["models"].items():
        assert row["steps"] == 20 and 0 < row["test_bits_per_dim"] < 8
        assert (tmp_path / name / "checkpoint.pt").is_file() and (tmp_path / name / "samples.png").is_file()
    check = results["models"]["cpflow"]["exact_check"]
    assert abs(check["mean_difference"]) < 0.05  # one-probe stochastic log-det against the exact one
    assert results["models"]["cpflow"]["samples_converged"]
    text = image_density.section(results, equal_time=results)  # the RESULTS.md section renders
    assert "| CP-Flow (conv ICNN) |" in text and "| affine coupling, 20 steps |" in text


def test_a_finished_run_is_never_overwritten(tmp_path):
    out = tmp_path / "image_density.json"
    out.write_text("{}")
    with pytest.raises(SystemExit):
        image_density.parse_args(["--out", str(out), "--run-dir", str(tmp_path / "run")])
    args = image_density.parse_args(["--out", str(out), "--overwrite", "--run-dir", str(tmp_path / "r")])
    assert args.overwrite
    (tmp_path / "run" / "cpflow").mkdir(parents=True)
    (tmp_path / "run" / "cpflow" / "checkpoint.pt").write_text("")
    with pytest.raises(SystemExit):  # a folder with a run in it needs --resume or --overwrite
        image_density.parse_args(["--quick", "--run-dir", str(tmp_path / "run")])


class _Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_identical(tmp_path, monkeypatch):
    common = ["--quick", "--no-progress", "--models", "cpflow"]
    image_density.main([*common, "--run-dir", str(tmp_path / "whole")])
    save = image_density.Run.save

    def save_then_die(run):
        save(run)
        raise _Killed

    monkeypatch.setattr(image_density.Run, "save", save_then_die)
    with pytest.raises(_Killed):  # killed right after the checkpoint of step 10
        image_density.main([*common, "--run-dir", str(tmp_path / "killed")])
    monkeypatch.setattr(image_density.Run, "save", save)
    assert load_checkpoint(tmp_path / "killed" / "cpflow" / "checkpoint.pt")["step"] == 10
    image_density.main([*common, "--run-dir", str(tmp_path / "killed"), "--resume"])
    whole = load_checkpoint(tmp_path / "whole" / "cpflow" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "killed" / "cpflow" / "checkpoint.pt")
    assert resumed["step"] == 20 and resumed["losses"] == whole["losses"]
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_downsampling_rounds_patch_means_to_levels():
    images = np.array([[[0, 1, 255, 255], [2, 1, 255, 254], [9, 9, 0, 0], [9, 9, 0, 3]]], dtype=np.uint8)
    assert image_density.downsample(images, 2).tolist() == [[[[1, 255], [9, 1]]]]


def test_cifar10_without_data_says_what_to_provide(tmp_path):
    with pytest.raises(FileNotFoundError, match="not bundled"):
        image_density.load_cifar10(None)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        image_density.load_cifar10(tmp_path)
