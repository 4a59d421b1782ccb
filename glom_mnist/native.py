"""The compiled first layer for CPU training with the seed's input dropout (`csrc/masked_taps.cpp`).

It does what `model._MaskedTaps` does, one (image, network) tile at a time in the core's cache,
drawing each tile's dropout from its own random stream instead of keeping the positions: a
training iteration of the seed configuration took about two thirds of the pure-torch path's time
on the 2-core CPU measured (README, "Speed and memory").

Built with torch's C++ extension loader the first time a CPU training step needs it (about 20 s;
cached under `~/.cache/torch_extensions`, or `$TORCH_EXTENSIONS_DIR`), which needs a C++ compiler
and `ninja` (`make setup` installs both). Where it cannot be built, or with `GLOM_NATIVE=0` in
the environment, the model uses the pure-torch path, which computes the same function (with other
random masks): tests/test_model.py checks both against the seed's formula.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).resolve().parent / "csrc" / "masked_taps.cpp"
_module: ModuleType | None = None
_failure: str | None = None


def enabled() -> bool:
    """False when `GLOM_NATIVE=0` (or "off", "false", "no") asks for the pure-torch path."""
    return os.environ.get("GLOM_NATIVE", "1").strip().lower() not in ("0", "off", "false", "no")


def masked_taps() -> ModuleType | None:
    """The compiled module (built on the first call), or None if disabled or it cannot be built
    (a warning says why, once)."""
    global _module, _failure
    if not enabled():
        return None
    if _module is None and _failure is None:
        try:
            load = _extension_loader()
            _module = load("glom_masked_taps", [str(SOURCE)],
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as error:  # no compiler, no ninja, no BLAS symbols: fall back
            _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}"
            warnings.warn(
                f"glom_mnist: the compiled first layer ({SOURCE.name}) could not be built "
                f"({_failure}); training on the CPU uses the pure-torch path, which is slower. "
                "It needs a C++ compiler and the ninja package (`make setup` installs both); "
                "set GLOM_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=2)
    return _module


def _extension_loader():
    """torch's C++ extension loader, with the pip-installed ninja (in the virtual environment's
    bin/, which need not be on PATH) found first, and without the warning it logs on import
    where there is no CUDA (irrelevant to a CPU extension)."""
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # a ninja on PATH will do
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        logger.setLevel(level)
    return load
