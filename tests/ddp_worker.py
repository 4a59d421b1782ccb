"""What each process runs when tests/test_distributed.py starts this script under torchrun.

    ddp_worker.py resume OUT         a run with noise and dropout, straight and interrupted then
                                     resumed; rank 0 prints what the test compares, as JSON
    ddp_worker.py fail-rank-1 ARGS   `python -m glom_mnist ARGS`, but rank 1 raises at its third
                                     iteration
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from glom_mnist import cli
from glom_mnist.distributed import DistributedTrainer, processes
from glom_mnist.train import TrainConfig


def synthetic(n: int = 32):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) + labels[:, None, None, None] * 0.2
    return images, labels, images[:8], labels[:8]


def resume(out: Path) -> None:
    """Train 6 iterations straight, and 3 then 3 more resumed; the seed preset's noise and
    dropout stay on. Rank 0 prints whether the two end equal, and whether the processes' global
    generators differed at every iteration (each draws its own noise and dropout)."""
    def cfg(name: str, iterations: int) -> TrainConfig:
        return TrainConfig(model_overrides={"height": 8, "width": 8, "steps": 3},
                           iterations=iterations, batch_size=4, eval_every=3, eval_images=8,
                           checkpoint_every=2, out_dir=str(out / name), device="cpu")

    states: dict[str, list[str]] = {}

    class Recording(DistributedTrainer):
        def batch_loss(self, network, idx):
            state = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
            states.setdefault(self.cfg.out_dir, []).append(state)
            return super().batch_loss(network, idx)

    with processes(cfg("a", 6), timeout_minutes=2) as rank:
        straight = Recording(cfg("a", 6), *synthetic())
        straight.fit(progress=False)
        Recording(cfg("b", 3), *synthetic()).fit(progress=False)
        torch.manual_seed(1234)                                   # disturb the global RNG
        resumed = Recording(cfg("b", 6), *synthetic(), resume=out / "b" / "last.pt")
        resumed.fit(progress=False)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, states[str(out / "a")])
        if rank == 0:
            a, b = straight.model.state_dict(), resumed.model.state_dict()
            print(json.dumps({
                "weights_equal": all(torch.equal(a[k], b[k]) for k in a),
                "losses": [[r["loss"] for r in t.log] for t in (straight, resumed)],
                "generators_differ": all(len(set(s)) == len(s) for s in zip(*every)),
            }))


def fail_rank_1(argv: list[str]) -> int:
    if os.environ["RANK"] == "1":
        real_step = DistributedTrainer.step

        def failing_step(self):
            if self.iteration == 2:
                raise RuntimeError("planted failure on rank 1")
            return real_step(self)

        DistributedTrainer.step = failing_step
    return cli.main(argv)


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    if scenario == "resume":
        resume(Path(rest[0]))
    else:
        sys.exit(fail_rank_1(rest))
