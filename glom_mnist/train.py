"""Training: the seed's recipe by default, resumable exactly, logged for plotting.

Recipe (seed): MSE between the top level and the one-hot label at every column, noise injected
into the state during training, accumulated intermediate states (all in the model), Adam lr
0.01, batch 60, 6000 iterations. Every hyper-parameter is a field of `TrainConfig`, settable
from the command line and recorded in the checkpoint.

Resuming: a training checkpoint holds the model, the optimiser, the torch RNG state, the
iteration and the log; batch order is a function of (seed, epoch), so a resumed run draws the
same batches and the same random numbers as an uninterrupted one.

Under torchrun the same training runs on several processes (glom_mnist/distributed.py,
docs/distributed.md).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, build_model, default_device, git_commit,
                         model_from_checkpoint, non_finite, provenance, read_checkpoint,
                         save_checkpoint)
from .config import GlomConfig, PATCH_PRESETS, PRESETS, PatchGlomConfig, model_config
from .evaluate import evaluate_model
from .files import (atomic_write_text, check_new_file, check_writable_folder,
                    remove_stale_temporaries, run_folder_lock)
from .islands import digit_mask
from .model import Glom
from .patch_glom import PatchGlom
from .scenes import KINDS as SCENE_KINDS
from .scenes import Scenes, column_objects, column_targets, evaluate_scenes, scene_batch


LOSSES = ("mse", "cross_entropy")
OPTIMIZERS = ("adam", "adamw")
ALL_PRESETS = sorted([*PRESETS, *PATCH_PRESETS])
RUN_FILES = ("last.pt", "log.csv", "curve.json")   # what a run writes in its --out-dir


@dataclass
class TrainConfig:
    """Everything about a run that is not the model."""

    preset: str = "seed"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist"
    root: str = "data"
    iterations: int = 6000
    batch_size: int = 60
    lr: float = 0.01
    schedule: str = "constant"        # "constant" (seed) or "cosine" (decays to 0 at the end)
    loss: str = "mse"                 # "mse" (seed) or "cross_entropy" (columns' vectors as logits)
    seed: int = 0
    limit_train: int | None = None    # train on the first N images only (smoke runs)
    val: int = 0                      # hold out the last N training images (the validation
                                      # split: the curve, and every choice); 0: train on all,
                                      # and draw the curve on the test images (no choice)
    eval_every: int = 250             # iterations between evaluations on the held-out slice
    eval_images: int = 500            # the curve's held-out images: the first N of them
    checkpoint_every: int = 100       # iterations between resumable checkpoints ...
    checkpoint_minutes: float = 5.0   # ... or minutes, whichever comes first
    max_minutes: float | None = None  # stop (resumably) after this much wall time
    out_dir: str = "runs/seed"
    amp: bool = False                 # bfloat16 autocast on CUDA
    init: str | None = None           # start from this checkpoint's weights (fine-tuning):
                                      # this run's model config (which may switch on what owns
                                      # no weights), a fresh optimiser, iteration 0
    revive: bool = False              # with init: restart the first-layer units stuck at +-1
                                      # (see revive_saturated_units)
    hard_weight: float = 0.0          # an image the batch's rollout votes wrong counts
                                      # 1 + hard_weight times in the loss (0: the seed's plain mean)
    optimizer: str = "adam"           # "adam" (seed) or "adamw" (decoupled weight decay)
    weight_decay: float = 0.0
    warmup: int = 0                   # iterations of linear learning-rate warm-up
    shift: int = 0                    # augmentation: shift each image by up to this many pixels
    label_smoothing: float = 0.0      # patch presets' cross-entropy
    island_weight: float = 0.0        # patch presets: weight of the islands in the loss
                                      # (patch_glom.island_loss; 0: cross-entropy alone)
    island_apart_everywhere: bool = False  # the island loss also pushes apart the top levels of
                                      # columns in different objects that are not neighbours
    island_boundary: float = 0.0      # the island loss also counts the top level of neighbours
                                      # in different objects on its own, this many times
    island_hold: float = 0.0          # the island loss also pulls the top level of neighbours
                                      # in one object above ISLAND_HOLD, this many times
    island_parts: float = 0.0         # the island loss also pulls the lower levels of neighbours
                                      # on one object's ink above ISLAND_HOLD, this many times
    scenes: str | None = None         # train on fresh scenes of several digits of this kind
                                      # (scenes.KINDS: "pair", "random"), every column against
                                      # its object's class; None: single digits
    device: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_kind(f.name, getattr(self, f.name), str(f.type))
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("iterations", "batch_size", "eval_every", "eval_images", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.hard_weight >= 0:
            raise ValueError(f"hard_weight must be >= 0 (0 = every image counts once), "
                             f"got {self.hard_weight}")
        for name in ("checkpoint_minutes", "max_minutes"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.limit_train is not None and self.limit_train < 1:
            raise ValueError(f"limit_train must be >= 1 (or not given: all images), "
                             f"got {self.limit_train}")
        if self.revive and not self.init:
            raise ValueError("--revive restarts units of a trained model: give --init")
        if self.preset not in ALL_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {ALL_PRESETS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("val", "warmup", "shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.island_weight >= 0:
            raise ValueError(f"island_weight must be >= 0 (0: cross-entropy alone), "
                             f"got {self.island_weight}")
        if self.island_weight and self.preset not in PATCH_PRESETS:
            raise ValueError(f"--island-weight adds the islands to the patch presets' loss: use "
                             f"--preset {' or '.join(sorted(PATCH_PRESETS))}, not {self.preset}")
        for name in ("island_apart_everywhere", "island_boundary", "island_hold", "island_parts"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (0: no such term), got {value}")
            if value and not self.island_weight:
                raise ValueError(f"--{name.replace('_', '-')} is a term of the islands' loss: "
                                 "give --island-weight too")
        if self.scenes is not None:
            self._check_scenes()
        self.model_config()                                   # the model's settings, checked

    def _check_scenes(self) -> None:
        """What training on scenes needs, one line for each thing it cannot do."""
        if self.scenes not in SCENE_KINDS:
            raise ValueError(f"scenes must be one of {sorted(SCENE_KINDS)} (or not given: single "
                             f"digits), got {self.scenes!r}")
        if self.preset not in PATCH_PRESETS:
            raise ValueError(f"--scenes trains every column against its own object's class, "
                             f"which only the patch presets can: use --preset "
                             f"{' or '.join(sorted(PATCH_PRESETS))}, not {self.preset}")
        if self.shift:
            raise ValueError("--shift moves whole images and scenes place their digits "
                             "themselves: drop --shift with --scenes")
        if not self.val:
            raise ValueError("--scenes measures its curve on scenes of the validation digits: "
                             "give --val N (the last N training images, e.g. --val 5000)")
        canvas = dict(zip(("height", "width"), SCENE_KINDS[self.scenes]))
        if differ := {k: v for k, v in self.model_overrides.items() if canvas.get(k, v) != v}:
            raise ValueError(f"--scenes {self.scenes} builds the model for its "
                             f"{canvas['height']} x {canvas['width']} canvas: drop --set "
                             + ", ".join(f"{k}={v}" for k, v in differ.items()))

    def model_config(self) -> GlomConfig | PatchGlomConfig:
        """The model's config: the preset, the --set fields and, with scenes, their canvas."""
        canvas = {}
        if self.scenes is not None:
            canvas = dict(zip(("height", "width"), SCENE_KINDS[self.scenes]))
        return model_config(self.preset, **{**self.model_overrides, **canvas})


