"""Training under torchrun: two CPU processes (gloo) train as one process on their combined batch.

Each launch starts three Python processes (torchrun and two workers): about 15 s of CPU time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glom_mnist.checkpoint import load_checkpoint, read_checkpoint
from glom_mnist.distributed import processes, shard_indices
from glom_mnist.train import TrainConfig, Trainer, batch_indices, load_training_data

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason="MNIST not "
                                 "prepared (`make data`; `make test` does it first)")
# a tiny run on real MNIST; noise, dropout and the random initial state off, so that the two
# processes compute what one does on the combined batch, up to the order of float sums; hard
# examples weigh double, which needs the whole batch's weights
TINY = {"steps": 2, "dropout": 0.0, "noise": 0.0, "init_noise": 0.0}
TINY_RUN = {"limit_train": 64, "batch_size": 8, "iterations": 3, "eval_images": 16,
            "hard_weight": 1.0}


def torchrun(*args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC ARGS`; its output as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summaries(stdout: str) -> list[dict]:
    """The JSON summaries `train` printed (an indented object from a line "{" to a line "}")."""
    found, lines = [], None
    for line in stdout.splitlines():
        if line == "{":
            lines = []
        if lines is not None:
            lines.append(line)
        if line == "}" and lines is not None:
            found.append(json.loads("\n".join(lines)))
            lines = None
    return found


@pytest.mark.parametrize("n", [60, 61, 65])
def test_the_processes_shards_are_the_single_process_batch_dealt_out(n):
    for world in (1, 2, 3):
        for iteration in range(25):                  # 10 batches of 6 per epoch: 3 epochs
            shards = [shard_indices(n, 6, iteration, 3, rank, world) for rank in range(world)]
            dealt = torch.stack(shards, 1).flatten()   # position j * world + rank
            assert torch.equal(dealt, batch_indices(n, 6, iteration, 3)), (world, iteration)


@pytest.fixture
def one_thread():
    """One thread for the single-process reference, as each worker has (OMP_NUM_THREADS=1): on 2
    busy cores a second thread only spins, costing 10x the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_mnist
def test_two_processes_train_as_one_on_the_combined_batch(tmp_path, one_thread):
    overrides = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    run = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()]
    done = torchrun("-m", "glom_mnist", "train", *overrides, *run, "--device", "cpu",
                    "--root", str(DATA), "--out-dir", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    [summary] = summaries(done.stdout)                # rank 0 alone reports
    assert summary["processes"] == 2 and summary["iterations"] == 3
    assert summary["max_weight_difference_between_processes"] == 0.0

    cfg = TrainConfig(model_overrides=TINY, **TINY_RUN, device="cpu", root=str(DATA),
                      out_dir=str(tmp_path / "single"))
    data = load_training_data(cfg)
    single = Trainer(cfg, *data)
    single.fit(progress=False)
    shared = load_checkpoint(tmp_path / "ddp" / "last.pt", device="cpu")  # single-process code
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(shared.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    log = read_checkpoint(tmp_path / "ddp" / "last.pt")["training"]["log"]
    for key in ("loss", "train_accuracy"):
        assert [r[key] for r in log] == pytest.approx([r[key] for r in single.log], rel=1e-5)

    # and one process resumes the two processes' checkpoint as it resumes its own
    more = dataclasses.replace(cfg, iterations=5)
    resumed = [Trainer(more, *data, resume=tmp_path / run / "last.pt")
               for run in ("ddp", "single")]
    for r in resumed:
        r.fit(progress=False)
    theirs, ours = (r.model.state_dict() for r in resumed)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-6)


@needs_mnist
def test_two_processes_train_on_scenes_as_one(tmp_path, one_thread):
    patch = {"steps": 2, "dim": 8, "loss_steps": 1}
    run = {"preset": "patch_small", "scenes": "pair", "val": 100, "limit_train": 64,
           "batch_size": 8, "iterations": 2, "eval_images": 4, "eval_every": 2}
    done = torchrun("-m", "glom_mnist", "train",
                    *[a for k, v in patch.items() for a in ("--set", f"{k}={v}")],
                    *[f"--{k.replace('_', '-')}={v}" for k, v in run.items()], "--device", "cpu",
                    "--root", str(DATA), "--out-dir", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = TrainConfig(model_overrides=patch, **run, device="cpu", root=str(DATA),
                      out_dir=str(tmp_path / "single"))
    single = Trainer(cfg, *load_training_data(cfg))
    single.fit(progress=False)
    shared = load_checkpoint(tmp_path / "ddp" / "last.pt", device="cpu")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(shared.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    log = read_checkpoint(tmp_path / "ddp" / "last.pt")["training"]["log"]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in single.log], rel=1e-5)
    assert log[-1]["island_ari"] == pytest.approx(single.log[-1]["island_ari"], abs=1e-6)


def test_a_resumed_run_draws_what_an_uninterrupted_one_does(tmp_path):
    done = torchrun(str(REPO / "tests" / "ddp_worker.py"), "resume", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["weights_equal"]
    straight, resumed = result["losses"]
    assert straight == resumed
    assert result["generators_differ"]              # every process its own noise and dropout


@needs_mnist
def test_a_failing_process_stops_the_others(tmp_path):
    done = torchrun(str(REPO / "tests" / "ddp_worker.py"), "fail-rank-1", "train",
                    "--set", "steps=2", "--limit-train=64", "--batch-size=8", "--iterations=50",
                    "--eval-images=16", "--device", "cpu", "--dist-timeout", "5",
                    "--root", str(DATA), "--out-dir", str(tmp_path / "run"), timeout=90)
    # well within the 5 minutes rank 0 would otherwise wait for rank 1 in the next exchange
    assert done.returncode != 0
    assert "error: planted failure on rank 1" in done.stderr
    # rank 0 wrote the last iteration both finished, whole, torchrun's SIGTERM notwithstanding
    assert read_checkpoint(tmp_path / "run" / "last.pt")["training"]["iteration"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["curve.json", "last.pt",
                                                                    "log.csv"]


@needs_mnist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_gpus_the_processes_take_one_each_and_talk_over_nccl(tmp_path):
    gpus = min(2, torch.cuda.device_count())
    done = torchrun("-m", "glom_mnist", "train", "--set", "steps=2", "--limit-train=64",
                    "--batch-size=8", "--iterations=3", "--eval-images=16", "--root", str(DATA),
                    "--out-dir", str(tmp_path / "run"), nproc=gpus)
    assert done.returncode == 0, done.stderr[-3000:]
    [summary] = summaries(done.stdout)
    assert summary["processes"] == gpus
    assert summary["max_weight_difference_between_processes"] == 0.0
    assert read_checkpoint(tmp_path / "run" / "last.pt")["provenance"]["device"] == "cuda"


def test_settings_torchrun_cannot_use_are_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="GPU of its LOCAL_RANK"):
        with processes(TrainConfig(device="cuda:1"), timeout_minutes=1):
            pass
    with pytest.raises(ValueError, match="--dist-timeout must be > 0"):
        with processes(TrainConfig(), timeout_minutes=0):
            pass
