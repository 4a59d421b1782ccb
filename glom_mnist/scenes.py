"""Scenes of several MNIST digits, and which digit every pixel belongs to.

GLOM's central claim is that the islands of agreement are the parse tree: at the top level, one
island per object. Testing it needs images with more than one object and a ground truth saying
which object each column belongs to. Two layouts (`KINDS`):

- "pair": two digits side by side on a 28 x 56 canvas, each as its whole 28 x 28 crop (MNIST's
  digits fill the middle 20 x 20 of their crop, so at least 8 blank pixels separate the two);
- "random": 2 or 3 digits at random positions on a 56 x 56 canvas. The tight boxes of their
  non-zero pixels may not overlap and lie at least `gap` pixels apart. (Their 28 x 28 crops may
  overlap: three whole crops fit on 56 x 56 only as quarters of a 2 x 2 grid, which would leave
  little to chance.) Each valid layout is equally likely: a scene's positions are drawn
  together and drawn again until no two boxes collide.

By default the digits of a scene are of different classes (`distinct=True`), drawn uniformly
among the classes and then uniformly among the images of each class; the training split
makes training scenes and the test split test scenes. Digits are composed on the raw canvas by
taking the pixelwise maximum (no pixel is non-zero in two digits, so this is also their sum)
and the canvas is then normalised exactly as single digits are (`data.normalise`): a model
trained on single digits reads the same pixel values.

Objects. Object k is the scene's k-th digit (left and right for pairs). Ink is a pixel brighter
than half of full intensity (byte >= `INK`; `islands.digit_mask`'s rule on raw MNIST). Every
pixel belongs to the object of its nearest ink pixel (Euclidean distance, ties to the lower
object index): ink belongs to its own digit and the background is shared out between the digits
like the cells of a Voronoi diagram of their ink; `Scenes.background` marks the pixels that are
not ink.

Columns. A model with `patch` x `patch` pixels per column sees the grid `(H // patch, W // patch)`
(rows and columns of pixels left over at the bottom and right are dropped): a column's object is
the most common object of its pixels (`column_objects`), a column is on a digit when any of its
pixels is ink (`islands.digit_columns`, which says why "any"), and its target class is its
object's class (`column_targets`).

Measuring a model on scenes: `evaluate_scenes`, e.g. for the seed model, which reads any canvas:

    model = on_canvas(load_checkpoint("best_models/glom_seed_hard.pt"), 28, 56)
    evaluate_scenes(model, test_scenes("pair", 500), tau=(0.9, 0.99))

or from the command line, `python -m glom_mnist scenes --checkpoint X.pt --kind pair --scenes 500`
(`run` below). `train --scenes` trains a patch model on fresh scenes (docs/patch-glom.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_split, normalise
from .islands import (adjusted_rand_index, column_pixels, digit_columns, island_containment,
                      islands, object_accuracy)
from .model import Glom

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = {"pair": (28, 56), "random": (56, 56)}   # canvas (H, W) of each layout
INK = 128                                        # raw byte >= 128 (intensity > 0.5) is ink
DIGIT = 28                                       # MNIST's side
PLACEMENT_TRIES = 64                             # layouts drawn at once per scene and round
PLACEMENT_ROUNDS = 100


@dataclass
class Scenes:
    """N scenes of up to K objects on an H x W canvas. Indexing (`scenes[:10]`) selects scenes."""

    images: torch.Tensor      # (N, 1, H, W) float32, normalised like single digits
    raw: torch.Tensor         # (N, H, W) uint8: the canvas before normalisation
    labels: torch.Tensor      # (N, K) int64: each object's class, -1 where a scene has fewer
    objects: torch.Tensor     # (N, H, W) int64: each pixel's object (its nearest ink's digit)
    background: torch.Tensor  # (N, H, W) bool: the pixels that are not ink
    boxes: torch.Tensor       # (N, K, 4) int64: where each digit was pasted, (top, left,
                              # bottom, right), bottom and right exclusive; -1 where absent

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> "Scenes":
        return Scenes(*(getattr(self, f.name)[index] for f in fields(self)))


# ---- composing scenes -------------------------------------------------------------------------

def scene_batch(images: torch.Tensor, labels: torch.Tensor, n: int, generator: torch.Generator,
                kind: str = "pair", *, counts: Sequence[int] = (2, 3), distinct: bool = True,
                gap: int = 2, name: str = "mnist") -> Scenes:
    """`n` fresh scenes of `kind` ("pair" or "random") from the digits `images` uint8
    `(M, 28, 28)` with classes `labels` `(M,)`, e.g. a split from `data.load_split`.

    Every random choice comes from `generator`: the same generator state gives the same scenes.
    counts: the numbers of digits a random scene may hold (each equally likely; pairs hold 2);
    distinct: the digits of a scene are of different classes; gap: the least distance in pixels
    between the tight boxes of two digits of a random scene. Cheap enough to draw every
    training batch afresh on a CPU.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not (images.dtype == torch.uint8 and images.dim() == 3
            and tuple(images.shape[1:]) == (DIGIT, DIGIT)):
        raise ValueError(f"images must be uint8 (M, {DIGIT}, {DIGIT}) as load_split returns them, "
                         f"got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be (M,) = ({len(images)},), got {tuple(labels.shape)}")
    H, W = KINDS[kind]
    sizes = [2] if kind == "pair" else sorted(set(counts))
    if not sizes or min(sizes) < 1:
        raise ValueError(f"counts must be positive numbers of digits, got {counts!r}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0 pixels, got {gap}")
    K = max(sizes)
    number = torch.tensor(sizes)[torch.randint(len(sizes), (n,), generator=generator)]  # (n,)
    present = torch.arange(K) < number[:, None]                          # (n, K)

    picked = _pick_digits(labels, n, K, distinct, generator)             # (n, K) into images
    digits = images[picked]                                              # (n, K, 28, 28)
    if kind == "pair":
        source = torch.tensor([0, 0, DIGIT, DIGIT]).expand(n, K, 4)      # whole crops
        top_left = torch.tensor([[0, 0], [0, DIGIT]]).expand(n, K, 2)
    else:
        source = _ink_boxes(digits)                                      # (n, K, 4)
        source = torch.where(present[..., None], source, 0)              # absent: empty box
        top_left = _place(source[..., 2:] - source[..., :2], H, W, gap, generator)
    layers = _paste(digits, source, top_left, H, W)                      # (n, K, H, W) uint8
    layers = layers * present[..., None, None]

    raw = layers.amax(1)                                                 # (n, H, W)
    ink = layers >= INK                                                  # (n, K, H, W)
    objects = nearest_object(torch.where(ink.any(1), ink.int().argmax(1), -1))  # (n, H, W)
    extent = source[..., 2:] - source[..., :2]
    boxes = torch.cat([top_left, top_left + extent], -1)
    return Scenes(images=normalise(raw, name), raw=raw,
                  labels=torch.where(present, labels[picked], -1), objects=objects,
                  background=raw < INK, boxes=torch.where(present[..., None], boxes, -1))


