"""Metrics of a GLOM checkpoint on a test set.

- majority-vote accuracy: each column votes with the argmax of its top-level vector; the image's
  label is the most common vote (the seed's rule);
- per-column accuracy: the share of all columns whose vote is the image's label;
- all-columns-agree rate: the share of images whose columns all cast the same vote;
- confusion matrix (rows: true label, columns: majority vote) and per-class accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import default_device, existing_checkpoint, load_checkpoint
from .cli import command_line
from .files import atomic_write_text, check_new_file
from .model import Glom


@torch.no_grad()
def evaluate_model(model: Glom, images: torch.Tensor, labels: torch.Tensor, *,
                   batch_size: int = 500, steps: int | None = None,
                   progress: bool = True, dropout: bool = False) -> dict[str, Any]:
    """Metrics of `model` on normalised `images`, run in eval mode: no dropout, no noise. With
    `dropout`, as the seed's own test loop ran its models: dropout on (training mode), no noise."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (>0), got {len(images)} and {len(labels)}")
    if batch_size < 1 or (steps is not None and steps < 1):
        raise ValueError(f"batch_size and steps must be >= 1, got {batch_size} and {steps}")
    if dropout and not getattr(model.cfg, "dropout", 0):
        raise ValueError("this model has no dropout to switch on; evaluate it without --dropout")
    was_training, cfg = model.training, model.cfg
    model.eval()
    if dropout:
        model.train()
        model.cfg = cfg.replace(noise=0.0)
    device = next(model.parameters()).device
    C = model.cfg.num_classes
    confusion = torch.zeros(C, C, dtype=torch.long)
    correct_columns = agree = columns = 0
    start = time.perf_counter()
    batches = range(0, len(images), batch_size)
    for i in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        x = images[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        levels = model(x, steps=steps)                                  # (B, L, D, H, W)
        if not torch.isfinite(levels).all():
            raise ValueError(f"the rollout of images {i}-{i + len(x) - 1} gave non-finite "
                             "values (NaN or inf): no metrics for a model that diverges")
        votes = model.votes(levels)                                     # (B, H, W)
        majority = model.majority(votes)                                # (B,)
        correct_columns += (votes == y[:, None, None]).sum().item()
        columns += votes.numel()
        agree += (votes == votes[:, :1, :1]).flatten(1).all(1).sum().item()
        confusion += torch.bincount((y * C + majority).cpu(), minlength=C * C).reshape(C, C)
    model.train(was_training)
    model.cfg = cfg
    n = len(images)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {
        "images": n,
        "majority_vote_accuracy": confusion.diag().sum().item() / n,
        "per_column_accuracy": correct_columns / columns,
        "all_columns_agree": agree / n,
        "per_class_accuracy": [round(v, 6) for v in per_class.tolist()],
        "confusion_matrix": confusion.tolist(),
        "steps": model.cfg.steps if steps is None else steps,
        "dropout": dropout,
        "seconds": round(time.perf_counter() - start, 2),
    }


HEADLINE = ("majority_vote_accuracy", "per_column_accuracy", "all_columns_agree")


def repeated_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each headline metric over repeated evaluations (other seeds), its standard
    deviation (`<name>_std`) and each run's value (`<name>_runs`); the rest from the first run,
    per-class accuracy and the confusion matrix summed over the runs."""
    out = dict(runs[0], repeats=len(runs))
    for key in HEADLINE:
        values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        out.update({key: values.mean().item(), f"{key}_std": values.std().item(),
                    f"{key}_runs": values.tolist()})
    confusion = torch.tensor([r["confusion_matrix"] for r in runs]).sum(0)
    out["confusion_matrix"] = confusion.tolist()
    out["per_class_accuracy"] = [round(v, 6) for v in
                                 (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()]
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """The headline metrics and per-class accuracy as a plain-text table."""
    def value(key: str) -> str:
        spread = f" +- {metrics[key + '_std']:.4f} over {metrics['repeats']} seeds" \
            if key + "_std" in metrics else ""
        return f"{metrics[key]:.4f}{spread}"

    lines = [f"images                  {metrics['images']}",
             f"majority-vote accuracy  {value('majority_vote_accuracy')}",
             f"per-column accuracy     {value('per_column_accuracy')}",
             f"all-columns-agree       {value('all_columns_agree')}",
             "per-class accuracy      " + " ".join(f"{i}:{a:.3f}" for i, a in
                                                   enumerate(metrics["per_class_accuracy"]))]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a glom-mnist checkpoint (.pt)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--root", default="data", help="data folder (default: data)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N images (of the test set, or of --val)")
    parser.add_argument("--val", type=int, default=None, metavar="N",
                        help="the validation split instead of the test set: the last N training "
                             "images, as `train --val N` held them out (for choices, such as "
                             "--steps; the test set is for final numbers)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=None, help="rollout steps (default: config)")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random initial state (default 0): the same seed, "
                             "device and batch size give the same metrics")
    parser.add_argument("--dropout", action="store_true",
                        help="dropout on, as the seed's own test loop ran (no noise)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="evaluate with seeds seed, seed+1, ...: the mean and spread")


def is_metrics_json(path: Path) -> bool:
    """Whether `path` is a metrics file this command wrote (which --json may replace)."""
    try:
        if path.stat().st_size > 1 << 20:
            return False
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(metrics, dict) and {"majority_vote_accuracy", "confusion_matrix",
                                          "checkpoint"} <= metrics.keys()


def check_arguments(args: argparse.Namespace) -> None:
    """Every option checked before anything is loaded or computed: one line per problem."""
    for name in ("limit", "batch_size", "steps", "val"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.json:
        target = Path(args.json)
        if target.is_file() and not is_metrics_json(target):
            raise ValueError(f"--json {target} exists and is not a metrics file written by "
                             "evaluate, so it is not replaced; choose another path")
        check_new_file(target, force=True, flag="--json")     # not a folder, and writable


def run(args: argparse.Namespace) -> int:
    from .data import load_split, normalise, prepare, verify

    path = existing_checkpoint(args.checkpoint)
    check_arguments(args)
    model = load_checkpoint(path, device=args.device or default_device())
    prepare(args.dataset, args.root)
    split = "test" if args.val is None else f"validation (the last {args.val} training images)"
    where = "the test set" if args.val is None else "the validation split"
    images, labels = load_split(args.dataset, args.root, train=args.val is not None)
    if args.val is not None:
        if args.val >= len(images):
            raise ValueError(f"--val {args.val}: the training set has {len(images)} images; "
                             "the validation split must leave some for training")
        images, labels = images[-args.val:], labels[-args.val:]
    if args.limit:
        if args.limit > len(images):
            print(f"--limit {args.limit}: {where} has {len(images)} images; evaluating "
                  f"all {len(images)}", file=sys.stderr)
        images, labels = images[:args.limit], labels[:args.limit]
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    runs = []
    for seed in range(args.seed, args.seed + args.repeats):
        torch.manual_seed(seed)         # the rollout starts from uniform noise (seed-experiment.md)
        runs.append(evaluate_model(model, normalise(images, args.dataset), labels,
                                   batch_size=args.batch_size, steps=args.steps,
                                   dropout=args.dropout))
    metrics = runs[0]
    if args.repeats > 1:
        metrics = repeated_metrics(runs)
    metrics.update(checkpoint=str(path), dataset=args.dataset, split=split, seed=args.seed,
                   device=str(next(model.parameters()).device),
                   data_md5=verify(args.dataset, args.root),
                   command=command_line(args))
    print(format_table(metrics))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0
