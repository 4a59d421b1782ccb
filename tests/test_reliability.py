"""The command line's hard cases: hostile files run no code, nothing of the user's is replaced
without --force, no command exits 0 with non-finite numbers, an interrupted run resumes exactly,
and every bad input gets one line saying what was wrong and what to do.

Commands run in this process through `cli.main` on tiny settings (2 rollout steps, 16 training
images, 2 iterations); only the tests about other processes start one. docs/reliability.md
lists the cases."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from glom_mnist import Glom, GlomConfig, data, save_checkpoint
from glom_mnist.checkpoint import CheckpointError, atomic_save, read_checkpoint
from glom_mnist.cli import main as cli_main
from glom_mnist.evaluate import evaluate_model
from glom_mnist.seed import read_seed_network, seed_file_names
from glom_mnist.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason="MNIST not "
                                 "prepared (`make data`; `make test` does it first)")
TINY_RUN = ["--root", DATA, "--set", "steps=2", "--limit-train", "16", "--batch-size", "8",
            "--iterations", "2", "--eval-images", "8", "--eval-every", "2", "--device", "cpu"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m glom_mnist ARGV`, run in this process."""
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    """The command failed (exit 2) with exactly one `error:` line and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> Path:
    """A finished tiny MNIST run's folder (2 iterations); tests work on copies."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli_main([str(a) for a in ["train", *TINY_RUN, "--out-dir", out]]) == 0
    return out


def copy_run(mnist_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(mnist_run, tmp_path / "run"))


# ---- code in files: no loader runs any -------------------------------------------------------

class Payload:
    """Unpickled by a loader that resolves any global, this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_hostile(path: Path, marker: Path, fmt: str) -> None:
    """A file that runs `touch marker` when unpickled: a plain pickle, or torch.save's zip or
    legacy format (the payload inside the object, where a checkpoint's marker would be)."""
    obj = {"format": "glom-mnist-checkpoint", "version": 1, "_modules": Payload(marker)}
    if fmt == "plain":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))


def test_import_seed_runs_no_code_from_plain_pickles(tmp_path, monkeypatch, capsys):
    """The seed's 8 file names, each a plain pickle whose loading would call os.system."""
    monkeypatch.chdir(tmp_path)
    evil, marker = tmp_path / "evil", tmp_path / "PWNED"
    evil.mkdir()
    for name in seed_file_names(GlomConfig.preset("seed")):
        (evil / name).write_bytes(pickle.dumps(Payload(marker)))
    code, _, err = cli(capsys, "import-seed", evil, tmp_path / "out.pt")
    assert "refusing global" in one_error_line(code, err)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


LOADERS = {"checkpoint": read_checkpoint, "seed network": read_seed_network,
           "MNIST pickle": lambda path: data._load_mnist_pickle(open(path, "rb"))}


@pytest.mark.parametrize("fmt", ["plain", "zip", "legacy"])
@pytest.mark.parametrize("loader", LOADERS)
def test_no_loader_runs_code_from_a_file_of_any_format(tmp_path, loader, fmt):
    if loader == "MNIST pickle" and fmt != "plain":
        pytest.skip("the MNIST source is a plain pickle only")
    marker = tmp_path / "PWNED"
    write_hostile(tmp_path / "file", marker, fmt)
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        LOADERS[loader](tmp_path / "file")
    assert not marker.exists()


