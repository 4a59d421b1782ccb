"""The networks compiled for a CPU (`csrc/networks.cpp`): their first layer with the seed's own
input dropout (`kernels._NativeMaskedTaps`) and their 10x10 layers (`kernels._NativeNetworkTail`).

Each does what its pure-torch counterpart (`_MaskedTaps`, `_NetworkTail`) does, one (image,
network) tile at a time in the core's cache, drawing each tile's dropout from its own random
streams and drawing it again in the backward pass instead of keeping it (the 10x10 layers
compute their activations again too). A training iteration of the seed configuration took 0.55x
of the pure-torch path's time on the 2-core CPU measured (docs/speed.md).

Built with torch's C++ extension loader the first time the model runs on a CPU (about 20 s;
cached under `~/.cache/torch_extensions`, or `$TORCH_EXTENSIONS_DIR`), for the vector
instructions torch uses on this CPU (`-ffast-math`, for the vectorised `exp` of the sigmoids),
which needs a C++ compiler and `ninja` (`make setup` installs both). Where it cannot be built,
with `GLOM_NATIVE=0` in the environment, on a GPU, or inside `torch.compile`, the model runs the
pure-torch functions, which compute the same (with other random masks): tests/test_model.py
checks both against the seed's formula and each other.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "networks.cpp"
# compiler flags for torch.backends.cpu.get_cpu_capability()'s answer (x86); none elsewhere
VECTOR_FLAGS = {"AVX2": ["-mavx2", "-mfma"],
                "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw",
                           "-mavx512vl"]}
_module: ModuleType | None = None
_failure: str | None = None


def enabled() -> bool:
    """False when `GLOM_NATIVE=0` (or "off", "false", "no") asks for the pure-torch path."""
    return os.environ.get("GLOM_NATIVE", "1").strip().lower() not in ("0", "off", "false", "no")


def module() -> ModuleType | None:
    """The compiled module (built on the first call), or None if disabled or it cannot be built
    (a warning says why, once)."""
    global _module, _failure
    if not enabled():
        return None
    if _module is None and _failure is None:
        try:
            load = _extension_loader()
            # built for the vector instructions torch itself uses here, and named after them,
            # so that a build cache shared by different machines never runs one on the other;
            # -ffast-math only when compiling (linked with it, the library would set
            # flush-to-zero for the whole process when loaded)
            capability = torch.backends.cpu.get_cpu_capability()
            _module = load(f"glom_networks_{capability.lower()}", [str(SOURCE)],
                           extra_cflags=["-O3", "-fopenmp", "-ffast-math",
                                         *VECTOR_FLAGS.get(capability, [])],
                           extra_ldflags=["-fopenmp"])
        except Exception as error:  # no compiler, no ninja, no BLAS symbols: fall back
            _failure = f"{type(error).__name__}: {_reason(str(error))}"
            warnings.warn(
                f"glom_mnist: the compiled networks ({SOURCE.name}) could not be built "
                f"({_failure}); the model uses its pure-torch path on the CPU, which is slower. "
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


def _reason(message: str) -> str:
    """The telling line of a build failure: the compiler's first error (a build log's last line
    is ninja's "build stopped"), else the message's last line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines
              if "error" in line.lower() and not line.startswith("Error building extension")]
    return (errors or lines or ["(no message)"])[0 if errors else -1]
