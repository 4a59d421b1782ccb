"""Training is resumable exactly, logs its curve, and learns; all on tiny synthetic data."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from glom_mnist import load_checkpoint
from glom_mnist.checkpoint import read_checkpoint
from glom_mnist import Glom, GlomConfig
from glom_mnist.train import (TrainConfig, Trainer, batch_indices, parse_overrides,
                               revive_saturated_units,
                               top_level_loss)

TINY = {"height": 8, "width": 8, "steps": 3}


def synthetic(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) + labels[:, None, None, None] * 0.2
    return images, labels, images[:8], labels[:8]


def tiny_cfg(tmp_path, name: str, **kw) -> TrainConfig:
    values = dict(model_overrides=TINY, iterations=6, batch_size=4, eval_every=3, eval_images=8,
                  checkpoint_every=2, out_dir=str(tmp_path / name), device="cpu")
    return TrainConfig(**{**values, **kw})


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight = Trainer(tiny_cfg(tmp_path, "a"), *synthetic())
    straight.fit(progress=False)

    first = Trainer(tiny_cfg(tmp_path, "b", iterations=3), *synthetic())
    first.fit(progress=False)
    assert read_checkpoint(tmp_path / "b" / "last.pt")["training"]["iteration"] == 3
    torch.manual_seed(1234)                                       # disturb the global RNG
    resumed = Trainer(tiny_cfg(tmp_path, "b"), *synthetic(), resume=tmp_path / "b" / "last.pt")
    resumed.fit(progress=False)

    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in straight.log] == [r["loss"] for r in resumed.log]


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    straight = Trainer(tiny_cfg(tmp_path, "a"), *synthetic())
    straight.fit(progress=False)

    interrupted = Trainer(tiny_cfg(tmp_path, "b"), *synthetic())
    real_step = interrupted.step

    def step_then_interrupt():
        if interrupted.iteration == 4:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(interrupted, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(progress=False)
    assert read_checkpoint(tmp_path / "b" / "last.pt")["training"]["iteration"] == 4
    resumed = Trainer(tiny_cfg(tmp_path, "b"), *synthetic(), resume=tmp_path / "b" / "last.pt")
    resumed.fit(progress=False)
    for k, v in params(straight).items():
        assert torch.equal(v, params(resumed)[k]), k


def test_log_curve_and_checkpoint_are_written(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "a"), *synthetic())
    summary = trainer.fit(progress=False)
    assert summary["finished"] and summary["iterations"] == 6
    rows = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    curve = json.loads((tmp_path / "a" / "curve.json").read_text())
    assert [r["iteration"] for r in curve] == [3, 6]
    assert 0.0 <= curve[-1]["majority_vote_accuracy"] <= 1.0
    trainer.save(tmp_path / "model.pt", metrics=summary, training=False)
    model = load_checkpoint(tmp_path / "model.pt", device="cpu")
    assert not model.training
    assert model.checkpoint_info["provenance"]["iterations"] == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, trainer.model.state_dict()[k])


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_both_losses_learn_a_fixed_batch(tmp_path, loss):
    images, labels, *_ = synthetic(4)
    cfg = tiny_cfg(tmp_path, loss, iterations=40, eval_every=40, checkpoint_every=40, lr=0.05,
                   loss=loss, model_overrides={**TINY, "steps": 8, "dropout": 0.0, "noise": 0.0})
    trainer = Trainer(cfg, images, labels, images, labels)
    trainer.fit(progress=False)
    losses = [r["loss"] for r in trainer.log]
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]


def test_losses_match_their_definitions_column_by_column():
    model = Glom(GlomConfig.preset("seed", height=3, width=2))
    levels = torch.randn(2, 4, 10, 3, 2)
    labels = torch.tensor([3, 7])
    top = levels[:, -1]                                                  # (B, 10, H, W)
    ce = mse = 0.0
    for b in range(2):
        for y in range(3):
            for x in range(2):
                logits = top[b, :, y, x]
                ce += -torch.log_softmax(logits, 0)[labels[b]]
                mse += ((logits - torch.nn.functional.one_hot(labels[b], 10)) ** 2).mean()
    torch.testing.assert_close(top_level_loss(model, levels, labels, "cross_entropy"), ce / 12)
    torch.testing.assert_close(top_level_loss(model, levels, labels), mse / 12)


def test_hard_examples_weigh_more_in_the_loss():
    model = Glom(GlomConfig.preset("seed", height=3, width=2))
    levels = torch.randn(3, 4, 10, 3, 2)
    labels = torch.tensor([3, 7, 1])
    per_image = torch.stack([top_level_loss(model, levels[i:i + 1], labels[i:i + 1])
                             for i in range(3)])
    weights = torch.tensor([1.0, 4.0, 1.0])
    torch.testing.assert_close(top_level_loss(model, levels, labels, weights=weights),
                               (per_image * weights).sum() / 6)
    torch.testing.assert_close(top_level_loss(model, levels, labels, weights=torch.ones(3)),
                               top_level_loss(model, levels, labels))


def test_hard_weight_changes_only_what_the_wrong_images_contribute(tmp_path):
    """With hard_weight the step's loss is the weighted mean over the images its own rollout
    votes wrong (weight 1 + hard_weight) and right (1); hard_weight 0 is the seed's step."""
    images, labels, *_ = synthetic(8)
    losses = {}
    for w in (0.0, 3.0):
        cfg = tiny_cfg(tmp_path, f"hw{w}", batch_size=8, hard_weight=w,
                       model_overrides={**TINY, "dropout": 0.0, "noise": 0.0})
        trainer = Trainer(cfg, images, labels, images, labels)
        model = trainer.model
        idx = batch_indices(8, 8, 0, cfg.seed)                      # the step's batch
        x, y = images[idx], labels[idx]
        torch.manual_seed(5)                                        # the same initial state
        with torch.no_grad():
            levels = model.train()(x)
            wrong = (model.majority(model.votes(levels)) != y).float()
            per_image = torch.stack([top_level_loss(model, levels[i:i + 1], y[i:i + 1])
                                     for i in range(8)])
        torch.manual_seed(5)
        losses[w] = (trainer.step()[0], per_image, wrong)
    (plain, per_image, wrong), (hard, _, _) = losses[0.0], losses[3.0]
    assert 0 < wrong.sum() < 8                      # both kinds of image in the batch
    assert plain == pytest.approx(per_image.mean().item(), rel=1e-5)
    weights = 1 + 3 * wrong
    assert hard == pytest.approx(((per_image * weights).sum() / weights.sum()).item(), rel=1e-5)


