"""`python -m glom_mnist figures`: the figures of a checkpoint (`make figures` redraws imgs/).

For either family of model: the seed's `Glom` (a column per pixel) or `PatchGlom` (a column per
patch; its maps are drawn over the pixels they cover). Each column votes by `model.votes`.
From the first --images test images (statistics) and the first --digits of them (pictures):
- islands.png: each level at the final step in PCA colours, island outlines over the digit;
- agreement.png: neighbour cosine per level, and the top level's agreement, vs step;
- training_curve.png: loss and accuracy vs iterations and wall time, from the training log
  (the checkpoint's own, else `<checkpoint stem>.log.csv` beside it, else the run folder's
  log.csv or curve.json);
- consensus.gif: the consensus forming over the steps for --gif-digits digits;
- islands.json: the numbers behind these figures (with the part-whole table: mean island size
  per level, over all columns and over digit columns), and the command that wrote them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch

from . import plots
from .checkpoint import default_device, existing_checkpoint, load_checkpoint, read_checkpoint
from .islands import digit_mask, islands, part_whole_table, rollout_statistics, vote_share
from .train import read_log_csv

MASK_RULE = ("digit columns: those with a pixel brighter than half way from the image's darkest "
             "to its brightest")


def read_training_log(checkpoint: str | Path,
                      run_dir: str | Path | None) -> tuple[list[dict[str, Any]], str] | None:
    """(log rows, where they came from), from the first of: the checkpoint's training state;
    `<checkpoint stem>.log.csv` beside it (a log shipped with the model); `run_dir`/log.csv
    (every iteration); `run_dir`/curve.json (evaluations only). None if there is none."""
    checkpoint = Path(checkpoint)
    log = read_checkpoint(checkpoint).get("training", {}).get("log")
    if log:
        return log, f"{checkpoint} (training state)"
    candidates = [checkpoint.with_name(checkpoint.stem + ".log.csv")]
    if run_dir is not None:
        candidates += [Path(run_dir) / "log.csv", Path(run_dir) / "curve.json"]
    for path in candidates:
        if path.is_file():
            rows = read_log_csv(path) if path.suffix == ".csv" else json.loads(path.read_text())
            if rows:
                return rows, str(path)
    return None


def held_out_label(train_config: dict[str, Any]) -> str:
    """What `train` scored its curve on (see `train.load_training_data`): the first
    --eval-images of the validation split when --val was given, else of the test images."""
    n, val = train_config.get("eval_images"), train_config.get("val")
    if not n:
        return "held-out"
    return f"validation (first {min(n, val)})" if val else f"test (first {n})"


def _rounded(value: Any, digits: int = 5) -> Any:
    """Tensors and floats as (nested lists of) rounded floats, for JSON."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return round(value, digits) if isinstance(value, float) else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="best_models/glom_seed_hard.pt",
                        help="the model to draw (default: best_models/glom_seed_hard.pt, the best)")
    parser.add_argument("--root", default="data", help="data folder (default: data)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--out", default="imgs", help="output folder (default: imgs)")
    parser.add_argument("--run", default=None,
                        help="run folder with log.csv / curve.json for the training curve "
                             "(default: the one recorded in the checkpoint)")
    parser.add_argument("--images", type=int, default=256, help="test images for the statistics")
    parser.add_argument("--digits", type=int, default=8, help="digits drawn in islands.png")
    parser.add_argument("--gif-digits", type=int, default=4, help="digits in consensus.gif")
    parser.add_argument("--tau", type=float, default=0.9,
                        help="cosine similarity that joins two neighbouring columns in an island")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial state's noise")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    """Draw the figures and write islands.json; returns 0."""
    from .data import load_split, normalise, prepare

    matplotlib.use("Agg")
    path = existing_checkpoint(args.checkpoint)
    if min(args.images, args.digits, args.gif_digits) < 1 or args.digits > args.images:
        raise ValueError("--images, --digits and --gif-digits must be >= 1, --digits <= --images")
    prepare(args.dataset, args.root)
    model = load_checkpoint(path, device=args.device or default_device())
    device, C, P = next(model.parameters()).device, model.cfg.num_classes, model.patch
    raw, labels = load_split(args.dataset, args.root, train=False)
    raw, labels = raw[:args.images], labels[:args.images]                # (N, H, W) uint8
    images = normalise(raw, args.dataset)                                # (N, 1, H, W)
    masks = digit_mask(raw, patch=P)                                     # (N, h, w) columns
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    torch.manual_seed(args.seed)
    stats = rollout_statistics(model, images, labels, masks=masks, tau=args.tau,
                               batch_size=args.batch_size, progress=True)

    k = args.digits
    with torch.no_grad():
        states = model(images[:k].to(device), return_all=True)          # (T+1, k, L, D, h, w)
        votes = model.votes(states).cpu()                                # (T+1, k, h, w)
        states = states.cpu()
    found = islands(states, args.tau, masks[:k])                         # labels (T+1, k, L, h, w)
    titles = [f"{y}: vote {p} ({s:.0%})" for y, p, s in
              zip(labels[:k].tolist(), model.majority(votes[-1]).tolist(),
                  vote_share(votes[-1], C).tolist())]
    T = len(states) - 1
    fig = plots.plot_level_maps(
        states[-1], found.labels[-1], images=raw[:k], titles=titles, votes=votes[-1],
        num_classes=C, patch=P,
        suptitle=f"{path.name} after {T} steps: level vectors in PCA colours,\n"
                 f"islands (cosine >= {args.tau}) outlined over the digit")
    fig.savefig(out / "islands.png", dpi=110)
    plt.close(fig)
    written.append(out / "islands.png")

    fig = plots.plot_agreement(stats)
    fig.savefig(out / "agreement.png", dpi=110)
    plt.close(fig)
    written.append(out / "agreement.png")

    train_config = model.checkpoint_info["provenance"].get("train_config", {})
    run_dir = args.run or train_config.get("out_dir")
    log = read_training_log(path, run_dir)
    if log is None:
        print(f"no training log in {path}, beside it ({path.stem}.log.csv) or in run folder "
              f"{run_dir!r} (log.csv, curve.json): skipping training_curve.png")
        (out / "training_curve.png").unlink(missing_ok=True)             # no stale curve
    else:
        fig = plots.plot_training_curve(log[0], eval_label=held_out_label(train_config),
                                        loss=train_config.get("loss", "mse"))
        fig.suptitle(f"training log: {log[1]}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "training_curve.png", dpi=110)
        plt.close(fig)
        written.append(out / "training_curve.png")

    g = min(args.gif_digits, k)
    written.append(plots.consensus_animation(states[:, :g], out / "consensus.gif",
                                             island_labels=found.labels[:, :g],
                                             votes=votes[:, :g], images=raw[:g],
                                             titles=titles[:g], num_classes=C, patch=P))

    per_step = {key: value for key, value in stats.items()
                if key not in ("votes", "majority", "vote_share")}
    summary = {
        "command": "python -m glom_mnist figures " + " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items()
            if value is not None and key not in ("command", "module")),
        "checkpoint": str(path),
        "checkpoint_metrics": model.checkpoint_info["metrics"],
        "dataset": args.dataset, "split": "test", "images": len(images), "steps": T,
        "patch": P, "grid": list(states.shape[-2:]),
        "tau": args.tau, "digit_mask": MASK_RULE, "seed": args.seed,
        "final_step": {key: _rounded(value[-1]) for key, value in per_step.items()},
        "per_step": {key: _rounded(value) for key, value in per_step.items()},
        "part_whole": part_whole_table({path.stem: stats}),
        "training_log": None if log is None else log[1],
        "files": [str(p) for p in written],
    }
    (out / "islands.json").write_text(json.dumps(summary, indent=1) + "\n")
    for p in written + [out / "islands.json"]:
        print(f"wrote {p}")
    return 0