class model(nn.Module):  # noqa: N801 - the seed's class name, pickled as __main__.model
    def __init__(self) -> None:
        super().__init__()
        self.Q1, self.K1, self.V1 = nn.Linear(90, 10), nn.Linear(10, 10), nn.Linear(10, 10)
        self.drop, self.act = nn.Dropout(0.1), nn.Tanh()


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")   # torch's legacy writer
@pytest.mark.parametrize("zip_format", [True, False])
def test_seed_networks_are_read_from_either_torch_format(tmp_path, monkeypatch, zip_format):
    monkeypatch.setattr(model, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "model", model, raising=False)
    torch.manual_seed(0)
    net = model()
    torch.save(net, tmp_path / "bottom_up_model0", _use_new_zipfile_serialization=zip_format)
    weights = read_seed_network(tmp_path / "bottom_up_model0")
    assert weights.keys() == {f"{n}.{p}" for n in ("Q1", "K1", "V1") for p in ("weight", "bias")}
    for key, value in net.state_dict().items():
        assert torch.equal(weights[key], value), key
    data_bytes = (tmp_path / "bottom_up_model0").read_bytes()
    (tmp_path / "cut").write_bytes(data_bytes[: len(data_bytes) * 3 // 4])
    with pytest.raises(ValueError, match="not a seed network file"):
        read_seed_network(tmp_path / "cut")
    with torch.no_grad():
        net.K1.bias[3] = float("inf")
    torch.save(net, tmp_path / "inf", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match="K1.bias hold non-finite values"):
        read_seed_network(tmp_path / "inf")


# ---- nothing replaced without --force; one writer per run folder -----------------------------

@needs_mnist
def test_train_refuses_a_folder_holding_a_run_unless_resumed_or_forced(mnist_run, tmp_path, capsys):
    run = copy_run(mnist_run, tmp_path)
    before = {name: (run / name).read_bytes() for name in ("last.pt", "log.csv")}
    code, _, err = cli(capsys, "train", *TINY_RUN, "--out-dir", run)
    line = one_error_line(code, err)
    assert f"--resume {run / 'last.pt'}" in line and "--force" in line and "--out-dir" in line
    assert "iteration 2 of 2" in line
    assert {name: (run / name).read_bytes() for name in before} == before
    code, _, _ = cli(capsys, "train", "--resume", run / "last.pt", "--out-dir", run,
                     "--iterations", "3")
    assert code == 0 and read_checkpoint(run / "last.pt")["training"]["iteration"] == 3
    code, _, err = cli(capsys, "train", *TINY_RUN, "--out-dir", run, "--force")
    assert code == 0 and "--force: starting over" in err
    assert read_checkpoint(run / "last.pt")["training"]["iteration"] == 2
    assert not (run / "train.lock").exists()


@needs_mnist
def test_a_second_process_writing_the_same_folder_refuses(tmp_path, capsys):
    from glom_mnist.files import run_folder_lock

    (tmp_path / "run").mkdir()
    with run_folder_lock(tmp_path / "run"):
        code, _, err = cli(capsys, "train", *TINY_RUN, "--out-dir", tmp_path / "run")
    assert f"another training (pid {os.getpid()}) is writing" in one_error_line(code, err)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_lock_dies_with_its_process(tmp_path):
    """A SIGKILLed holder leaves no lock behind (the kernel drops it), so nothing goes stale."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from glom_mnist.files import run_folder_lock\n"
         "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        from glom_mnist.files import run_folder_lock
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            with run_folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "train.lock").exists()                      # the file stays ...
    with run_folder_lock(tmp_path):                                # ... but the lock is free
        assert (tmp_path / "train.lock").read_text().strip() == str(os.getpid())


@pytest.mark.slow
@needs_mnist
def test_two_trainings_started_into_one_folder_one_refuses(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOM_NATIVE": "0"}
    argv = [sys.executable, "-m", "glom_mnist", "train", *map(str, TINY_RUN),
            "--iterations", "1000", "--checkpoint-every", "1", "--out-dir", str(tmp_path / "run")]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        for _ in range(3000):                        # until it trains (and so holds the lock)
            if (tmp_path / "run" / "last.pt").exists():
                break
            time.sleep(0.1)
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "another training" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert read_checkpoint(tmp_path / "run" / "last.pt")["training"]["iteration"] >= 1


@needs_mnist
def test_save_refuses_an_existing_file_before_training(tmp_path, capsys):
    save = tmp_path / "exp" / "m.pt"
    save.parent.mkdir()
    save.write_bytes(b"the user's model")
    code, _, err = cli(capsys, "train", *TINY_RUN, "--out-dir", tmp_path / "run", "--save", save)
    assert "pass --force" in one_error_line(code, err)
    assert save.read_bytes() == b"the user's model" and not (tmp_path / "run").exists()
    code, _, _ = cli(capsys, "train", *TINY_RUN, "--out-dir", tmp_path / "run", "--save", save,
                     "--force")
    assert code == 0 and "training" not in read_checkpoint(save)


def tiny_checkpoint(path: Path, **config) -> Path:
    torch.manual_seed(0)
    save_checkpoint(Glom(GlomConfig.preset("seed", steps=1, **config)), path)
    return path


@needs_mnist
def test_evaluate_json_replaces_only_its_own_metrics_and_checks_before_evaluating(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "ck.pt")
    base = ["evaluate", "--checkpoint", checkpoint, "--root", DATA, "--limit", "4",
            "--device", "cpu", "--json"]
    before = checkpoint.read_bytes()
    code, out, err = cli(capsys, *base, checkpoint)                 # --json onto a checkpoint
    assert "not a metrics file" in one_error_line(code, err) and "accuracy" not in out
    assert checkpoint.read_bytes() == before
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for target, says in ((tmp_path / "folder", "is a folder"),
                         (tmp_path / "file" / "m.json", "is a file, not a folder")):
        code, out, err = cli(capsys, *base, target)
        assert says in one_error_line(code, err) and "accuracy" not in out
    metrics = tmp_path / "m.json"
    assert cli(capsys, *base, metrics)[0] == 0
    assert cli(capsys, *base, metrics)[0] == 0                      # a previous metrics file
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_export_refuses_a_folder_and_its_own_checkpoint_even_with_force(synthetic_run,
                                                                       tmp_path, capsys):
    last = synthetic_run
    (tmp_path / "dir.pt").mkdir()
    code, _, err = cli(capsys, "export", last, tmp_path / "dir.pt", "--force")
    assert "is a folder" in one_error_line(code, err)
    before = last.read_bytes()
    code, _, err = cli(capsys, "export", last, last, "--force")
    assert "is the checkpoint being exported" in one_error_line(code, err)
    assert last.read_bytes() == before


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    """A run's last.pt from a tiny synthetic run (no MNIST needed)."""
    cfg = TrainConfig(model_overrides={"height": 8, "width": 8, "steps": 2}, iterations=2,
                      batch_size=4, eval_every=2, eval_images=4, out_dir=str(tmp_path / "syn"),
                      device="cpu")
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    Trainer(cfg, images, labels, images[:4], labels[:4]).fit(progress=False)
    return tmp_path / "syn" / "last.pt"


# ---- Ctrl-C and SIGTERM: the saved iteration, weights, optimiser and RNG state agree ----------

SYNTHETIC = {"height": 8, "width": 8, "steps": 3}


def synthetic_trainer(tmp_path: Path, name: str, resume: Path | None = None) -> Trainer:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (16,), generator=g)
    images = torch.randn(16, 1, 8, 8, generator=g) + labels[:, None, None, None] * 0.2
    cfg = TrainConfig(model_overrides=SYNTHETIC, iterations=4, batch_size=4, eval_every=4,
                      eval_images=4, checkpoint_every=2, out_dir=str(tmp_path / name),
                      device="cpu")
    return Trainer(cfg, images, labels, images[:4], labels[:4], resume=resume)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Trainer:
    """The uninterrupted run that every interrupted one must equal once resumed."""
    trainer = synthetic_trainer(tmp_path_factory.mktemp("straight"), "run")
    trainer.fit(progress=False)
    return trainer


def signal_inside_iteration(monkeypatch, trainer: Trainer, iteration: int, *signals: int) -> None:
    """Deliver `signals` to this process in the middle of `iteration` (after its rollout has
    drawn its random numbers, before the optimiser step), as a Ctrl-C at a random time would."""
    import glom_mnist.train as train

    real = train.top_level_loss

    def loss_then_signal(*args, **kwargs):
        if trainer.iteration + 1 == iteration:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "top_level_loss", loss_then_signal)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_an_iteration_saves_a_state_that_resumes_exactly(tmp_path, monkeypatch,
                                                                         straight, sig):
    stopped = synthetic_trainer(tmp_path, "stopped")
    signal_inside_iteration(monkeypatch, stopped, 3, sig)
    if sig == signal.SIGINT:                        # Ctrl-C: saved, then KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            stopped.fit(progress=False)
    else:
        assert stopped.fit(progress=False)["finished"] is False
    monkeypatch.undo()
    last = tmp_path / "stopped" / "last.pt"
    assert read_checkpoint(last)["training"]["iteration"] == 3        # the iteration finished
    torch.manual_seed(99)                                              # disturb the global RNG
    resumed = synthetic_trainer(tmp_path, "stopped", resume=last)
    resumed.fit(progress=False)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert [r["loss"] for r in straight.log] == [r["loss"] for r in resumed.log]


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                     straight, capsys):
    stopped = synthetic_trainer(tmp_path, "stopped")
    signal_inside_iteration(monkeypatch, stopped, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(progress=False)
    monkeypatch.undo()
    assert "saving nothing" in capsys.readouterr().err
    last = tmp_path / "stopped" / "last.pt"
    assert read_checkpoint(last)["training"]["iteration"] == 2        # the periodic checkpoint
    resumed = synthetic_trainer(tmp_path, "stopped", resume=last)
    resumed.fit(progress=False)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(resumed)[k]), k


