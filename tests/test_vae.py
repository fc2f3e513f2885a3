"""The VAE experiment (python -m experiments.vae, experiments/vae/): data, posteriors, training,
checkpoint/resume after a real kill, two-process DDP, evaluation bounds.

Everything runs in float64 on tiny networks (8 latent dimensions, 4 base channels) and a
handful of batches.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pyro
import pytest
import torch

from experiments.vae import cli, report
from experiments.vae import data as vae_data
from experiments.vae.checkpoints import state_dict_equal
from experiments.vae.config import Config, ConfigError
from experiments.vae.evaluate import evaluate_bounds, importance_sampled_log_likelihood
from experiments.vae.model import VAE, Architecture, elbo_loss
from experiments.vae.posteriors import (
    POSTERIORS,
    PosteriorConfig,
    build_posterior,
    cpflow_blocks,
)
from experiments.vae.run_folder import RunExistsError
from experiments.vae.train import Trainer, run
from pyro_cpflow import CheckpointError, NonConvergenceWarning, load_checkpoint
from tests.sync_counter import HostSyncCounter
from tests.test_checkpoints import CreatesAFile

ROOT = Path(__file__).resolve().parents[1]
CLI = ["-m", "experiments.vae"]  # the command line, from the repository root
TINY = Config(
    dataset="binarized_mnist",
    flow="gaussian",
    epochs=1,
    max_batches=2,
    batch_size=20,
    warmup=2,
    early_stopping=0,
    latent_dim=8,
    feature_dim=16,
    channels=4,
    head_channels=8,
    flow_steps=2,
    flow_hidden=(16, 16),
    is_samples=4,
    test_images=20,
    valid_images=40,
    chunk=200,
    dtype="float64",
    threads=1,
    progress=False,
)
TINY_FLAGS = [
    "--latent-dim",
    "8",
    "--feature-dim",
    "16",
    "--channels",
    "4",
    "--flow-steps",
    "2",
    "--flow-hidden",
    "16,16",
    "--batch-size",
    "20",
    "--valid-images",
    "40",
    "--test-images",
    "20",
    "--is-samples",
    "4",
    "--dtype",
    "float64",
    "--threads",
    "1",
    "--no-progress",
    "--warmup",
    "2",
    "--early-stopping",
    "0",
    "--seed",
    "3",
]
TIME_FIELDS = {"epoch_seconds", "valid_seconds", "train_seconds", "eval_seconds", "wall_seconds"}


def _records(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS}
        for line in path.read_text().splitlines()
    ]


def _environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


# ----------------------------------------------------------------------------- data

SHAPES = {
    "freyfaces": ((1, 28, 20), (1565, 200, 200), "categorical", 255),
    "caltech101": ((1, 28, 28), (4100, 2264, 2307), "bernoulli", 1),
    "binarized_mnist": ((1, 28, 28), (50000, 10000, 10000), "bernoulli", 1),
    "mnist": ((1, 28, 28), (50000, 10000, 10000), "bernoulli", 255),
    "omniglot": ((1, 28, 28), (23000, 1345, 8115), "bernoulli", 255),
}


@pytest.mark.parametrize("name", vae_data.DATASETS)
def test_data_sets_load_with_standard_splits(name):
    data = vae_data.load_dataset(name)
    shape, sizes, likelihood, levels = SHAPES[name]
    assert data.image_shape == shape
    assert (len(data.train), len(data.valid), len(data.test)) == sizes
    assert (data.likelihood, data.levels) == (likelihood, levels)
    for split in (data.train, data.valid, data.test):
        assert split.dtype == torch.uint8 and int(split.max()) <= levels
    if data.dynamic_binarization:  # grey training images, binary evaluation images
        assert int(data.train.max()) > 1 and int(data.valid.max()) == 1 and int(data.test.max()) == 1
        x = data.batch(data.train[:50], torch.float64, torch.Generator().manual_seed(0), binarize=True)
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert data.units == ("bits/dim" if name == "freyfaces" else "nats")
    assert ("not directly comparable" in data.note) == (name == "omniglot")


def test_frey_faces_split_is_a_fixed_shuffle_of_all_images():
    from scipy.io import loadmat

    data = vae_data.load_dataset("freyfaces")
    raw = loadmat(vae_data.DATA_DIR / "frey_rawface.mat")["ff"].T.reshape(-1, 1, 28, 20)
    every = torch.cat([data.train, data.valid, data.test])
    assert sorted(map(bytes, every.numpy())) == sorted(map(bytes, raw))  # a permutation
    # the legacy np.random.seed(123) shuffle of the Sylvester-flows / CP-Flow code
    import numpy as np

    order = np.arange(1965)
    np.random.RandomState(123).shuffle(order)
    assert np.array_equal(every.numpy(), raw[order])
    # images are upright faces: the top rows (hair/forehead) differ from the bottom (chin)
    assert data.batch(data.train, torch.float64).mean() > 0.3


def test_caltech_silhouettes_are_dark_objects_on_zero_background():
    data = vae_data.load_dataset("caltech101")
    border = torch.cat([data.train[:, 0, 0, :], data.train[:, 0, -1, :]], 1).double().mean()
    assert border < data.train.double().mean()  # the modelled 1 - x has a 0 background


def test_mnist_files_match_the_independent_checksums_of_the_uncompressed_data():
    expected = {  # from /work/shared/data/README.md (uncompressed IDX files)
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    }
    for name, sha256 in expected.items():
        with gzip.open(vae_data.verify_file(name), "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == sha256


def test_every_recorded_checksum_matches_and_a_corrupt_file_is_refused(tmp_path):
    for name in vae_data.FILES:
        vae_data.verify_file(name)
    (tmp_path / "frey_rawface.mat").write_bytes(b"not the Frey Faces")
    with pytest.raises(vae_data.ChecksumError, match="sha256"):
        vae_data.verify_file("frey_rawface.mat", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        vae_data.verify_file("binarized_mnist.npz", tmp_path)


# ----------------------------------------------------------------------------- model


def _tiny_vae(
    flow: str,
    likelihood: str = "bernoulli",
    shape=(1, 28, 28),
    logdet="exact",
    cg_options=(),
) -> VAE:
    arch = Architecture(shape, likelihood, latent_dim=8, feature_dim=16, channels=4, head_channels=8)
    posterior = build_posterior(
        PosteriorConfig(flow, 8, 16, steps=2, hidden_dims=(16, 16), logdet=logdet, cg_options=cg_options)
    )
    return VAE(arch, posterior)


@pytest.mark.parametrize("flow", POSTERIORS)
def test_elbo_loss_is_trace_elbo_and_svi_trains_the_model_and_guide(flow):
    vae = _tiny_vae(flow)
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3))
    with torch.no_grad():
        vae.approximate_posterior(x).rsample()  # ActNorm's data-dependent initialisation
    torch.manual_seed(1)
    ours = elbo_loss(vae.model, vae.guide, x, 0.5)
    torch.manual_seed(1)
    pyros = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, 0.5)
    assert torch.allclose(ours, pyros, rtol=1e-12, atol=1e-9)
    pyro.clear_param_store()
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adamax({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    before = [p.detach().clone() for p in vae.parameters()]
    assert math.isfinite(svi.step(x, 1.0))
    assert (
        sum(not torch.equal(p, b) for p, b in zip(vae.parameters(), before, strict=True)) > len(before) // 2
    )


def test_log_weights_score_the_guides_samples_without_the_inverse_solver(monkeypatch):
    import pyro_cpflow.transforms

    def forbidden(*args, **kwargs):
        raise AssertionError("the inverse solver was called")

    monkeypatch.setattr(pyro_cpflow.transforms, "invert_gradient_map", forbidden)
    vae = _tiny_vae("cpflow", "categorical", (1, 28, 20)).eval()
    x = torch.randint(0, 256, (3, 1, 28, 20)).double() / 255
    with torch.no_grad():
        weights = vae.log_weights(x, 5)
    assert weights.shape == (5, 3) and torch.isfinite(weights).all()


@pytest.mark.parametrize("placement, count", [("between", 1), ("around", 3), ("none", 0)])
def test_cpflow_posterior_actnorm_placement(placement, count):
    from pyro_cpflow import ActNorm

    posterior = build_posterior(
        PosteriorConfig("cpflow", 8, 16, steps=2, hidden_dims=(16,), actnorm=placement)
    )
    assert sum(isinstance(m, ActNorm) for m in posterior.modules()) == count


def _device_reads_of_a_training_step(cg_options: dict) -> HostSyncCounter:
    """Device reads of the second training step of a CP-Flow VAE (stochastic log-det)."""
    vae = _tiny_vae("cpflow", logdet="stochastic", cg_options=tuple(cg_options.items()))
    optimizer = torch.optim.Adamax(vae.parameters(), lr=1e-3)
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3))
    with torch.no_grad():
        vae.approximate_posterior(x).rsample()  # ActNorm's data-dependent initialisation
    with pyro.validation_enabled(False):  # as the trainer runs, unless --validate
        for _ in range(2):
            with HostSyncCounter() as counter:
                loss = vae(x, 1.0)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()  # its step counters live on the host
    return counter


def test_cpflow_training_step_never_reads_the_device_with_the_cuda_settings():
    gpu = Config(device="cuda").cg_options()
    assert gpu["cg_check_every"] == 0 and gpu["cg_max_iter"] == 16 and gpu["on_failure"] == "ignore"
    counter = _device_reads_of_a_training_step(gpu)
    assert counter.total == 0, dict(counter.counts)
    # the control: the CPU settings test CG convergence on the host, and the counter sees it
    cpu = Config(device="cpu").cg_options()
    assert cpu["cg_check_every"] == 1 and cpu["cg_max_iter"] is None
    counter = _device_reads_of_a_training_step(cpu)
    assert counter.total >= 4 and all(
        "linalg.py" in where and "check_every" in where for _, where in counter.counts
    ), dict(counter.counts)


def test_cg_misses_are_counted_per_epoch_and_warned_about_past_a_small_share(tmp_path):
    stochastic = replace(TINY, flow="cpflow", logdet="stochastic")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonConvergenceWarning)
        converged = run(replace(stochastic, out_dir=str(tmp_path / "a")))
    advice = "epoch 1: .* raise --cg-max-iter .now 1. or use --logdet exact"
    with pytest.warns(NonConvergenceWarning, match=advice):
        starved = run(replace(stochastic, cg_max_iter=1, cg_check_every=0, out_dir=str(tmp_path / "b")))
    first = _records(tmp_path / "a" / "metrics.jsonl")[0]
    assert first["cg_unconverged"] == 0 and first["cg_iterations_max"] >= 2
    assert first["cg_solves"] == 2 * 2 * 20  # batches x blocks x images
    first = _records(tmp_path / "b" / "metrics.jsonl")[0]
    assert first["cg_unconverged"] > 0 and first["cg_iterations_max"] == 1
    assert math.isfinite(converged["test_nelbo"]) and math.isfinite(starved["test_nelbo"])
    results = json.loads((tmp_path / "b" / "results.json").read_text())  # not only in the log
    assert results["cg_warned_epochs"] == [1] and results["cg_unconverged"] == first["cg_unconverged"]
    assert results["cg_unconverged_share"] > 0.01
    assert json.loads((tmp_path / "a" / "results.json").read_text())["cg_warned_epochs"] == []


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("flow", POSTERIORS)
def test_tiny_run_of_each_posterior(flow, tmp_path):
    record = run(replace(TINY, flow=flow, out_dir=str(tmp_path)))
    assert record["epochs_trained"] == 1 and record["ranks_identical"]
    for key in ("valid_nelbo", "test_nelbo", "test_nll"):
        assert math.isfinite(record[key]) and record[key] > 0
    lines = _records(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in lines] == ["epoch", "final"]
    assert lines[0]["steps"] == 2 and lines[0]["beta"] == 0.5
    for name in ("checkpoint.pt", "results.json", "config.json", "samples.png", "reconstructions.png"):
        assert (tmp_path / name).is_file()


def test_tiny_run_on_frey_faces_reports_bits_per_dimension(tmp_path):
    config = replace(TINY, dataset="freyfaces", flow="cpflow", out_dir=str(tmp_path))
    record = run(config)
    assert record["units"] == "bits/dim"
    assert record["test_nll_bpd"] == pytest.approx(record["test_nll"] / (560 * math.log(2)))
    assert 4.0 < record["test_nelbo_bpd"] < 9.0  # below 8 bits/dim only once it has learnt


def test_is_nll_is_below_the_negative_elbo_on_a_trained_model(tmp_path):
    # "IS-NLL <= negative ELBO": log p(x) >= E[log mean_k w_k] >= E[w] = ELBO
    config = replace(TINY, flow="iaf", epochs=3, max_batches=5, out_dir=str(tmp_path))
    trainer = Trainer(config)
    trainer.fit()
    assert trainer.stopping.best_epoch >= 2  # it learnt something
    trainer.vae.load_state_dict(trainer.best_model)
    images = trainer.test_images
    common = dict(dtype=torch.float64, chunk=400, max_images=60, seed=5)
    bounds = evaluate_bounds(trainer.vae, trainer.data, images, elbo_samples=4, is_samples=20, **common)
    assert bounds.nll < bounds.nelbo  # the ELBO's samples are independent of the IS ones
    assert bounds.nll > 0.5 * bounds.nelbo  # and the bound is not vacuous


class _RecordedWeights:
    """Stands in for a VAE: hands out rows of a fixed table of log-weights in order."""

    def __init__(self, weights):
        self.weights, self.used = weights, 0

    def log_weights(self, x, num_samples):
        rows = self.weights[self.used : self.used + num_samples]
        self.used += num_samples
        return rows


@pytest.mark.parametrize("chunk", [36, 15, 9, 1])
def test_importance_sampling_in_chunks_is_one_log_sum_exp(chunk):
    weights = 40 * torch.randn(12, 3) - 400
    expected = weights.logsumexp(0) - math.log(12)
    found = importance_sampled_log_likelihood(_RecordedWeights(weights), torch.zeros(3, 1), 12, chunk)
    assert torch.allclose(found, expected, rtol=0, atol=1e-10)


def test_resume_in_process_equals_an_uninterrupted_run(tmp_path):
    config = replace(TINY, flow="cpflow", epochs=3, max_batches=2, warmup=3)
    straight = run(replace(config, out_dir=str(tmp_path / "a")))
    run(replace(config, epochs=1, out_dir=str(tmp_path / "b")))
    resumed = run(replace(config, out_dir=str(tmp_path / "b")), resume=True)
    drop = TIME_FIELDS | {"note"}
    assert {k: v for k, v in straight.items() if k not in drop} == {
        k: v for k, v in resumed.items() if k not in drop
    }
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state_dict_equal(a["model"], b["model"]) and state_dict_equal(a["best_model"], b["best_model"])
    # the resumed log holds every epoch once (the final record of the 1-epoch run is dropped)
    assert _records(tmp_path / "a" / "metrics.jsonl") == _records(tmp_path / "b" / "metrics.jsonl")


def test_resume_refuses_a_checkpoint_written_with_other_settings(tmp_path):
    run(replace(TINY, out_dir=str(tmp_path)))
    with pytest.raises(RuntimeError, match="different settings.*latent_dim"):
        Trainer(replace(TINY, latent_dim=4, out_dir=str(tmp_path)), resume=True)


def test_resume_refuses_a_code_carrying_checkpoint_and_its_code_never_runs(tmp_path):
    run(replace(TINY, out_dir=str(tmp_path)))
    checkpoint, marker = tmp_path / "checkpoint.pt", tmp_path / "payload-ran"
    state = load_checkpoint(checkpoint)
    torch.save({**state, "trap": CreatesAFile(marker)}, checkpoint)  # what an attacker would leave
    with pytest.raises(CheckpointError, match=f"{re.escape(str(checkpoint))}.*--overwrite"):
        Trainer(_resumed(tmp_path), resume=True)
    assert not marker.exists()


def _resumed(folder: Path) -> Config:
    """The configuration of a one-epoch TINY run in ``folder``, continued to two epochs."""
    return replace(TINY, epochs=2, out_dir=str(folder))


DAMAGE = {"flipped bit": "is damaged", "truncated": "is truncated", "empty": "is empty"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_refuses_a_damaged_checkpoint_naming_the_file(tmp_path, damage):
    run(replace(TINY, out_dir=str(tmp_path)))
    checkpoint = tmp_path / "checkpoint.pt"
    data = checkpoint.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1  # the lowest bit of one byte
    damaged = {"flipped bit": bytes(flipped), "truncated": data[: len(data) // 2], "empty": b""}
    checkpoint.write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(checkpoint))} {DAMAGE[damage]}.*backup"):
        Trainer(_resumed(tmp_path), resume=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_run_folder_is_never_started_over_without_resume_or_overwrite(tmp_path, capsys):
    flags = [
        *TINY_FLAGS,
        "--dataset",
        "binarized_mnist",
        "--flow",
        "gaussian",
        "--max-batches",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    cli.main([*flags, "--epochs", "2"])
    before = _snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main([*flags, "--epochs", "1"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert f"{tmp_path} already holds a run" in message and "--resume" in message and "--overwrite" in message
    assert _snapshot(tmp_path) == before  # nothing touched
    with pytest.raises(SystemExit):
        cli.main([*flags, "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err
    cli.main([*flags, "--epochs", "1", "--overwrite"])
    assert [r["event"] for r in _records(tmp_path / "metrics.jsonl")] == ["epoch", "final"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_resume_without_a_checkpoint_refuses_to_start_a_run_over(tmp_path):
    run(replace(TINY, out_dir=str(tmp_path)))
    (tmp_path / "checkpoint.pt").unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(RunExistsError, match="no checkpoint.pt to resume from"):
        Trainer(_resumed(tmp_path), resume=True)
    assert _snapshot(tmp_path) == before


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(tmp_path):
    run(replace(TINY, out_dir=str(tmp_path)))
    metrics = tmp_path / "metrics.jsonl"
    intact = _records(metrics)[:1]
    with metrics.open("a") as handle:
        handle.write('{"event": "epoch", "epoch": 2, "train_lo')  # a write cut off by a kill
    with pytest.warns(UserWarning, match=f"{re.escape(str(metrics))}: dropped its last line"):
        run(_resumed(tmp_path), resume=True)
    records = _records(metrics)
    assert records[:1] == intact and [r["event"] for r in records] == ["epoch", "epoch", "final"]


def test_resume_refuses_metrics_damaged_before_the_last_line_naming_file_and_line(tmp_path):
    run(replace(TINY, out_dir=str(tmp_path)))
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(metrics))}, line 1: not a JSON record"):
        Trainer(_resumed(tmp_path), resume=True)


BAD_VALUES = [
    ("--epochs", "-1", "must be an integer >= 1"),
    ("--epochs", "0", "must be an integer >= 1"),
    ("--time-limit", "-1", "must be a finite number >= 0"),
    ("--time-limit", "inf", "must be a finite number >= 0"),
    ("--batch-size", "-5", "must be an integer >= 1"),
    ("--batch-size", "0", "must be an integer >= 1"),
    ("--batch-size", "1", "must be >= 2 with actnorm 'between'"),
    ("--max-batches", "-1", "must be an integer >= 0"),
    ("--test-images", "-5", "must be an integer >= 0"),
    ("--valid-images", "-1", "must be an integer >= 0"),
    ("--is-samples", "-1", "must be an integer >= 0"),
    ("--flow-steps", "0", "must be an integer >= 1"),
    ("--elbo-samples", "0", "must be an integer >= 1"),
    ("--log-every", "0", "must be an integer >= 1"),
    ("--lr", "0", "must be a finite number > 0"),
    ("--lr", "nan", "must be a finite number > 0"),
    ("--warmup", "-1", "must be an integer >= 0"),
    ("--early-stopping", "-1", "must be an integer >= 0"),
    ("--latent-dim", "0", "must be an integer >= 1"),
    ("--chunk", "0", "must be an integer >= 1"),
    ("--cg-max-iter", "0", "must be an integer >= 1"),
    ("--cg-check-every", "-1", "must be an integer >= 0"),
    ("--cg-check-every", "0", "0 .never test convergence. needs cg_max_iter"),
    ("--seed", "-1", "must be an integer in \\[0, 4294967295\\]"),
    ("--threads", "-1", "must be an integer >= 0"),
    ("--device", "gpu", "must name a torch device"),
    ("--out-dir", "FILE", "must be a folder"),
]


@pytest.mark.parametrize("option, value, expected", BAD_VALUES, ids=[f"{o}={v}" for o, v, _ in BAD_VALUES])
def test_every_bad_command_line_value_is_refused_naming_the_option(tmp_path, capsys, option, value, expected):
    if value == "FILE":
        value = str(tmp_path / "a-file")
        Path(value).write_text("")
    flags = [
        *TINY_FLAGS,
        "--dataset",
        "binarized_mnist",
        "--flow",
        "cpflow",
        "--epochs",
        "1",
        "--max-batches",
        "1",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*flags, option, value])  # the last occurrence of an option wins
    assert exit_.value.code == 2
    assert re.search(f"argument {option}: {expected}", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_flow_steps_are_honoured_and_zero_is_refused():
    for steps in (1, 3):
        posterior = build_posterior(PosteriorConfig("cpflow", 8, 16, steps=steps, hidden_dims=(8,)))
        assert len(cpflow_blocks(posterior)) == steps
    with pytest.raises(ValueError, match="steps must be >= 1"):
        PosteriorConfig("cpflow", 8, 16, steps=0)
    with pytest.raises(ConfigError, match="flow_steps must be an integer >= 1, got 0"):
        replace(TINY, flow_steps=0)


def test_options_added_later_take_their_defaults_when_resuming_an_older_run():
    older = {k: v for k, v in TINY.to_dict().items() if k not in ("actnorm", "cg_max_iter")}
    assert TINY.differences(older) == []
    assert replace(TINY, actnorm="around").differences(older) == ["actnorm"]


@pytest.mark.slow  # subprocesses: about 30-90 s on two cores
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tmp_path):
    flags = [
        *TINY_FLAGS,
        "--dataset",
        "binarized_mnist",
        "--flow",
        "cpflow",
        "--epochs",
        "4",
        "--max-batches",
        "3",
    ]
    command = [sys.executable, *CLI, *flags]
    cli.main([*flags, "--out-dir", str(tmp_path / "straight")])  # in-process: saves a start-up
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--out-dir", str(killed)],
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoint.pt").exists():
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    checkpoint = load_checkpoint(killed / "checkpoint.pt")
    assert checkpoint["epoch"] < 4 and not (killed / "results.json").exists()
    subprocess.run(
        [*command, "--out-dir", str(killed), "--resume"],
        check=True,
        env=_environment(),
        capture_output=True,
        timeout=300,
    )
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(killed / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 4
    for key in ("model", "best_model"):
        assert state_dict_equal(a[key], b[key])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][index][k]) for k in state)
    assert _records(tmp_path / "straight" / "metrics.jsonl") == _records(killed / "metrics.jsonl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # subprocesses: about 30-90 s on two cores
def test_two_process_distributed_run_keeps_the_ranks_identical(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *CLI,
        *TINY_FLAGS,
        "--dataset",
        "binarized_mnist",
        "--flow",
        "cpflow",
        "--epochs",
        "2",
        "--max-batches",
        "2",
        "--out-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = _records(tmp_path / "metrics.jsonl")[-1]
    assert final["event"] == "final" and final["world_size"] == 2 and final["ranks_identical"]
    assert math.isfinite(final["test_nll"])
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert checkpoint["rng"][0]["torch"].ne(checkpoint["rng"][1]["torch"]).any()  # own streams


# ----------------------------------------------------------------------------- report


def test_report_rebuilds_each_runs_command_and_writes_table_and_figure(tmp_path):
    folder = tmp_path / "run"
    record = run(replace(TINY, dataset="freyfaces", flow="cpflow", lr=2e-3, out_dir=str(folder)))
    entry = report.Run(folder)
    command = entry.command().split()
    assert command[:3] == ["python", "-m", "experiments.vae"]
    rebuilt = cli.config_from_args(cli.build_parser().parse_args(command[3:]))
    assert rebuilt.to_dict() == entry.config  # the command reproduces the configuration
    results_md = tmp_path / "RESULTS.md"
    report.main(
        [
            str(folder),
            "--title",
            "Tiny",
            "--results-md",
            str(results_md),
            "--figure",
            str(tmp_path / "curves.png"),
        ]
    )
    text = results_md.read_text()
    assert "## Tiny" in text and f"{record['test_nelbo_bpd']:.3f}" in text and "| 4.45 |" in text
    assert (tmp_path / "curves.png").stat().st_size > 0