EPOCH_SEED = 100_003    # epoch e of seed s is the permutation seeded s * EPOCH_SEED + e
                        # and, with scenes, iteration t's scenes are drawn seeded s * EPOCH_SEED + t
VALIDATION_SCENES_SEED = 0   # the validation scenes: the same for every run of a --val split
EVAL_TAU = 0.9               # the islands' cosine threshold of the curve's island_ari
SCENE_KEYS = ["object_accuracy", "all_objects_right", "island_ari"]   # the curve's, on scenes


_KINDS: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str,
                                              "bool": bool, "dict[str, Any]": dict}


def _check_kind(name: str, value: Any, annotation: str) -> None:
    """ValueError unless `value` is of the kind its annotation names (floats finite)."""
    base = annotation.removesuffix(" | None")
    if (value is None and base != annotation) or base not in _KINDS:
        return
    ok = isinstance(value, _KINDS[base]) and (base == "bool" or not isinstance(value, bool))
    if ok and base == "float":
        ok = math.isfinite(value)
    if not ok:
        kind = "a finite number" if base == "float" else {"int": "an integer", "str": "a string",
                                                          "bool": "true or false"}.get(base, base)
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def batch_indices(n: int, batch_size: int, iteration: int, seed: int) -> torch.Tensor:
    """The training images of `iteration`: epochs are seeded permutations of the n images."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]


def top_level_loss(model: Glom, levels: torch.Tensor, labels: torch.Tensor,
                   kind: str = "mse", weights: torch.Tensor | None = None) -> torch.Tensor:
    """The label's loss at every column of the top level, averaged over columns and images
    (with `weights` `(B,)`: the images' weighted mean).

    "mse" (the seed's): squared error between the class channels and the one-hot label.
    "cross_entropy": the class channels are each column's logits. Same architecture and the same
    vote; only the training signal differs (MSE against a one-hot target sits at the
    constant-output solution for hundreds of iterations, see the README).
    """
    C = model.cfg.num_classes
    top = levels[:, -1, :C]                                              # (B, C, H, W)
    if kind == "cross_entropy":
        H, W = top.shape[-2:]
        per_image = F.cross_entropy(top, labels[:, None, None].expand(-1, H, W),
                                    reduction="none").mean((1, 2))
    else:
        target = F.one_hot(labels, C).to(top.dtype)[:, :, None, None].expand_as(top)
        per_image = F.mse_loss(top, target, reduction="none").mean((1, 2, 3))
    if weights is None:
        return per_image.mean()
    return (per_image * weights).sum() / weights.sum()


@torch.no_grad()
def settled_first_layer(model: Glom, images: torch.Tensor) -> torch.Tensor:
    """Every network's first-layer activations (tanh) in the settled state of `images`, the
    rollout's last step in eval mode: `(B, R, D, H, W)`. The model's mode is given back."""
    was_training = model.training
    model.eval()
    q = model.first_layer(model(images))
    model.train(was_training)
    return q


@torch.no_grad()
def revive_saturated_units(model: Glom, images: torch.Tensor,
                           threshold: float = 0.995) -> list[tuple[str, int, int, int]]:
    """Restart every first-layer unit whose tanh sits at +1, or at -1, in the settled state (the
    rollout's last step) of every one of these images, at every column: the mean of its tanh
    beyond +-threshold. (A unit that switches between +1 and -1, a sharp detector, is alive.)

    Such a unit passes no gradient, so it never recovers; and since each network's output adds
    its first layer's activations (V = tanh(.) + Q + K), a dead unit i pins output channel i of
    that network. One did so to class 5's channel of the top level in the seed-recipe run (see
    the README). Its weights and bias are set to zero: its tanh then starts at 0, where the slope
    is largest. (In that run the unit drifted from +0.5 to -1 over the 30 steps, as the level below
    grew.) Returns (role, source level, target level, unit) for each unit restarted.
    """
    mean_q = settled_first_layer(model, images).mean((0, 3, 4))          # (R, D)
    revived = []
    for r, (role, src, tgt) in enumerate(model.routes):
        for unit in (mean_q[r].abs() > threshold).nonzero().flatten().tolist():
            model.A[r, unit].zero_()
            model.a[r, unit].zero_()
            revived.append((role, src, tgt, unit))
    return revived


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """Linear warm-up over cfg.warmup iterations, then constant or a cosine down to 0."""
    if iteration < cfg.warmup:
        return cfg.lr * (iteration + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (iteration - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def random_shift(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """Each image moved by its own random offset of up to `pixels` in each direction, the
    uncovered border filled with the image's edge values (MNIST's background)."""
    B, _, H, W = images.shape
    padded = F.pad(images, (pixels,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, B)).tolist()
    return torch.stack([padded[i, :, y:y + H, x:x + W] for i, (y, x) in enumerate(zip(dy, dx))])


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class TrainingDiverged(ValueError):
    """A training iteration gave a non-finite loss or non-finite weights."""


class Trainer:
    """Holds a run's model, optimiser, data and log; `fit()` trains to cfg.iterations.

    The data are `load_training_data`'s: normalised images and their labels, to train on and
    held out; with cfg.scenes the raw digits `(M, 28, 28)` uint8 that scenes are composed of,
    the held-out ones making cfg.eval_images validation scenes."""

    def __init__(self, cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                 eval_images: torch.Tensor, eval_labels: torch.Tensor,
                 resume: str | Path | None = None,
                 on_eval: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device) if cfg.device else default_device()
        self.images, self.labels = images, labels
        self.eval_images, self.eval_labels = eval_images, eval_labels
        self.eval_scenes: Scenes | None = None
        if cfg.scenes:
            self.eval_scenes = scene_batch(
                eval_images, eval_labels, cfg.eval_images,
                torch.Generator().manual_seed(VALIDATION_SCENES_SEED), cfg.scenes,
                name=cfg.dataset)
        self.on_eval = on_eval
        self.iteration, self.wall = 0, 0.0
        self.commit = git_commit()    # the code this process runs, not the tree at save time
        self.log: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] | None = []   # the --init model's, set below
        if resume:
            self._resume(resume)
        else:
            # the history of the model this run starts from, kept in the run's checkpoint: that
            # file may be replaced later, and this run's history must not change with it
            self.history = parent_history(cfg.init) if cfg.init else []
            torch.manual_seed(cfg.seed)
            self.model = (self._initial_weights(cfg.init) if cfg.init
                          else build_model(cfg.model_config())).to(self.device)
            if cfg.revive:
                revived = revive_saturated_units(self.model, images[:cfg.batch_size].to(self.device))
                print(f"--revive: restarted {len(revived)} first-layer unit(s) stuck at +-1: "
                      + ", ".join(f"{n} {s}->{t} unit {u}" for n, s, t, u in revived), file=sys.stderr)
            self.optimizer = make_optimizer(cfg, self.model)

    def _initial_weights(self, path: str | Path) -> Glom | PatchGlom:
        """This run's model (--preset/--set) with the weights of checkpoint `path`.

        The two configs may differ in fields that own no weights (attention, clamp_input,
        dropout, steps, ...): fine-tuning the seed architecture with the consensus attention
        switched on is one such run. They may also differ in an ingredient this run switches off
        (e.g. `--set positional=false`): its weights are left out. A change that alters the
        weights' shapes, or adds weights the checkpoint lacks, is refused.
        """
        source = model_from_checkpoint(read_checkpoint(path), path)
        model = build_model(self.cfg.model_config())
        want, have = model.cfg.to_dict(), source.cfg.to_dict()
        differ = ", ".join(f"{k} (run {want[k]!r}, checkpoint {have[k]!r})"
                           for k in want if want[k] != have[k])
        theirs = {k: tuple(v.shape) for k, v in source.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if any(theirs.get(k) != shape for k, shape in ours.items()):
            raise ValueError(f"--init {path}: its weights do not fit this run's model, whose "
                             f"config differs in {differ}; pass the checkpoint's --preset and "
                             "--set values for those fields")
        dropped = sorted(set(theirs) - set(ours))
        if differ:
            print(f"--init {path}: weights used as they are; this run's config differs in "
                  f"{differ}" + (f", so these are left out: {', '.join(dropped)}"
                                 if dropped else ""), file=sys.stderr)
        model.load_state_dict({k: v for k, v in source.state_dict().items() if k in ours})
        return model

    def _resume(self, path: str | Path) -> None:
        obj = read_checkpoint(path)
        state = training_state_of(obj, path)
        saved_loss = state.get("train_config", {}).get("loss", "mse")
        if saved_loss != self.cfg.loss:
            raise ValueError(f"{path} was trained with --loss {saved_loss}; resume it with "
                             f"--loss {saved_loss} (this run asks for {self.cfg.loss})")
        saved_scenes = state.get("train_config", {}).get("scenes")
        if saved_scenes != self.cfg.scenes:
            def data(kind: str | None) -> str:
                return f"--scenes {kind}" if kind else "single digits"
            raise ValueError(f"{path} was trained on {data(saved_scenes)}; resume it on the "
                             f"same (this run asks for {data(self.cfg.scenes)})")
        self.model = model_from_checkpoint(obj, path).to(self.device)
        self.optimizer = make_optimizer(self.cfg, self.model)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: its optimiser or RNG state does not fit this model "
                                  f"({_first_line(err)}); not resumable") from None
        moments = {f"optimiser {k}": v for s in self.optimizer.state.values()
                   for k, v in s.items()}
        if bad := non_finite(moments):
            raise CheckpointError(f"{path}: its {', '.join(sorted(set(bad)))} state is not "
                                  "finite (NaN or inf); not resumable")
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        self.iteration, self.wall, self.log = state["iteration"], state["wall"], state["log"]
        self.history = state.get("history")       # None: a run saved before histories were kept

    def training_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                "iteration": self.iteration, "wall": self.wall, "log": self.log,
                "train_config": dataclasses.asdict(self.cfg),
                **({"history": self.history} if self.history is not None else {})}

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None,
             training: bool = True) -> None:
        save_checkpoint(self.model, path, metrics=metrics,
                        training=self.training_state() if training else None,
                        provenance_info=provenance(
                            git_commit=self.commit, iterations=self.iteration,
                            wall_seconds=round(self.wall, 1), device=str(self.device),
                            train_config=dataclasses.asdict(self.cfg)))

    def step(self) -> tuple[float, float]:
        """One training iteration; returns (loss, majority-vote accuracy on the batch)."""
        cfg = self.cfg
        idx = (torch.arange(cfg.batch_size) if cfg.scenes else
               batch_indices(len(self.images), cfg.batch_size, self.iteration, cfg.seed))
        loss, correct, _ = self.batch_loss(self.model, idx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item(), correct.float().mean().item()

    def training_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This iteration's images `(B, 1, H, W)` and targets: the training images `idx` and
        their labels `(B,)`; with scenes, the scenes at positions `idx` of the iteration's fresh
        batch of cfg.batch_size scenes and each column's class, its object's `(B, h, w)`. The
        scenes are drawn seeded by (seed, iteration), so a resumed run draws the same ones."""
        cfg = self.cfg
        if not cfg.scenes:
            return self.images[idx], self.labels[idx]
        generator = torch.Generator().manual_seed(cfg.seed * EPOCH_SEED + self.iteration)
        batch = scene_batch(self.images, self.labels, cfg.batch_size, generator, cfg.scenes,
                            name=cfg.dataset)[idx]
        return batch.images, column_targets(batch.labels, column_objects(batch.objects,
                                                                         self.model.patch))

    def batch_loss(self, network: torch.nn.Module,
                   idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The loss of the training batch `idx` (see training_batch) rolled out by `network` (the
        model, or its DistributedDataParallel wrapper), which of its images the rollout votes
        right `(B,)`, and their weights in the loss `(B,)` (None: all 1). Sets this iteration's
        learning rate."""
        cfg = self.cfg
        x, y = (t.to(self.device) for t in self.training_batch(idx))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.iteration)
        if cfg.shift:
            x = random_shift(x, cfg.shift)
        network.train()
        if isinstance(self.model, PatchGlom):     # its own loss, over the last steps' columns
            states = network(x, return_all=True)
            loss, correct = self.model.states_loss(
                states, y, cfg.label_smoothing, island_weight=cfg.island_weight,
                apart_everywhere=cfg.island_apart_everywhere, boundary=cfg.island_boundary,
                hold=cfg.island_hold, parts=cfg.island_parts,
                ink=digit_mask(x, patch=self.model.patch) if cfg.island_parts else None)
            return loss, correct, None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and self.device.type == "cuda"):
            levels = network(x)
        with torch.no_grad():
            correct = self.model.majority(self.model.votes(levels)) == y
        # hard examples: the images this very rollout gets wrong weigh 1 + hard_weight
        weights = 1.0 + cfg.hard_weight * (~correct).float() if cfg.hard_weight else None
        return top_level_loss(self.model, levels.float(), y, cfg.loss, weights), correct, weights

    def evaluate(self) -> dict[str, Any]:
        """The curve's metrics on the held-out images. On the validation scenes: each object's
        majority vote (`majority_vote_accuracy` = `object_accuracy`), each column's vote against
        its object's class (`per_column_accuracy`), the scenes with every object right, and the
        adjusted Rand index of the top-level islands (tau EVAL_TAU) and the objects."""
        if self.eval_scenes is None:
            metrics = evaluate_model(self.model, self.eval_images, self.eval_labels,
                                     batch_size=250, progress=False)
            return {k: metrics[k] for k in ("majority_vote_accuracy", "per_column_accuracy",
                                            "all_columns_agree")}
        metrics = evaluate_scenes(self.model, self.eval_scenes, tau=EVAL_TAU, batch_size=100)
        return {"majority_vote_accuracy": metrics["object_accuracy"],
                "per_column_accuracy": metrics["column_accuracy"],
                "object_accuracy": metrics["object_accuracy"],
                "all_objects_right": metrics["all_objects_right"],
                "island_ari": metrics["islands"][EVAL_TAU]["island_ari"]}

    def all_stop(self, stop: bool) -> bool:
        """Whether training stops after this iteration, `stop` saying whether this process asks
        to (SIGTERM, --max-minutes). Under torchrun: whether any process asks, so that they all
        stop after the same one (glom_mnist/distributed.py)."""
        return stop

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train until cfg.iterations (or max_minutes); checkpoint to out_dir/last.pt.

        SIGTERM, or a first Ctrl-C (SIGINT), ends the run once the current iteration is done,
        and saves it: model, optimiser, RNG state and iteration then agree, so a resume is
        exact. After a Ctrl-C, fit raises KeyboardInterrupt once that is saved. A second Ctrl-C
        stops at once, saving nothing (an iteration may be half done): last.pt keeps the last
        checkpoint written. So does a non-finite loss or weight, which raises TrainingDiverged.
        """
        cfg = self.cfg
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        last = out / "last.pt"
        session_start = time.monotonic()
        stop: dict[str, int | None] = {"signal": None}

        def on_signal(signum: int, frame: Any) -> None:
            if stop["signal"] is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt                          # a second Ctrl-C: at once
            if stop["signal"] is None:
                stop["signal"] = signum
                tqdm.write(f"{signal.Signals(signum).name}: stopping once iteration "
                           f"{self.iteration + 1} is done, to save it (Ctrl-C again: stop at "
                           "once, saving nothing)", file=sys.stderr)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not progress,
                   desc="train", dynamic_ncols=True)
        try:
            self._loop(cfg, out, last, stop, bar, session_start)
            self.save(last)
            self.write_log(out)
        finally:
            bar.close()
            # only now: a SIGTERM during that save (torchrun's, stopping the other processes
            # when one failed) must not kill it half-written
            for s, handler in previous.items():
                signal.signal(s, handler)
        if stop["signal"] == signal.SIGINT:
            print(f"saved iteration {self.iteration} to {last}; go on with --resume {last}",
                  file=sys.stderr)
            raise KeyboardInterrupt
        done = self.iteration >= cfg.iterations
        return {"iterations": self.iteration, "finished": done, "wall_seconds": self.wall,
                **{k: v for k, v in (self.log[-1] if self.log else {}).items()
                   if k not in ("iteration", "wall")}}

    def _loop(self, cfg: TrainConfig, out: Path, last: Path, stop: dict[str, int | None],
              bar: Any, session_start: float) -> None:
        """fit's iterations, until the last one, a stop asked for (a signal, --max-minutes: in
        every process under torchrun) or a non-finite loss or weight (TrainingDiverged)."""
        running_loss = running_acc = None
        last_save = time.monotonic()
        try:
            while self.iteration < cfg.iterations:
                t0 = time.perf_counter()
                loss, acc = self.step()
                if not math.isfinite(loss) or non_finite(dict(self.model.named_parameters())):
                    raise TrainingDiverged(self._diverged(loss, last))
                dt = time.perf_counter() - t0
                self.wall += dt
                self.iteration += 1
                running_loss = loss if running_loss is None else 0.95 * running_loss + 0.05 * loss
                running_acc = acc if running_acc is None else 0.95 * running_acc + 0.05 * acc
                bar.update(1)
                bar.set_postfix(loss=f"{running_loss:.4f}", acc=f"{running_acc:.3f}",
                                img_s=f"{cfg.batch_size / dt:.1f}")
                row: dict[str, Any] = {"iteration": self.iteration, "wall": round(self.wall, 2),
                                       "loss": loss, "train_accuracy": acc}
                if self.iteration % cfg.eval_every == 0 or self.iteration == cfg.iterations:
                    row.update(self.evaluate())
                    if self.on_eval:
                        self.on_eval(row)
                self.log.append(row)
                stopping = self.all_stop(stop["signal"] is not None or (
                    cfg.max_minutes is not None
                    and time.monotonic() - session_start > 60 * cfg.max_minutes))
                if (self.iteration % cfg.checkpoint_every == 0
                        or time.monotonic() - last_save > 60 * cfg.checkpoint_minutes):
                    self.save(last)
                    self.write_log(out)
                    last_save = time.monotonic()
                if stopping:
                    break
        except KeyboardInterrupt:
            kept = f"{last} keeps the last checkpoint written" if last.exists() else \
                "no checkpoint was written"
            tqdm.write(f"stopped at once, saving nothing: {kept}", file=sys.stderr)
            raise

    def _diverged(self, loss: float, last: Path) -> str:
        """The one line saying where the run diverged and what was kept."""
        try:
            kept = (f"{last} keeps iteration {read_checkpoint(last)['training']['iteration']}, "
                    "the last good checkpoint")
        except (OSError, ValueError, KeyError, TypeError):
            kept = "no checkpoint of this run was written"
        why = f"the loss is {loss}" if not math.isfinite(loss) else "the weights became non-finite"
        return (f"training diverged at iteration {self.iteration + 1} ({why}); nothing of that "
                f"iteration was saved and {kept}; train again with a smaller --lr")

    def write_log(self, out: Path) -> None:
        """The learning curve as CSV (every iteration) and JSON (the evaluated rows), atomically."""
        write_log_csv(self.log, out / "log.csv")
        evaluated = [r for r in self.log if "majority_vote_accuracy" in r]
        atomic_write_text(out / "curve.json",
                          json.dumps(evaluated, indent=1, allow_nan=False) + "\n")


def _first_line(err: BaseException) -> str:
    return next((l.strip() for l in str(err).splitlines() if l.strip()), type(err).__name__)[:200]


# what a training checkpoint's "training" entry holds, and of which kind
TRAINING_STATE = {"optimizer": dict, "rng_cpu": torch.Tensor, "iteration": int,
                  "wall": (int, float), "log": list}


def training_state_of(obj: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The "training" entry of checkpoint `obj`, checked; a one-line error if there is none or
    it lacks something `train` writes."""
    state = obj.get("training")
    if state is None:
        raise ValueError(f"{path} has no training state (a shipped model?): not a run's "
                         f"checkpoint (runs/NAME/last.pt is); to train on from its weights, "
                         f"start a new run with --init {path}")
    problem = None if isinstance(state, dict) else "is not a dict"
    for key, kind in TRAINING_STATE.items():
        if problem is None and key not in state:
            problem = f"has no '{key}'"
        elif problem is None and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            problem = f"has a {type(state[key]).__name__} for '{key}'"
    if problem is None and not isinstance(state.get("train_config", {}), dict):
        problem = "has a train_config that is not a dict"
    history = state.get("history", []) if problem is None else []
    if problem is None and not (state["iteration"] >= 0 and math.isfinite(state["wall"])
                                and isinstance(history, list)
                                and all(isinstance(r, dict) for r in state["log"] + history)):
        problem = "has a negative iteration, a non-finite wall time or log rows that are not dicts"
    if problem:
        raise CheckpointError(f"{path}: its training state {problem}; it was not written by "
                              "`train`, or is damaged: use another copy")
    return state


LOG_KEYS = ["iteration", "wall", "loss", "train_accuracy", "majority_vote_accuracy",
            "per_column_accuracy", "all_columns_agree"]


def write_log_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Log rows as CSV, atomically; `stage` and `loss_kind` columns when the rows have them,
    and the scenes' metrics (SCENE_KEYS) when any row has them."""
    keys = (LOG_KEYS + [k for k in SCENE_KEYS if any(k in row for row in rows)]
            + [k for k in ("stage", "loss_kind") if rows and k in rows[0]])
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def read_log_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a `write_log_csv` CSV, numbers as floats (text such as `loss_kind` as is), empty
    cells left out."""
    def value(text: str) -> Any:
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def lineage_log(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The whole training history of a training checkpoint (a run's last.pt): the log of the run
    it was initialised from (`--init`), then its own, with iterations and wall time continuing
    across runs. Each row gets `stage` (1 for the first run) and `loss_kind` (that run's loss).

    A run keeps the history of its `--init` model in its checkpoint (`parent_history`, read when
    it started). A run saved before that was kept has its parents followed back as far as their
    files exist, to the `.log.csv` beside a shipped model: if one of those files was replaced
    since, that history is the new file's."""
    chain, earlier = [training_state_of(read_checkpoint(checkpoint), checkpoint)], []
    while True:
        training = chain[-1]
        if training.get("history") is not None:              # kept when the run started
            earlier = training["history"]
            break
        parent = training.get("train_config", {}).get("init")
        if not (parent and Path(parent).is_file()):
            break
        obj = read_checkpoint(parent)                        # each checkpoint is read once
        if "training" not in obj:                            # a shipped model
            earlier = shipped_history(parent)
            break
        chain.append(training_state_of(obj, parent))
    rows = [{**row, "stage": int(row.get("stage", 1))} for row in earlier]
    iteration = max((r["iteration"] for r in rows), default=0.0)
    wall = max((r["wall"] for r in rows), default=0.0)
    first = int(max((r["stage"] for r in rows), default=0)) + 1
    for stage, training in enumerate(reversed(chain), start=first):
        kind = training.get("train_config", {}).get("loss", "mse")
        for row in training["log"]:
            rows.append({**row, "iteration": row["iteration"] + iteration,
                         "wall": row["wall"] + wall, "stage": stage, "loss_kind": kind})
        # the next run's clock starts where this one ended, and never before its last logged
        # row: rows keep 2 decimals of wall time, so a short run's last row can be rounded up
        # past its exact total
        iteration = iteration + training["iteration"]
        wall = max(wall + training["wall"], rows[-1]["wall"] if rows else 0.0)
    return rows


def load_training_data(cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, held-out images, held-out labels), normalised, from
    cfg.root. Held out: the first cfg.eval_images of the last cfg.val training images (the
    validation split, on which every choice is made), or with val=0 of the test images (a
    curve only). With cfg.scenes: the raw digits `(M, 28, 28)` uint8 that the scenes are
    composed of, all cfg.val validation digits held out (the curve's cfg.eval_images scenes
    are drawn from them)."""
    from .data import load_split, normalise, prepare

    prepare(cfg.dataset, cfg.root)
    images, labels = load_split(cfg.dataset, cfg.root, train=True)
    if cfg.val:
        if cfg.val >= len(images):
            raise ValueError(f"--val {cfg.val} leaves no training images (there are {len(images)})")
        held_images, held_labels = images[-cfg.val:], labels[-cfg.val:]
        images, labels = images[:-cfg.val], labels[:-cfg.val]
    else:
        held_images, held_labels = load_split(cfg.dataset, cfg.root, train=False)
    limits = [("--limit-train", cfg.limit_train, len(images))]
    if not cfg.scenes:                                 # scenes: as many as asked, from all
        limits.append(("--eval-images", cfg.eval_images, len(held_images)))
    for flag, asked, have in limits:
        if asked is not None and asked > have:
            print(f"{flag} {asked}: the split has {have} images; using all {have}", file=sys.stderr)
    if cfg.limit_train:
        images, labels = images[:cfg.limit_train], labels[:cfg.limit_train]
    if cfg.scenes:
        return images, labels, held_images, held_labels
    held_images, held_labels = held_images[:cfg.eval_images], held_labels[:cfg.eval_images]
    return (normalise(images, cfg.dataset), labels,
            normalise(held_images, cfg.dataset), held_labels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every option defaults to None ("not given"): a new run then takes TrainConfig's default, a
    # resumed one its own saved value (see config_from_args).
    defaults = TrainConfig()
    parser.add_argument("--preset", default=None, choices=ALL_PRESETS,
                        help=f"model preset (default {defaults.preset})")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a model config field, e.g. --set dropout=0 --set steps=20")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("preset", "model_overrides"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None)
        elif f.name in ("loss", "optimizer"):
            parser.add_argument(flag, choices=LOSSES if f.name == "loss" else OPTIMIZERS,
                                default=None, help=f"(default {default})")
        elif f.name == "scenes":
            parser.add_argument(flag, choices=sorted(SCENE_KINDS), default=None,
                                help="train a patch preset on fresh scenes of several digits "
                                     "of this kind, each column against its object's class "
                                     "(default: single digits; needs --val)")
        else:
            kind = {"iterations": int, "batch_size": int, "seed": int, "limit_train": int,
                    "eval_every": int, "eval_images": int, "checkpoint_every": int,
                    "val": int, "warmup": int, "shift": int, "lr": float,
                    "checkpoint_minutes": float, "max_minutes": float, "hard_weight": float,
                    "weight_decay": float, "label_smoothing": float,
                    "island_weight": float, "island_boundary": float,
                    "island_hold": float, "island_parts": float}.get(f.name, str)
            parser.add_argument(flag, type=kind, default=None, help=f"(default {default})")
    parser.add_argument("--resume", default=None,
                        help="a runs/*/last.pt to continue from, with that run's own settings "
                             "for every option not given here")
    parser.add_argument("--save", default=None,
                        help="when finished, also write the model (no training state) here")
    parser.add_argument("--dist-timeout", type=float, default=10.0, metavar="MINUTES",
                        help="under torchrun: how long a process waits for the others in one "
                             "exchange before it stops with an error (default 10; more than "
                             "rank 0's longest evaluation)")
    parser.add_argument("--force", action="store_true",
                        help="start over in an --out-dir that holds a run, replacing it, and "
                             "replace an existing --save file")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the options given on the command line; the others from the run
    being resumed (`--resume`: its recipe goes on unchanged) or else TrainConfig's defaults.
    A resumed run keeps its model: a --set that would change it is refused."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given: dict[str, Any] = {n: getattr(args, n) for n in fields - {"model_overrides"}
                             if getattr(args, n) is not None}
    saved: dict[str, Any] = {}
    if args.resume:
        obj = read_checkpoint(args.resume)
        state = training_state_of(obj, args.resume)
        saved = {k: v for k, v in state.get("train_config", {}).items() if k in fields}
        try:
            TrainConfig(**saved)
        except ValueError as err:
            raise CheckpointError(f"{args.resume}: its saved training settings are invalid "
                                  f"({err}); not resumable") from None
    if args.set:
        preset = given.get("preset", saved.get("preset", TrainConfig.preset))
        given["model_overrides"] = parse_overrides(args.set, preset)
        if args.resume:
            model = model_from_checkpoint(obj, args.resume).cfg.to_dict()
            differ = [f"{k}={v!r} (the run has {model[k]!r})"
                      for k, v in given["model_overrides"].items() if model[k] != v]
            if differ:
                raise ValueError(f"--set {', '.join(differ)}: a resumed run keeps its model; "
                                 f"drop --set, or start a new run from these weights with "
                                 f"--init {args.resume}")
            given["model_overrides"] = {**saved.get("model_overrides", {}),
                                        **given["model_overrides"]}
    return TrainConfig(**{**saved, **given})


def parse_overrides(pairs: list[str], preset: str = "seed") -> dict[str, Any]:
    """`['dropout=0', 'accumulate=2,4']` -> {'dropout': 0.0, 'accumulate': (2, 4)}, typed by
    the field's default in the preset's config."""
    defaults = model_config(preset).to_dict() if preset in ALL_PRESETS else GlomConfig().to_dict()
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in defaults:
            raise ValueError(f"--set wants FIELD=VALUE with FIELD one of {sorted(defaults)}, "
                             f"got {pair!r}")
        default = defaults[name]
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {name} wants true or false, got {text!r}")
            out[name] = text.lower() in ("true", "1")
            continue
        kind = ("integers separated by commas" if isinstance(default, tuple) else
                {int: "an integer", float: "a number"}.get(type(default), "a word"))
        try:
            out[name] = (tuple(int(v) for v in text.split(",") if v)
                         if isinstance(default, tuple) else type(default)(text))
        except ValueError:
            raise ValueError(f"--set {name} wants {kind} (default {default!r}), "
                             f"got {text!r}") from None
    return out


def _check_run_folder(out: Path, resume: str | None, force: bool) -> None:
    """Refuse to start a run in a folder that holds another, unless resuming that very run
    or --force."""
    last = out / "last.pt"
    if not any((out / name).exists() for name in RUN_FILES):
        return
    if resume and Path(resume).resolve() == last.resolve():
        return
    if force:
        print(f"--force: starting over in {out}; the run there is replaced as this one saves",
              file=sys.stderr)
        return
    try:
        state = read_checkpoint(last)["training"]
        where = f" (iteration {state['iteration']} of {state['train_config']['iterations']})"
    except (OSError, ValueError, KeyError, TypeError):
        where = ""
    raise ValueError(f"{out} holds a run{where}: continue it with --resume {last}, train into "
                     f"another --out-dir, or pass --force to start over and replace it")


def run(args: argparse.Namespace) -> int:
    from .distributed import DistributedTrainer, processes

    cfg = config_from_args(args)
    out, save = Path(cfg.out_dir), Path(args.save) if args.save else None
    with processes(cfg, args.dist_timeout) as rank:     # None: a single process, not torchrun's
        writer = not rank                              # rank 0 (or a single process) writes
        if writer:
            if save:
                check_new_file(save, force=args.force, flag="--save",
                               also=(save.with_suffix(".log.csv"),))
            check_writable_folder(out, "--out-dir")
        with run_folder_lock(out) if writer else contextlib.nullcontext():
            if writer:                                 # one training per folder
                _check_run_folder(out, args.resume, args.force)
                remove_stale_temporaries(out, RUN_FILES)
            data = load_training_data(cfg)
            trainer = (Trainer if rank is None else DistributedTrainer)(
                cfg, *data, resume=args.resume, on_eval=lambda row: tqdm.write(progress_line(row)))
            summary = trainer.fit()
    if not writer:
        return 0
    print(json.dumps(summary, indent=1, allow_nan=False))
    if summary["finished"] and save:
        history = export_run(out / "last.pt", save, metrics=summary)
        print(f"wrote {save} and its training history {history}")
    elif save:
        print(f"stopped before the last iteration: {save} not written (resume with "
              f"--resume {out / 'last.pt'}, or ship it as it is with "
              f"`python -m glom_mnist export`)")
    return 0


def progress_line(row: dict[str, Any]) -> str:
    """The line an evaluation during training prints."""
    if "object_accuracy" in row:
        return (f"iter {row['iteration']}: validation scenes object accuracy "
                f"{row['object_accuracy']:.4f}, all objects right {row['all_objects_right']:.4f}, "
                f"island ARI {row['island_ari']:.4f}, loss {row['loss']:.4f}")
    return (f"iter {row['iteration']}: held-out majority-vote accuracy "
            f"{row['majority_vote_accuracy']:.4f}, loss {row['loss']:.4f}")


def shipped_history(model: str | Path) -> list[dict[str, Any]]:
    """A shipped model's training history: the `.log.csv` written beside it (none: [])."""
    history = Path(model).with_suffix(".log.csv")
    return read_log_csv(history) if history.is_file() else []


def parent_history(init: str | Path) -> list[dict[str, Any]]:
    """The whole history of the model a run starts from: a run's checkpoint's `lineage_log`, or
    a shipped model's `.log.csv`."""
    obj = read_checkpoint(init)
    return lineage_log(init) if "training" in obj else shipped_history(init)


def export_run(checkpoint: str | Path, out: str | Path,
               metrics: dict[str, Any] | None = None) -> Path:
    """Ship a run's checkpoint as a model file: weights, config, metrics and provenance, without
    the optimiser and RNG state; and its whole history (`lineage_log`) as `<out>.log.csv`, which
    `figures` reads. Metrics default to how far the run got and its last held-out evaluation.
    Returns the history's path."""
    obj = read_checkpoint(checkpoint)
    state = training_state_of(obj, checkpoint)
    if metrics is None:
        scheduled = state.get("train_config", {}).get("iterations")
        evaluated = [r for r in state["log"] if "majority_vote_accuracy" in r]
        metrics = {"iterations": state["iteration"], "scheduled_iterations": scheduled,
                   "finished": scheduled is not None and state["iteration"] >= scheduled,
                   "wall_seconds": state["wall"],
                   **({f"held_out_{k}": evaluated[-1][k]
                       for k in LOG_KEYS[4:] + SCENE_KEYS + ["iteration"]
                       if k in evaluated[-1]} if evaluated else {})}
    save_checkpoint(model_from_checkpoint(obj, checkpoint), out, metrics=metrics,
                    provenance_info=obj.get("provenance"))
    history = Path(out).with_suffix(".log.csv")
    write_log_csv(lineage_log(checkpoint), history)
    return history
