"""Ablations of the patch GLOM: each ingredient off in turn, at the same budget and seed
(and one variant with a wider consensus).

Every run trains the small patch preset (the variant that ships as glom_small.pt) for the same
number of images with the same seed, schedule and augmentation, and is scored on the validation
split (the last 5,000 training images); the test set is not touched. Runs that already finished
are read back, so an interrupted sweep continues where it stopped.

    python benchmarks/ablations.py                      # all variants, about 35 min on one core
    python benchmarks/ablations.py --only full no_consensus --iterations 50   # a quick look

Writes benchmarks/results/ablations.json (the table docs/results.md quotes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from results_io import write_json

# the shipped small preset: glom_small.pt's config
BASE = ["--preset", "patch_small"]
# one ingredient changed per variant, written as `--set` overrides of the base
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_consensus": ["consensus=false"],
    "no_top_down": ["top_down=false"],
    "no_positional": ["positional=false"],
    "levels_2": ["levels=2"],                         # one level above the input: no parts
    "steps_4": ["steps=4", "loss_steps=2"],           # half the iterations of the rollout
    "loss_last_step": ["loss_steps=1"],               # the loss on the final state only
    "patch_2": ["patch=2", "stem=6"],                 # 2x2-pixel columns, 4x as many
    "kernel_5": ["kernel=5"],                         # consensus over 5x5 columns, not 3x3
}


def train_args(name: str, args: argparse.Namespace) -> list[str]:
    sets = [x for s in VARIANTS[name] for x in ("--set", s)]
    return [sys.executable, "-m", "glom_mnist", "train", *BASE, *sets,
            "--loss", "cross_entropy", "--optimizer", "adamw", "--weight-decay", "0.05",
            "--lr", "3e-3", "--warmup", str(args.iterations // 10), "--schedule", "cosine",
            "--shift", "2", "--batch-size", str(args.batch_size),
            "--iterations", str(args.iterations), "--seed", str(args.seed),
            "--val", "5000", "--eval-images", "5000", "--eval-every", str(args.iterations),
            "--root", args.root, "--out-dir", str(Path(args.runs) / name)]


def finished(name: str, args: argparse.Namespace) -> dict | None:
    """The final validation row of a finished run of this variant, or None."""
    curve = Path(args.runs) / name / "curve.json"
    if not curve.is_file():
        return None
    rows = [r for r in json.loads(curve.read_text()) if r.get("iteration") == args.iterations]
    return rows[-1] if rows else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default="data")
    p.add_argument("--runs", default="runs/ablations")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/ablations.json")
    args = p.parse_args()
    results = {}
    for name in args.only:
        row = finished(name, args)
        if row is None:
            run_dir = Path(args.runs) / name
            cmd = train_args(name, args)
            if (run_dir / "last.pt").is_file():        # an interrupted run: continue it
                cmd = [sys.executable, "-m", "glom_mnist", "train", "--resume",
                       str(run_dir / "last.pt")]
            print(" ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd).returncode != 0:
                print(f"ablations: the run {name} failed; see its output above", file=sys.stderr)
                return 1
            row = finished(name, args)
            if row is None:
                print(f"ablations: the run {name} stopped before iteration {args.iterations}",
                      file=sys.stderr)
                return 1
        results[name] = {"changes": VARIANTS[name], **{k: row[k] for k in (
            "majority_vote_accuracy", "per_column_accuracy", "all_columns_agree", "wall")}}
        print(f"{name:22s} vote {row['majority_vote_accuracy']:.4f}  "
              f"column {row['per_column_accuracy']:.4f}  agree {row['all_columns_agree']:.4f}",
              flush=True)
    write_json(args.out, {
        "what": "each ingredient of the small patch preset changed in turn; validation split "
                "(last 5,000 training images); same images, seed and schedule for every run",
        "command": "python " + " ".join(sys.argv),
        "base": BASE, "iterations": args.iterations, "batch_size": args.batch_size,
        "seed": args.seed, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
