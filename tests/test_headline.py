"""The best shipped model still gives its recorded result: a change to the model, the rollout, the
vote or the data pipeline that moves the headline number fails here.

The record, best_models/glom_seed_hard_first500.json, holds counts on the first 500 test images
(seed 0 for the initial noise, one batch, eval mode: no dropout, no noise), written by

    PYTHONPATH=. python tests/test_headline.py --write

Evaluation has no dropout, so the compiled CPU networks and the pure-torch ones compute the same
rollout up to rounding, and both must reproduce the record exactly.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from glom_mnist import load_checkpoint
from glom_mnist.data import load_split, normalise, prepare
from glom_mnist.evaluate import evaluate_model

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "best_models" / "glom_seed_hard.pt"
RECORD = ROOT / "best_models" / "glom_seed_hard_first500.json"
IMAGES, SEED = 500, 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(checkpoint: Path = CHECKPOINT, images: int = IMAGES,
            seed: int = SEED) -> dict[str, Any]:
    """Counts of `checkpoint` on the first `images` MNIST test images, on the CPU."""
    prepare("mnist", ROOT / "data")
    model = load_checkpoint(checkpoint, device="cpu")
    raw, labels = load_split("mnist", ROOT / "data", train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # on two busy cores, two threads spend most of their time waiting
    try:
        torch.manual_seed(seed)
        metrics = evaluate_model(model, normalise(raw[:images], "mnist"), labels[:images],
                                 batch_size=images, progress=False)
    finally:
        torch.set_num_threads(threads)
    columns = images * model.cfg.height * model.cfg.width
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
        "command": "PYTHONPATH=. python tests/test_headline.py --write",
    }


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    recorded = json.loads(RECORD.read_text())
    assert recorded["checkpoint_sha256"] == sha256(CHECKPOINT), (
        f"{CHECKPOINT.name} is not the file the record was measured on: if the new model is "
        f"meant, measure it again (`{recorded['command']}`) and say why in the commit")
    return recorded


def check(found: dict[str, Any], recorded: dict[str, Any]) -> None:
    for key in ("majority_vote_right", "columns_right", "all_columns_agree", "confusion_matrix"):
        assert found[key] == recorded[key], (
            f"{key}: {found[key]} now, {recorded[key]} recorded ({CHECKPOINT.name}, first "
            f"{IMAGES} test images, seed {SEED}): the result moved")


def test_best_model_gives_its_recorded_counts(record: dict[str, Any]):
    check(measure(), record)


@pytest.mark.slow
def test_pure_torch_networks_give_the_same_counts(record: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GLOM_NATIVE", "0")                  # the path without a C++ compiler
    check(measure(), record)


def dump(counts: dict[str, Any]) -> str:
    """The record as JSON, the confusion matrix one row per line."""
    head = json.dumps({k: v for k, v in counts.items() if k != "confusion_matrix"}, indent=1)
    rows = ",\n  ".join(json.dumps(row) for row in counts["confusion_matrix"])
    return head[:-2] + f',\n "confusion_matrix": [\n  {rows}\n ]\n}}\n'


if __name__ == "__main__":
    counts = measure()
    text = dump(counts)
    if "--write" in sys.argv[1:]:
        tmp = RECORD.with_name(RECORD.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(RECORD)                                  # atomic: never half a record
        print(f"wrote {RECORD.relative_to(ROOT)}")
    print(text, end="")
