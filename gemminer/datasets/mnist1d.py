"""MNIST-1D (Greydanus 2020), made locally by the `mnist1d` package and cached as `.npz`."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from gemminer.datatypes import Dataset, TensorData, default_cache_dir, read_npz
from gemminer.errors import GemminerError


def load_mnist1d(data_dir: Path | None = None, num_samples: int = 5000) -> Dataset:
    """MNIST-1D made locally by `mnist1d.data.make_dataset` (never downloaded).

    num_samples 5000 gives the canonical 4000/1000 split. The arrays are cached as
    float32 `.npz`, and a fresh build is cast to float32 the same way, so a run is
    bit-identical with or without the cache.
    """
    if num_samples < 10:
        raise GemminerError(f"mnist1d needs at least 10 samples, got {num_samples}")
    cache = (data_dir or default_cache_dir()) / f"mnist1d-{num_samples}.npz"
    if cache.is_file():
        arrays = read_npz(cache, "data cache", "delete it to rebuild")
        try:
            x, y, x_test, y_test = (arrays[key] for key in ("x", "y", "x_test", "y_test"))
        except KeyError as err:
            raise GemminerError(f"cannot read data cache {cache}: no array {err}; delete it to rebuild") from None
    else:
        x, y, x_test, y_test = _make_mnist1d(num_samples)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")  # processes may build it at once
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, x=x, y=y, x_test=x_test, y_test=y_test)
            os.replace(tmp, cache)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise GemminerError(f"cannot write the MNIST-1D cache {cache}: {err.strerror}; give a writable "
                                "--data-dir") from err
    to_tensors = lambda xs, ys: TensorData(torch.from_numpy(xs).unsqueeze(1), torch.from_numpy(ys))  # noqa: E731
    return Dataset("mnist1d", to_tensors(x, y), to_tensors(x_test, y_test), num_classes=10)


def _make_mnist1d(num_samples: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds Python's and NumPy's global generators: keep the caller's state.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return (raw["x"].astype(np.float32), raw["y"].astype(np.int64),
            raw["x_test"].astype(np.float32), raw["y_test"].astype(np.int64))
