"""The figures of either family: level maps over the picture they were computed from, the votes
by the model's own rule, and `python -m glom_mnist figures` on a patch-column checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from glom_mnist import plots, save_checkpoint
from glom_mnist.checkpoint import provenance
from glom_mnist.cli import main as cli_main
from glom_mnist.config import model_config
from glom_mnist.figures import held_out_label
from glom_mnist.patch_glom import PatchGlom

DATA = Path(__file__).resolve().parent.parent / "data"


def test_outlines_of_patch_columns_lie_on_their_pixel_edges():
    labels = np.array([[0, 1], [0, 0]])                    # column (0, 1) differs from two
    pixel = plots.outline_segments(labels)                 # one pixel per column
    assert sorted(map(tuple, pixel.reshape(-1, 4).tolist())) == [
        (0.5, -0.5, 0.5, 0.5), (0.5, 0.5, 1.5, 0.5)]
    patch = plots.outline_segments(labels, patch=4)        # 4 x 4 pixels per column
    assert sorted(map(tuple, patch.reshape(-1, 4).tolist())) == [
        (3.5, -0.5, 3.5, 3.5), (3.5, 3.5, 7.5, 3.5)]


def test_level_maps_cover_the_input_and_show_the_votes_given():
    torch.manual_seed(0)
    levels = torch.randn(2, 3, 5, 2, 3)                    # (N, L, D, h, w): 2 x 3 columns
    images = torch.rand(2, 8, 12)                          # ... of 4 x 4 pixels
    votes = torch.tensor([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [0, 1, 2]]])
    fig = plots.plot_level_maps(levels, images=images, votes=votes, patch=4)
    shown = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(shown) == 2 * (1 + 3 + 1)                   # input, 3 levels, votes per digit
    assert {im.get_extent() == [-0.5, 11.5, 7.5, -0.5] for im in shown} == {True}
    assert np.array_equal(shown[-1].get_array(), votes[1].numpy())       # as given
    assert np.array_equal(shown[-2].get_array(), votes[0].numpy())
    plt.close(fig)


def test_the_curve_says_which_split_it_was_scored_on():
    assert held_out_label({"val": 5000, "eval_images": 1000}) == "validation (first 1000)"
    assert held_out_label({"val": 300, "eval_images": 1000}) == "validation (first 300)"
    assert held_out_label({"val": 0, "eval_images": 500}) == "test (first 500)"
    assert held_out_label({}) == "held-out"


@pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(),
                    reason="MNIST not prepared (`make data`; `make test` does it first)")
def test_figures_of_a_patch_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = PatchGlom(model_config("patch_small", steps=2, loss_steps=2))
    log = [{"iteration": 1, "wall": 1.0, "loss": 2.3, "train_accuracy": 0.1},
           {"iteration": 2, "wall": 2.0, "loss": 2.2, "train_accuracy": 0.2,
            "majority_vote_accuracy": 0.3, "per_column_accuracy": 0.2, "all_columns_agree": 0.0}]
    checkpoint = tmp_path / "patch.pt"
    save_checkpoint(model, checkpoint, training={"log": log},
                    provenance_info=provenance(train_config={
                        "val": 5000, "eval_images": 1000, "loss": "cross_entropy"}))
    curves = []
    draw = plots.plot_training_curve
    monkeypatch.setattr(plots, "plot_training_curve",
                        lambda rows, **options: curves.append(options) or draw(rows, **options))
    out = tmp_path / "figures"
    assert cli_main(["figures", "--checkpoint", str(checkpoint), "--root", str(DATA),
                     "--out", str(out), "--images", "6", "--digits", "2", "--gif-digits", "1",
                     "--device", "cpu"]) == 0
    for name in ("islands.png", "agreement.png", "training_curve.png", "consensus.gif"):
        assert (out / name).stat().st_size > 0, name
    assert curves == [{"eval_label": "validation (first 1000)", "loss": "cross_entropy"}]
    summary = json.loads((out / "islands.json").read_text())
    assert summary["patch"] == 4 and summary["grid"] == [7, 7]
    rows = summary["part_whole"]
    assert [(r["columns"], r["per image"]) for r in rows][0] == ("all", 49)
    assert rows[1]["columns"] == "digit" and 0 < rows[1]["per image"] < 49
    assert set(rows[0]) >= {"level 1", "level 2", "top / level 1", "grows"}
    assert all(0 < size <= 49 for r in rows for key, size in r.items() if key.startswith("level"))
