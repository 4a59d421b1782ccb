"""Checkpoints: one file with weights, config, metrics and provenance.

Written atomically (a temporary file in the same folder, then `os.replace`), read with
`torch.load(weights_only=True)`, so loading executes no code from the file. Training
checkpoints add the optimiser, RNG states and iteration under the key "training".
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import zipfile
import pickle
from pathlib import Path
from typing import Any

import torch

from .config import GlomConfig, PatchGlomConfig, config_from_dict
from .model import Glom
from .patch_glom import PatchGlom

FORMAT = "glom-mnist-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable glom-mnist checkpoint."""


def git_commit() -> str:
    """The repository's commit (with '+dirty' if there are uncommitted changes), or 'unknown'.

    A copy of the tree without `.git` (a rented GPU machine, say) can name its commit in the
    environment variable GLOM_GIT_COMMIT.
    """
    if os.environ.get("GLOM_GIT_COMMIT"):
        return os.environ["GLOM_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(**extra: Any) -> dict[str, Any]:
    """Where a checkpoint came from: package, git commit, torch, machine; plus `extra`."""
    from . import __version__

    return {"package_version": __version__, "git_commit": git_commit(),
            "torch_version": str(torch.__version__), "python": platform.python_version(),
            "machine": platform.machine(), **extra}


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: Glom, path: str | Path, *, metrics: dict[str, Any] | None = None,
                    provenance_info: dict[str, Any] | None = None,
                    training: dict[str, Any] | None = None) -> None:
    """Write `model` (weights + config) with its metrics and provenance to `path`, atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
           "state_dict": state, "metrics": metrics or {},
           "provenance": provenance_info if provenance_info is not None else provenance()}
    if training is not None:
        obj["training"] = training
    atomic_save(obj, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's dict, checked; a one-line CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
            AttributeError, ValueError, TypeError) as err:
        lines = [l.strip() for l in str(err).splitlines() if l.strip()] or [type(err).__name__]
        first = next((l for l in lines if "WeightsUnpickler error" in l), lines[0])
        raise CheckpointError(f"{path} is not a readable glom-mnist checkpoint "
                              f"(truncated, corrupt or not ours): {first[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a glom-mnist checkpoint (no '{FORMAT}' marker); "
                              "for the seed's best_models/ use `python -m glom_mnist import-seed`")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj.get('version')!r}; "
                              f"this code reads version {VERSION}")
    return obj


def build_model(cfg: GlomConfig | PatchGlomConfig) -> Glom | PatchGlom:
    """A fresh model of the family `cfg` belongs to."""
    return PatchGlom(cfg) if isinstance(cfg, PatchGlomConfig) else Glom(cfg)


def model_from_checkpoint(obj: dict[str, Any], path: str | Path = "checkpoint") -> Glom | PatchGlom:
    """Rebuild the model of a checkpoint dict (config, then weights)."""
    try:
        cfg = config_from_dict(obj["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} has an unknown or invalid config: {err}") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(obj["state_dict"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit its config: {first[:200]}") from None
    return model


def load_checkpoint(path: str | Path, device: str | torch.device | None = None, *,
                    height: int | None = None, width: int | None = None) -> Glom:
    """The Glom model saved at `path`, in eval mode, on `device` (default: CUDA if available).

    `height`, `width`: run it on images of that size instead of the size it was trained on
    (the weights do not depend on it: a canvas of several digits, say). The checkpoint's metrics
    and provenance are on `model.checkpoint_info`.
    """
    obj = read_checkpoint(path)
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if size and isinstance(obj.get("config"), dict):
        obj["config"] = {**obj["config"], **size}
    model = model_from_checkpoint(obj, path)
    model.checkpoint_info = {k: obj.get(k, {}) for k in ("metrics", "provenance")}
    return model.to(device or default_device()).eval()


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU; chosen once by the caller and passed around."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
