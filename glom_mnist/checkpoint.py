"""Checkpoints: one file with weights, config, metrics and provenance.

Written atomically (a temporary file in the same folder, then `os.replace`). Read only if the
file is a zip archive (the format `torch.save` writes), and then with
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain values and refuses any
other global, so loading executes no code from the file. Every tensor must be finite, and the
config valid, both on writing and on reading. Training checkpoints add the optimiser, RNG
states and iteration under the key "training".
"""
from __future__ import annotations

import os
import pickle
import platform
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import GlomConfig, PatchGlomConfig, config_from_dict
from .files import atomic_write
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
    atomic_write(path, lambda f: torch.save(obj, f))


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(model: Glom, path: str | Path, *, metrics: dict[str, Any] | None = None,
                    provenance_info: dict[str, Any] | None = None,
                    training: dict[str, Any] | None = None) -> None:
    """Write `model` (weights + config) with its metrics and provenance to `path`, atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if bad := non_finite(state):
        raise ValueError(f"refusing to write {path}: the weights {', '.join(bad)} are not "
                         "finite (NaN or inf)")
    obj = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
           "state_dict": state, "metrics": metrics or {},
           "provenance": provenance_info if provenance_info is not None else provenance()}
    if training is not None:
        obj["training"] = training
    atomic_save(obj, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's dict, checked; a one-line CheckpointError for anything else."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a checkpoint file (.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):               # never handed to an unpickler
        raise CheckpointError(f"{path} is not a glom-mnist checkpoint: not a complete zip "
                              "archive (a truncated or partly copied file, or another format); "
                              "use a whole .pt file written by this package")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((l.strip() for l in str(err).splitlines() if "GLOBAL" in l
                       or "Unsupported" in l), str(err).strip().splitlines()[0])
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, so "
                              f"it was not loaded (loading runs no code from a file): "
                              f"{detail[:200]}") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, AttributeError, ValueError,
            TypeError, KeyError, IndexError) as err:
        lines = [l.strip() for l in str(err).splitlines() if l.strip()] or [type(err).__name__]
        raise CheckpointError(f"{path} is a damaged checkpoint (a zip archive torch cannot "
                              f"read: {lines[0][:200]}); use another copy") from None
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
    """Rebuild the model of a checkpoint dict (config, then weights), refusing weights that do
    not fit the config or are not finite."""
    try:
        cfg = config_from_dict(obj["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} has an unknown or invalid config: {err}") from None
    model = build_model(cfg)
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} has no weights (no 'state_dict' of tensors)")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        differ = [k for k in sorted(want.keys() | have.keys()) if want.get(k) != have.get(k)]
        first = differ[0]
        raise CheckpointError(f"{path}: the weights do not fit its config (levels "
                              f"{cfg.levels}, dim {cfg.dim}, kernel {cfg.kernel}): {first} is "
                              f"{have.get(first, 'missing')} where the config needs "
                              f"{want.get(first, 'none')}"
                              + (f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""))
    if bad := non_finite(state):
        raise CheckpointError(f"{path}: the weights {', '.join(bad)} are not finite (NaN or "
                              "inf); the run diverged before this was written: use an earlier "
                              "checkpoint")
    model.load_state_dict(state)
    return model


def existing_checkpoint(path: str | Path) -> Path:
    """`path` as a Path if it is a file; else the commands' one-line refusal, said before any
    data is prepared or loaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one (`python -m glom_mnist "
                                "train`, or `make train`) or use a file from best_models/")
    return path


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
