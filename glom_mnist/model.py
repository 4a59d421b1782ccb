"""GLOM as a state grid: one column of L level embeddings per pixel, updated T times.

Hinton, "How to represent part-whole hierarchies in a neural network" (arXiv:2102.12627): at
every step each level embedding receives a bottom-up message from the level below, a top-down
message from the level above, an attention-weighted average of the same level in nearby columns
(the consensus), and keeps its previous value. This file follows the public GLOM-on-MNIST
experiment (docs/seed-experiment.md): every message comes from a small network that reads the
3x3 torus neighbourhood of one level, a lateral network reads the level's own neighbourhood, and
the consensus attention uses Kilcher's similarity over the level and the levels above it.

This file says what is computed. How the networks run fast (all at once, with hand-written
backward passes, compiled on a CPU) is glom_mnist/kernels.py, behind one call (`Glom.networks`);
tests/test_model.py proves the whole rollout equal to the seed's formulation written plainly
(tests/oracle.py). Speed: docs/speed.md.

Axes everywhere: B batch, L levels, D dim, H, W pixels (one column each), T steps, R networks
("routes"), k the neighbourhood's side.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ROLES, GlomConfig


class Glom(nn.Module):
    """The GLOM state grid. `model(images)` -> levels `(B, L, D, H, W)`."""

    patch = 1  # pixels per column side: one column per pixel

    def __init__(self, cfg: GlomConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, D, k = cfg.levels, cfg.dim, cfg.kernel
        # network r reads level source and adds to level target: bottom_up (l -> l+1), lateral
        # (l -> l), top_down (l+1 -> l), grouped by role in this order
        self.routes = cfg.routes()                                   # [(role, source, target)]
        R = len(self.routes)
        # Network r: Q = tanh(A x + a), K = tanh(B Q + b) + Q, V = tanh(C K + c) + Q + K, x the
        # k x k neighbourhood of its source level (A as a convolution weight: the seed's
        # Linear(k*k*D -> D) laid out by seed_linear_to_conv). Initialised like nn.Linear.
        self.A = nn.Parameter(_uniform((R, D, D, k, k), fan_in=D * k * k))   # (R, out, in, k, k)
        self.a = nn.Parameter(_uniform((R, D), fan_in=D * k * k))
        self.B = nn.Parameter(_uniform((R, D, D), fan_in=D))
        self.b = nn.Parameter(_uniform((R, D), fan_in=D))
        self.C = nn.Parameter(_uniform((R, D, D), fan_in=D))
        self.c = nn.Parameter(_uniform((R, D), fan_in=D))
        self.kernels = kernels.Networks([src for _, src, _ in self.routes], L)  # no weights
        target = torch.tensor([t for *_, t in self.routes], dtype=torch.long)
        self.register_buffer("route_target", target, persistent=False)           # (R,)
        self.role_routes, start = {}, 0              # each role's networks: consecutive routes
        for role in ROLES:
            n = sum(r == role for r, *_ in self.routes)
            self.role_routes[role], start = slice(start, start + n), start + n
        # the consensus reaches every level but the input one
        attended = torch.ones(L).index_fill(0, torch.tensor([0]), 0.0) * float(cfg.attention)
        self.register_buffer("attended_levels", attended.view(1, L, 1, 1, 1), persistent=False)
        receives = torch.bincount(target, minlength=L).float() + attended      # contributions
        self.register_buffer("messages_per_level", receives.view(1, L, 1, 1, 1), persistent=False)
        # Kilcher's similarity: level l sees lambda**(m-l) <e_m,x, e_m,y> for every m >= l
        m, l = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
        lam = torch.where(m >= l, cfg.attention_lambda ** (m - l).clamp(min=0).float(), 0.0)
        self.register_buffer("level_mix", lam, persistent=False)                # (L above, L)
        self._step = self.update          # one GLOM step; compile_steps() swaps in a compiled one

    # ---- one step ------------------------------------------------------------------------
    def update(self, levels: torch.Tensor) -> torch.Tensor:
        """One GLOM step: each level embedding `(B, L, D, H, W)` from its previous value, the
        networks' messages and the consensus."""
        cfg = self.cfg
        messages = self.network_messages(levels)                # bottom-up + lateral + top-down
        if cfg.attention:
            consensus = self.consensus(levels)                  # the neighbours' weighted mean
        if cfg.update == "residual":                            # the seed's: add everything
            if cfg.attention:                                   # and step towards the consensus
                pull = consensus - levels
                messages = messages + cfg.attention_weight * self.attended_levels * pull
            return levels + messages                            # + the previous state
        # "average" (Hinton's, with equal weights): each level that receives anything becomes
        # the mean of its previous value and what it receives
        if cfg.attention:
            messages = messages + self.attended_levels * consensus
        count = self.messages_per_level
        return torch.where(count > 0, (levels + messages) / (1 + count), levels)

    def network_messages(self, levels: torch.Tensor) -> torch.Tensor:
        """The networks' messages summed per target level, times out_scale: `(B, L, D, H, W)`."""
        V = self.networks(levels).to(levels.dtype)              # (B, R, D, H, W)
        messages = torch.zeros_like(levels)                     # (B, L, D, H, W)
        self.receive(messages, V, "bottom_up")                  # from level l-1's neighbourhood
        self.receive(messages, V, "lateral")                    # from level l's own
        self.receive(messages, V, "top_down")                   # from level l+1's neighbourhood
        return messages

    def receive(self, messages: torch.Tensor, V: torch.Tensor, role: str) -> torch.Tensor:
        """Add out_scale times the outputs of `role`'s networks to their target levels, in place."""
        r = self.role_routes[role]
        return messages.index_add_(1, self.route_target[r], V[:, r], alpha=self.cfg.out_scale)

    def networks(self, levels: torch.Tensor) -> torch.Tensor:
        """Every network's output V `(B, R, D, H, W)`, network r in route order, from the k x k
        torus neighbourhood of its source level: Q = tanh(A x + a), K = tanh(B Q + b) + Q,
        V = tanh(C K + c) + Q + K. While training, dropout on x, Q and K (a mask of its own for
        every network, column and value, as in the seed). All R at once: kernels.Networks."""
        p = self.cfg.dropout if self.training else 0.0
        return self.kernels(levels, self.A, self.a, self.B, self.b, self.C, self.c, p)

    def first_layer(self, levels: torch.Tensor) -> torch.Tensor:
        """Every network's first layer Q = tanh(A x + a) `(B, R, D, H, W)` (dropout on x while
        training): where its units sit tells whether they are alive."""
        p = self.cfg.dropout if self.training else 0.0
        return self.kernels.first_layer(levels, self.A, self.a, p)

    def neighbours(self, levels: torch.Tensor) -> list[torch.Tensor]:
        """The k*k torus neighbours of every column, each `(B, L, D, H, W)`, in row-major order
        of their offsets (dy, dx) = (-1, -1), (-1, 0), ..., (1, 1) for k = 3."""
        r = self.cfg.kernel // 2
        return [levels.roll((-dy, -dx), dims=(-2, -1))
                for dy in range(-r, r + 1) for dx in range(-r, r + 1)]

    def attention(self, levels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Consensus-attention weights over the k x k torus neighbourhood, and the neighbours.

        Weight of neighbour y for column x at level l: softmax over y of
        sum_{m >= l} lambda**(m-l) <e_{m,x}, e_{m,y}> / sqrt(D) (Kilcher's similarity: columns
        that agree at higher levels listen to each other more).
        Returns weights `(B, L, N, H, W)` (N = k*k, summing to 1 over N) and the N neighbours
        of `neighbours()`. (One rolled copy per offset: ~3x faster to train through on a CPU
        than unfolding the state into a `(B, L, D, N, H, W)` tensor and contracting it.)
        """
        neighbours = self.neighbours(levels)
        similarity = torch.stack([(levels * n).sum(2) for n in neighbours], 2)  # (B, L, N, H, W)
        scores = torch.einsum("bmnhw,ml->blnhw", similarity, self.level_mix)
        return (scores / math.sqrt(levels.shape[2])).softmax(dim=2), neighbours

    def consensus(self, levels: torch.Tensor) -> torch.Tensor:
        """The attention-weighted average of each level over its neighbourhood `(B, L, D, H, W)`."""
        weights, neighbours = self.attention(levels)
        return sum(weights[:, :, n, None] * v for n, v in enumerate(neighbours))

    # ---- the rollout ---------------------------------------------------------------------
    def initial_state(self, images: torch.Tensor) -> torch.Tensor:
        """Uniform noise in [0, init_noise) with the image copied into every channel of level 0."""
        B, _, H, W = images.shape
        cfg = self.cfg
        levels = torch.rand(B, cfg.levels, cfg.dim, H, W, device=images.device,
                            dtype=images.dtype) * cfg.init_noise
        levels[:, 0] = images.expand(B, cfg.dim, H, W)
        return levels

    def forward(self, images: torch.Tensor, steps: int | None = None,
                return_all: bool = False) -> torch.Tensor:
        """Roll the state grid out for `steps` (default cfg.steps) updates.

        images: `(B, 1, H, W)`, normalised. Returns the final levels `(B, L, D, H, W)`, or with
        return_all every state `(T+1, B, L, D, H, W)` (index 0 is the initial state).
        """
        self.check_images(images)
        T = self.cfg.steps if steps is None else steps
        if not (isinstance(T, int) and T >= 0):
            raise ValueError(f"steps must be a non-negative integer, got {T!r}")
        levels = self.initial_state(images)
        B = levels.shape[0]
        chunk = kernels.inference_chunk(levels, self.training)   # inference on a CPU: a few images
        if chunk >= B:
            return self.rollout(levels, T, return_all)
        parts = [self.rollout(levels[i:i + chunk], T, return_all) for i in range(0, B, chunk)]
        return torch.cat(parts, dim=1 if return_all else 0)

    def rollout(self, levels: torch.Tensor, T: int, return_all: bool = False) -> torch.Tensor:
        """T steps from the state `levels` `(B, L, D, H, W)` (see forward)."""
        cfg = self.cfg
        input_level = levels[:, :1]                                          # (B, 1, D, H, W)
        states = [levels] if return_all else []
        # accumulated intermediate states: residual shortcuts through the T steps, re-added and
        # re-saved every T//k steps (T//2=15, T//4=7, T//8=3 for T=30; at least every step)
        periods = [max(1, T // k) for k in cfg.accumulate]
        saved = [levels] * len(periods)
        for t in range(T):
            levels = self._step(levels)
            if self.training and cfg.noise:
                levels = levels + kernels.uniform_like(levels, cfg.noise)     # U[0, noise)
            for i, period in enumerate(periods):
                if t % period == 0:
                    levels = levels + cfg.accumulate_scale * saved[i]
                    saved[i] = levels
            if cfg.clamp_input:
                levels = torch.cat([input_level, levels[:, 1:]], 1)
            if return_all:
                states.append(levels)
        if saved:
            levels = levels + cfg.accumulate_scale * sum(saved)
            if cfg.clamp_input:
                levels = torch.cat([input_level, levels[:, 1:]], 1)
            if return_all:
                states[-1] = levels
        return torch.stack(states) if return_all else levels

    def compile_steps(self, **options) -> "Glom":
        """Run each step (`update`) through `torch.compile`: the same maths (tests compare the
        rollout and its gradients), fused into fewer kernels, which pays on a GPU
        (kernels.compile_step; docs/speed.md). Returns the model."""
        self._step = kernels.compile_step(self.update, self.A.device, **options)
        return self

    # ---- reading the top level -----------------------------------------------------------
    def column_scores(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Each column's class scores `(B, num_classes, H, W)`: the first num_classes channels
        of the top level of the final state."""
        return self(images, steps=steps)[:, -1, :self.cfg.num_classes]

    def votes(self, levels: torch.Tensor) -> torch.Tensor:
        """Each column's class `(..., H, W)` from levels `(..., L, D, H, W)`."""
        return column_votes(levels, self.cfg.num_classes)

    def majority(self, votes: torch.Tensor) -> torch.Tensor:
        """The image's label by majority vote: `(B, H, W)` -> `(B,)`."""
        return majority_vote(votes, self.cfg.num_classes)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Majority-vote labels `(B,)`."""
        return self.majority(self.column_scores(images, steps).argmax(1))

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse input the model cannot read, saying what was expected."""
        cfg = self.cfg
        want = f"(B, 1, {cfg.height}, {cfg.width})"
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor {want}, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape {want}, got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (cfg.height, cfg.width):
            raise ValueError(f"images must have shape {want} (the config's image size), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor (normalised pixels), "
                             f"got dtype {images.dtype}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")


def column_votes(levels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each column's class: argmax of the first num_classes channels of its top-level vector.
    `(..., L, D, H, W)` -> `(..., H, W)`."""
    return levels[..., -1, :num_classes, :, :].argmax(dim=-3)


def vote_counts(votes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Columns voting for each class. `(..., H, W)` -> `(..., num_classes)`."""
    return F.one_hot(votes.flatten(-2), num_classes).sum(-2)


def majority_vote(votes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The image's label: the most common column vote, ties to the lowest class (the seed's
    rule). `(..., H, W)` -> `(...,)`."""
    return vote_counts(votes, num_classes).argmax(-1)


def seed_linear_to_conv(weight: torch.Tensor, dim: int, kernel: int = 3) -> torch.Tensor:
    """Lay out a seed `Linear(k*k*D -> D)` weight as a conv weight `(D, D, k, k)`.

    The seed's input is the concatenation over shifts (dy, dx) in row-major order of
    `roll(state, (dy, dx))`, which reads the neighbour at offset (-dy, -dx); a convolution
    (cross-correlation) tap (i, j) reads offset (i - k//2, j - k//2). Hence the flip.
    """
    out = weight.shape[0]
    return weight.reshape(out, kernel, kernel, dim).permute(0, 3, 1, 2).flip(2, 3).contiguous()


def conv_to_seed_linear(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `seed_linear_to_conv`: `(D, D, k, k)` -> `(D, k*k*D)`."""
    out = weight.shape[0]
    return weight.flip(2, 3).permute(0, 2, 3, 1).reshape(out, -1).contiguous()


def _uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): nn.Linear's default initialisation."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)
