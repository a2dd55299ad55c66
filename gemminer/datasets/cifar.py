"""CIFAR-10 and CIFAR-100 from their official python (pickled) or binary releases."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemminer.datasets.common import Source, cached_arrays, first_existing, image_dataset, missing
from gemminer.datasets.download import Archive, fetch
from gemminer.datatypes import Dataset
from gemminer.errors import GemminerError, reading


@dataclass(frozen=True)
class CifarRelease:
    python_folder: str
    python_train: tuple[str, ...]
    python_test: tuple[str, ...]
    label_key: bytes
    binary_folder: str
    binary_train: tuple[str, ...]
    binary_test: tuple[str, ...]
    label_bytes: int  # CIFAR-100 records carry (coarse, fine); the fine label is the last byte
    num_classes: int
    archive: Archive


RELEASES = {
    "cifar10": CifarRelease(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels",
        "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), 1, 10,
        Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", True)),
    "cifar100": CifarRelease(
        "cifar-100-python", ("train",), ("test",), b"fine_labels",
        "cifar-100-binary", ("train.bin",), ("test.bin",), 2, 100,
        Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", True)),
}


def _numpy_reconstruct() -> object:
    module = "numpy._core.multiarray" if importlib.util.find_spec("numpy._core") else "numpy.core.multiarray"
    return importlib.import_module(module)._reconstruct


class CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds: dicts, lists, bytes, ints and numpy arrays.

    Rebuilding an array needs exactly three globals (`_reconstruct`, `ndarray`, `dtype`);
    every other global, and so every code-running payload, is refused.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def read_python_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels of one pickled batch."""
    try:
        with open(path, "rb") as handle:
            batch = CifarUnpickler(handle, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as err:  # a damaged pickle fails in open-ended ways; all mean "not a batch"
        raise GemminerError(f"{path} is not a CIFAR python batch: {err}") from None
    if len(images) != len(labels):
        raise GemminerError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def read_binary_batch(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """The binary release: records of `label_bytes` label bytes and 3072 pixel bytes."""
    with reading(path, "CIFAR binary batch"):
        raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3 * 32 * 32
    if raw.size % record:
        raise GemminerError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), rows[:, label_bytes - 1].astype(np.int64)


def load_cifar(source: Source) -> Dataset:
    release = RELEASES[source.name]
    root = source.root
    python = first_existing([root / release.python_folder, root], release.python_train + release.python_test)
    binary = first_existing([root / release.binary_folder, root], release.binary_train + release.binary_test)
    if python is None and binary is None and source.download:
        fetch(release.archive, root)
        python = first_existing([root / release.python_folder], release.python_train + release.python_test)
    if python is not None:
        train_files, test_files = release.python_train, release.python_test
        folder, read = python, lambda path: read_python_batch(path, release.label_key)
    elif binary is not None:
        train_files, test_files = release.binary_train, release.binary_test
        folder, read = binary, lambda path: read_binary_batch(path, release.label_bytes)
    else:
        raise missing(source, f"{root / release.python_folder}/ ({', '.join(release.python_train)}, "
                              f"{', '.join(release.python_test)}) or {root / release.binary_folder}/ "
                              f"({', '.join(release.binary_train)}, {', '.join(release.binary_test)})")

    def decode() -> dict[str, np.ndarray]:
        parts = {split: [read(folder / name) for name in names]
                 for split, names in (("train", train_files), ("test", test_files))}
        return {"x_train": np.concatenate([x for x, _ in parts["train"]]),
                "y_train": np.concatenate([y for _, y in parts["train"]]),
                "x_test": np.concatenate([x for x, _ in parts["test"]]),
                "y_test": np.concatenate([y for _, y in parts["test"]])}

    files = [folder / name for name in train_files + test_files]
    arrays = cached_arrays(source.name, files, decode)
    return image_dataset(source.name, arrays, release.num_classes, augmentation="crop_flip")
