"""Islands of agreement: do GLOM's columns agree, and at which scale?

GLOM's claim (Hinton 2021, "islands of identical vectors"): after some steps the columns that
belong to one part agree at that part's level, so islands of near-identical level vectors form,
small at low levels (parts) and large at high levels (the whole digit). Everything here is
computed from the states of a rollout, `model(images, return_all=True)`: `(T+1, B, L, D, h, w)`,
on the grid of columns, h x w: the pixels for the seed's model (`Glom`, a column per pixel), the
4 x 4 patches for `PatchGlom` (`model.patch` pixels a side). Functions that take `states` also
accept a single state `(B, L, D, h, w)` and then return their result without the step axis.
Each column's vote is the model's own rule, `model.votes(states)`; the functions here take votes.

Two neighbourhoods, on purpose:
- `neighbour_cosine` uses the model's own neighbourhood, the 8 neighbours on a torus, so it
  measures agreement with exactly the columns each column reads;
- `islands` uses the plain image grid with 4-neighbour edges and no wrap-around, so that an
  island is a region one can outline on the digit: on a torus the background at the left and
  right borders would be one island, and with 8 neighbours two strokes that touch at a corner
  would merge.

The digit mask (`digit_mask`): a pixel is ink when it is brighter than half the way from the
image's darkest to its brightest pixel (for raw MNIST, intensity > 0.5 x max), and a column is on
the digit when any of its pixels is ink (`digit_columns`: "any" rather than "most", because a
stroke 2 pixels wide covers at most half of a 4 x 4 patch).

Scenes of several digits (`glom_mnist.scenes`) ask whether the islands are the objects:
`object_accuracy` (does each object's majority vote name it?), `adjusted_rand_index` (how well a
partition of the columns, by island or by vote, matches the objects) and `island_containment`
(does each island stay within one object?). They take tensors and know nothing of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import Glom, majority_vote, vote_counts  # the majority rule of both families

if TYPE_CHECKING:  # patch_glom imports islands' object measures
    from .patch_glom import PatchGlom

# half of the model's 8 torus neighbours as (dy, dx); the other half are their opposites
HALF_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))


def _steps_axis(states: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`(T+1, B, L, D, H, W)` as is, or a single state `(B, L, D, H, W)` with a step axis added;
    the flag says whether the caller should drop the step axis again."""
    if states.dim() == 6:
        return states, False
    if states.dim() == 5:
        return states.unsqueeze(0), True
    raise ValueError(f"states must be (T+1, B, L, D, H, W) or (B, L, D, H, W), "
                     f"got shape {tuple(states.shape)}")


def _unit(levels: torch.Tensor) -> torch.Tensor:
    """Level vectors scaled to length 1 along D (zero vectors stay zero); `(..., D, H, W)`.
    Twice as fast on a CPU as F.normalize, whose norm kernel is slow along a strided axis."""
    return levels * (levels * levels).sum(-3, keepdim=True).clamp(min=1e-24).rsqrt()


# ---- agreement with the neighbours --------------------------------------------------------------

def neighbour_cosine_map(states: torch.Tensor) -> torch.Tensor:
    """Each column's mean cosine similarity to its 8 torus neighbours, per level.

    `(..., L, D, H, W)` -> `(..., L, H, W)`. A zero vector has cosine 0 with everything.
    Cosine is symmetric, so the similarity to the neighbour at -(dy, dx) is that of (dy, dx)
    read at the neighbour: 4 products instead of 8.
    """
    *lead, D, H, W = states.shape
    unit = _unit(states).reshape(-1, D, H, W)
    padded = F.pad(unit, (1, 1, 1, 1), mode="circular")                  # (N, D, H+2, W+2)
    total = unit.new_zeros(unit.shape[0], H, W)
    for dy, dx in HALF_NEIGHBOURS:
        similarity = (unit * padded[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]).sum(1)  # (N, H, W)
        total += similarity + similarity.roll((dy, dx), dims=(-2, -1))
    return (total / 8).reshape(*lead, H, W)