# ---- non-finite numbers: refused at the edge, never saved, never reported with exit 0 ---------

@pytest.mark.parametrize("option,value,says", [
    ("--lr", "inf", "lr must be a finite number"), ("--lr", "nan", "lr must be a finite number"),
    ("--hard-weight", "nan", "hard_weight must be a finite number"),
    ("--checkpoint-minutes", "-1", "checkpoint_minutes must be >= 0"),
    ("--limit-train", "0", "limit_train must be >= 1"),
    ("--set", "init_noise=inf", "init_noise must be a finite number"),
    ("--set", "dropout=abc", "--set dropout wants a number"),
])
def test_bad_training_settings_get_one_line_before_any_work(tmp_path, capsys, option, value, says):
    code, _, err = cli(capsys, "train", *TINY_RUN, "--out-dir", tmp_path / "run", option, value)
    assert says in one_error_line(code, err)
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                            monkeypatch):
    import glom_mnist.train as train

    trainer = synthetic_trainer(tmp_path, "run")
    real = train.top_level_loss
    monkeypatch.setattr(train, "top_level_loss", lambda *a, **k: real(*a, **k) * (
        float("nan") if trainer.iteration + 1 == 3 else 1.0))
    with pytest.raises(ValueError, match=r"diverged at iteration 3 \(the loss is nan\).*"
                                         r"last.pt keeps iteration 2"):
        trainer.fit(progress=False)
    saved = read_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["training"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@needs_mnist
def test_a_diverging_command_exits_2_and_prints_no_nan(tmp_path, capsys):
    code, out, err = cli(capsys, "train", *TINY_RUN, "--set", "out_scale=1e30",
                         "--out-dir", tmp_path / "run")
    assert "diverged at iteration 1" in one_error_line(code, err)
    assert "NaN" not in out and "Infinity" not in out
    assert not (tmp_path / "run" / "last.pt").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    model = Glom(GlomConfig.preset("seed", steps=1))
    with torch.no_grad():
        model.A[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="A are not finite"):
        save_checkpoint(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@needs_mnist
def test_checkpoints_with_non_finite_weights_or_config_are_refused(tmp_path, capsys):
    obj = read_checkpoint(tiny_checkpoint(tmp_path / "ok.pt"))
    obj["state_dict"]["A"][0, 0, 0] = float("nan")
    atomic_save(obj, tmp_path / "nan.pt")
    obj = read_checkpoint(tmp_path / "ok.pt")
    obj["config"]["init_noise"] = float("inf")
    atomic_save(obj, tmp_path / "inf.pt")
    for name, says in (("nan.pt", "weights A are not finite"), ("inf.pt", "init_noise must be")):
        code, out, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / name, "--root", DATA,
                             "--limit", "4", "--device", "cpu")
        assert says in one_error_line(code, err) and "accuracy" not in out


def test_a_rollout_that_overflows_gives_no_metrics():
    torch.manual_seed(0)
    model = Glom(GlomConfig.preset("seed", height=6, width=6, steps=3, out_scale=1e38))
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_model(model, torch.randn(4, 1, 6, 6), torch.arange(4), progress=False)


@needs_mnist
@pytest.mark.parametrize("option,value", [("--batch-size", "-4"), ("--batch-size", "0"),
                                          ("--steps", "0"), ("--limit", "0")])
def test_evaluate_refuses_counts_below_one(tmp_path, capsys, option, value):
    checkpoint = tiny_checkpoint(tmp_path / "ck.pt")
    code, out, err = cli(capsys, "evaluate", "--checkpoint", checkpoint, "--root", DATA,
                         "--device", "cpu", "--limit", "4", option, value)
    assert f"{option} must be >= 1" in one_error_line(code, err) and "accuracy" not in out


# ---- one line, not a traceback ----------------------------------------------------------------

def damage(state: dict, how: str) -> None:
    training = state["training"]
    if how.startswith("no "):
        del training[how[3:]]
    elif how == "iteration as text":
        training["iteration"] = "2"
    elif how == "training a list":
        state["training"] = [1, 2]
    elif how == "train_config a string":
        training["train_config"] = "mse"
    elif how == "optimiser of another model":
        training["optimizer"]["param_groups"][0]["params"] = [0]
    elif how == "rng state of floats":
        training["rng_cpu"] = torch.zeros(5)
    elif how == "nan in the optimiser":
        next(iter(training["optimizer"]["state"].values()))["exp_avg"][0] = float("nan")


DAMAGE = ["no optimizer", "no rng_cpu", "no iteration", "no log", "iteration as text",
          "training a list", "train_config a string", "optimiser of another model",
          "rng state of floats", "nan in the optimiser"]


@needs_mnist
@pytest.mark.parametrize("how", DAMAGE)
def test_resume_of_a_damaged_training_state_gets_one_line(mnist_run, tmp_path, capsys, how):
    run = copy_run(mnist_run, tmp_path)
    state = read_checkpoint(run / "last.pt")
    damage(state, how)
    atomic_save(state, run / "last.pt")
    code, _, err = cli(capsys, "train", "--resume", run / "last.pt", "--out-dir", run,
                       "--iterations", "3")
    assert str(run / "last.pt") in one_error_line(code, err)


@needs_mnist
def test_a_root_or_out_dir_that_is_a_file_gets_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    checkpoint = tiny_checkpoint(tmp_path / "ck.pt")
    for argv, says in (
            (["data", "mnist", "--root", a_file], "is a file, not a folder"),
            (["evaluate", "--checkpoint", checkpoint, "--root", a_file], "is a file, not a folder"),
            (["train", "--root", a_file, "--out-dir", tmp_path / "run"], "is a file, not a folder"),
            (["data", "mnist", "--root", a_file / "data"], "is a file, not a folder"),
            (["train", *TINY_RUN, "--out-dir", a_file], "--out-dir"),
            (["train", *TINY_RUN, "--out-dir", a_file / "run"], "--out-dir")):
        code, _, err = cli(capsys, *argv)
        assert says in one_error_line(code, err), argv
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@needs_mnist
def test_a_read_only_out_dir_gets_one_line(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    code, _, err = cli(capsys, "train", *TINY_RUN, "--out-dir", tmp_path / "ro" / "run")
    assert "cannot write in" in one_error_line(code, err) or "--out-dir" in err


@pytest.mark.parametrize("content", ["truncated", "random", "another zip"])
def test_broken_checkpoint_files_say_what_they_are(tmp_path, capsys, content):
    tiny_checkpoint(tmp_path / "ok.pt")
    good = (tmp_path / "ok.pt").read_bytes()
    if content == "another zip":
        with zipfile.ZipFile(tmp_path / "bad.pt", "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
    else:
        broken = good[: len(good) // 2] if content == "truncated" else os.urandom(len(good))
        (tmp_path / "bad.pt").write_bytes(broken)
    code, _, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / "bad.pt", "--root", DATA,
                       "--limit", "4")
    line = one_error_line(code, err)
    assert ("a damaged checkpoint" if content == "another zip" else
            "not a complete zip archive") in line
    assert "Errno" not in line and "file an issue" not in line


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    obj = read_checkpoint(tiny_checkpoint(tmp_path / "ok.pt"))
    obj["config"]["dim"] = 12
    atomic_save(obj, tmp_path / "dim12.pt")
    from glom_mnist import load_checkpoint
    with pytest.raises(CheckpointError, match=r"do not fit its config.*dim 12.*A is "
                       r"\(8, 10, 10, 3, 3\) where the config needs \(8, 12, 12, 3, 3\)") as err:
        load_checkpoint(tmp_path / "dim12.pt", device="cpu")
    assert "Error(s) in loading" not in str(err.value)


@needs_mnist
def test_resume_refuses_a_set_that_changes_the_model(mnist_run, tmp_path, capsys):
    run = copy_run(mnist_run, tmp_path)
    code, _, err = cli(capsys, "train", "--resume", run / "last.pt", "--set", "dim=12")
    line = one_error_line(code, err)
    assert "dim=12 (the run has 10)" in line and "--init" in line


# ---- leftovers and limits ---------------------------------------------------------------------

@needs_mnist
def test_temporaries_of_a_killed_write_are_removed_on_the_next_start(mnist_run, tmp_path, capsys):
    run = copy_run(mnist_run, tmp_path)
    stale = [run / "last.pt.k1ll3d.tmp", run / "log.csv.tmp"]
    for path in stale:
        path.write_bytes(b"")
    keep = run / "notes.tmp"                                   # not one of a run's files
    keep.write_text("mine")
    code, _, err = cli(capsys, "train", "--resume", run / "last.pt", "--out-dir", run,
                       "--iterations", "3")
    assert code == 0 and "temporary file(s) left by an interrupted write" in err
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


@needs_mnist
def test_evaluate_says_when_limit_exceeds_the_test_set(tmp_path, monkeypatch, capsys):
    import glom_mnist.data

    real = glom_mnist.data.load_split
    monkeypatch.setattr(glom_mnist.data, "load_split",         # 10,000 images take long here:
                        lambda *a, **k: tuple(t[:30] for t in real(*a, **k)))   # keep 30
    code, out, err = cli(capsys, "evaluate", "--checkpoint", tiny_checkpoint(tmp_path / "ck.pt"),
                         "--root", DATA, "--limit", "20000", "--device", "cpu")
    assert code == 0 and "--limit 20000: the test set has 30 images; evaluating all 30" in err
    assert "images                  30" in out
