"""Side-by-side measurements behind the fast model's training step on a CPU (README, "Speed and
memory"): the pieces issue 3's work replaced, each against its replacement, in one process.

- masks: a dropout keep-mask (0s and 1s, float32) for a `(60, 8, 10, 784)` tensor, p = 0.1:
  `torch.rand(...) >= p` converted to float, `bernoulli_`, and the model's `_keep_mask` (16-bit
  random fields, `torch.ge(..., out=)`). Median of 20 calls each, alternating.
- tail: one seed-configuration training iteration (batch 60, 30 steps, dropout 0.1, Adam) with
  the networks' 10x10 layers as (a) grouped 1x1 convolutions with autograd (the code before
  commit 0504531, its masks and folded dropout scale aside), (b) batched matmuls with autograd,
  (c) `_NetworkTail`, the model's. Alternating, median of `--rounds` iterations each after 3
  warm-up iterations.

    python benchmarks/step_variants.py [--rounds 5] [--json benchmarks/results/step_variants.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import glom_mnist.model as gm  # noqa: E402
from glom_mnist import Glom, GlomConfig  # noqa: E402
from results_io import write_json  # noqa: E402  (benchmarks/, the script's own folder)


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def masks(rounds: int) -> dict:
    x = torch.empty(60, 8, 10, 784)
    variants = {
        "rand_ge_float": lambda: (torch.rand_like(x) >= 0.1).to(x.dtype),
        "bernoulli": lambda: torch.empty_like(x).bernoulli_(0.9),
        "fields_ge_out": lambda: gm._keep_mask(x, 0.1),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            fn()
            times[name].append(timed(fn, 20))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}  # ms per mask


def tail_conv1x1(self: Glom, levels: torch.Tensor) -> torch.Tensor:
    B, L, D, H, W = levels.shape
    R = len(self.routes)
    p, train, scale = self.cfg.dropout, self.training, self.dropout_scale()
    Q = self.first_layer(levels).view(B, R * D, H, W)
    K = gm._tanh(F.conv2d(gm._dropout(Q, p, train), (self.B * scale).reshape(R * D, D, 1, 1),
                          self.b.reshape(-1), groups=R)) + Q
    V = gm._tanh(F.conv2d(gm._dropout(K, p, train), (self.C * scale).reshape(R * D, D, 1, 1),
                          self.c.reshape(-1), groups=R)) + Q + K
    return levels.new_zeros(B, L, D, H, W).index_add_(1, self.route_target, V.view(B, R, D, H, W),
                                                      alpha=self.cfg.out_scale)


def tail_matmul_autograd(self: Glom, levels: torch.Tensor) -> torch.Tensor:
    B, L, D, H, W = levels.shape
    R = len(self.routes)
    p, train, scale = self.cfg.dropout, self.training, self.dropout_scale()
    Q = self.first_layer(levels).view(B, R, D, H * W)
    K = gm._tanh(torch.matmul(self.B * scale, gm._dropout(Q, p, train)).add_(self.b[..., None])) + Q
    V = gm._tanh(torch.matmul(self.C * scale, gm._dropout(K, p, train)).add_(self.c[..., None])) + Q + K
    return levels.new_zeros(B, L, D, H, W).index_add_(1, self.route_target, V.view(B, R, D, H, W),
                                                      alpha=self.cfg.out_scale)


def tail(rounds: int) -> dict:
    torch.manual_seed(0)
    # the variants share the convolution first layer: the input dropout it has ("shared")
    model = Glom(GlomConfig.preset("seed", input_dropout="shared")).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    images, labels = torch.randn(60, 1, 28, 28), torch.randint(0, 10, (60,))

    def iteration():
        optimizer.zero_grad()
        top = model(images)[:, -1]
        target = F.one_hot(labels, 10).float()[:, :, None, None].expand_as(top)
        F.mse_loss(top, target).backward()
        optimizer.step()

    variants = {"conv1x1_autograd": tail_conv1x1, "matmul_autograd": tail_matmul_autograd,
                "network_tail": Glom.network_messages}
    own = Glom.network_messages
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for _ in range(3):
            iteration()
        for _ in range(rounds):
            for name, fn in variants.items():
                Glom.network_messages = fn
                iteration()                                  # one untimed: a switch re-allocates
                times[name].append(timed(iteration, 1))
    finally:
        Glom.network_messages = own
    return {k: statistics.median(v) for k, v in times.items()}  # s per iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"command": " ".join(sys.argv), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "rounds": args.rounds}
    out["mask_ms"] = masks(args.rounds)
    print("keep-mask for (60, 8, 10, 784), ms:", {k: round(v, 2) for k, v in out["mask_ms"].items()})
    out["train_iteration_s"] = tail(args.rounds)
    print("training iteration, s:", {k: round(v, 3) for k, v in out["train_iteration_s"].items()})
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