def neighbour_cosine(states: torch.Tensor) -> torch.Tensor:
    """Neighbour cosine: the mean over images and columns of the cosine similarity between a
    column's level vector and those of its 8 torus neighbours. `(T+1, L)`, or `(L,)` for a state."""
    states, single = _steps_axis(states)
    per_image = neighbour_cosine_map(states).mean((-2, -1))              # (T+1, B, L)
    mean = per_image.mean(1)                                             # (T+1, L)
    return mean[0] if single else mean


# ---- the column grid ----------------------------------------------------------------------------

def column_pixels(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """`(N, H, W)` -> `(N, H // patch, W // patch, patch * patch)`: each column's pixels (rows and
    columns of pixels left over at the bottom and right are dropped)."""
    N, H, W = pixels.shape
    h, w = H // patch, W // patch
    cut = pixels[:, :h * patch, :w * patch].reshape(N, h, patch, w, patch)
    return cut.permute(0, 1, 3, 2, 4).reshape(N, h, w, patch * patch)


def digit_columns(background: torch.Tensor, patch: int) -> torch.Tensor:
    """Columns on a digit: any of their pixels is ink. `(N, H, W)` bool background ->
    `(N, H // patch, W // patch)` bool; for patch 1 the ink itself."""
    return column_pixels(~background, patch).any(-1)


def digit_mask(images: torch.Tensor, threshold: float = 0.5, patch: int = 1) -> torch.Tensor:
    """The digit columns of a model with `patch` x `patch` pixels per column (`model.patch`):
    those with a pixel brighter than `threshold` of the way from the image's darkest pixel to
    its brightest. Raw `(B, H, W)` or normalised `(B, 1, H, W)` images -> bool
    `(B, H // patch, W // patch)`; for patch 1 the digit pixels."""
    x = images.float().reshape(images.shape[0], images.shape[-2], images.shape[-1])  # (B, H, W)
    low = x.amin((-2, -1), keepdim=True)
    high = x.amax((-2, -1), keepdim=True)
    return digit_columns(x - low <= threshold * (high - low), patch)


# ---- islands ------------------------------------------------------------------------------------

@dataclass
class Islands:
    """The islands of every image and level (leading axes `...` = those of the levels given)."""

    labels: torch.Tensor     # (..., L, H, W) int64: island 0..count-1 (row-major order), -1 = none
    count: torch.Tensor      # (..., L) int64: number of islands
    mean_size: torch.Tensor  # (..., L) float: members / count (nan if there are none)
    largest: torch.Tensor    # (..., L) int64: columns in the largest island
    members: torch.Tensor    # (..., L) int64: columns in islands (all, or those in the mask)


def islands(levels: torch.Tensor, tau: float = 0.9, mask: torch.Tensor | None = None) -> Islands:
    """Islands: the connected components of the image grid whose edges join 4-neighbours (no
    wrap-around) whose level vectors have cosine similarity >= tau, per image and level.

    levels: `(..., L, D, H, W)`, e.g. `(B, L, D, H, W)` or every step `(T+1, B, L, D, H, W)`.
    mask: bool `(B, H, W)` on the same grid (e.g. `digit_mask(raw, patch=model.patch)`), the
    same for every level and step; columns outside it belong to no island (label -1) and join
    nothing.
    Components by min-label propagation (vectorised over images, levels and steps): every
    column starts with its own index as label; each round it takes the smallest label across its
    edges, hands that label on to the column its label names ("hooking": a whole tree of labels
    moves at once), then jumps to its label's label. Labels only ever name columns of the same
    island and only decrease, so at the fixed point each is the island's smallest index; hooking
    and jumping make the rounds grow with the logarithm of the island's length, not the length.
    """
    return _islands_from_cosines(*_grid_cosines(levels), tau, mask)


def _grid_cosines(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each column with its right and its lower neighbour (no wrap-around):
    `(..., D, H, W)` -> `(..., H, W-1)` and `(..., H-1, W)`."""
    unit = _unit(levels)
    return (unit[..., :-1] * unit[..., 1:]).sum(-3), (unit[..., :-1, :] * unit[..., 1:, :]).sum(-3)


def _islands_from_cosines(right: torch.Tensor, down: torch.Tensor, tau: float,
                          mask: torch.Tensor | None) -> Islands:
    """`islands`, given the cosines of `_grid_cosines`."""
    *lead, H, _ = right.shape
    W = down.shape[-1]
    n = H * W
    inside = torch.ones(*lead, H, W, dtype=torch.bool, device=down.device)
    if mask is not None:
        inside = inside & mask.to(down.device).unsqueeze(-3)             # (..., L, H, W)
    right = (right >= tau) & inside[..., :-1] & inside[..., 1:]          # (..., L, H, W-1)
    down = (down >= tau) & inside[..., :-1, :] & inside[..., 1:, :]      # (..., L, H-1, W)

    # labels (..., L, H*W + 1): slot n is a sink that every outside column points to
    index = torch.arange(n + 1, device=down.device)
    labels = torch.where(inside.flatten(-2), index[:n], n)
    labels = torch.cat([labels, labels.new_full((*lead, 1), n)], -1)
    while True:
        grid = labels[..., :n].view(*lead, H, W)
        smallest = grid.clone()                                          # over self and edges
        smallest[..., :-1] = torch.minimum(smallest[..., :-1], torch.where(right, grid[..., 1:], n))
        smallest[..., 1:] = torch.minimum(smallest[..., 1:], torch.where(right, grid[..., :-1], n))
        smallest[..., :-1, :] = torch.minimum(smallest[..., :-1, :], torch.where(down, grid[..., 1:, :], n))
        smallest[..., 1:, :] = torch.minimum(smallest[..., 1:, :], torch.where(down, grid[..., :-1, :], n))
        smallest = smallest.flatten(-2)                                  # (..., L, H*W)
        hooked = torch.cat([smallest, labels[..., n:]], -1).scatter_reduce(
            -1, labels[..., :n], smallest, "amin")
        new = hooked.gather(-1, hooked)                                  # the label's label
        if torch.equal(new, labels):
            break
        labels = new

    labels = labels[..., :n]                                             # (..., L, H*W)
    roots = labels == index[:n]                                          # one per island
    island_id = torch.cat([roots.cumsum(-1) - 1, labels.new_full((*lead, 1), -1)], -1)
    sizes = torch.zeros_like(island_id).scatter_add_(-1, labels, torch.ones_like(labels))
    count = roots.sum(-1)                                                # (..., L)
    members = inside.flatten(-2).sum(-1)
    mean_size = torch.where(count > 0, members / count.clamp(min=1), float("nan"))
    return Islands(labels=island_id.gather(-1, labels).view(*lead, H, W), count=count,
                   mean_size=mean_size, largest=sizes[..., :n].amax(-1), members=members)


def _island_stats_per_image(states: torch.Tensor, tau: float,
                            mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """count, mean_size, largest, members per step, image and level `(T+1, B, L)`; with a mask
    also the same over digit columns only (keys prefixed "digit_")."""
    stats = {}
    cosines = _grid_cosines(states)
    for prefix, m in [("", None)] + ([("digit_", mask)] if mask is not None else []):
        found = _islands_from_cosines(*cosines, tau, m)
        stats.update({prefix + "count": found.count.float(), prefix + "mean_size": found.mean_size,
                      prefix + "largest": found.largest.float(),
                      prefix + "members": found.members.float()})
    return stats


def island_stats(states: torch.Tensor, tau: float = 0.9,
                 digit_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Island count, mean island size (columns per island), largest island (columns) and the
    columns the islands cover ("members": all of them, h x w), each averaged over images, per
    step and level: `(T+1, L)` (or `(L,)` for a single state).

    Over all columns, and with `digit_mask` (`(B, h, w)`, on the states' grid) also over digit
    columns only (keys "digit_count", "digit_mean_size", "digit_largest", "digit_members");
    images without an island are skipped in the mean island size.
    """
    states, single = _steps_axis(states)
    stats = {k: v.nanmean(1) for k, v in _island_stats_per_image(states, tau, digit_mask).items()}
    return {k: v[0] for k, v in stats.items()} if single else stats


# ---- the top level's vote ---------------------------------------------------------------------

def vote_share(votes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confidence: the share of columns that vote for the majority label. `(..., H, W)` -> `(...,)`."""
    counts = vote_counts(votes, num_classes)
    return counts.amax(-1) / counts.sum(-1)


def _agreement_per_image(votes: torch.Tensor, labels: torch.Tensor,
                         num_classes: int) -> dict[str, torch.Tensor]:
    """The three agreement metrics of each step and image `(T+1, B)`, as floats, from the votes
    `(T+1, B, h, w)`."""
    labels = labels.to(votes.device)
    return {
        "per_column_accuracy": (votes == labels[:, None, None]).float().mean((-2, -1)),
        "all_columns_agree": (votes == votes[..., :1, :1]).flatten(-2).all(-1).float(),
        "majority_vote_accuracy": (majority_vote(votes, num_classes) == labels).float(),
    }


def agreement(votes: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """The columns' agreement at every step, averaged over images: `(T+1,)` each (0-dim for a
    single step). votes: each column's class `(T+1, B, h, w)` or `(B, h, w)`, by the model's own
    rule (`model.votes(states)`). per_column_accuracy: the share of columns whose vote is the
    label; all_columns_agree: the share of images whose columns all vote the same;
    majority_vote_accuracy: the share of images whose majority vote is the label."""
    if votes.dim() not in (3, 4):
        raise ValueError(f"votes must be (T+1, B, h, w) or (B, h, w), "
                         f"got shape {tuple(votes.shape)}")
    single = votes.dim() == 3
    per_image = _agreement_per_image(votes[None] if single else votes, labels, num_classes)
    means = {k: v.mean(1) for k, v in per_image.items()}
    return {k: v[0] for k, v in means.items()} if single else means


# ---- a whole test set ---------------------------------------------------------------------------

@torch.no_grad()
def rollout_statistics(model: Glom | PatchGlom, images: torch.Tensor, labels: torch.Tensor, *,
                       masks: torch.Tensor | None = None, tau: float = 0.9,
                       with_islands: bool = True, batch_size: int = 32,
                       steps: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Neighbour cosine, agreement and island statistics of `model` (in eval mode) on normalised
    `images` `(N, 1, H, W)`, rolled out in batches and averaged over all N images. The model's
    columns form an h x w grid (h = H / model.patch); each votes by `model.votes`.

    Returns `neighbour_cosine` `(T+1, L)`, the `agreement` metrics `(T+1,)`, with_islands the
    `island_stats` `(T+1, L)` (digit-only ones too when `masks` `(N, h, w)` is given, e.g.
    `digit_mask(raw, patch=model.patch)`), and the final step's `votes` `(N, h, w)`, `majority`
    `(N,)` and `vote_share` `(N,)` on the CPU. The averages equal those of the per-batch
    functions applied to all images at once.
    """
    grid = (images.shape[-2] // model.patch, images.shape[-1] // model.patch)
    if masks is not None and tuple(masks.shape) != (len(images), *grid):
        raise ValueError(f"masks must be (N, h, w) = {(len(images), *grid)}, one per column of "
                         f"the model's grid, got {tuple(masks.shape)}: make them with "
                         f"digit_mask(raw, patch={model.patch})")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    C = model.cfg.num_classes
    per_image: dict[str, list[torch.Tensor]] = {}
    for i in tqdm(range(0, len(images), batch_size), desc="rollout", disable=not progress,
                  leave=False):
        states = model(images[i:i + batch_size].to(device), steps=steps,
                       return_all=True)                                  # (T+1, B, L, D, H, W)
        votes = model.votes(states)                                     # (T+1, B, h, w)
        found = {"neighbour_cosine": neighbour_cosine_map(states).mean((-2, -1)),
                 **_agreement_per_image(votes, labels[i:i + batch_size], C)}
        if with_islands:
            mask = None if masks is None else masks[i:i + batch_size]
            found.update(_island_stats_per_image(states, tau, mask))
        found["votes"] = votes[-1].to(torch.uint8)[None]                 # (1, B, h, w)
        for k, v in found.items():
            per_image.setdefault(k, []).append(v.cpu())
    model.train(was_training)
    joined = {k: torch.cat(v, dim=1) for k, v in per_image.items()}     # image axis is 1
    votes = joined.pop("votes")[0].long()                                # (N, h, w)
    stats: dict[str, Any] = {k: v.nanmean(1) for k, v in joined.items()}
    stats.update(votes=votes, majority=model.majority(votes), vote_share=vote_share(votes, C))
    return stats


# ---- parts and wholes ---------------------------------------------------------------------------

def part_whole_table(stats_by_model: Mapping[str, Mapping[str, torch.Tensor]],
                     step: int = -1) -> list[dict[str, Any]]:
    """Does island size grow from level 1 to the top level? One row per model and column set
    (all columns; digit columns when measured): the columns per image in the set (h x w for
    all; the mean count of digit columns), mean island size per level at `step`, the ratio
    top / level 1, and `grows` = sizes never shrink from level 1 up.

    stats_by_model: name -> `island_stats` (or `rollout_statistics`) result `(T+1, L)`.
    """
    rows = []
    for name, stats in stats_by_model.items():
        for columns, prefix in (("all", ""), ("digit", "digit_")):
            if prefix + "mean_size" not in stats:
                continue
            sizes = stats[prefix + "mean_size"][step][1:].tolist()       # levels 1 .. L-1
            members = stats[prefix + "members"][step][-1].item()         # the same at every level
            row: dict[str, Any] = {"model": name, "columns": columns,
                                   "per image": round(members, 1)}
            row.update({f"level {l}": round(s, 2) for l, s in enumerate(sizes, start=1)})
            row["top / level 1"] = round(sizes[-1] / sizes[0], 2) if sizes[0] else float("nan")
            row["grows"] = all(b >= a for a, b in zip(sizes, sizes[1:]))
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts (e.g. `part_whole_table`) as an aligned plain-text table."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [keys] + [[str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# ---- scenes of several objects ------------------------------------------------------------------

def adjusted_rand_index(labels_a: torch.Tensor, labels_b: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Adjusted Rand index of two partitions of each image's elements (Hubert and Arabie 1985):
    1 for the same partition up to the names of its parts, about 0 for partitions no more alike
    than chance given their part sizes (below 0 for less alike).

    labels_a, labels_b: int `(B, ...)`, each element's part; mask: bool `(B, ...)`, only these
    elements (e.g. the digit columns). -> float64 `(B,)`. From the contingency table n_ij of
    the two partitions, with a_i, b_j its row and column sums and C(m) = m (m - 1) / 2:
    ARI = (sum C(n_ij) - E) / ((sum C(a_i) + sum C(b_j)) / 2 - E), E = sum C(a_i) sum C(b_j) / C(n).
    The denominator is 0 only when both partitions are one part, or both all single elements
    (or n = 1): the same partition, ARI 1. An image without elements gets nan.
    """
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"the two labellings differ in shape: {tuple(labels_a.shape)} "
                         f"and {tuple(labels_b.shape)}")
    B = labels_a.shape[0]
    a, b = labels_a.reshape(B, -1), labels_b.reshape(B, -1)
    image = torch.arange(B, device=a.device)[:, None].expand_as(a)
    if mask is not None:
        keep = mask.reshape(B, -1).to(a.device)
        image, a, b = image[keep], a[keep], b[keep]
    image, a, b = image.reshape(-1), a.reshape(-1).long(), b.reshape(-1).long()

    def pairs(m: torch.Tensor) -> torch.Tensor:
        return m * (m - 1) / 2

    def pairs_within(*parts: torch.Tensor) -> torch.Tensor:
        """sum over the groups of elements with equal image and parts of C(group size): (B,)"""
        total = torch.zeros(B, dtype=torch.float64, device=a.device)
        if image.numel() == 0:
            return total
        key, span = torch.zeros_like(image), 1                           # one int64 per element
        for part in parts:
            part = part - part.min()
            key, span = key * (int(part.max()) + 1) + part, span * (int(part.max()) + 1)
        groups, sizes = torch.unique(image * span + key, return_counts=True)
        return total.index_add_(0, groups // span, pairs(sizes.double()))

    n = torch.bincount(image, minlength=B).double()
    both, in_a, in_b = pairs_within(a, b), pairs_within(a), pairs_within(b)
    total = pairs(n)
    expected = torch.where(total > 0, in_a * in_b / total.clamp(min=1), 0.0)
    best = (in_a + in_b) / 2
    ari = torch.where(best > expected, (both - expected) / (best - expected), 1.0)
    return torch.where(n > 0, ari, float("nan"))


def object_accuracy(votes: torch.Tensor, objects: torch.Tensor, object_labels: torch.Tensor,
                    num_classes: int = 10,
                    mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Is each object recognised? Its columns' majority vote (ties to the lowest class, as
    `majority_vote`) against its class.

    votes: int `(B, H, W)` each column's class; objects: int `(B, H, W)` each column's object
    0..K-1; object_labels: int `(B, K)` each object's class, -1 where a scene has fewer objects;
    mask: bool `(B, H, W)`, only the columns it keeps vote (e.g. `digit_columns`: the object's
    ink alone, not the blank canvas counted in it). Returns "majority" `(B, K)` (-1 for an object
    without columns), "right" bool `(B, K)` (an object without columns is not right), and the
    shares "object_accuracy" (over the objects present) and "all_objects_right" (over the
    scenes), 0-dim.
    """
    B, K = object_labels.shape
    if objects.min() < 0 or objects.max() >= K:
        raise ValueError(f"objects must be 0..{K - 1} (object_labels has {K} per scene)")
    key = (objects * num_classes + votes).reshape(B, -1)                 # (B, H*W)
    key = key + torch.arange(B, device=key.device)[:, None] * (K * num_classes)
    weight = None if mask is None else mask.reshape(-1).to(key.device, torch.float64)
    counts = torch.bincount(key.reshape(-1), weight, minlength=B * K * num_classes)
    counts = counts.view(B, K, num_classes)
    majority = torch.where(counts.sum(-1) > 0, counts.argmax(-1), -1)    # (B, K)
    present = object_labels >= 0
    right = present & (majority == object_labels.to(majority.device))
    return {"majority": majority, "right": right,
            "object_accuracy": right.sum() / present.sum(),
            "all_objects_right": (right | ~present).all(1).float().mean()}


def island_containment(labels: torch.Tensor, objects: torch.Tensor) -> dict[str, torch.Tensor]:
    """Does each island lie within one object (all its columns belong to the same object)?

    labels: `islands(...).labels` `(B, L, H, W)` (-1 = no island); objects: int `(B, H, W)`.
    Returns counts per image and level `(B, L)`: "islands" and "contained", and the same for
    the islands of at least 2 columns, "multi_islands" and "multi_contained" (a single column
    always lies within one object, so the share over all islands grows with their number).
    """
    *lead, H, W = labels.shape
    n = H * W
    island = labels.flatten(-2)                                          # (B, L, n)
    slot = torch.where(island >= 0, island, n)                           # slot n: no island
    obj = objects.flatten(-2).unsqueeze(-2).expand_as(island).to(island.device)
    lowest = island.new_full((*lead, n + 1), n).scatter_reduce(-1, slot, obj, "amin")
    highest = island.new_full((*lead, n + 1), -1).scatter_reduce(-1, slot, obj, "amax")
    size = torch.zeros_like(lowest).scatter_add_(-1, slot, torch.ones_like(slot))
    real, within = size[..., :n] > 0, (lowest == highest)[..., :n]
    multi = size[..., :n] >= 2
    return {"islands": real.sum(-1), "contained": (real & within).sum(-1),
            "multi_islands": multi.sum(-1), "multi_contained": (multi & within).sum(-1)}
