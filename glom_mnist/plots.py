"""Plotting helpers shared by `python -m glom_mnist figures` and the notebooks.

Each function builds and returns a matplotlib Figure (or draws into axes it is given); none
chooses a backend or calls `plt.show()`, so `figures` can run headless (Agg) and the notebooks
inline. Level maps colour each column's level vector by its first three principal components
(`PcaColours`) and outline the islands (`outline_segments`). Everything is drawn in pixel
coordinates of the input image, so that a model's grid of columns (one per pixel for `Glom`, one
per `patch` x `patch` pixels for `PatchGlom`) covers the picture it was computed from; the votes
drawn are those the caller passes, by the model's own rule (`model.votes(levels)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

AGREEMENT_NAMES = {"per_column_accuracy": "per-column accuracy",
                   "all_columns_agree": "all columns agree",
                   "majority_vote_accuracy": "majority-vote accuracy"}


# ---- colours and outlines ---------------------------------------------------------------------

@dataclass
class PcaColours:
    """Level vectors -> RGB: their projection on 3 principal components, each scaled to [0, 1]
    by its 2nd..98th percentile. Fit once (e.g. on the final step) and reuse for every step and
    digit, so that one colour means one vector throughout a figure or animation."""

    mean: torch.Tensor        # (D,)
    components: torch.Tensor  # (D, 3)
    low: torch.Tensor         # (3,)
    spread: torch.Tensor      # (3,)

    @classmethod
    def fit(cls, levels: torch.Tensor) -> "PcaColours":
        """Fit on the vectors of one level `(..., D, H, W)`, over all leading axes and columns."""
        D = levels.shape[-3]
        x = levels.detach().float().cpu().movedim(-3, -1).reshape(-1, D)  # (N, D)
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)         # (k, D), k = min(N, D)
        components = torch.zeros(D, 3)
        components[:, : min(3, len(vh))] = vh[:3].T
        # a fixed sign (largest coefficient positive) so that colours do not flip between runs
        largest = components.abs().argmax(0)
        components *= torch.where(components[largest, torch.arange(3)] < 0, -1.0, 1.0)
        projected = (x - mean) @ components                                 # (N, 3)
        low, high = projected.quantile(0.02, dim=0), projected.quantile(0.98, dim=0)
        # components without variance (e.g. level 0, whose channels are equal) stay constant
        spread = torch.maximum(high - low, (high - low).max() * 1e-3 + 1e-12)
        return cls(mean, components, low, spread)

    def __call__(self, levels: torch.Tensor) -> np.ndarray:
        """RGB in [0, 1]: `(..., D, H, W)` -> `(..., H, W, 3)`."""
        x = levels.detach().float().cpu().movedim(-3, -1)                   # (..., H, W, D)
        rgb = ((x - self.mean) @ self.components - self.low) / self.spread
        return rgb.clamp(0, 1).numpy()


def outline_segments(labels: np.ndarray | torch.Tensor, patch: int = 1) -> np.ndarray:
    """Line segments `(S, 2, 2)` (x, y in pixel coordinates) along every column edge between two
    different labels `(h, w)` of columns of `patch` x `patch` pixels: the outlines of islands, and
    of the digit when -1 marks outside. Pixel (y, x) is centred on (x, y), as `imshow` draws it."""
    labels = np.asarray(labels)
    y, x = np.nonzero(labels[:, 1:] != labels[:, :-1])       # edge between (y, x) and (y, x+1)
    vertical = np.stack([np.stack([x + 0.5, y - 0.5], -1), np.stack([x + 0.5, y + 0.5], -1)], 1)
    y, x = np.nonzero(labels[1:, :] != labels[:-1, :])       # edge between (y, x) and (y+1, x)
    horizontal = np.stack([np.stack([x - 0.5, y + 0.5], -1), np.stack([x + 0.5, y + 0.5], -1)], 1)
    segments = np.concatenate([vertical, horizontal]).reshape(-1, 2, 2)  # in column units
    return segments * patch + (patch - 1) / 2      # column c: c*patch - 0.5 to (c+1)*patch - 0.5


def draw_outlines(ax: Axes, labels: np.ndarray | torch.Tensor | None, color: str = "white",
                  linewidth: float = 0.7) -> LineCollection:
    """Add the outlines of `labels` `(H, W)` (none if None) to `ax`; returns the collection, whose
    `set_segments(outline_segments(...))` redraws them."""
    segments = outline_segments(labels) if labels is not None else np.zeros((0, 2, 2))
    return ax.add_collection(LineCollection(segments, colors=color, linewidths=linewidth))


def pixel_extent(grid: tuple[int, int], patch: int = 1) -> tuple[float, float, float, float]:
    """`imshow`'s extent that lays a map of h x w columns (`grid`) over the h*patch x w*patch
    pixels they cover: (left, right, bottom, top) with pixel (y, x) centred on (x, y)."""
    h, w = grid
    return (-0.5, w * patch - 0.5, h * patch - 0.5, -0.5)


# ---- level maps -------------------------------------------------------------------------------

class LevelGrid:
    """A grid of level maps, one column per item (a digit, or one digit at a step): the input
    image, then each level as PCA colours with island outlines, then optionally the votes. The
    maps of `size` = (h, w) columns of `patch` x `patch` pixels cover the input's extent."""

    def __init__(self, colours: Sequence[PcaColours], items: int, *,
                 images: np.ndarray | torch.Tensor | None = None,
                 titles: Sequence[str] | None = None, with_votes: bool = False,
                 num_classes: int = 10, size: tuple[int, int] = (28, 28), patch: int = 1,
                 scale: float = 1.3) -> None:
        self.colours = list(colours)
        L = len(self.colours)
        names = (["input"] if images is not None else []) + [f"level {l}" for l in range(L)]
        names[-1] += " (top)"
        if with_votes:
            names.append("votes")
        wide = max(1.0, size[1] / size[0])          # a 28 x 56 scene is twice as wide as a digit
        self.fig, axes = plt.subplots(len(names), items,
                                      figsize=(scale * wide * items + 0.6, scale * len(names)),
                                      squeeze=False, layout="constrained")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        for row, name in enumerate(names):
            axes[row, 0].set_ylabel(name)
        for j, title in enumerate(titles or []):
            axes[0, j].set_title(title, fontsize=9)
        extent = pixel_extent(tuple(size), patch)
        first = 0
        if images is not None:
            for j in range(items):
                axes[0, j].imshow(np.asarray(images[j]), cmap="gray", extent=extent)
            first = 1
        blank = np.zeros((*size, 3))
        self.maps = [[axes[first + l, j].imshow(blank, extent=extent) for j in range(items)]
                     for l in range(L)]
        self.outlines = [[draw_outlines(axes[first + l, j], None) for j in range(items)]
                         for l in range(L)]
        self.votes = [axes[-1, j].imshow(np.zeros(size), cmap="tab10", vmin=-0.5,
                                         vmax=max(num_classes, 10) - 0.5, extent=extent)
                      for j in range(items)] if with_votes else []
        if with_votes:
            bar = self.fig.colorbar(self.votes[0], ax=list(axes[-1]), ticks=range(num_classes),
                                    fraction=0.05, pad=0.01, shrink=0.9)
            bar.ax.tick_params(labelsize=7)
        self.patch = patch

    def show(self, levels: torch.Tensor, island_labels: torch.Tensor | None = None,
             votes: torch.Tensor | None = None) -> list[Artist]:
        """Draw levels `(N, L, D, h, w)` with island labels `(N, L, h, w)` and, in the votes row,
        `votes` `(N, h, w)`; returns the artists."""
        for l, colours in enumerate(self.colours):
            rgb = colours(levels[:, l])                                       # (N, h, w, 3)
            for j, image in enumerate(self.maps[l]):
                image.set_data(rgb[j])
                if island_labels is not None:
                    self.outlines[l][j].set_segments(
                        outline_segments(island_labels[j, l].cpu(), self.patch))
        if self.votes and votes is not None:
            for j, image in enumerate(self.votes):
                image.set_data(votes[j].cpu().numpy())
        return [a for row in self.maps + self.outlines for a in row] + self.votes