def test_batches_cover_each_epoch_once_and_depend_on_the_seed():
    epoch = torch.cat([batch_indices(12, 4, i, seed=0) for i in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))
    assert not torch.equal(batch_indices(12, 4, 0, seed=0), batch_indices(12, 4, 0, seed=1))
    assert not torch.equal(batch_indices(12, 4, 0, seed=0), batch_indices(12, 4, 3, seed=0))


def test_bad_settings_are_refused_clearly():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="hard_weight must be >= 0"):
        TrainConfig(hard_weight=-1)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["dropuot=0"])
    assert parse_overrides(["dropout=0", "accumulate=2,4", "attention=true"]) == {
        "dropout": 0.0, "accumulate": (2, 4), "attention": True}


def test_init_starts_from_a_checkpoints_weights_with_a_fresh_optimiser(tmp_path):
    images, labels, *_ = synthetic(8)
    first = Trainer(tiny_cfg(tmp_path, "first"), images, labels, images, labels)
    first.fit(progress=False)
    first.save(tmp_path / "first.pt", training=False)
    second = Trainer(tiny_cfg(tmp_path, "second", init=str(tmp_path / "first.pt"), loss="cross_entropy"),
                     images, labels, images, labels)
    assert second.iteration == 0 and not second.optimizer.state
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k])
    with pytest.raises(ValueError, match=r"do not fit.*levels \(run 3, checkpoint 4\)"):
        Trainer(tiny_cfg(tmp_path, "third", init=str(tmp_path / "first.pt"),
                         model_overrides={**TINY, "levels": 3}), images, labels, images, labels)


