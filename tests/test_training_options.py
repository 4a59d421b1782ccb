"""Training options beyond the seed's recipe (validation split, warm-up, shifts, AdamW, the patch
presets) and evaluating as the seed's test loop did (dropout on, repeated over seeds)."""
from __future__ import annotations

import pytest
import torch

from glom_mnist import Glom, GlomConfig
from glom_mnist import train as train_module
from glom_mnist.checkpoint import read_checkpoint
from glom_mnist.evaluate import evaluate_model, repeated_metrics
from glom_mnist.patch_glom import PatchGlom
from glom_mnist.train import TrainConfig, Trainer, learning_rate, load_training_data, random_shift

PATCH_TINY = {"dim": 8, "hidden": 1, "steps": 3, "loss_steps": 2, "pos_freqs": 1,
              "height": 8, "width": 8}


def test_warm_up_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup=4, iterations=14, schedule="cosine")
    assert [learning_rate(cfg, i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 4) == pytest.approx(1.0)
    assert learning_rate(cfg, 9) == pytest.approx(0.5)
    assert learning_rate(cfg, 14) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(TrainConfig(lr=0.01), 3000) == 0.01           # the seed's: constant


def test_random_shift_moves_each_image_by_at_most_the_given_pixels():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 12, 12)
    images[:, :, 6, 6] = 1.0
    shifted = random_shift(images, 2)
    assert shifted.shape == images.shape
    where = shifted.flatten(1).argmax(1)
    rows, cols = where // 12, where % 12
    assert torch.equal(shifted.flatten(1).sum(1), torch.ones(64))      # the dot, moved, not lost
    assert ((rows - 6).abs() <= 2).all() and ((cols - 6).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10             # offsets differ by image


def test_validation_split_is_the_last_training_images(monkeypatch):
    train_x, train_y = torch.arange(100).view(100, 1, 1, 1).float(), torch.arange(100) % 10
    test_x, test_y = -torch.ones(30, 1, 1, 1), torch.zeros(30, dtype=torch.long)
    from glom_mnist import data
    monkeypatch.setattr(data, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(data, "normalise", lambda x, dataset: x)
    monkeypatch.setattr(data, "load_split",
                        lambda dataset, root, train: (train_x, train_y) if train else (test_x, test_y))
    x, y, hx, hy = load_training_data(TrainConfig(val=20, eval_images=15))
    assert x.flatten().tolist() == list(range(80))                      # never trains on them
    assert hx.flatten().tolist() == list(range(80, 95))                 # the first 15 of the 20
    _, _, tx, _ = load_training_data(TrainConfig(val=0, eval_images=15))
    assert (tx == -1).all() and len(tx) == 15                           # no split: test images
    with pytest.raises(ValueError, match="leaves no training images"):
        load_training_data(TrainConfig(val=100))


def synthetic(n: int = 32):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) + labels[:, None, None, None] * 0.2
    return images, labels, images[:8], labels[:8]


def patch_cfg(tmp_path, name, **kw) -> TrainConfig:
    values = dict(preset="patch", model_overrides=PATCH_TINY, iterations=6, batch_size=4,
                  eval_every=3, eval_images=8, checkpoint_every=2, out_dir=str(tmp_path / name),
                  device="cpu", optimizer="adamw", weight_decay=0.05, warmup=2,
                  schedule="cosine", shift=1, lr=3e-3)
    return TrainConfig(**{**values, **kw})


def test_a_patch_preset_trains_and_resumes_exactly(tmp_path):
    straight = Trainer(patch_cfg(tmp_path, "a"), *synthetic())
    assert isinstance(straight.model, PatchGlom)
    assert isinstance(straight.optimizer, torch.optim.AdamW)
    straight.fit(progress=False)
    first = Trainer(patch_cfg(tmp_path, "b", iterations=3), *synthetic())
    first.fit(progress=False)
    torch.manual_seed(99)                                               # disturb the RNG
    resumed = Trainer(patch_cfg(tmp_path, "b"), *synthetic(), resume=tmp_path / "b" / "last.pt")
    resumed.fit(progress=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    saved = read_checkpoint(tmp_path / "a" / "last.pt")
    assert saved["config"]["kind"] == "patch"
    assert "majority_vote_accuracy" in straight.log[-1]


def test_init_may_switch_off_an_ingredient_leaving_its_weights_out(tmp_path, capsys):
    """A trained patch model fine-tuned without its positional signal (`--set positional=false`);
    switching one on, which would need weights the checkpoint lacks, is refused."""
    first = Trainer(patch_cfg(tmp_path, "a", iterations=2), *synthetic())
    first.save(tmp_path / "a.pt", training=False)
    plain = Trainer(patch_cfg(tmp_path, "b", init=str(tmp_path / "a.pt"),
                              model_overrides={**PATCH_TINY, "positional": False}), *synthetic())
    assert plain.model.where is None
    note = capsys.readouterr().err
    assert "positional (run False, checkpoint True), so these are left out: where" in note
    theirs = first.model.state_dict()
    assert set(theirs) - set(plain.model.state_dict()) == {"where"}
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    plain.save(tmp_path / "b.pt", training=False)
    with pytest.raises(ValueError, match=r"do not fit.*positional \(run True, checkpoint False\)"):
        Trainer(patch_cfg(tmp_path, "c", init=str(tmp_path / "b.pt")), *synthetic())


def test_evaluating_with_dropout_as_the_seeds_test_loop(monkeypatch):
    torch.manual_seed(0)
    model = Glom(GlomConfig.preset("seed", height=6, width=6, steps=3, noise=0.5)).eval()
    images, labels = torch.randn(8, 1, 6, 6), torch.randint(0, 10, (8,))
    seen = []
    real_rollout = Glom.rollout

    def rollout(self, *args, **kwargs):
        seen.append((self.training, self.cfg.noise))
        return real_rollout(self, *args, **kwargs)

    monkeypatch.setattr(Glom, "rollout", rollout)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(evaluate_model(model, images, labels, batch_size=8, progress=False,
                                   dropout=True))
    assert set(seen) == {(True, 0.0)}                      # dropout on (training mode), no noise
    assert not model.training and model.cfg.noise == 0.5   # given back as it was
    assert runs[0]["dropout"] is True
    torch.manual_seed(0)
    again = evaluate_model(model, images, labels, batch_size=8, progress=False, dropout=True)
    assert again["confusion_matrix"] == runs[0]["confusion_matrix"]     # seeded: repeatable
    with pytest.raises(ValueError, match="no dropout"):
        evaluate_model(Glom(GlomConfig.preset("seed", height=6, width=6, dropout=0.0)), images,
                       labels, progress=False, dropout=True)


def test_repeated_metrics_are_the_mean_and_spread_of_the_runs():
    def run(acc, column, agree, diag):
        confusion = torch.zeros(10, 10, dtype=torch.long)
        confusion[0, 0], confusion[0, 1] = diag, 4 - diag
        return {"majority_vote_accuracy": acc, "per_column_accuracy": column,
                "all_columns_agree": agree, "confusion_matrix": confusion.tolist(),
                "per_class_accuracy": [0.0] * 10, "images": 4}
    out = repeated_metrics([run(0.5, 0.4, 0.1, 2), run(0.75, 0.6, 0.3, 3)])
    assert out["majority_vote_accuracy"] == pytest.approx(0.625)
    assert out["majority_vote_accuracy_std"] == pytest.approx(0.1767767, rel=1e-5)
    assert out["per_column_accuracy_runs"] == pytest.approx([0.4, 0.6])
    assert out["repeats"] == 2
    assert out["per_class_accuracy"][0] == pytest.approx(5 / 8)         # summed confusion
