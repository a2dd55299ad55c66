"""Data set registry: name -> loader(Source) -> Dataset.

``--data NAME`` picks a loader; ``imagefolder:PATH`` passes PATH to the imagefolder
loader. Every image set is decoded once into uint8 arrays and cached under
``$GEMMINER_CACHE/arrays`` (default ``~/.cache/gemminer/arrays``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gemminer.datasets.cifar import load_cifar
from gemminer.datasets.common import Source
from gemminer.datasets.folders import load_image_folder, load_tiny_imagenet
from gemminer.datasets.idx import load_idx_dataset
from gemminer.datasets.mnist1d import load_mnist1d
from gemminer.datasets.svhn import load_svhn
from gemminer.datatypes import Dataset
from gemminer.errors import GemminerError

Loader = Callable[[Source], Dataset]

DATASETS: dict[str, Loader] = {
    "mnist1d": lambda source: load_mnist1d(source.data_dir, num_samples=source.num_samples),
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "mnist": load_idx_dataset,
    "fashion-mnist": load_idx_dataset,
    "svhn": load_svhn,
    "tiny-imagenet": load_tiny_imagenet,
    "imagefolder": load_image_folder,
}


def open_dataset(name: str, data_dir: Path | None = None, *, num_samples: int = 5000,
                 download: bool = False) -> Dataset:
    """The registered data set `name` (``imagefolder:PATH`` for a folder of class folders)."""
    family, _, path = name.partition(":")
    if family not in DATASETS or (path and family != "imagefolder"):
        allowed = ", ".join([*sorted(set(DATASETS) - {"imagefolder"}), "imagefolder:PATH"])
        raise GemminerError(f"unknown data set {name!r}; allowed: {allowed}")
    source = Source(family, data_dir, download=download, path=path, num_samples=num_samples)
    return DATASETS[family](source)