def test_init_may_switch_on_what_owns_no_weights(tmp_path, capsys):
    """The seed architecture's weights fine-tuned with the consensus attention on."""
    images, labels, *_ = synthetic(8)
    first = Trainer(tiny_cfg(tmp_path, "first"), images, labels, images, labels)
    first.save(tmp_path / "first.pt", training=False)
    second = Trainer(tiny_cfg(tmp_path, "second", preset="consensus", init=str(tmp_path / "first.pt")),
                     images, labels, images, labels)
    assert second.model.cfg.attention and second.model.cfg.clamp_input
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k])
    note = capsys.readouterr().err
    assert "attention (run True, checkpoint False)" in note and "clamp_input" in note
    second.fit(progress=False)
    assert read_checkpoint(tmp_path / "second" / "last.pt")["config"]["attention"] is True


def test_lineage_wall_time_never_runs_backwards_across_runs(tmp_path):
    """Log rows keep 2 decimals of wall time: a parent whose last row was rounded up past its
    exact total must not make its child's first rows look earlier (a CI run hit this once the
    training step got faster)."""
    from glom_mnist.checkpoint import atomic_save
    from glom_mnist.train import lineage_log

    images, labels, *_ = synthetic(8)
    Trainer(tiny_cfg(tmp_path, "first"), images, labels, images, labels).fit(progress=False)
    second = Trainer(tiny_cfg(tmp_path, "second", iterations=2,
                              init=str(tmp_path / "first" / "last.pt")), images, labels, images, labels)
    second.fit(progress=False)
    parent = read_checkpoint(tmp_path / "first" / "last.pt")
    rows = parent["training"]["log"]
    for i, row in enumerate(rows, start=1):                           # its last row: 0.03 ...
        row["wall"] = round(0.03 * i / len(rows), 2)
    parent["training"]["wall"] = 0.0279                               # ... rounded up from this
    atomic_save(parent, tmp_path / "first" / "last.pt")
    child = read_checkpoint(tmp_path / "second" / "last.pt")
    for i, row in enumerate(child["training"]["log"]):                # a very quick first row
        row["wall"] = 0.01 * i
    atomic_save(child, tmp_path / "second" / "last.pt")
    walls = [r["wall"] for r in lineage_log(tmp_path / "second" / "last.pt")]
    assert walls == sorted(walls), walls


def test_lineage_log_chains_a_fine_tuned_run_after_its_parent(tmp_path):
    from glom_mnist import plots
    from glom_mnist.train import export_run, lineage_log, read_log_csv, write_log_csv

    images, labels, *_ = synthetic(8)
    Trainer(tiny_cfg(tmp_path, "first"), images, labels, images, labels).fit(progress=False)
    second = Trainer(tiny_cfg(tmp_path, "second", iterations=4, loss="cross_entropy",
                              init=str(tmp_path / "first" / "last.pt")),
                     images, labels, images, labels)
    second.fit(progress=False)
    rows = lineage_log(tmp_path / "second" / "last.pt")
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert [(r["stage"], r["loss_kind"]) for r in rows] == [(1, "mse")] * 6 + [(2, "cross_entropy")] * 4
    walls = [r["wall"] for r in rows]
    assert walls == sorted(walls)
    write_log_csv(rows, tmp_path / "history.log.csv")
    back = read_log_csv(tmp_path / "history.log.csv")
    assert back[-1]["loss_kind"] == "cross_entropy" and back[-1]["iteration"] == 10.0
    fig = plots.plot_training_curve(back)
    assert len(fig.axes[0].get_lines()) == 2                 # one loss line per stage

    # a run initialised from a shipped model continues the history kept beside that model
    export_run(tmp_path / "second" / "last.pt", tmp_path / "ship" / "model.pt")
    Trainer(tiny_cfg(tmp_path, "third", iterations=2, init=str(tmp_path / "ship" / "model.pt")),
            images, labels, images, labels).fit(progress=False)
    rows = lineage_log(tmp_path / "third" / "last.pt")
    assert [r["iteration"] for r in rows] == list(range(1, 13))
    assert [r["stage"] for r in rows] == [1] * 6 + [2] * 4 + [3] * 2
    assert all(type(r["stage"]) is int for r in rows)   # "1", not "1.0", in the CSV it writes
    assert rows[-1]["loss_kind"] == "mse" and rows[-3]["loss_kind"] == "cross_entropy"
    with pytest.raises(ValueError, match="no training state"):
        second.save(tmp_path / "model.pt", training=False)
        lineage_log(tmp_path / "model.pt")


