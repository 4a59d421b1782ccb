"""Where a scene model's islands part from the objects: merges or splits, and through which
columns.

    python scripts/island_failures.py --checkpoint best_models/glom_scenes.pt --kind random \
        --scenes 200 --val 5000 --tau 0.9

Rolls the model out on the validation scenes (`--val N`: scenes of the last N training digits,
as `scenes --val` makes them) and prints, at cosine `--tau` and level `--level` (default: the
top), JSON with:
- scenes_digit_ari_above_0.99: the share of scenes whose islands over the digit columns are
  their objects (adjusted Rand index above 0.99), at the level looked at;
- merged_islands: islands holding columns of two objects or more; split_objects: objects whose
  digit columns lie in two islands or more (at a lower level, where the islands are parts, a
  split is what GLOM asks for and a merge is a part in two wholes);
- cross_pairs / cross_linked / cross_linked_background / cross_linked_digit: 4-neighbour pairs
  of columns in two objects, those of them at cosine >= tau (the links that merge islands), and
  of those the pairs of two blank columns and of two digit columns (cross_pairs_digit: all
  pairs of two digit columns in two objects, where two digits' ink lies in adjacent patches);
- same_pairs / same_unlinked / same_unlinked_digit: pairs in one object, those below tau (the
  breaks that split islands or make extra ones), and of those the pairs of two digit columns;
- blank_votes_by_distance: the blank columns by their distance (in columns, 8-neighbour steps)
  to the nearest digit column of their own object, each bin with its number of columns and the
  share of them voting their object's class (how far from the ink the digit's class reaches).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from glom_mnist import load_checkpoint
from glom_mnist.islands import adjusted_rand_index, digit_columns, islands
from glom_mnist.scenes import KINDS, column_objects, column_targets, test_scenes

DISTANCE_BINS = {"1": (1, 1), "2": (2, 2), "3": (3, 3), "4-5": (4, 5), "6+": (6, None)}  # to ink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--kind", choices=sorted(KINDS), default="random")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--level", type=int, default=-1,
                        help="the level whose islands to look at (default -1: the top)")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    height, width = KINDS[args.kind]
    model = load_checkpoint(args.checkpoint, height=height, width=width).eval()
    scenes = test_scenes(args.kind, args.scenes, 0, val=args.val)
    with torch.no_grad():
        torch.manual_seed(0)
        levels = torch.cat([model(scenes.images[i:i + args.batch_size])
                            for i in range(0, len(scenes), args.batch_size)])
    objects = column_objects(scenes.objects, model.patch)
    digit = digit_columns(scenes.background, model.patch)
    labels = islands(levels, args.tau).labels[:, args.level]             # (N, h, w)
    digit_ari = adjusted_rand_index(labels, objects, digit)
    merged = sum(int(objects[b][labels[b] == i].unique().numel() > 1)
                 for b in range(len(scenes)) for i in labels[b].unique())
    split = sum(int(labels[b][(objects[b] == o) & digit[b]].unique().numel() > 1)
                for b in range(len(scenes)) for o in objects[b].unique())
    level = F.normalize(levels[:, args.level], dim=1)                    # (N, D, h, w)
    count = dict.fromkeys(["cross_pairs", "cross_linked", "cross_linked_background",
                           "cross_pairs_digit", "cross_linked_digit", "same_pairs",
                           "same_unlinked", "same_unlinked_digit"], 0)
    for axis in (-1, -2):
        n = level.shape[axis] - 1
        linked = (level.narrow(axis, 0, n) * level.narrow(axis, 1, n)).sum(1) >= args.tau
        cross = objects.narrow(axis, 0, n) != objects.narrow(axis, 1, n)
        both_digit = digit.narrow(axis, 0, n) & digit.narrow(axis, 1, n)
        both_blank = ~digit.narrow(axis, 0, n) & ~digit.narrow(axis, 1, n)
        for key, mask in [("cross_pairs", cross), ("cross_linked", cross & linked),
                          ("cross_linked_background", cross & linked & both_blank),
                          ("cross_pairs_digit", cross & both_digit),
                          ("cross_linked_digit", cross & linked & both_digit),
                          ("same_pairs", ~cross), ("same_unlinked", ~cross & ~linked),
                          ("same_unlinked_digit", ~cross & ~linked & both_digit)]:
            count[key] += int(mask.sum())
    right = model.votes(levels) == column_targets(scenes.labels, objects)  # (N, h, w)
    distance = ink_distance(objects, digit)
    by_distance = {}
    for name, (low, high) in DISTANCE_BINS.items():
        ring = ~digit & (distance >= low) & (distance <= (high or distance.max()))
        by_distance[name] = {
            "columns": int(ring.sum()), "voting_their_object": right[ring].float().mean().item()}
    print(json.dumps({"checkpoint": args.checkpoint, "kind": args.kind, "scenes": len(scenes),
                      "tau": args.tau, "level": args.level % levels.shape[1],
                      "scenes_digit_ari_above_0.99": (digit_ari > 0.99).float().mean().item(),
                      "merged_islands": merged, "split_objects": split, **count,
                      "blank_votes_by_distance": by_distance}, indent=1))


def ink_distance(objects: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
    """Each column's distance, in 8-neighbour steps, to the nearest digit column of its own
    object `(N, h, w)` (0 on the ink): grown one step at a time by 3x3 max pooling."""
    distance = torch.where(digit, 0, -1)
    own = F.one_hot(objects).movedim(-1, 1).bool()                      # (N, K, h, w)
    reached = own & digit[:, None]                                      # each object's ink
    step = 0
    while (distance < 0).any() and step < max(objects.shape[-2:]):
        step += 1
        reached = F.max_pool2d(reached.float(), 3, 1, 1).bool()
        distance = torch.where((distance < 0) & (reached & own).any(1), step, distance)
    return distance


if __name__ == "__main__":
    main()