def fit_colours(levels: torch.Tensor) -> list[PcaColours]:
    """One `PcaColours` per level, fit on levels `(N, L, D, H, W)`."""
    return [PcaColours.fit(levels[:, l]) for l in range(levels.shape[1])]


def plot_level_maps(levels: torch.Tensor, island_labels: torch.Tensor | None = None, *,
                    images: np.ndarray | torch.Tensor | None = None,
                    titles: Sequence[str] | None = None,
                    colours: Sequence[PcaColours] | None = None,
                    votes: torch.Tensor | None = None, num_classes: int = 10, patch: int = 1,
                    suptitle: str | None = None) -> Figure:
    """Level maps of N items `(N, L, D, h, w)` (digits, or one digit's steps) as PCA colours
    (fit on these levels unless `colours` is given) with island outlines `(N, L, h, w)`, under
    the input `images` `(N, h*patch, w*patch)` and over a row of `votes` `(N, h, w)` if given."""
    levels = levels.detach().cpu()
    grid = LevelGrid(colours or fit_colours(levels), len(levels), images=images, titles=titles,
                     with_votes=votes is not None, num_classes=num_classes,
                     size=levels.shape[-2:], patch=patch)
    grid.show(levels, island_labels, votes)
    if suptitle:
        grid.fig.suptitle(suptitle)
    return grid.fig


