"""The best shipped models still give their recorded results: a change to a model, the rollout, the
vote or the data pipeline that moves a headline number fails here.

Each record, best_models/NAME_first500.json (glom_seed_hard: the seed's architecture; glom_best:
the patch GLOM), holds counts on the first 500 test images (seed 0 for the initial noise, one
batch, eval mode: no dropout, no noise), written by

    PYTHONPATH=. python tests/test_headline.py NAME --write

and best_models/glom_scenes_first100pairs.json the scene model's counts on the first 100 test
pairs (`scenes.test_scenes("pair", 100)`, seed 0): objects right, columns on their object's class,
top-level islands, and the island ARI to 3 decimals (`... test_headline.py glom_scenes --write`).

Evaluation has no dropout, so the compiled CPU networks and the pure-torch ones compute the same
rollout up to rounding, and both must reproduce the record exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from glom_mnist import load_checkpoint
from glom_mnist.data import load_split, normalise, prepare
from glom_mnist.evaluate import evaluate_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("glom_seed_hard", "glom_best")
SCENE_MODEL = "glom_scenes"
IMAGES, SEED, PAIRS = 500, 0, 100


def checkpoint_of(name: str) -> Path:
    return ROOT / "best_models" / f"{name}.pt"


def record_of(name: str) -> Path:
    if name == SCENE_MODEL:
        return ROOT / "best_models" / f"{name}_first{PAIRS}pairs.json"
    return ROOT / "best_models" / f"{name}_first500.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """On two busy cores, two threads spend most of their time waiting: measure on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(checkpoint: Path, images: int = IMAGES, seed: int = SEED) -> dict[str, Any]:
    """Counts of `checkpoint` on the first `images` MNIST test images, on the CPU."""
    prepare("mnist", ROOT / "data")
    model = load_checkpoint(checkpoint, device="cpu")
    raw, labels = load_split("mnist", ROOT / "data", train=False)
    with one_thread():
        torch.manual_seed(seed)
        metrics = evaluate_model(model, normalise(raw[:images], "mnist"), labels[:images],
                                 batch_size=images, progress=False)
    patch = getattr(model.cfg, "patch", 1)                  # a column per pixel, or per patch
    columns = images * (model.cfg.height // patch) * (model.cfg.width // patch)
    confusion = metrics["confusion_matrix"]                   # rows: label, columns: vote
    return {
        "checkpoint": str(checkpoint.relative_to(ROOT)),
        "checkpoint_sha256": sha256(checkpoint),
        "test_images": images,
        "seed": seed,
        "majority_vote_right": sum(confusion[c][c] for c in range(len(confusion))),
        "columns": columns,
        "columns_right": round(metrics["per_column_accuracy"] * columns),
        "all_columns_agree": round(metrics["all_columns_agree"] * images),
        "confusion_matrix": confusion,
        "command": f"PYTHONPATH=. python tests/test_headline.py {checkpoint.stem} --write",
    }


def measure_scenes(checkpoint: Path, pairs: int = PAIRS, seed: int = SEED) -> dict[str, Any]:
    """Counts of `checkpoint` on the first `pairs` test pairs (28x56), on the CPU."""
    from glom_mnist.scenes import evaluate_scenes, test_scenes

    prepare("mnist", ROOT / "data")
    model = load_checkpoint(checkpoint, device="cpu", height=28, width=56)
    scenes = test_scenes("pair", pairs, seed, root=ROOT / "data")
    with one_thread():
        found = evaluate_scenes(model, scenes, tau=0.9, batch_size=pairs, seed=seed)
    columns = pairs * (28 // model.patch) * (56 // model.patch)
    at = found["islands"][0.9]
    return {
        "checkpoint": str(checkpoint.relative_to(ROOT)),
        "checkpoint_sha256": sha256(checkpoint),
        "test_pairs": pairs,
        "seed": seed,
        "objects_right": round(found["object_accuracy"] * 2 * pairs),
        "pairs_all_right": round(found["all_objects_right"] * pairs),
        "columns": columns,
        "columns_on_target": round(found["column_accuracy"] * columns),
        "top_level_islands": round(at["islands_per_scene"][-1] * pairs),
        "island_ari": round(at["island_ari"], 3),
        "digit_island_ari": round(at["digit_island_ari"], 3),
        "command": f"PYTHONPATH=. python tests/test_headline.py {checkpoint.stem} --write",
    }


SCENE_KEYS = ("objects_right", "pairs_all_right", "columns_on_target", "top_level_islands",
              "island_ari", "digit_island_ari")


def recorded(name: str) -> dict[str, Any]:
    record = json.loads(record_of(name).read_text())
    assert record["checkpoint_sha256"] == sha256(checkpoint_of(name)), (
        f"{name}.pt is not the file the record was measured on: if the new model is "
        f"meant, measure it again (`{record['command']}`) and say why in the commit")
    return record


IMAGE_KEYS = ("majority_vote_right", "columns_right", "all_columns_agree", "confusion_matrix")


def check(name: str, found: dict[str, Any], record: dict[str, Any],
          keys: tuple[str, ...] = IMAGE_KEYS, on: str = f"{IMAGES} test images") -> None:
    for key in keys:
        assert found[key] == record[key], (
            f"{key}: {found[key]} now, {record[key]} recorded ({name}.pt, first {on}, "
            f"seed {SEED}): the result moved")


@pytest.mark.parametrize("name", MODELS)
def test_best_models_give_their_recorded_counts(name: str):
    check(name, measure(checkpoint_of(name)), recorded(name))


def test_the_scene_model_gives_its_recorded_counts_on_test_pairs():
    check(SCENE_MODEL, measure_scenes(checkpoint_of(SCENE_MODEL)), recorded(SCENE_MODEL),
          SCENE_KEYS, f"{PAIRS} test pairs")


@pytest.mark.slow
def test_pure_torch_networks_give_the_same_counts(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GLOM_NATIVE", "0")                  # the path without a C++ compiler
    check("glom_seed_hard", measure(checkpoint_of("glom_seed_hard")), recorded("glom_seed_hard"))


def dump(counts: dict[str, Any]) -> str:
    """The record as JSON, the confusion matrix one row per line."""
    if "confusion_matrix" not in counts:
        return json.dumps(counts, indent=1) + "\n"
    head = json.dumps({k: v for k, v in counts.items() if k != "confusion_matrix"}, indent=1)
    rows = ",\n  ".join(json.dumps(row) for row in counts["confusion_matrix"])
    return head[:-2] + f',\n "confusion_matrix": [\n  {rows}\n ]\n}}\n'


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or ["glom_seed_hard"]
    if names[0] not in (*MODELS, SCENE_MODEL):
        sys.exit(f"error: {names[0]} is not one of {', '.join((*MODELS, SCENE_MODEL))}")
    measured = (measure_scenes if names[0] == SCENE_MODEL else measure)(checkpoint_of(names[0]))
    text = dump(measured)
    if "--write" in sys.argv[1:]:
        target = record_of(names[0])
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)                                  # atomic: never half a record
        print(f"wrote {target.relative_to(ROOT)}")
    print(text, end="")
