"""Checkpoints load without executing code, fail in one clear line, and are written atomically."""
from __future__ import annotations

import pickle

import pytest
import torch

from glom_mnist import Glom, GlomConfig, load_checkpoint, save_checkpoint
from glom_mnist.checkpoint import CheckpointError, read_checkpoint
from glom_mnist.cli import main as cli_main


def tiny() -> Glom:
    return Glom(GlomConfig.preset("seed", height=6, width=6, steps=2))


def test_round_trip_keeps_weights_config_and_metrics(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "m.pt", metrics={"majority_vote_accuracy": 0.5})
    loaded = load_checkpoint(tmp_path / "m.pt", device="cpu")
    assert loaded.cfg == model.cfg and not loaded.training
    assert loaded.checkpoint_info["metrics"] == {"majority_vote_accuracy": 0.5}
    assert loaded.checkpoint_info["provenance"]["git_commit"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_truncated_foreign_and_unknown_config_files_give_one_line_errors(tmp_path):
    save_checkpoint(tiny(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a complete zip archive") as err:
        load_checkpoint(tmp_path / "truncated.pt")
    assert "\n" not in str(err.value)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a glom-mnist checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    obj = read_checkpoint(tmp_path / "m.pt")
    obj["config"]["levles"] = 3
    torch.save(obj, tmp_path / "badcfg.pt")
    with pytest.raises(CheckpointError, match="unknown or invalid config"):
        load_checkpoint(tmp_path / "badcfg.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_loading_executes_no_code(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "glom-mnist-checkpoint", "x": Evil()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert "code ran" not in capsys.readouterr().out


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(tiny(), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]           # no temporary left


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and len(err.strip().splitlines()) == 1