def consensus_animation(states: torch.Tensor, path: str | Path, *,
                        island_labels: torch.Tensor | None = None,
                        votes: torch.Tensor | None = None,
                        images: np.ndarray | torch.Tensor | None = None,
                        titles: Sequence[str] | None = None, num_classes: int = 10,
                        patch: int = 1, steps: Sequence[int] | None = None, fps: int = 4,
                        dpi: int = 60) -> Path:
    """A GIF of the consensus forming: `LevelGrid` frames of states `(T+1, N, L, D, h, w)` (and
    island labels `(T+1, N, L, h, w)`, votes `(T+1, N, h, w)`) at `steps` (default: all),
    colours fit on the final step, the last frame held for a second. About a second per frame
    to draw on a CPU."""
    states = states.detach().cpu()
    T = len(states) - 1
    steps = list(range(T + 1)) if steps is None else list(steps)
    grid = LevelGrid(fit_colours(states[-1]), states.shape[1], images=images, titles=titles,
                     with_votes=votes is not None, num_classes=num_classes,
                     size=states.shape[-2:], patch=patch)
    title = grid.fig.suptitle(f"step {T} of {T}")
    grid.show(states[-1], None, None if votes is None else votes[-1])
    grid.fig.canvas.draw()                      # lay out once; frames only change pixels
    grid.fig.set_layout_engine("none")

    def frame(t: int) -> list[Artist]:
        title.set_text(f"step {t} of {T}")
        return grid.show(states[t], None if island_labels is None else island_labels[t],
                         None if votes is None else votes[t]) + [title]

    animation = FuncAnimation(grid.fig, frame, frames=steps + steps[-1:] * fps, blit=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    animation.save(path, writer=PillowWriter(fps=fps), dpi=dpi)
    plt.close(grid.fig)
    return path


# ---- curves -------------------------------------------------------------------------------------

def plot_neighbour_cosine(stats: Mapping[str, torch.Tensor], ax: Axes | None = None) -> Figure:
    """Neighbour cosine per level `(T+1, L)` vs step (key as in `islands.rollout_statistics`)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    cosine = torch.as_tensor(stats["neighbour_cosine"])
    for l in range(cosine.shape[1]):
        ax.plot(cosine[:, l], label=f"level {l}")
    ax.set(xlabel="step", ylabel="mean cosine to the 8 neighbours",
           title="agreement with the neighbours")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure


def plot_votes_per_step(stats: Mapping[str, torch.Tensor], ax: Axes | None = None) -> Figure:
    """The top level's agreement metrics `(T+1,)` vs step (keys as in
    `islands.rollout_statistics`): per-column and majority-vote accuracy, all-columns-agree."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    for key, name in AGREEMENT_NAMES.items():
        if key in stats:
            ax.plot(torch.as_tensor(stats[key]), label=name)
    ax.set(xlabel="step", ylabel="share", ylim=(0, 1.02), title="the top level's vote")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure


def plot_agreement(stats: Mapping[str, torch.Tensor]) -> Figure:
    """`plot_neighbour_cosine` and `plot_votes_per_step` side by side."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_neighbour_cosine(stats, left)
    plot_votes_per_step(stats, right)
    fig.tight_layout()
    return fig


def plot_island_stats(stats: Mapping[str, torch.Tensor]) -> Figure:
    """Mean island size and islands per image `(T+1, L)` vs step, one colour per level; solid over
    digit columns (when measured), dashed over all columns."""
    fig, (size_ax, count_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    L = torch.as_tensor(stats["mean_size"]).shape[1]
    for prefix, style in (("digit_", "-"), ("", "--")):
        if prefix + "mean_size" not in stats:
            continue
        what = "digit columns" if prefix else "all columns"
        for l in range(L):
            colour = f"C{l}"
            size_ax.plot(torch.as_tensor(stats[prefix + "mean_size"])[:, l], style, color=colour,
                         label=f"level {l}, {what}")
            count_ax.plot(torch.as_tensor(stats[prefix + "count"])[:, l], style, color=colour)
    size_ax.set(xlabel="step", ylabel="columns per island", yscale="log", title="mean island size")
    count_ax.set(xlabel="step", ylabel="islands per image", yscale="log", title="island count")
    size_ax.legend(fontsize=7, ncol=2)
    for ax in (size_ax, count_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot_training_curve(log: Sequence[Mapping[str, Any]], axes: Sequence[Axes] | None = None,
                        eval_label: str = "held-out", loss: str = "mse") -> Figure:
    """Loss vs iteration, and accuracy vs iteration and vs wall time, from a training log (rows of
    `Trainer.log`): the batch's majority-vote accuracy (smoothed) and the metrics of the
    evaluation rows, labelled `eval_label` (say which images they are, e.g. "test (first 500)").
    `loss` names the loss of rows that do not say theirs (`loss_kind`): the run's --loss.
    Given `axes` (3) it clears and redraws them, for live updates."""
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    fig = axes[0].figure
    for ax in axes:
        ax.clear()
        ax.grid(alpha=0.3)
    loss_ax, iter_ax, wall_ax = axes
    train = [r for r in log if "train_accuracy" in r]
    held_out = [r for r in log if r.get("majority_vote_accuracy") is not None]
    window = max(1, len(train) // 30)
    if train:
        iters = np.array([r["iteration"] for r in train])
        minutes = np.array([r["wall"] for r in train]) / 60
        losses = np.array([r["loss"] for r in train], float)
        stages = np.array([r.get("stage", 1) for r in train])
        several = len(np.unique(stages)) > 1           # a run fine-tuned from another: one loss
        for stage in np.unique(stages):                # line per run, each with its own loss
            part = stages == stage
            start = np.argmax(part)
            loss_ax.plot(iters[part], _smooth(losses[part], window),
                         label=f"stage {int(stage)}: {train[start].get('loss_kind', '')}"
                         if several else None)
            if start > 0:
                for ax, x in ((iter_ax, iters), (wall_ax, minutes)):
                    ax.axvline(x[start], color="0.4", ls="--", lw=0.8)
        if several:
            loss_ax.set_yscale("log")
            loss_ax.legend(fontsize=7)
        accuracy = _smooth(np.array([r["train_accuracy"] for r in train], float), window)
        for ax, x in ((iter_ax, iters), (wall_ax, minutes)):
            ax.plot(x, accuracy, color="0.6", label=f"training batch (mean of {window})")
    for key, name in AGREEMENT_NAMES.items():
        if held_out and key in held_out[0]:
            values = [r[key] for r in held_out]
            iter_ax.plot([r["iteration"] for r in held_out], values, "o-", ms=3,
                         label=f"{eval_label} {name}")
            wall_ax.plot([r["wall"] / 60 for r in held_out], values, "o-", ms=3)
    kinds = {r.get("loss_kind", loss) for r in train} or {loss}
    loss_ax.set(xlabel="iteration", ylabel=" / ".join(sorted(kinds)) + " loss", title="loss")
    iter_ax.set(xlabel="iteration", ylabel="accuracy", ylim=(0, 1), title="accuracy vs iterations")
    wall_ax.set(xlabel="training minutes (evaluation excluded)", ylabel="accuracy", ylim=(0, 1),
                title="accuracy vs wall time")
    iter_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- evaluation ---------------------------------------------------------------------------------

def plot_confusion(confusion: Sequence[Sequence[int]] | torch.Tensor) -> Figure:
    """The confusion matrix (rows: true label, columns: majority vote), counts written in."""
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    shown = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    classes = range(len(matrix))
    ax.set(xticks=list(classes), yticks=list(classes), xlabel="majority vote", ylabel="true label",
           title="confusion matrix")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    return fig


def plot_digits(images: np.ndarray | torch.Tensor, titles: Sequence[str], columns: int = 8) -> Figure:
    """Images `(N, H, W)` in a grid, each with its title."""
    images = np.asarray(images)
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image, cmap="gray")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