def test_a_runs_history_survives_its_parent_being_replaced(tmp_path):
    """A run keeps its --init model's history: exporting a later stage over the model an earlier
    stage started from, or deleting a parent run, leaves every run's history as it was."""
    from glom_mnist.train import export_run, lineage_log

    images, labels, *_ = synthetic(8)
    Trainer(tiny_cfg(tmp_path, "first"), images, labels, images, labels).fit(progress=False)
    export_run(tmp_path / "first" / "last.pt", tmp_path / "ship" / "model.pt")
    Trainer(tiny_cfg(tmp_path, "second", iterations=3, init=str(tmp_path / "ship" / "model.pt")),
            images, labels, images, labels).fit(progress=False)
    Trainer(tiny_cfg(tmp_path, "third", iterations=2, init=str(tmp_path / "second" / "last.pt")),
            images, labels, images, labels).fit(progress=False)
    before = lineage_log(tmp_path / "third" / "last.pt")
    assert [r["stage"] for r in before] == [1] * 6 + [2] * 3 + [3] * 2
    # the third stage replaces the model the second started from, and the second run is deleted
    export_run(tmp_path / "third" / "last.pt", tmp_path / "ship" / "model.pt", metrics={})
    (tmp_path / "second" / "last.pt").unlink()
    assert lineage_log(tmp_path / "third" / "last.pt") == before
    # resumed, a run still has it
    cfg = tiny_cfg(tmp_path, "third", iterations=4, init=str(tmp_path / "second" / "last.pt"))
    Trainer(cfg, images, labels, images, labels,
            resume=tmp_path / "third" / "last.pt").fit(progress=False)
    after = lineage_log(tmp_path / "third" / "last.pt")
    assert after[:len(before)] == before and [r["stage"] for r in after[-4:]] == [3] * 4


def test_resuming_with_another_loss_is_refused(tmp_path):
    images, labels, *_ = synthetic(8)
    Trainer(tiny_cfg(tmp_path, "a", iterations=2, loss="cross_entropy"),
            images, labels, images, labels).fit(progress=False)
    with pytest.raises(ValueError, match="resume it with --loss cross_entropy"):
        Trainer(tiny_cfg(tmp_path, "a"), images, labels, images, labels,
                resume=tmp_path / "a" / "last.pt")


def _train_args(*argv: str):
    from glom_mnist.cli import build_parser
    return build_parser("train").parse_args(["train", *argv])


