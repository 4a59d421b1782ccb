"""A stronger GLOM: columns for patches, the paper's weighted average, a real consensus.

Hinton, "How to represent part-whole hierarchies in a neural network" (arXiv:2102.12627), as the
paper describes it rather than as the seed's cellular automaton does:

- a column per image patch (here 4x4 pixels), each holding L level embeddings of D numbers;
- level 0 is the input: an embedding of the pixels around the column's patch, held fixed;
- every step, each level l >= 1 becomes the average of four contributions:
    its previous value,
    a bottom-up message   (an MLP of level l-1 in the same column),
    a top-down message    (an MLP of level l+1 and the column's position; none for the top level),
    the consensus         (the attention-weighted average of level l in the neighbouring columns,
                           weighted by how much the embeddings already agree: no learned queries
                           or keys, so agreement is what attracts and islands can form);
- embeddings are layer-normalised after every step (no wrap-around at the canvas edges);
- each column reads its class scores off its top level (one linear map shared by all columns);
  the image's label is the majority vote of its columns. No global pooling.

The weights do not depend on the canvas size, and the positional signal is a set of sinusoids of
the column's pixel coordinates, so a model trained on 28x28 runs on any canvas whose sides are
multiples of the patch size (`load_checkpoint(path, height=H, width=W)`).

Shapes: B batch, h x w columns (H/patch x W/patch), L levels, D dim, C classes, T steps. The state
is kept as `(B, h, w, L, D)` inside (the MLPs act on the last axis); `forward` returns the
islands' convention `(B, L, D, h, w)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PatchGlomConfig
from .islands import object_accuracy


class LevelMLPs(nn.Module):
    """One two-layer MLP per level, each applied to every column of its level:
    `(G, B, n, Din) -> (G, B, n, Dout)` for G levels."""

    def __init__(self, groups: int, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(groups, d_in, d_hidden) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.zeros(groups, 1, d_hidden))
        self.w2 = nn.Parameter(torch.randn(groups, d_hidden, d_out) / math.sqrt(d_hidden))
        self.b2 = nn.Parameter(torch.zeros(groups, 1, d_out))

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """`extra` `(G, n, d_hidden)`: a per-column term added to the hidden layer's input."""
        G, B, n, _ = x.shape
        pre = torch.baddbmm(self.b1, x.reshape(G, B * n, -1), self.w1).view(G, B, n, -1)
        if extra is not None:
            pre = pre + extra[:, None]
        hidden = F.gelu(pre).view(G, B * n, -1)
        return torch.baddbmm(self.b2, hidden, self.w2).view(G, B, n, -1)


def positions(h: int, w: int, patch: int, freqs: int, device: torch.device) -> torch.Tensor:
    """Sinusoids of each column's centre in pixels, wavelengths 2*patch * 2**k: `(h, w, 4*freqs)`.
    Defined for any canvas, so the top-down networks see the same code for the same place."""
    y = (torch.arange(h, device=device) + 0.5) * patch
    x = (torch.arange(w, device=device) + 0.5) * patch
    omega = 2 * math.pi / (2 * patch * 2.0 ** torch.arange(freqs, device=device))   # (F,)
    ay, ax = y[:, None] * omega, x[:, None] * omega                                 # (h, F), (w, F)
    code_y = torch.cat([ay.sin(), ay.cos()], -1)[:, None].expand(h, w, 2 * freqs)
    code_x = torch.cat([ax.sin(), ax.cos()], -1)[None, :].expand(h, w, 2 * freqs)
    return torch.cat([code_y, code_x], -1)


ISLAND_MARGIN = 0.5   # island_loss: neighbours in different objects are pushed below this cosine
ISLAND_HOLD = 0.95    # island_loss(hold=...): neighbours in one object are pulled above this one


