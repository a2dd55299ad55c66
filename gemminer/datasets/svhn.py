"""SVHN (cropped digits) from the official train_32x32.mat / test_32x32.mat."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gemminer.datasets.common import Source, cached_arrays, first_existing, image_dataset, missing
from gemminer.datasets.download import Archive, fetch
from gemminer.datatypes import Dataset
from gemminer.errors import GemminerError

FILES = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
URL = "http://ufldl.stanford.edu/housenumbers/"


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """X (32, 32, 3, N) -> (N, 3, 32, 32) uint8; y (N, 1) with 10 for the digit 0 -> 0..9."""
    try:
        from scipy.io import loadmat  # a dependency of mnist1d, so always present
    except ImportError as err:
        raise GemminerError(f"reading SVHN .mat files needs scipy ({err})") from None
    try:
        mat = loadmat(path, variable_names=["X", "y"])
        images, labels = mat["X"], mat["y"]
    except Exception as err:  # scipy's MatReadError and friends: any unreadable file is one clear error
        raise GemminerError(f"{path} is not an SVHN .mat file: {err}") from None
    images = np.ascontiguousarray(np.transpose(images, (3, 2, 0, 1)), dtype=np.uint8)
    labels = labels.reshape(-1).astype(np.int64) % 10
    return images, labels


def load_svhn(source: Source) -> Dataset:
    root = source.root
    candidates = [root / "svhn", root]
    folder = first_existing(candidates, FILES)
    if folder is None and source.download:
        for name, md5 in FILES.items():
            fetch(Archive(URL + name, md5), root / "svhn")
        folder = root / "svhn"
    if folder is None:
        raise missing(source, f"{', '.join(FILES)} in {candidates[0]}/ or {root}/")

    def decode() -> dict[str, np.ndarray]:
        x_train, y_train = read_svhn_mat(folder / "train_32x32.mat")
        x_test, y_test = read_svhn_mat(folder / "test_32x32.mat")
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    arrays = cached_arrays("svhn", [folder / name for name in FILES], decode)
    return image_dataset("svhn", arrays, 10, augmentation="none")  # digits: a flip changes their meaning
