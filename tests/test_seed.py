"""`import-seed` turns the seed's 8 pickled modules into our checkpoint without running code."""
from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
from torch import nn

from glom_mnist import load_checkpoint
from glom_mnist.cli import main as cli_main
from glom_mnist.seed import import_seed, read_seed_network, seed_file_names
from glom_mnist.config import GlomConfig

from oracle import OracleGlom, seed_networks


class model(nn.Module):  # noqa: N801 - the seed's class name, pickled as __main__.model
    """The seed's network class as its notebook defined it: Linear layers Q1, K1, V1."""

    def __init__(self) -> None:
        super().__init__()
        self.Q1 = nn.Linear(90, 10)
        self.K1 = nn.Linear(10, 10)
        self.V1 = nn.Linear(10, 10)
        self.drop = nn.Dropout(0.1)
        self.act = nn.Tanh()


@pytest.fixture
def seed_dir(tmp_path, monkeypatch):
    """A folder laid out like the seed's best_models/, holding an oracle's weights."""
    monkeypatch.setattr(model, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "model", model, raising=False)
    torch.manual_seed(0)
    oracle = OracleGlom()
    for name, weights in seed_networks(oracle).items():
        net = model()
        net.load_state_dict(weights, strict=False)
        torch.save(net, tmp_path / name)                       # a whole pickled module
    return tmp_path, oracle


def test_seed_files_import_into_a_checkpoint_equal_to_the_oracle(seed_dir, tmp_path):
    directory, oracle = seed_dir
    assert sorted(os.listdir(directory)) == sorted(seed_file_names(GlomConfig.preset("seed")))
    out = tmp_path / "out" / "seed_published.pt"
    assert cli_main(["import-seed", str(directory), str(out)]) == 0
    ours = load_checkpoint(out, device="cpu")
    oracle.eval()
    images = torch.randn(2, 1, 28, 28)
    torch.manual_seed(3)
    init = ours.initial_state(images)
    torch.manual_seed(3)
    fast = ours(images, steps=None)
    slow = OracleGlom.forward(oracle, images, init=init.permute(0, 3, 4, 1, 2))
    assert torch.allclose(fast, slow.permute(0, 3, 4, 1, 2), atol=1e-5)


def test_import_refuses_to_overwrite_and_names_missing_files(seed_dir, tmp_path, capsys):
    directory, _ = seed_dir
    out = tmp_path / "exists.pt"
    out.write_bytes(b"user data")
    assert cli_main(["import-seed", str(directory), str(out)]) == 2
    assert out.read_bytes() == b"user data"
    assert "exists" in capsys.readouterr().err
    (directory / "top_down_model1").unlink()
    with pytest.raises(FileNotFoundError, match="top_down_model1"):
        import_seed(directory, tmp_path / "new.pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > evil-ran.txt",))


def test_a_file_naming_other_globals_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"_modules": Evil()}, tmp_path / "bottom_up_model0")
    with pytest.raises(ValueError, match="refusing global"):
        read_seed_network(tmp_path / "bottom_up_model0")
    assert not (tmp_path / "evil-ran.txt").exists()
    (tmp_path / "junk").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="not a seed network file"):
        read_seed_network(tmp_path / "junk")
