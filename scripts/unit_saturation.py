"""How saturated one first-layer unit is in the settled state of some checkpoints.

The README's diagnosis of the 5s: unit 5 of the bottom-up network into the top level drifts to
tanh -1. For each checkpoint: the mean of that unit's tanh over the first N training images, every
column, after the full rollout, and the share of its values below -0.99.

    python scripts/unit_saturation.py best_models/glom_seed_recipe.pt best_models/glom_seed_hard.pt
"""
from __future__ import annotations

import argparse

import torch

from glom_mnist import load_checkpoint
from glom_mnist.data import load_split, normalise
from glom_mnist.train import settled_first_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--route", default="bottom_up,2,3", help="role,source,target")
    parser.add_argument("--unit", type=int, default=5)
    parser.add_argument("--images", type=int, default=60, help="the first N training images")
    parser.add_argument("--root", default="data")
    args = parser.parse_args()
    role, src, tgt = args.route.split(",")
    route = (role, int(src), int(tgt))
    images, _ = load_split("mnist", args.root, train=True)
    x = normalise(images[:args.images], "mnist")
    for path in args.checkpoints:
        model = load_checkpoint(path, device="cpu")
        if route not in model.routes:
            raise SystemExit(f"{path} has no network {route}; it has {model.routes}")
        torch.manual_seed(0)
        q = settled_first_layer(model, x)[:, model.routes.index(route), args.unit]
        print(f"{path}: {route} unit {args.unit}: mean tanh {q.mean():.3f}, "
              f"values below -0.99: {(q < -0.99).float().mean():.1%}")


if __name__ == "__main__":
    main()