def island_loss(states: torch.Tensor, targets: torch.Tensor, margin: float = ISLAND_MARGIN,
                apart_everywhere: bool = False, boundary: float = 0.0,
                hold: float = 0.0, parts: float = 0.0,
                ink: torch.Tensor | None = None) -> torch.Tensor:
    """The islands in the objective: of every pair of 4-neighbour columns (no wrap-around), in
    states `(S, B, L, D, h, w)`, those in one object (the same target in `targets` `(B, h, w)`:
    the objects of a scene are of different classes) should agree at the top level, the whole
    (1 - cosine), and those in different objects should disagree at every level above the
    input, since a part belongs to one whole (cosine above `margin`, penalised linearly).
    Islands are the components that cosine >= tau joins, so this asks for one island per object
    whose parts stay inside it. The mean of the two terms, each over its pairs (0 without any).
    With `apart_everywhere` a third term, the same penalty at the top level over every pair of
    columns in different objects wherever they are: two wholes differ even where blank columns
    lie between them. With `boundary` > 0 a fourth term, `boundary` times the same penalty over
    the top level of the neighbours in different objects alone: in the second term these pairs'
    top level is one level among L-1, yet one of them above tau joins two objects' islands.
    With `hold` > 0 a fifth term, `hold` times the mean over the first term's pairs of how far
    their top level lies below ISLAND_HOLD (linearly): the first term asks every pair for a little
    more agreement, a pair at cosine 0.85 no more than one at 0.99, yet below tau it splits its
    island; this one asks only the pairs below ISLAND_HOLD, and each as much.
    With `parts` > 0 a sixth term, `parts` times the same pull below ISLAND_HOLD at the levels
    between the input and the top, over the neighbours in one object that are both on its ink
    (`ink` `(B, h, w)` bool, e.g. `islands.digit_mask`): the lower levels are parts of the
    object, and a part lies on the digit, not on the blank canvas around it."""
    if parts and ink is None:
        raise ValueError("island_loss(parts=...) needs the ink columns: give ink (B, h, w)")
    unit = F.normalize(states[:, :, 1:], dim=3)                            # (S, B, L-1, D, h, w)
    agree_sum, agree_n, apart_sum, apart_n, edge_sum, hold_sum = 0.0, 0, 0.0, 0, 0.0, 0.0
    part_sum, part_n = 0.0, 0
    for axis in (-1, -2):                                                  # right, then down
        n = unit.shape[axis] - 1
        cos = (unit.narrow(axis, 0, n) * unit.narrow(axis, 1, n)).sum(3)   # (S, B, L-1, h', w')
        same = targets.narrow(axis, 0, n) == targets.narrow(axis, 1, n)    # (B, h', w')
        top = cos[:, :, -1]                                                # (S, B, h', w')
        together = same.expand_as(top)
        agree_sum = agree_sum + (1 - top)[together].sum()
        if hold:                                          # the same pairs, below ISLAND_HOLD
            hold_sum = hold_sum + F.relu(ISLAND_HOLD - top)[together].sum()
        agree_n += int(same.sum()) * top.shape[0]
        apart = ~same[:, None].expand_as(cos[0])                           # (B, L-1, h', w')
        penalty = F.relu(cos - margin)                                     # (S, B, L-1, h', w')
        apart_sum = apart_sum + penalty[apart.expand_as(cos)].sum()
        apart_n += int(apart.sum()) * cos.shape[0]
        if boundary:                                      # the top level of the same pairs
            edge_sum = edge_sum + penalty[:, :, -1][(~same).expand_as(top)].sum()
        if parts:                                         # the lower levels of the ink's pairs
            on_ink = same & ink.narrow(axis, 0, n) & ink.narrow(axis, 1, n)      # (B, h', w')
            lower = cos[:, :, :-1]                                         # (S, B, L-2, h', w')
            on_ink = on_ink[:, None].expand_as(lower)
            part_sum = part_sum + F.relu(ISLAND_HOLD - lower)[on_ink].sum()
            part_n += int(on_ink.sum())
    loss = agree_sum / max(agree_n, 1) + apart_sum / max(apart_n, 1)
    if boundary:                           # its pairs: the second term's, at one level of L-1
        loss = loss + boundary * edge_sum / max(apart_n // unit.shape[2], 1)
    if hold:
        loss = loss + hold * hold_sum / max(agree_n, 1)
    if parts:
        loss = loss + parts * part_sum / max(part_n, 1)
    if apart_everywhere:
        top = unit[:, :, -1].flatten(-2)                                   # (S, B, D, n)
        cos = top.transpose(2, 3) @ top                                    # (S, B, n, n)
        objects = targets.flatten(1)
        apart = (objects[:, :, None] != objects[:, None, :]).expand_as(cos)
        loss = loss + F.relu(cos - margin)[apart].sum() / max(int(apart.sum()), 1)
    return loss


class PatchGlom(nn.Module):
    """GLOM with patch columns. `model(images)` -> the final levels `(B, L, D, h, w)`."""

    def __init__(self, cfg: PatchGlomConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch = cfg.patch
        L, D, P = cfg.levels, cfg.dim, cfg.patch
        hidden = cfg.hidden * D
        # level 0: the pixels of a stem x stem window centred on each patch, embedded linearly
        self.embed = nn.Conv2d(1, D, cfg.stem, stride=P, padding=(cfg.stem - P) // 2)
        # where levels 1..L-1 start: one learned embedding per level, the same in every column
        self.start = nn.Parameter(torch.randn(L - 1, 1, 1, D))
        self.bottom_up = LevelMLPs(L - 1, D, hidden, D) if cfg.bottom_up else None   # l-1 -> l
        self.top_down = LevelMLPs(L - 2, D, hidden, D) if cfg.top_down and L > 2 else None
        # the column's position enters the top-down networks' hidden layer (l+1 -> l)
        self.where = (nn.Parameter(torch.zeros(L - 2, 4 * cfg.pos_freqs, hidden))
                      if self.top_down is not None and cfg.positional else None)
        self.readout = nn.Linear(D, cfg.num_classes)        # each column's class scores

    # ---- the contributions ------------------------------------------------------------------
    def consensus(self, levels: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
        """Each embedding's attention-weighted average over the same level of the neighbouring
        columns (`near` `(G, 1, n, n)`, a level's window: 0 for the k x k neighbours, -inf for
        the rest, itself and columns past the canvas edge). Weight of neighbour y for column x:
        softmax_y(<e_x, e_y>/sqrt(D)). `(G, B, n, D) -> (G, B, n, D)`."""
        similarity = levels @ levels.transpose(-1, -2) / math.sqrt(levels.shape[-1]) + near
        return similarity.softmax(-1) @ levels

    def step(self, levels: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """One GLOM step on the state `(L, B, n, D)`: every level above the input becomes the
        mean of its previous value and the messages it receives, normalised."""
        cfg = self.cfg
        total = levels[1:]                                                  # previous value
        count = 1
        if self.bottom_up is not None:
            total = total + self.bottom_up(levels[:-1])                     # bottom-up
            count += 1
        if cfg.consensus:
            total = total + self.consensus(levels[1:], context["near"])     # consensus
            count += 1
        if self.top_down is not None:
            down = self.top_down(levels[2:], context.get("where"))          # top-down to 1..L-2
            total = torch.cat([total[:-1] + down, total[-1:]]) / torch.cat(
                [torch.full((cfg.levels - 2, 1, 1, 1), count + 1.0, device=total.device),
                 torch.full((1, 1, 1, 1), float(count), device=total.device)])
        else:
            total = total / count
        return torch.cat([levels[:1], F.layer_norm(total, (cfg.dim,))])     # input level held

    # ---- the rollout ------------------------------------------------------------------------
    def initial_state(self, images: torch.Tensor) -> torch.Tensor:
        """Level 0 from the image, levels 1..L-1 at their learned start: `(L, B, n, D)`."""
        x = self.embed(images).flatten(2).transpose(1, 2)                  # (B, n, D)
        start = self.start.expand(-1, *x.shape[:2], -1)                    # (L-1, B, n, D)
        return F.layer_norm(torch.cat([x[None], start]), (self.cfg.dim,))

    def context(self, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
        """What every step of a rollout on h x w columns shares: each level's consensus window
        (the top level's `top_kernel` wide when set: a whole spans more columns than its parts),
        and the positions' term of the top-down networks."""
        y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                              indexing="ij")
        y, x = y.flatten(), x.flatten()
        dy, dx = (y[:, None] - y[None]).abs(), (x[:, None] - x[None]).abs()
        cfg = self.cfg
        windows = [cfg.kernel] * (cfg.levels - 2) + [cfg.top_kernel or cfg.kernel]   # 1..L-1
        near = torch.stack([(dy <= k // 2) & (dx <= k // 2) & ((dy + dx) > 0) for k in windows])
        mask = torch.zeros(near.shape, device=device).masked_fill(~near, float("-inf"))
        out = {"near": mask[:, None]}                                      # (L-1, 1, n, n)
        if self.where is not None:
            code = positions(h, w, self.patch, cfg.pos_freqs, device).flatten(0, 1)  # (n, P)
            out["where"] = torch.einsum("np,gph->gnh", code, self.where)   # (L-2, n, hidden)
        return out

    def states(self, images: torch.Tensor, steps: int | None = None) -> list[torch.Tensor]:
        """Every state of the rollout, the initial one first: T+1 tensors `(L, B, n, D)`."""
        self.check_images(images)
        T = self.cfg.steps if steps is None else steps
        if not (isinstance(T, int) and T >= 0):
            raise ValueError(f"steps must be a non-negative integer, got {T!r}")
        levels = self.initial_state(images)
        context = self.context(images.shape[2] // self.patch, images.shape[3] // self.patch,
                               images.device)
        states = [levels]
        for _ in range(T):
            levels = self.step(levels, context)
            states.append(levels)
        return states

    def grid(self, state: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """A state `(L, B, n, D)` in the islands' convention `(B, L, D, h, w)`."""
        L, B, n, D = state.shape
        h, w = images.shape[2] // self.patch, images.shape[3] // self.patch
        return state.permute(1, 0, 3, 2).reshape(B, L, D, h, w)

    def forward(self, images: torch.Tensor, steps: int | None = None,
                return_all: bool = False) -> torch.Tensor:
        """images `(B, 1, H, W)`, normalised -> the final levels `(B, L, D, h, w)`, or with
        return_all every state `(T+1, B, L, D, h, w)`."""
        states = self.states(images, steps)
        if return_all:
            return torch.stack([self.grid(s, images) for s in states])
        return self.grid(states[-1], images)

    # ---- reading the columns ----------------------------------------------------------------
    def scores(self, levels: torch.Tensor) -> torch.Tensor:
        """Class scores of each column from levels `(..., L, D, h, w)`: `(..., C, h, w)`."""
        return self.readout(levels[..., -1, :, :, :].movedim(-3, -1)).movedim(-1, -3)

    def column_scores(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Each column's class scores after the rollout: `(B, C, h, w)`."""
        return self.scores(self(images, steps=steps))

    def votes(self, levels: torch.Tensor) -> torch.Tensor:
        """Each column's class `(..., h, w)` from levels `(..., L, D, h, w)`."""
        return self.scores(levels).argmax(-3)

    def majority(self, votes: torch.Tensor) -> torch.Tensor:
        """The image's label: the most common column vote, ties to the lowest class."""
        return F.one_hot(votes.flatten(-2), self.cfg.num_classes).sum(-2).argmax(-1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Majority-vote labels `(B,)`."""
        return self.majority(self.votes(self(images, steps=steps)))

    def loss(self, images: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
             **islands: float | bool | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of `images` (see states_loss, whose island options `islands` are)
        and whether each is voted right."""
        return self.states_loss(self(images, return_all=True), targets, label_smoothing,
                                **islands)

    def states_loss(self, states: torch.Tensor, targets: torch.Tensor,
                    label_smoothing: float = 0.0,
                    island_weight: float = 0.0,
                    apart_everywhere: bool = False,
                    boundary: float = 0.0,
                    hold: float = 0.0,
                    parts: float = 0.0,
                    ink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of every column's scores against its target, averaged over the columns
        and the last `cfg.loss_steps` of the rollout's states `(T+1, B, L, D, h, w)`, plus
        `island_weight` times `island_loss` over the same states (`apart_everywhere`,
        `boundary`, `hold`, `parts` and `ink`: see there); and whether each image's final votes
        are right `(B,)`.

        targets: each image's label `(B,)`, the target of all its columns; or each column's own
        class `(B, h, w)`, e.g. the class of its object in a scene of several digits
        (`scenes.column_targets`). An image is right when, for every class among its targets,
        the majority vote of the columns with that target is that class: for a label, when the
        image's majority vote is its label; for a scene of digits of different classes, when
        every object is voted right.
        """
        scores = self.scores(states[-self.cfg.loss_steps:])                # (S, B, C, h, w)
        S, B, C, h, w = scores.shape
        if targets.dim() == 1:
            targets = targets[:, None, None].expand(B, h, w)
        if targets.shape != (B, h, w):
            raise ValueError(f"targets must be labels ({B},) or per-column classes "
                             f"({B}, {h}, {w}), got {tuple(targets.shape)}")
        loss = F.cross_entropy(scores.movedim(2, -1).reshape(-1, C),
                               targets.expand(S, B, h, w).reshape(-1),
                               label_smoothing=label_smoothing)
        if island_weight:
            loss = loss + island_weight * island_loss(states[-self.cfg.loss_steps:], targets,
                                                      apart_everywhere=apart_everywhere,
                                                      boundary=boundary, hold=hold,
                                                      parts=parts, ink=ink)
        with torch.no_grad():
            present = F.one_hot(targets.flatten(1), C).any(1)               # (B, C) classes there
            classes = torch.where(present, torch.arange(C, device=present.device), -1)
            right = object_accuracy(scores[-1].argmax(1), targets, classes, C)["right"]
        return loss, (right | ~present).all(1)

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse input the model cannot read, saying what was expected."""
        P = self.patch
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor of shape (B, 1, H, W), got {shape}")
        if images.shape[2] % P or images.shape[3] % P:
            raise ValueError(f"image sides must be multiples of the patch size {P}, "
                             f"got {tuple(images.shape[2:])}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point (normalised), got {images.dtype}")