def test_scenes(kind: str, n: int, seed: int = 0, *, root: str | Path = "data",
                name: str = "mnist", train: bool = False, val: int = 0,
                **options: Any) -> Scenes:
    """A fixed set of `n` scenes of `kind` from the test split (the training split with
    `train=True`; with `val=N` its last N images, the validation split), the same for the same
    seed and options (those of `scene_batch`)."""
    images, labels = load_split(name, root, train=train or bool(val))
    if val:
        if val >= len(images):
            raise ValueError(f"--val {val} leaves no training images (there are {len(images)})")
        images, labels = images[-val:], labels[-val:]
    generator = torch.Generator().manual_seed(seed)
    return scene_batch(images, labels, n, generator, kind, name=name, **options)


test_scenes.__test__ = False  # a builder of test data, not a test, should a test module import it


def _pick_digits(labels: torch.Tensor, n: int, K: int, distinct: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """Indices `(n, K)` of the digits of each scene: uniform over the images, or with
    `distinct` K different classes uniform over the classes, then uniform within each class."""
    if not distinct:
        return torch.randint(len(labels), (n, K), generator=generator)
    per_class = torch.bincount(labels)                                   # (C,)
    present = (per_class > 0).nonzero().squeeze(1)                       # the classes there are
    if len(present) < K:
        raise ValueError(f"{K} digits of different classes need {K} classes, "
                         f"the images have {len(present)}")
    order = labels.argsort(stable=True)                                  # images class by class
    start = torch.cumsum(per_class, 0) - per_class                       # (C,)
    shuffled = torch.rand(n, len(present), generator=generator).argsort(1)
    classes = present[shuffled[:, :K]]                                   # (n, K)
    u = torch.rand(n, K, generator=generator, dtype=torch.float64)
    within = (u * per_class[classes]).long().clamp(max=per_class[classes] - 1)
    return order[start[classes] + within]


def _ink_boxes(digits: torch.Tensor) -> torch.Tensor:
    """Tight box (top, left, bottom, right) of the non-zero pixels of each digit
    `(..., 28, 28)` -> `(..., 4)`, bottom and right exclusive."""
    def span(on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:   # on: (..., 28)
        first = on.int().argmax(-1)
        last = DIGIT - on.flip(-1).int().argmax(-1)
        return first, last

    top, bottom = span((digits > 0).any(-1))
    left, right = span((digits > 0).any(-2))
    return torch.stack([top, left, bottom, right], -1)


def _place(extent: torch.Tensor, H: int, W: int, gap: int,
           generator: torch.Generator) -> torch.Tensor:
    """Top-left corners `(n, K, 2)` for boxes of extent (height, width) `(n, K, 2)` on an H x W
    canvas, no two boxes closer than `gap` pixels (boxes of extent 0 are absent and collide with
    nothing). Each scene's corners are drawn together, PLACEMENT_TRIES layouts at a time, and the
    first valid one is kept: every valid layout is equally likely."""
    n, K, _ = extent.shape
    room = torch.tensor([H, W]) - extent + 1                             # (n, K, 2) positions
    if (room < 1).any():
        raise ValueError(f"a digit does not fit on the {H} x {W} canvas")
    corners = torch.zeros(n, K, 2, dtype=torch.long)
    todo = torch.arange(n)
    for _ in range(PLACEMENT_ROUNDS):
        u = torch.rand(len(todo), PLACEMENT_TRIES, K, 2, generator=generator, dtype=torch.float64)
        tries = (u * room[todo, None]).long()                            # (t, T, K, 2)
        low, high = tries, tries + extent[todo, None]
        # boxes i and j keep apart when one ends `gap` pixels before the other starts on an axis
        apart = ((low[:, :, :, None] >= high[:, :, None] + gap)
                 | (low[:, :, None] >= high[:, :, :, None] + gap)).any(-1)  # (t, T, K, K)
        real = (extent[todo] > 0).all(-1)                                # (t, K)
        ignore = ~(real[:, :, None] & real[:, None, :]) | torch.eye(K, dtype=torch.bool)
        valid = (apart | ignore[:, None]).flatten(-2).all(-1)            # (t, T)
        found = valid.any(1)
        first = valid.int().argmax(1)                                    # first valid layout
        corners[todo[found]] = tries[found, first[found]]
        todo = todo[~found]
        if len(todo) == 0:
            return corners
    raise RuntimeError(f"could not place the digits of {len(todo)} scenes apart on {H} x {W} "
                       f"after {PLACEMENT_ROUNDS * PLACEMENT_TRIES} layouts each: lower gap")


def _paste(digits: torch.Tensor, source: torch.Tensor, top_left: torch.Tensor,
           H: int, W: int) -> torch.Tensor:
    """Each digit's `source` box (top, left, bottom, right) `(n, K, 4)` copied to `top_left`
    `(n, K, 2)` of its own empty H x W layer: `(n, K, 28, 28)` -> `(n, K, H, W)`."""
    n, K = digits.shape[:2]
    extent = source[..., 2:] - source[..., :2]                           # (n, K, 2)
    y = torch.arange(H) - top_left[..., :1]                              # (n, K, H) in the box
    x = torch.arange(W) - top_left[..., 1:]                              # (n, K, W)
    inside = ((y >= 0) & (y < extent[..., :1]))[..., :, None] \
        & ((x >= 0) & (x < extent[..., 1:]))[..., None, :]               # (n, K, H, W)
    rows = (y + source[..., :1]).clamp(0, DIGIT - 1)
    cols = (x + source[..., 1:2]).clamp(0, DIGIT - 1)
    flat = digits.reshape(n, K, DIGIT * DIGIT)
    index = (rows[..., :, None] * DIGIT + cols[..., None, :]).reshape(n, K, H * W)
    return (flat.gather(-1, index).view(n, K, H, W) * inside).to(torch.uint8)


def nearest_object(owner: torch.Tensor, chunk_values: int = 1 << 22) -> torch.Tensor:
    """Each pixel's object: that of its nearest ink pixel (Euclidean distance; ties to the
    lower object index). owner: int `(N, H, W)`, the object of each ink pixel and -1 elsewhere
    -> int64 `(N, H, W)` (all 0 in an image without ink).

    Exact, one axis at a time, on keys squared distance * K + object (so that the smallest key
    is the nearest ink and, among equally near ones, the lowest object): first the nearest ink
    to the left and to the right in the same row (running max and min of ink positions), then
    over the rows, the smallest of (y - y')^2 * K + row key at y' (brute force over y', as in
    Felzenszwalb and Huttenlocher's distance transform: canvases are small). Keys are below
    2^24, exact in float32. Computed about `chunk_values` values at a time.
    """
    N, H, W = owner.shape
    K = max(1, int(owner.max()) + 1) if owner.numel() else 1
    x = torch.arange(W, device=owner.device)
    y = torch.arange(H, device=owner.device, dtype=torch.float32)
    dy2 = (y[:, None] - y[None, :]).square() * K                         # (H, H')
    none = (H * H + W * W) * K                                           # above every real key
    ink = owner >= 0
    left = torch.where(ink, x, -1).cummax(-1).values                     # nearest ink at or left
    right = torch.where(ink, x, W).flip(-1).cummin(-1).values.flip(-1)   # ... at or right

    def key(at: torch.Tensor) -> torch.Tensor:                           # (N, H, W)
        found = (at >= 0) & (at < W)
        return torch.where(found, (x - at).square() * K + owner.gather(-1, at.clamp(0, W - 1)),
                           none)

    row = torch.minimum(key(left), key(right)).float().transpose(-1, -2)  # (N, W, H')
    step = max(1, chunk_values // (W * H * H))
    best = torch.cat([(part[..., None, :] + dy2).amin(-1) for part in row.split(step)])
    return (best.transpose(-1, -2).long() % K)                           # (N, H, W)


# ---- the column grid --------------------------------------------------------------------------

def column_objects(objects: torch.Tensor, patch: int) -> torch.Tensor:
    """Each column's object: the most common object among its patch x patch pixels, ties to the
    lower index. `(N, H, W)` -> `(N, H // patch, W // patch)`; the identity for patch 1."""
    if patch == 1:
        return objects
    pixels = column_pixels(objects, patch)                               # (N, h, w, p*p)
    counts = F.one_hot(pixels, int(objects.max()) + 1).sum(-2)           # (N, h, w, K)
    return counts.argmax(-1)                                             # first maximum


def column_targets(labels: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Each column's target class, its object's class: labels `(N, K)`, column objects
    `(N, h, w)` -> `(N, h, w)`."""
    N, h, w = objects.shape
    return labels.gather(1, objects.reshape(N, h * w)).view(N, h, w)


# ---- measuring a model ------------------------------------------------------------------------

def on_canvas(model: Glom, height: int, width: int) -> Glom:
    """The same `Glom` on a height x width canvas. Its networks read k x k neighbourhoods and
    no weight depends on the image size, so only the config changes; mode and device are kept."""
    resized = Glom(model.cfg.replace(height=height, width=width))
    resized.load_state_dict(model.state_dict())
    return resized.to(next(model.parameters()).device).train(model.training)


def _rollout(model: torch.nn.Module, images: torch.Tensor, seed: int,
             steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final levels `(B, L, D, h, w)` and column scores `(B, C, h, w)` of one rollout of `steps`
    (None: the model's own). Models with `column_scores` roll out twice from the same random
    initial state (the same seed); the others' scores are their top level's first
    `cfg.num_classes` channels."""
    more = {} if steps is None else {"steps": steps}
    torch.manual_seed(seed)
    levels = model(images, **more)
    if hasattr(model, "column_scores"):
        torch.manual_seed(seed)
        return levels, model.column_scores(images, **more)
    return levels, levels[:, -1, :model.cfg.num_classes]


@torch.no_grad()
def evaluate_scenes(model: torch.nn.Module, scenes: Scenes, tau: float | Sequence[float] = 0.9,
                    *, batch_size: int = 32, seed: int = 0, steps: int | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Are the model's top-level islands the scene's objects? Measured on every scene, in eval
    mode, and averaged over the scenes.

    The model reads the scenes' canvas: `model(images)` -> levels `(B, L, D, h, w)` with
    `h, w = H // model.patch, W // model.patch` (`patch` 1 when the model has none), and each
    column votes for the class of its highest score (`model.column_scores(images)`, `(B, C, h, w)`,
    or the top level's first num_classes channels). Random initial states come from `seed`; the
    caller's random state is left as it was. `steps` rolls out that many steps instead of the
    model's own (do the islands last past the steps the model was trained for?).

    Returns
    - object_accuracy: the share of objects whose columns' majority vote is their class;
      all_objects_right: the share of scenes with every object right; digit_object_accuracy,
      digit_all_objects_right: the same with only the object's digit columns voting (its ink,
      not the blank canvas nearer to it than to any other digit);
    - column_accuracy, digit_column_accuracy: the share of columns (of digit columns) voting for
      their object's class;
    - vote_ari, digit_vote_ari: the adjusted Rand index (mean over scenes) between the partition
      of the columns by their vote and the objects, over all columns and over digit columns;
    - islands: for each tau, island_ari and digit_island_ari, the same between the top-level
      islands (`islands.islands`: 4 neighbours, no wrap-around, cosine >= tau, found on all
      columns) and the objects; then per level: islands_per_scene, containment (the share of all
      islands that lie within one object) and multi_containment (the same over islands of at
      least 2 columns: a single column is always within one object).
    """
    taus = (float(tau),) if isinstance(tau, (int, float)) else tuple(map(float, tau))
    patch = getattr(model, "patch", 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    found: dict[str, list[torch.Tensor]] = {}                           # per scene, batch by batch

    def keep(key: str, value: torch.Tensor) -> None:
        found.setdefault(key, []).append(value.cpu())

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in tqdm(range(0, len(scenes), batch_size), desc="scenes", disable=not progress,
                      leave=False):
            batch = scenes[i:i + batch_size]
            levels, scores = _rollout(model, batch.images.to(device), seed + i, steps)
            if not (torch.isfinite(levels).all() and torch.isfinite(scores).all()):
                raise ValueError(f"the rollout of scenes {i}-{i + len(batch) - 1} gave non-finite "
                                 "values (NaN or inf): no metrics for a model that diverges")
            votes = scores.argmax(1).cpu()                               # (B, h, w)
            objects = column_objects(batch.objects, patch)
            digit = digit_columns(batch.background, patch)
            if votes.shape != objects.shape:
                raise ValueError(f"the model's column grid {tuple(votes.shape[1:])} is not the "
                                 f"scenes' {tuple(objects.shape[1:])} at patch {patch}")
            right = object_accuracy(votes, objects, batch.labels, scores.shape[1])["right"]
            ink_right = object_accuracy(votes, objects, batch.labels, scores.shape[1],
                                        digit)["right"]
            on_target = votes == column_targets(batch.labels, objects)
            keep("right", right)                                         # (B, K)
            keep("ink_right", ink_right)
            keep("on_target", on_target.flatten(1))                      # (B, h*w)
            keep("digit", digit.flatten(1))
            keep("vote_ari", adjusted_rand_index(votes, objects))        # (B,)
            keep("digit_vote_ari", adjusted_rand_index(votes, objects, digit))
            for t in taus:
                labels = islands(levels, t).labels.cpu()                 # (B, L, h, w)
                keep(f"{t}:island_ari", adjusted_rand_index(labels[:, -1], objects))
                keep(f"{t}:digit_island_ari", adjusted_rand_index(labels[:, -1], objects, digit))
                for k, v in island_containment(labels, objects).items():
                    keep(f"{t}:{k}", v)                                  # (B, L)
    model.train(was_training)

    per_scene = {k: torch.cat(v) for k, v in found.items()}
    present = scenes.labels >= 0
    right, on_target, digit = per_scene["right"], per_scene["on_target"], per_scene["digit"]
    ink_right = per_scene["ink_right"]
    out: dict[str, Any] = {
        "scenes": len(scenes), "canvas": list(scenes.images.shape[-2:]), "patch": patch,
        "steps": getattr(getattr(model, "cfg", None), "steps", None) if steps is None else steps,
        "object_accuracy": (right.sum() / present.sum()).item(),
        "all_objects_right": (right | ~present).all(1).double().mean().item(),
        "digit_object_accuracy": (ink_right.sum() / present.sum()).item(),
        "digit_all_objects_right": (ink_right | ~present).all(1).double().mean().item(),
        "column_accuracy": on_target.double().mean().item(),
        "digit_column_accuracy": on_target[digit].double().mean().item(),
        "vote_ari": per_scene["vote_ari"].nanmean().item(),
        "digit_vote_ari": per_scene["digit_vote_ari"].nanmean().item(),
        "islands": {},
    }
    for t in taus:
        total = {k: per_scene[f"{t}:{k}"].sum(0).double()
                 for k in ("islands", "contained", "multi_islands", "multi_contained")}
        out["islands"][t] = {
            "island_ari": per_scene[f"{t}:island_ari"].nanmean().item(),
            "digit_island_ari": per_scene[f"{t}:digit_island_ari"].nanmean().item(),
            "islands_per_scene": (total["islands"] / len(scenes)).tolist(),
            "containment": (total["contained"] / total["islands"]).tolist(),
            "multi_containment": (total["multi_contained"] / total["multi_islands"]).tolist(),
        }
    return out


def scene_figure(model: torch.nn.Module, scenes: Scenes, tau: float = 0.9, *, shown: int = 4,
                 seed: int = 0, steps: int | None = None, title: str | None = None) -> "Figure":
    """The first `shown` scenes as the model parses them after `steps` (None: its own): the
    input, each level's vectors in PCA colours with its islands (cosine >= tau) outlined, and each
    column's vote. The caller's random state is left as it was."""
    from .plots import plot_level_maps

    device = next(model.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        levels, scores = _rollout(model.eval(), scenes.images[:shown].to(device), seed, steps)
    levels = levels.cpu()
    titles = ["digits " + " ".join(str(c) for c in row.tolist() if c >= 0)
              for row in scenes.labels[:shown]]
    return plot_level_maps(levels, islands(levels, tau).labels, images=scenes.raw[:shown],
                           titles=titles, votes=scores.argmax(1).cpu(),
                           patch=getattr(model, "patch", 1), suptitle=title)


# ---- the command: python -m glom_mnist scenes -------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a glom-mnist checkpoint (.pt)")
    parser.add_argument("--kind", required=True, choices=sorted(KINDS),
                        help="pair: two digits side by side on 28 x 56; random: 2 or 3 digits "
                             "at random places on 56 x 56")
    parser.add_argument("--scenes", type=int, required=True, metavar="N",
                        help="how many scenes, composed from the test digits (or --val's)")
    parser.add_argument("--val", type=int, default=0, metavar="N",
                        help="compose the scenes from the validation split, the last N training "
                             "digits (as `train --scenes --val N` does for its curve), to make "
                             "choices on; default: the test digits, for final numbers only")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.9],
                        help="cosine thresholds of the islands (default 0.9)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the scenes and of the rollout's random initial state "
                             "(default 0): the same seed gives the same scenes and metrics")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--root", default="data", help="data folder (default: data)")
    parser.add_argument("--steps", type=int, default=None, metavar="T",
                        help="roll out T steps instead of the checkpoint's own: do the islands "
                             "last past the steps the model was trained for?")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="also draw the first 4 scenes: levels, islands at the first --tau, "
                             "votes")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --json or --figure file")


def check_arguments(args: argparse.Namespace) -> None:
    """Every option checked before anything is loaded or computed: one line per problem."""
    from .files import check_new_file

    for name in ("scenes", "batch_size", "steps"):                   # steps: None is its own
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.val < 0:
        raise ValueError(f"--val must be >= 0 (0: the test digits), got {args.val}")
    bad = [t for t in args.tau if not (math.isfinite(t) and -1 <= t <= 1)]
    if bad:
        raise ValueError(f"--tau values are cosine thresholds between -1 and 1, got {bad}")
    if args.figure and Path(args.figure).suffix.lower() != ".png":
        raise ValueError(f"--figure {args.figure} must be a .png file")
    for flag, value in (("--json", args.json), ("--figure", args.figure)):
        if not value:
            continue
        target = Path(value)
        if target.exists() and target.resolve() == Path(args.checkpoint).resolve():
            raise ValueError(f"{flag} {target} is the checkpoint being measured; choose another "
                             "path")
        check_new_file(target, force=args.force, flag=flag)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def format_table(metrics: dict[str, Any]) -> str:
    """The scene metrics as a plain-text table: the votes, then the islands per tau and level."""
    def number(v: float | None) -> str:
        return f"{'n/a':>8s}" if v is None or math.isnan(v) else f"{v:8.3f}"

    everyone = "both digits" if metrics["kind"] == "pair" else "every digit"
    digits = metrics.get("split", "test").split()[0] + " digits"   # "test" or "validation"
    lines = [f"scenes                     {metrics['scenes']} {metrics['kind']} "
             f"({' x '.join(map(str, metrics['canvas']))}), {digits}, seed {metrics['seed']}"
             + (f", {metrics['steps']} steps" if metrics.get("steps") else ""),
             f"object accuracy            {metrics['object_accuracy']:.4f}  "
             f"(digit columns voting {metrics['digit_object_accuracy']:.4f})",
             f"all objects right          {metrics['all_objects_right']:.4f}  ({everyone} right; "
             f"digit columns voting {metrics['digit_all_objects_right']:.4f})",
             f"column accuracy            {metrics['column_accuracy']:.4f}  "
             f"(digit columns {metrics['digit_column_accuracy']:.4f})",
             f"vote ARI                   {metrics['vote_ari']:.4f}  "
             f"(digit columns {metrics['digit_vote_ari']:.4f})"]
    for tau, found in metrics["islands"].items():
        levels = len(found["containment"])
        lines += ["",
                  f"tau {tau}: island ARI (top level) {found['island_ari']:.4f}  "
                  f"(digit columns {found['digit_island_ari']:.4f})",
                  "  level                      " + " ".join(f"{l:>8d}" for l in range(levels))]
        for key, name in (("islands_per_scene", "islands per scene"),
                          ("containment", "within one object"),
                          ("multi_containment", "  of islands >= 2 columns")):
            lines.append(f"  {name:<26s} " + " ".join(number(v) for v in found[key]))
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN (a share of no islands at all) as null; keys as strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def run(args: argparse.Namespace) -> int:
    from .checkpoint import default_device, existing_checkpoint, load_checkpoint
    from .cli import command_line
    from .data import prepare, verify
    from .files import atomic_write, atomic_write_text

    path = existing_checkpoint(args.checkpoint)
    check_arguments(args)
    H, W = KINDS[args.kind]
    model = load_checkpoint(path, device=args.device or default_device(), height=H, width=W)
    prepare(args.dataset, args.root)
    digits = "validation" if args.val else "test"      # which split the scenes' digits are from
    scenes = test_scenes(args.kind, args.scenes, args.seed, root=args.root, name=args.dataset,
                         val=args.val)
    metrics = evaluate_scenes(model, scenes, tau=args.tau, batch_size=args.batch_size,
                              seed=args.seed, steps=args.steps, progress=True)
    metrics = {"command": command_line(args), "checkpoint": str(path), "checkpoint_name": path.name,
               "checkpoint_sha256": file_sha256(path), "kind": args.kind, "seed": args.seed,
               "dataset": args.dataset,
               "split": f"{digits} (the last {args.val} training images)" if args.val else digits,
               "data_md5": verify(args.dataset, args.root),
               "device": str(next(model.parameters()).device), **metrics}
    print(format_table(metrics))
    if args.json:
        atomic_write_text(args.json, json.dumps(_json_safe(metrics), indent=2, allow_nan=False)
                          + "\n")
        print(f"wrote {args.json}")
    if args.figure:
        import matplotlib.pyplot as plt   # only when drawing: measuring needs no plotting library

        fig = scene_figure(model, scenes, args.tau[0], seed=args.seed, steps=args.steps,
                           title=f"{path.name} on {args.kind} {digits} scenes"
                                 + (f", {args.steps} steps" if args.steps else "")
                                 + f":\nislands (cosine >= {args.tau[0]}) outlined, and the votes")
        atomic_write(args.figure, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        print(f"wrote {args.figure}")
    return 0
