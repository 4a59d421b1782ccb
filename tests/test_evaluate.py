"""The evaluation metrics are what their names say, and the command writes them with a command
line that runs again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glom_mnist import Glom, GlomConfig, save_checkpoint
from glom_mnist.cli import build_parser, main as cli_main
from glom_mnist.evaluate import evaluate_model

DATA = Path(__file__).resolve().parent.parent / "data"


def test_metrics_match_their_definitions_image_by_image():
    torch.manual_seed(0)
    model = Glom(GlomConfig.preset("seed", height=5, width=4, steps=2)).train()
    images = torch.randn(12, 1, 5, 4)
    labels = torch.randint(0, 10, (12,))
    torch.manual_seed(1)
    metrics = evaluate_model(model, images, labels, batch_size=12, progress=False)
    assert model.training                                     # its mode is given back
    torch.manual_seed(1)                                      # the same initial state, eval mode
    votes = model.eval().votes(model(images))                 # (12, 5, 4)
    confusion = torch.zeros(10, 10, dtype=torch.long)
    right_columns = agree = 0
    for image_votes, label in zip(votes, labels):
        counts = torch.bincount(image_votes.flatten(), minlength=10)
        majority = int(counts.argmax())                       # ties: the lowest class
        confusion[label, majority] += 1
        right_columns += int((image_votes == label).sum())
        agree += int(len(image_votes.unique()) == 1)
    assert metrics["confusion_matrix"] == confusion.tolist()
    assert metrics["majority_vote_accuracy"] == pytest.approx(confusion.trace().item() / 12)
    assert metrics["per_column_accuracy"] == pytest.approx(right_columns / (12 * 20))
    assert metrics["all_columns_agree"] == pytest.approx(agree / 12)
    for c in range(10):
        n = int((labels == c).sum())
        want = confusion[c, c].item() / n if n else 0.0
        assert metrics["per_class_accuracy"][c] == pytest.approx(want, abs=1e-6)


def test_mismatched_labels_are_refused():
    model = Glom(GlomConfig.preset("seed", height=4, width=4, steps=1))
    with pytest.raises(ValueError, match="as many labels as images"):
        evaluate_model(model, torch.zeros(3, 1, 4, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(),
                    reason="MNIST not prepared (`make data`; `make test` does it first)")
def test_the_command_writes_metrics_and_a_command_that_runs_again(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "m.pt"
    save_checkpoint(Glom(GlomConfig.preset("seed", steps=2)), checkpoint)
    out = tmp_path / "m.json"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--root", str(DATA), "--limit", "7",
            "--batch-size", "4", "--steps", "1", "--device", "cpu", "--json", str(out)]
    assert cli_main(args) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 7 and metrics["steps"] == 1 and metrics["device"] == "cpu"
    assert sum(map(sum, metrics["confusion_matrix"])) == 7
    command = metrics["command"].split()
    assert command[:3] == ["python", "-m", "glom_mnist"]
    assert vars(build_parser("evaluate").parse_args(command[3:])) == \
        vars(build_parser("evaluate").parse_args(args))      # the same options, run again
    assert "majority-vote accuracy" in capsys.readouterr().out
    out.rename(tmp_path / "first.json")
    assert cli_main(args) == 0                                # seeded: the same metrics again
    again = json.loads(out.read_text())
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["seed"] == 0
    assert {k: v for k, v in again.items() if k != "seconds"} == \
        {k: v for k, v in first.items() if k != "seconds"}


def test_val_evaluates_the_last_training_images_that_train_val_held_out(tmp_path):
    """`evaluate --val N` scores the validation split, the images `train --val N` held out, so
    that choices such as the rollout's length are made without the test set."""
    from glom_mnist.data import load_split, normalise

    torch.manual_seed(0)
    model = Glom(GlomConfig.preset("seed", steps=1))
    checkpoint = tmp_path / "m.pt"
    save_checkpoint(model, checkpoint)
    out = tmp_path / "val.json"
    assert cli_main(["evaluate", "--checkpoint", str(checkpoint), "--root", str(DATA),
                     "--val", "50", "--limit", "6", "--batch-size", "6", "--device", "cpu",
                     "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["split"].startswith("validation") and metrics["images"] == 6
    raw, labels = load_split("mnist", str(DATA), train=True)
    torch.manual_seed(0)
    expected = evaluate_model(model.eval(), normalise(raw[-50:][:6], "mnist"), labels[-50:][:6],
                              batch_size=6, progress=False)
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
