"""Training a patch GLOM on scenes of several digits (`train --scenes`), and measuring a
checkpoint on test scenes (the `scenes` command). Toy digits (solid rectangles whose height
names their class) for training; MNIST for the commands end to end."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glom_mnist.checkpoint import read_checkpoint
from glom_mnist import load_checkpoint
from glom_mnist.cli import build_parser
from glom_mnist.data import load_split
from glom_mnist.scenes import evaluate_scenes, scene_batch
from glom_mnist.train import TrainConfig, Trainer
from test_reliability import cli, one_error_line
from test_scenes import toy_digits

DATA = Path(__file__).resolve().parent.parent / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(),
                                 reason="MNIST not prepared (`make data`; `make test` does it first)")
TINY = {"steps": 2, "dim": 8, "loss_steps": 1, "pos_freqs": 1}


def toy_split() -> tuple[torch.Tensor, ...]:
    """Raw toy digits as `load_training_data` gives them with --scenes: training classes 0-5
    (three of each), validation classes 6-9."""
    images, labels = toy_digits()
    train = labels < 6
    return images[train].repeat(3, 1, 1), labels[train].repeat(3), images[~train], labels[~train]


def scene_cfg(tmp_path: Path, name: str, **changes) -> TrainConfig:
    values = dict(preset="patch_small", scenes="pair", model_overrides=TINY, val=4, iterations=4,
                  batch_size=4, eval_every=2, eval_images=6, checkpoint_every=2, lr=3e-3,
                  schedule="cosine", warmup=1, out_dir=str(tmp_path / name), device="cpu")
    return TrainConfig(**{**values, **changes})


# ---- training on scenes -----------------------------------------------------------------------

def test_a_batch_is_fresh_pairs_of_training_digits_each_column_targeting_its_digit(tmp_path):
    trainer = Trainer(scene_cfg(tmp_path, "a"), *toy_split())
    assert (trainer.model.cfg.height, trainer.model.cfg.width) == (28, 56)
    x, targets = trainer.training_batch(torch.arange(4))
    assert x.shape == (4, 1, 28, 56) and targets.shape == (4, 7, 14)
    ink = x[:, 0] > 0.5                                                   # the rectangles' inside
    for scene, target in zip(ink, targets):
        # a toy digit's class is its height - 6; each half of a pair holds one digit
        left, right = (int(half.any(1).sum()) - 6 for half in (scene[:, :28], scene[:, 28:]))
        assert left != right and {left, right} <= set(range(6))          # training classes only
        on_digit = scene.reshape(7, 4, 14, 4).any(3).any(1)              # (7, 14) digit columns
        assert (target[:, :7][on_digit[:, :7]] == left).all()
        assert (target[:, 7:][on_digit[:, 7:]] == right).all()
        assert set(target.unique().tolist()) == {left, right}
    trainer.iteration = 1                                                 # the next iteration's
    assert not torch.equal(trainer.training_batch(torch.arange(4))[0], x)
    again = Trainer(scene_cfg(tmp_path, "b"), *toy_split())               # the same seed's
    assert torch.equal(again.training_batch(torch.arange(4))[0], x)
    validation = trainer.eval_scenes.labels
    assert len(validation) == 6 and set(validation[validation >= 0].tolist()) <= {6, 7, 8, 9}


def test_scene_training_resumes_exactly_and_logs_the_object_metrics(tmp_path):
    straight = Trainer(scene_cfg(tmp_path, "a"), *toy_split())
    straight.fit(progress=False)
    first = Trainer(scene_cfg(tmp_path, "b", iterations=2), *toy_split())
    first.fit(progress=False)
    torch.manual_seed(99)                                                 # disturb the RNG
    resumed = Trainer(scene_cfg(tmp_path, "b"), *toy_split(), resume=tmp_path / "b" / "last.pt")
    resumed.fit(progress=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["loss"] for r in straight.log] == [r["loss"] for r in resumed.log]

    curve = json.loads((tmp_path / "a" / "curve.json").read_text())
    assert [r["iteration"] for r in curve] == [2, 4]
    for row in curve:
        assert 0 <= row["all_objects_right"] <= row["object_accuracy"] <= 1
        assert row["majority_vote_accuracy"] == row["object_accuracy"]
        assert -1 <= row["island_ari"] <= 1 and "all_columns_agree" not in row
    assert "island_ari" in (tmp_path / "a" / "log.csv").read_text().splitlines()[0]
    saved = read_checkpoint(tmp_path / "a" / "last.pt")
    assert (saved["config"]["height"], saved["config"]["width"]) == (28, 56)
    assert saved["provenance"]["train_config"]["scenes"] == "pair"

    with pytest.raises(ValueError, match="trained on --scenes pair"):
        Trainer(scene_cfg(tmp_path, "b", scenes="random", iterations=6), *toy_split(),
                resume=tmp_path / "b" / "last.pt")


def test_what_scene_training_cannot_do_is_refused_in_one_line(tmp_path, capsys):
    for changes, says in ((dict(preset="seed", model_overrides={}), "only the patch presets"),
                          (dict(shift=2), "drop --shift"),
                          (dict(val=0), "give --val N"),
                          (dict(model_overrides={**TINY, "width": 28}), "drop --set width=28"),
                          (dict(scenes="triple"), "scenes must be one of")):
        with pytest.raises(ValueError, match=says):
            scene_cfg(tmp_path, "x", **changes)
    code, _, err = cli(capsys, "train", "--scenes", "pair", "--val", "100", "--out-dir",
                       tmp_path / "seed")
    assert "--preset patch or patch_small, not seed" in one_error_line(code, err)
    assert not (tmp_path / "seed" / "last.pt").exists()


# ---- the islands in the objective (--island-weight) -------------------------------------------

def two_objects(top_same: bool, lower_same: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """States `(S=2, B=1, L=3, D=4, 2, 4)` of a scene whose left two columns are one object
    (class 0) and right two another (class 3): at the top level the same vector everywhere or
    one per object, at level 1 likewise; level 0 (the input) the same everywhere."""
    states = torch.zeros(2, 1, 3, 4, 2, 4)
    states[:, :, 0, 2] = 1
    for level, same in ((1, lower_same), (2, top_same)):
        states[:, :, level, 0, :, :2] = 1
        states[:, :, level, 0 if same else 1, :, 2:] = 1
    targets = torch.zeros(1, 2, 4, dtype=torch.long)
    targets[:, :, 2:] = 3
    return states, targets


def test_island_loss_is_zero_for_one_island_per_object_and_penalises_what_crosses():
    from glom_mnist.patch_glom import ISLAND_MARGIN, island_loss
    assert island_loss(*two_objects(top_same=False, lower_same=False)) == 0
    # one top-level island over both objects: the 4 pairs across the border, all at cosine 1
    assert island_loss(*two_objects(top_same=True, lower_same=False)) == pytest.approx(
        (1 - ISLAND_MARGIN) / 2)                               # of the 4 (levels 1, 2) x 2 rows
    # a level-1 island crossing the border is a part in two wholes
    assert island_loss(*two_objects(top_same=False, lower_same=True)) == pytest.approx(
        (1 - ISLAND_MARGIN) / 2)
    # inside one object, lower levels may differ (parts); the top level must agree
    states, targets = two_objects(top_same=False, lower_same=False)
    states[:, :, 1, :, :, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])[:, None]
    assert island_loss(states, targets) == 0
    states[:, :, 2, :, :, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0])[:, None]  # top: orthogonal
    assert island_loss(states, targets) > 0
    single = torch.zeros_like(targets)                         # one object: agreement only
    assert island_loss(*two_objects(top_same=True, lower_same=True)[:1], single) == 0


def test_island_loss_apart_everywhere_also_separates_objects_that_do_not_touch():
    from glom_mnist.patch_glom import ISLAND_MARGIN, island_loss
    states, targets = two_objects(top_same=False, lower_same=False)
    assert island_loss(states, targets, apart_everywhere=True) == 0
    # the right object's last column takes the left object's top-level vector: no neighbour
    # across the border agrees, but 8 of the 16 pairs of columns in different objects do
    states[:, :, 2, :, :, 3] = states[:, :, 2, :, :, 0]
    assert island_loss(states, targets, apart_everywhere=True) - island_loss(
        states, targets) == pytest.approx((1 - ISLAND_MARGIN) * 8 / 16)
    states, targets = two_objects(top_same=True, lower_same=False)   # one island over both
    assert island_loss(states, targets, apart_everywhere=True) == pytest.approx(
        (1 - ISLAND_MARGIN) / 2 + (1 - ISLAND_MARGIN))


def test_island_boundary_counts_the_top_level_across_the_border_on_its_own():
    from glom_mnist.patch_glom import ISLAND_MARGIN, island_loss
    # one top-level island over both objects: the border pairs' top level is 1 of the 2 levels
    # (so half the penalty) in the second term, and the whole penalty, times 3, in the fourth
    states, targets = two_objects(top_same=True, lower_same=False)
    assert island_loss(states, targets, boundary=3.0) - island_loss(
        states, targets) == pytest.approx(3 * (1 - ISLAND_MARGIN))
    # a level-1 island across the border: the fourth term looks at the top level only
    states, targets = two_objects(top_same=False, lower_same=True)
    assert island_loss(states, targets, boundary=3.0) == pytest.approx(island_loss(states, targets))
    assert island_loss(*two_objects(top_same=False, lower_same=False), boundary=3.0) == 0


def test_island_hold_pulls_only_the_neighbours_in_one_object_below_the_hold_cosine():
    from glom_mnist.patch_glom import ISLAND_HOLD, island_loss
    for cosine in (0.8, ISLAND_HOLD + 0.02):
        # the left object's second column tilted at the top level: cosine `cosine` with the
        # first, 0 with the right object; 2 of the 8 pairs in one object, in both steps
        states, targets = two_objects(top_same=False, lower_same=False)
        states[:, :, 2, :, :, 1] = 0
        states[:, :, 2, 0, :, 1] = cosine
        states[:, :, 2, 3, :, 1] = (1 - cosine ** 2) ** 0.5
        assert island_loss(states, targets, hold=2.0) - island_loss(
            states, targets) == pytest.approx(2 * max(ISLAND_HOLD - cosine, 0) * 2 / 8)


def test_island_parts_pulls_the_lower_levels_of_ink_neighbours_in_one_object_only():
    from glom_mnist.patch_glom import ISLAND_HOLD, island_loss
    states, targets = two_objects(top_same=False, lower_same=False)
    ink = torch.ones(1, 2, 4, dtype=torch.bool)
    ink[:, 1, :2] = False                         # the left object's lower row is blank canvas
    with pytest.raises(ValueError, match="needs the ink columns"):
        island_loss(states, targets, parts=1.0)
    assert island_loss(states, targets, parts=2.0, ink=ink) == island_loss(states, targets)
    for cosine in (0.3, ISLAND_HOLD + 0.02):
        # level 1 of the left object's second column tilted (cosine `cosine` with the first, 0
        # with the right object): of the 5 ink pairs in one object (2 across and 2 down in the
        # right object, the upper one in the left), one below the hold; the blank pair is not
        # asked, nor is the top level
        states, targets = two_objects(top_same=False, lower_same=False)
        states[:, :, 1, 0, :, 1] = cosine
        states[:, :, 1, 3, :, 1] = (1 - cosine ** 2) ** 0.5
        assert island_loss(states, targets, parts=2.0, ink=ink) - island_loss(
            states, targets) == pytest.approx(2 * max(ISLAND_HOLD - cosine, 0) / 5)


def test_the_trainer_gives_the_part_term_the_ink_columns_of_its_scenes(tmp_path, monkeypatch):
    import glom_mnist.patch_glom as patch_glom
    from glom_mnist.islands import digit_columns
    from glom_mnist.train import EPOCH_SEED
    seen, real = {}, patch_glom.island_loss

    def spy(states, targets, **options):
        seen.update(options)
        return real(states, targets, **options)

    monkeypatch.setattr(patch_glom, "island_loss", spy)
    trainer = Trainer(scene_cfg(tmp_path, "p", island_weight=1.0, island_parts=2.0),
                      *toy_split())
    trainer.batch_loss(trainer.model, torch.arange(4))
    generator = torch.Generator().manual_seed(trainer.cfg.seed * EPOCH_SEED + trainer.iteration)
    scenes = scene_batch(trainer.images, trainer.labels, 4, generator, "pair")
    assert seen["parts"] == 2.0
    assert seen["ink"].any() and not seen["ink"].all()
    assert torch.equal(seen["ink"], digit_columns(scenes.background, trainer.model.patch))


def test_island_weight_adds_the_islands_to_the_loss_and_is_refused_where_it_cannot_apply(tmp_path):
    plain = Trainer(scene_cfg(tmp_path, "a"), *toy_split())
    islands = Trainer(scene_cfg(tmp_path, "b", island_weight=1.0), *toy_split())
    torch.manual_seed(0)
    loss, *_ = plain.batch_loss(plain.model, torch.arange(4))
    torch.manual_seed(0)
    more, *_ = islands.batch_loss(islands.model, torch.arange(4))
    assert more.item() > loss.item()                           # the same model, batch and rollout
    everywhere = Trainer(scene_cfg(tmp_path, "c", island_weight=1.0,
                                   island_apart_everywhere=True), *toy_split())
    torch.manual_seed(0)
    most, *_ = everywhere.batch_loss(everywhere.model, torch.arange(4))
    assert most.item() > more.item()           # the untrained top level is alike everywhere
    islands.fit(progress=False)
    assert read_checkpoint(tmp_path / "b" / "last.pt")["provenance"]["train_config"][
        "island_weight"] == 1.0
    for changes, says in ((dict(island_weight=-1.0), "island_weight must be >= 0"),
                          (dict(island_weight=1.0, scenes=None, preset="seed", model_overrides={}),
                           "--island-weight adds the islands"),
                          (dict(island_apart_everywhere=True), "give --island-weight too"),
                          (dict(island_boundary=1.0), "give --island-weight too"),
                          (dict(island_weight=1.0, island_boundary=-1.0),
                           "island_boundary must be >= 0"),
                          (dict(island_hold=1.0), "--island-hold is a term of the islands"),
                          (dict(island_weight=1.0, island_hold=-0.5),
                           "island_hold must be >= 0"),
                          (dict(island_parts=1.0), "--island-parts is a term of the islands"),
                          (dict(island_weight=1.0, island_parts=-1.0),
                           "island_parts must be >= 0")):
        with pytest.raises(ValueError, match=says):
            scene_cfg(tmp_path, "x", **changes)


# ---- the commands end to end on MNIST ---------------------------------------------------------

@needs_mnist
def test_train_on_scenes_then_measure_the_checkpoint_on_test_scenes(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--preset", "patch_small", "--scenes", "pair",
                         *[a for kv in TINY.items() for a in ("--set", "%s=%s" % kv)],
                         "--val", "100", "--limit-train", "64", "--batch-size", "4",
                         "--iterations", "2", "--eval-images", "4", "--eval-every", "2",
                         "--device", "cpu", "--root", DATA, "--out-dir", run)
    assert code == 0, err
    assert "validation scenes object accuracy" in err + out
    [row] = json.loads((run / "curve.json").read_text())
    assert {"object_accuracy", "all_objects_right", "island_ari"} <= row.keys()

    checkpoint, metrics = run / "last.pt", tmp_path / "scenes.json"
    args = ["scenes", "--checkpoint", checkpoint, "--kind", "pair", "--scenes", "6",
            "--tau", "0.9", "0.5", "--batch-size", "4", "--device", "cpu", "--root", DATA,
            "--json", metrics]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "object accuracy" in out and "all objects right" in out and "island ARI" in out
    found = json.loads(metrics.read_text())
    assert found["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert found["checkpoint_name"] == "last.pt" and found["kind"] == "pair"
    assert found["scenes"] == 6 and found["seed"] == 0 and found["canvas"] == [28, 56]
    assert set(found["islands"]) == {"0.9", "0.5"}
    assert len(found["islands"]["0.9"]["containment"]) == 3               # one per level
    command = found["command"].split()
    assert command[:3] == ["python", "-m", "glom_mnist"]
    assert vars(build_parser("scenes").parse_args(command[3:])) == \
        vars(build_parser("scenes").parse_args([str(a) for a in args]))  # the same options

    before = metrics.read_bytes()
    code, out, err = cli(capsys, *args)                                   # no overwrite ...
    assert "pass --force" in one_error_line(code, err) and "object accuracy" not in out
    assert metrics.read_bytes() == before
    assert cli(capsys, *args, "--force")[0] == 0                          # ... unless --force
    assert json.loads(metrics.read_text()) == found                       # seeded: the same
    saved = checkpoint.read_bytes()
    code, _, err = cli(capsys, *args[:-1], checkpoint, "--force")         # never the checkpoint
    assert "is the checkpoint being measured" in one_error_line(code, err)
    assert checkpoint.read_bytes() == saved
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []

    figure = tmp_path / "scenes.png"                                      # the scenes drawn
    code, out, err = cli(capsys, *args[:-2], "--figure", figure)
    assert code == 0, err
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {figure}" in out
    drawn = figure.read_bytes()
    code, out, err = cli(capsys, *args[:-2], "--figure", figure)          # no overwrite ...
    assert "pass --force" in one_error_line(code, err) and figure.read_bytes() == drawn
    code, _, err = cli(capsys, *args[:-2], "--figure", tmp_path / "scenes.jpg")
    assert "must be a .png file" in one_error_line(code, err)
    assert not (tmp_path / "scenes.jpg").exists()

    # choices are made on scenes of the validation digits, the last --val training images: the
    # curve's own scenes for the same seed, none of them a test digit
    val_json = tmp_path / "val.json"
    code, out, err = cli(capsys, *args[:-1], val_json, "--val", "100")
    assert code == 0, err
    assert "validation digits" in out and "test digits" not in out   # the table says which digits
    validation = json.loads(val_json.read_text())
    assert validation["split"] == "validation (the last 100 training images)"
    assert found["split"] == "test" and validation["scenes"] == 6
    images, labels = load_split("mnist", DATA, train=True)
    expected = scene_batch(images[-100:], labels[-100:], 6, torch.Generator().manual_seed(0),
                           "pair")
    model = load_checkpoint(checkpoint, device="cpu", height=28, width=56)
    assert validation["object_accuracy"] == evaluate_scenes(model, expected)["object_accuracy"]
    for bad, says in (("-1", "--val must be >= 0"), ("60000", "leaves no training images")):
        code, _, err = cli(capsys, *args[:-1], tmp_path / "bad.json", "--val", bad)
        assert says in one_error_line(code, err)
    code, _, err = cli(capsys, *args[:-1], tmp_path / "bad.json", "--steps", "0")
    assert "--steps must be >= 1" in one_error_line(code, err)
    assert not (tmp_path / "bad.json").exists()
    code, out, err = cli(capsys, *args[:-1], tmp_path / "longer.json", "--steps", "3")
    assert code == 0 and ", 3 steps" in out, err                         # past its own 2 steps
    assert json.loads((tmp_path / "longer.json").read_text())["steps"] == 3 != found["steps"]


def test_the_gpu_scene_stage_script_keeps_an_earlier_runs_model_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scenes.pt").write_bytes(b"an earlier stage")
    done = subprocess.run(["bash", "scripts/gpu_scenes.sh"], cwd=DATA.parent, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OUT": str(out),
                                                      "RUNS": str(tmp_path / "runs")})
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        f"gpu_scenes.sh: {out / 'scenes.pt'} is left from an earlier run; move it away, or set "
        "FORCE=1 to replace it"]
    assert (out / "scenes.pt").read_bytes() == b"an earlier stage"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
@needs_mnist
def test_the_gpu_scene_stage_script_runs_end_to_end_on_a_cpu(tmp_path):
    """scripts/gpu_scenes.sh at toy sizes (its dry run): a stage from the shipped scene model,
    exported with its history, then measured on validation scenes, 4 steps past, and pairs."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "RUNS": str(tmp_path / "runs"), "BATCH": "2",
           "PROBE": "2", "ITERS": "3", "VAL_SCENES": "4", "RESERVE_S": "30", "BUDGET_S": "300",
           "PY": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_scenes.sh"], cwd=DATA.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {name: json.loads((out / f"{name}.json").read_text())
             for name in ("val_random", "val_random_20", "val_pairs")}
    assert [(f["kind"], f["steps"], f["scenes"]) for f in found.values()] == [
        ("random", 16, 4), ("random", 20, 4), ("pair", 16, 4)]
    assert all(f["split"].startswith("validation") for f in found.values())
    assert json.loads((out / "failures.json").read_text())["scenes"] == 2
    history = (out / "scenes.log.csv").read_text().splitlines()
    assert len(history) > 27_000                     # the shipped model's stages, then this one
