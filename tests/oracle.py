"""A deliberately naive GLOM state grid: the seed's formulation, written plainly.

State `(B, H, W, L, D)`; the 3x3 torus neighbourhood is 9 rolled copies concatenated along the
last axis; one `Linear(90 -> 10)` network per role and level, called level by level. This is
the reference the fast `glom_mnist.Glom` is proven equal to, and the baseline of
`benchmarks/bench_model.py`. It follows docs/seed-experiment.md and nothing else.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

SHIFTS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]


class SeedNet(nn.Module):
    """Q = tanh(A x + a), K = tanh(B Q + b) + Q, V = tanh(C K + c) + Q + K; output 0.01 V."""

    def __init__(self, dim: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.Q1 = nn.Linear(9 * dim, dim)
        self.K1 = nn.Linear(dim, dim)
        self.V1 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Q = torch.tanh(self.Q1(self.drop(x)))
        K = torch.tanh(self.K1(self.drop(Q))) + Q
        V = torch.tanh(self.V1(self.drop(K))) + Q + K
        return 0.01 * V


class OracleGlom(nn.Module):
    """The seed's networks and rollout, with the seed's loops over levels."""

    def __init__(self, levels: int = 4, dim: int = 10, steps: int = 30, dropout: float = 0.1,
                 noise: float = 1e-4) -> None:
        super().__init__()
        self.levels, self.dim, self.steps, self.noise = levels, dim, steps, noise
        self.bottom_up = nn.ModuleList(SeedNet(dim, dropout) for _ in range(levels - 1))
        self.lateral = nn.ModuleList(SeedNet(dim, dropout) for _ in range(levels - 1))
        self.top_down = nn.ModuleList(SeedNet(dim, dropout) for _ in range(levels - 2))

    def delta(self, state: torch.Tensor) -> torch.Tensor:
        B, H, W, L, D = state.shape
        rolled = [torch.roll(state, shifts=s, dims=(1, 2)) for s in SHIFTS]
        neighbourhood = torch.cat(rolled, dim=4)                     # (B, H, W, L, 9*D)
        delta = [torch.zeros(B * H * W, D) for _ in range(L)]
        for i in range(L):
            x = neighbourhood[:, :, :, i, :].reshape(-1, 9 * D)
            if i < L - 1:
                delta[i + 1] = delta[i + 1] + self.bottom_up[i](x)   # level i -> i+1
            if i > 0:
                delta[i] = delta[i] + self.lateral[i - 1](x)         # level i -> i
            if i >= 2:
                delta[i - 1] = delta[i - 1] + self.top_down[i - 2](x)  # level i -> i-1
        return torch.stack(delta, dim=1).reshape(B, H, W, L, D)

    def forward(self, images: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        """images `(B, 1, H, W)` -> final state `(B, H, W, L, D)`; `init` overrides the noise."""
        B, _, H, W = images.shape
        state = torch.rand(B, H, W, self.levels, self.dim) * 0.1 if init is None else init.clone()
        state[:, :, :, 0, :] = images[:, 0, :, :, None].expand(B, H, W, self.dim)
        S = self.steps
        s1, s2, s3 = state.clone(), state.clone(), state.clone()
        for step in range(S):
            state = state + self.delta(state)
            if self.training and self.noise:
                state = state + self.noise * torch.rand_like(state)
            if step % max(1, S // 2) == 0:
                state = state + 0.1 * s1
                s1 = state.clone()
            if step % max(1, S // 4) == 0:
                state = state + 0.1 * s2
                s2 = state.clone()
            if step % max(1, S // 8) == 0:
                state = state + 0.1 * s3
                s3 = state.clone()
        return state + 0.1 * (s1 + s2 + s3)


def seed_networks(oracle: OracleGlom) -> dict[str, dict[str, torch.Tensor]]:
    """The oracle's weights keyed like the seed's published files (`bottom_up_model0`, ...)."""
    out = {}
    for prefix, nets in (("bottom_up_model", oracle.bottom_up), ("layer_att_model", oracle.lateral),
                         ("top_down_model", oracle.top_down)):
        for i, net in enumerate(nets):
            out[f"{prefix}{i}"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return out


def oracle_loss(oracle: OracleGlom, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE between the top level and the one-hot label at every column."""
    top = oracle(images)[..., -1, :]                                  # (B, H, W, D)
    target = F.one_hot(labels, oracle.dim).float()[:, None, None, :].expand_as(top)
    return F.mse_loss(top, target)