def test_options_not_given_take_the_defaults_or_the_resumed_runs_own(tmp_path):
    from glom_mnist.train import config_from_args

    assert config_from_args(_train_args()) == TrainConfig()
    assert config_from_args(_train_args("--lr", "0.003", "--set", "dropout=0")) == \
        TrainConfig(lr=0.003, model_overrides={"dropout": 0.0})

    images, labels, *_ = synthetic(8)
    recipe = dict(lr=0.003, schedule="cosine", loss="cross_entropy", batch_size=3, seed=7,
                  max_minutes=30.0)
    Trainer(tiny_cfg(tmp_path, "a", iterations=2, **recipe),
            images, labels, images, labels).fit(progress=False)
    last = str(tmp_path / "a" / "last.pt")
    cfg = config_from_args(_train_args("--resume", last, "--iterations", "9",
                                       "--max-minutes", "5"))
    for name, value in recipe.items():
        if name != "max_minutes":
            assert getattr(cfg, name) == value, name          # the run's recipe goes on
    assert cfg.iterations == 9 and cfg.max_minutes == 5.0     # what was given wins
    assert cfg.model_overrides == TINY and cfg.out_dir == str(tmp_path / "a")
    resumed = Trainer(cfg, images, labels, images, labels, resume=last)
    assert resumed.iteration == 2 and resumed.fit(progress=False)["finished"]


def test_export_ships_an_unfinished_run_and_never_overwrites(tmp_path, capsys):
    from glom_mnist.cli import main

    images, labels, *_ = synthetic(8)
    trainer = Trainer(tiny_cfg(tmp_path, "run", max_minutes=0.0), images, labels, images, labels)
    assert trainer.fit(progress=False)["finished"] is False            # stopped after 1 of 6
    last, out = tmp_path / "run" / "last.pt", tmp_path / "ship" / "model.pt"
    assert main(["export", str(last), str(out)]) == 0
    shipped = read_checkpoint(out)
    assert "training" not in shipped
    assert shipped["metrics"]["iterations"] == 1 and shipped["metrics"]["scheduled_iterations"] == 6
    assert shipped["metrics"]["finished"] is False
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, load_checkpoint(out, device="cpu").state_dict()[k])
    with open(out.with_suffix(".log.csv")) as f:
        assert [float(r["iteration"]) for r in csv.DictReader(f)] == [1.0]
    before = out.read_bytes()
    assert main(["export", str(last), str(out)]) == 2                  # exists: refused
    assert "pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(out), str(tmp_path / "again.pt")]) == 2  # not a run's checkpoint
    assert "no training state" in capsys.readouterr().err


def test_ctrl_c_ends_a_command_with_a_line_not_a_traceback(monkeypatch, capsys):
    import glom_mnist.export
    from glom_mnist.cli import main

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(glom_mnist.export, "run", interrupted)
    assert main(["export", "a.pt", "b.pt"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_provenance_names_the_commit_the_run_started_with(tmp_path, monkeypatch):
    import glom_mnist.train

    images, labels, *_ = synthetic(8)
    monkeypatch.setattr(glom_mnist.train, "git_commit", lambda: "started-here")
    trainer = Trainer(tiny_cfg(tmp_path, "run", iterations=2), images, labels, images, labels)
    monkeypatch.setattr(glom_mnist.train, "git_commit", lambda: "edited-since")
    trainer.fit(progress=False)
    assert read_checkpoint(tmp_path / "run" / "last.pt")["provenance"]["git_commit"] == "started-here"


def test_revive_restarts_only_the_units_stuck_at_plus_or_minus_one():
    torch.manual_seed(0)
    model = Glom(GlomConfig.preset("seed", **TINY))
    images = synthetic()[0][:4]
    assert revive_saturated_units(model, images) == []            # a fresh model has none
    with torch.no_grad():
        model.a[2, 3] = -40.0                                       # unit 3 of network 2: dead
        model.A[0, 4] *= 1000                   # unit 4 of network 0: +-1 by its input, alive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    role, src, tgt = model.routes[2]
    assert revive_saturated_units(model, images) == [(role, src, tgt, 3)]
    after = model.state_dict()
    assert torch.all(after["A"][2, 3] == 0) and after["a"][2, 3] == 0
    after["A"][2, 3], after["a"][2, 3] = before["A"][2, 3], before["a"][2, 3]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_revive_needs_a_trained_model(tmp_path):
    with pytest.raises(ValueError, match="--init"):
        Trainer(tiny_cfg(tmp_path, "x", revive=True), *synthetic())
