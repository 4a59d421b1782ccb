"""The same training on several processes: torchrun, DistributedDataParallel, a DistributedSampler.

`torchrun --nproc_per_node=N -m glom_mnist train ...` starts N processes (on several machines
with torchrun's --nnodes, --node_rank and --master_addr, or a rendezvous); `train.run` finds
torchrun's environment and trains a `DistributedTrainer` in each (docs/distributed.md):

- `--batch-size` is the global batch. Iteration t trains on the images a single process would
  (`batch_indices`: the same seeded permutation per epoch), which a DistributedSampler deals out,
  batch_size / N to each process. DistributedDataParallel averages the processes' gradients, so
  an iteration is the single-process iteration on the whole batch: the same --lr, schedule and
  iterations are the same recipe.
  With --scenes every process draws the iteration's batch of scenes (seeded by the seed and the
  iteration) and trains on every N-th of them, from position rank on.
- The weights start identical (the same seed, then rank 0's broadcast). The noise and dropout
  that the model draws from torch's global generator differ between processes: each seeds it at
  every iteration from (seed, rank, iteration), so a resumed run draws what an uninterrupted
  one would, with nothing to save per process.
- Rank 0 alone evaluates, logs and writes the checkpoints (the unwrapped model's: a single
  process reads and resumes them). Every process stops after the same iteration.
- NCCL when the processes train on GPUs (one each, cuda:LOCAL_RANK), gloo on the CPU. A process
  that fails exits and torchrun stops the others; a process left waiting for the others in an
  exchange gives up after --dist-timeout minutes.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .checkpoint import default_device
from .train import EPOCH_SEED, TrainConfig, Trainer, TrainingDiverged


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same environment) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def processes(cfg: TrainConfig, timeout_minutes: float) -> Iterator[int | None]:
    """Under torchrun: join the process group (NCCL on GPUs, gloo on the CPU), yield this
    process's rank, and leave the group when done. Otherwise yield None: a single process."""
    if not timeout_minutes > 0:
        raise ValueError(f"--dist-timeout must be > 0 minutes, got {timeout_minutes}")
    if not launched():
        yield None
        return
    device = torch.device(cfg.device) if cfg.device else default_device()
    if device.type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if device.index is not None:
            raise ValueError(f"--device {cfg.device}: under torchrun each process trains on the "
                             "GPU of its LOCAL_RANK; pass --device cuda (or no --device)")
        if local_rank >= gpus:
            raise ValueError(f"process {local_rank} of this machine has no GPU of its own (it has "
                             f"{gpus}): start at most {gpus} processes per machine "
                             "(torchrun --nproc_per_node), or train on the CPU with --device cpu")
        torch.cuda.set_device(local_rank)     # the model goes to "cuda", the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    yield dist.get_rank()
    # reached when training ended normally; a process that fails leaves the group as it is and
    # exits at once, so that torchrun stops the others (tearing down a group whose peers are
    # gone can wait on them)
    dist.destroy_process_group()


@functools.lru_cache(maxsize=2)
def epoch_shard(n: int, epoch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Process `rank`'s share of epoch `epoch` of n training images: a DistributedSampler over
    batch_indices' permutation of that epoch, every world-th image from position rank on."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed * EPOCH_SEED, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def shard_indices(n: int, batch_size: int, iteration: int, seed: int, rank: int,
                  world: int) -> torch.Tensor:
    """Process `rank`'s batch_size / world images of `iteration`: together, the world processes'
    shards are the images `batch_indices(n, batch_size, iteration, seed)` (every world-th of them,
    from position rank on)."""
    per_epoch = max(1, n // batch_size)                  # as batch_indices
    epoch, i = divmod(iteration, per_epoch)
    b = batch_size // world
    return epoch_shard(n, epoch, seed, rank, world)[i * b:(i + 1) * b]


def step_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of the global generator for one process's iteration: a hash of all three, so
    every process draws its own noise and dropout masks, the same on every run."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{iteration}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1                       # below 2**63


class DistributedTrainer(Trainer):
    """A Trainer for one of torchrun's processes (inside `processes`): its share of every global
    batch through DistributedDataParallel; rank 0 alone evaluates, logs and writes."""

    def __init__(self, cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                 eval_images: torch.Tensor, eval_labels: torch.Tensor,
                 resume: str | Path | None = None,
                 on_eval: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} is the global batch, split evenly "
                             f"between the {self.world} processes: make it a multiple of "
                             f"{self.world}")
        super().__init__(cfg, images, labels, eval_images, eval_labels, resume=resume,
                         on_eval=on_eval if self.rank == 0 else None)
        # broadcasts rank 0's weights; every backward pass then averages the gradients
        self.network = DistributedDataParallel(
            self.model,
            device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,                   # the buffers are constant wiring
            # the seed family with attention alone runs no network
            find_unused_parameters=not getattr(self.model, "routes", True))

    def step(self) -> tuple[float, float]:
        """One iteration on this process's shard of the global batch; returns the whole batch's
        loss and majority-vote accuracy (means over the processes)."""
        cfg = self.cfg
        torch.manual_seed(step_seed(cfg.seed, self.rank, self.iteration))
        idx = (torch.arange(self.rank, cfg.batch_size, self.world) if cfg.scenes else
               shard_indices(len(self.images), cfg.batch_size, self.iteration, cfg.seed,
                             self.rank, self.world))
        loss, correct, weights = self.batch_loss(self.network, idx)
        if weights is not None:
            # the whole batch's weighted mean: this shard's weighted sum over all the weights,
            # times world, which DistributedDataParallel's mean over the processes divides out
            total = weights.sum()
            dist.all_reduce(total)
            loss = loss * (weights.sum() * self.world / total)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # exchanged before the update: a process interrupted while it waits here keeps its
        # model as it was at this iteration's start, which its checkpoint then says
        means = torch.stack([loss.detach(), correct.float().mean()]) / self.world
        dist.all_reduce(means)
        self.optimizer.step()
        batch_loss, accuracy = means.tolist()
        return batch_loss, accuracy

    def all_stop(self, stop: bool) -> bool:
        """Whether any process asks to stop: all of them stop after this iteration then."""
        flag = torch.tensor([float(stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def evaluate(self) -> dict[str, Any]:
        return super().evaluate() if self.rank == 0 else {}

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None,
             training: bool = True) -> None:
        if self.rank == 0:
            super().save(path, metrics=metrics, training=training)

    def write_log(self, out: Path) -> None:
        if self.rank == 0:
            super().write_log(out)

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Trainer.fit on every process (a progress bar on rank 0's terminal only); the summary
        adds how far apart the processes' weights ended (0: DistributedDataParallel kept them
        equal)."""
        try:
            summary = super().fit(progress=progress and self.rank == 0)
        except TrainingDiverged:
            raise
        except Exception:
            # another process failed (its collective errors here, and torchrun stops this one):
            # keep what was finished. The model is still as it was at the failed iteration's
            # start, and every iteration draws from (seed, rank, iteration): it resumes exactly
            out = Path(self.cfg.out_dir)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)   # torchrun's, while this is written
            self.save(out / "last.pt")
            self.write_log(out)
            raise
        return {**summary, "processes": self.world,
                "max_weight_difference_between_processes": self.replica_difference()}

    @torch.no_grad()
    def replica_difference(self) -> float:
        """The largest difference between any process's weights and rank 0's."""
        mine = torch.cat([p.flatten() for p in self.model.parameters()])
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        difference = (mine - reference).abs().max()
        dist.all_reduce(difference, op=dist.ReduceOp.MAX)
        return difference.item()
