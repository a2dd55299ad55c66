"""What every image loader shares: where the files are, the uint8 array cache, and the Dataset it builds."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemminer.datatypes import Dataset, TensorData, default_cache_dir
from gemminer.errors import GemminerError

CACHE_FORMAT = 1  # bump when the cached arrays change meaning, so old caches are not read


@dataclass
class Source:
    """How a loader is asked for its data."""

    name: str  # registry name, e.g. "cifar10"
    data_dir: Path | None  # --data-dir; None: <cache>/data
    download: bool = False
    path: str = ""  # the part after "name:" (imagefolder:PATH)
    num_samples: int = 5000  # MNIST-1D only

    @property
    def root(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_cache_dir() / "data"


def missing(source: Source, expected: str, downloadable: bool = True) -> GemminerError:
    """The one-line error for a data set that is not on disk."""
    hint = ("; put the official files there, or add --download to fetch them" if downloadable and not source.download
            else "; put the files there")
    return GemminerError(f"data set {source.name} not found: expected {expected}{hint}")


def first_existing(candidates: Iterable[Path], files: Iterable[str]) -> Path | None:
    """The first folder among `candidates` that holds every one of `files`."""
    files = list(files)
    for folder in candidates:
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def fingerprint(files: Iterable[Path]) -> str:
    """sha256 over the resolved path, size and mtime of each file: a changed, added or
    removed file gives a new key, so a stale cache is never read."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}".encode())
    for path in files:
        try:
            stat = os.stat(path)
        except OSError as err:
            raise GemminerError(f"cannot read {path}: {err.strerror}") from None
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def cached_arrays(name: str, files: list[Path], decode: Callable[[], dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
    """Decode once; later starts read ``<cache>/arrays/<name>-<fingerprint>.npz`` (no pickle).

    `decode` returns uint8 NCHW images and int64 labels under ARRAY_KEYS. The training
    images' per-channel mean and std are stored with them.
    """
    path = default_cache_dir() / "arrays" / f"{name}-{fingerprint(files)}.npz"
    if path.is_file():
        from gemminer.datatypes import read_npz

        return read_npz(path, "data cache", "delete it to rebuild")
    arrays = decode()
    arrays["mean"], arrays["std"] = channel_stats(arrays["x_train"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"cannot write data cache {path} ({err.strerror}); images will be decoded again next time",
                      stacklevel=2)
    return arrays


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 NCHW images, in [0, 1], in float64 chunks (small memory)."""
    channels = images.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        squares += (block * block).sum(axis=(0, 2, 3))
    count = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 1e-12))
    return mean, std


def image_dataset(name: str, arrays: dict[str, np.ndarray], num_classes: int, augmentation: str) -> Dataset:
    """A Dataset of uint8 image tensors from cached arrays (no copy: tensors share the arrays)."""
    def split(x_key: str, y_key: str) -> TensorData:
        images = np.ascontiguousarray(arrays[x_key], dtype=np.uint8)
        labels = np.ascontiguousarray(arrays[y_key], dtype=np.int64)
        if images.ndim != 4 or len(images) != len(labels):
            raise GemminerError(f"data set {name}: images {images.shape} and labels {labels.shape} do not match")
        return TensorData(torch.from_numpy(images), torch.from_numpy(labels))

    train, test = split("x_train", "y_train"), split("x_test", "y_test")
    for part, data in (("training", train), ("test", test)):
        if len(data) and (int(data.y.min()) < 0 or int(data.y.max()) >= num_classes):
            raise GemminerError(f"data set {name}: {part} labels outside 0..{num_classes - 1}")
    return Dataset(name, train, test, num_classes, mean=tuple(float(v) for v in arrays["mean"]),
                   std=tuple(float(v) for v in arrays["std"]), augmentation=augmentation)
