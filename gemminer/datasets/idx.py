"""MNIST and Fashion-MNIST from their official IDX files, gzipped or not."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from gemminer.datasets.common import Source, cached_arrays, image_dataset, missing
from gemminer.datasets.download import Archive, fetch
from gemminer.datatypes import Dataset
from gemminer.errors import GemminerError, reading

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

MIRRORS = {  # the files and md5s published for each data set (the .gz versions)
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
               "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                       "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
}

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (magic 0x0000TTNN: type code TT, NN dimensions, big-endian sizes); gzip by magic bytes."""
    with reading(path, "IDX data file", "delete it to fetch or copy it again"):
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise GemminerError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise GemminerError(f"{path}: header says shape {shape}, but the file holds {len(raw) - offset} data bytes")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_dataset(source: Source) -> Dataset:
    """Looks in <dir>/<name>/ first, then <dir>/ (MNIST and Fashion-MNIST share file names)."""
    root = source.root
    candidates = [root / source.name, root]

    def locate() -> list[Path] | None:
        for folder in candidates:
            found = [_find(folder, stem) for stem in FILES]
            if all(found):
                return found  # type: ignore[return-value]
        return None

    paths = locate()
    if paths is None and source.download:
        base, md5s = MIRRORS[source.name]
        for stem, md5 in zip(FILES, md5s, strict=True):
            fetch(Archive(base + stem + ".gz", md5), root / source.name)
        paths = locate()
    if paths is None:
        raise missing(source, f"{', '.join(FILES)} (each may end in .gz) in {candidates[0]}/ or {root}/")

    def decode() -> dict[str, np.ndarray]:
        x_train, y_train, x_test, y_test = (read_idx(path) for path in paths)
        for images in (x_train, x_test):
            if images.ndim != 3:
                raise GemminerError(f"{source.name}: images must be (N, rows, columns), got {images.shape}")
        return {"x_train": x_train[:, None].astype(np.uint8), "y_train": y_train.astype(np.int64),
                "x_test": x_test[:, None].astype(np.uint8), "y_test": y_test.astype(np.int64)}

    return image_dataset(source.name, cached_arrays(source.name, paths, decode), 10, augmentation="none")
