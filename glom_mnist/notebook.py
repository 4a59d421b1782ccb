"""The setup that notebooks/02_evaluate and 03_islands share: where the repository is, whether
to run in smoke mode (`GLOM_SMOKE=1`: tiny data, for CI), and the model they study."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import default_device, load_checkpoint
from .config import GlomConfig
from .model import Glom
from .patch_glom import PatchGlom

BEST = Path("best_models") / "glom_seed_hard.pt"


class Setup(NamedTuple):
    smoke: bool               # GLOM_SMOKE=1: a quick run on tiny data
    root: Path                # the repository
    data: Path                # root / "data"
    model: Glom | PatchGlom   # in eval mode, of either family
    name: str                 # the checkpoint's stem, or "untrained"


def repository_root(cwd: Path | None = None) -> Path:
    """The repository, whether Jupyter started in it or in notebooks/."""
    cwd = Path.cwd() if cwd is None else cwd
    return cwd.parent if cwd.name == "notebooks" else cwd


def setup() -> Setup:
    """Load `GLOM_CHECKPOINT` (default: the best shipped model) and say what was loaded.

    In smoke mode a missing checkpoint gives an untrained seed-preset model with 4 steps, so that
    CI runs the notebook's code on a fresh clone; its numbers mean nothing, and it says so.
    """
    smoke = os.environ.get("GLOM_SMOKE") == "1"
    root = repository_root()
    checkpoint = Path(os.environ.get("GLOM_CHECKPOINT", root / BEST))
    print(f"smoke mode: {smoke}")
    if checkpoint.is_file():
        model = load_checkpoint(checkpoint)
        name = checkpoint.stem
        print(f"loaded {checkpoint.name} ({model.cfg.steps} steps) on "
              f"{next(model.parameters()).device}")
        print("its recorded metrics:", {k: v for k, v in model.checkpoint_info["metrics"].items()
                                        if isinstance(v, (int, float))})
    elif smoke:
        torch.manual_seed(0)
        model = Glom(GlomConfig.preset("seed", steps=4)).to(default_device()).eval()
        name = "untrained"
        print(f"SMOKE MODE: no checkpoint {checkpoint.name}, so this runs an UNTRAINED "
              "seed-preset model with 4 steps; its numbers mean nothing")
    else:
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: train one (`make train`) or set "
                                "GLOM_CHECKPOINT to a checkpoint file")
    return Setup(smoke, root, root / "data", model, name)
