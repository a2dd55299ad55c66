"""Data sets as tensors, and batches sliced from them (no per-sample Python work)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gemminer.errors import GemminerError, reading

# data.eval_batch_size "auto" per device type. CPU: a ResNet-20 pass over CIFAR-10's test split
# takes 14.0 s at 256 and 16.6 s at 1000 on 2 cores (benchmarks/eval_batch.py, BENCHMARKS.md);
# CUDA: large batches keep the GPU busy (to be confirmed by benchmarks/gpu_check.sh).
AUTO_EVAL_BATCH = {"cpu": 256, "cuda": 1000}


@dataclass
class TensorData:
    """Inputs and integer labels, already on their device."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise GemminerError(f"TensorData has {len(self.x)} inputs and {len(self.y)} labels: one label per input")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))


class Batches:
    """Re-iterable mini-batches of a TensorData.

    With `shuffle`, each pass draws a fresh permutation from `generator`, so the
    order is a function of the seed alone. The last short batch is kept.

    Resumable: `state_dict()` taken after k batches of a pass holds the generator
    state from before that pass's permutation and k, so the next pass after
    `load_state_dict()` yields exactly the remaining batches.

    Data-parallel: with `world_size` > 1 every rank draws the same global
    permutation and takes its contiguous share of each global batch.
    """

    def __init__(self, data: TensorData, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, transform: Callable[[Tensor], Tensor] | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise GemminerError(f"batch size must be >= 1, got {batch_size}")
        if shuffle and generator is None:
            raise GemminerError("shuffled batches need an explicit generator")
        if batch_size < world_size:
            raise GemminerError(f"batch size {batch_size} is smaller than the {world_size} processes sharing it")
        self.data, self.batch_size, self.shuffle, self.generator = data, batch_size, shuffle, generator
        self.transform = transform  # applied to each batch's inputs (uint8 images -> normalized floats)
        self.rank, self.world_size = rank, world_size
        self._pass_start_state: torch.Tensor | None = None  # generator state before the current pass
        self._position = 0  # batches handed out in the current pass
        self._skip = 0  # batches to skip in the next pass (set by load_state_dict)

    def __len__(self) -> int:
        return (len(self.data) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.data)
        skip, self._skip = self._skip, 0
        order = None
        if self.shuffle:
            self._pass_start_state = self.generator.get_state()
            order = torch.randperm(n, generator=self.generator).to(self.data.y.device)
        self._position = skip
        try:
            for start in range(skip * self.batch_size, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                if self.world_size > 1:
                    if stop - start < self.world_size:
                        break  # too short to give every rank a sample; all ranks drop it alike
                    share = torch.arange(start, stop).tensor_split(self.world_size)[self.rank]
                    start, stop = int(share[0]), int(share[-1]) + 1
                index = order[start:stop] if order is not None else slice(start, stop)
                self._position += 1
                yield self._batch(index)
        finally:  # exhausted or abandoned (closed): the next pass starts afresh
            self._position = 0

    def _batch(self, index: Tensor | slice) -> tuple[Tensor, Tensor]:
        if self.transform is None:
            return self.data.x[index], self.data.y[index]
        with one_thread_on_cpu(self.data.x.device):
            return self.transform(self.data.x[index]), self.data.y[index]

    def _augmentation_generator(self) -> torch.Generator | None:
        return getattr(self.transform, "generator", None)

    def state_dict(self) -> dict[str, object]:
        """Where the batch stream stands: generator state and position in the pass, and the
        augmentation generator's state (as it is now: skipped batches do not redraw)."""
        if self._position and self._pass_start_state is not None:
            generator_state = self._pass_start_state  # mid-pass: replay the same permutation
        else:
            generator_state = self.generator.get_state() if self.generator is not None else None
        augmentation = self._augmentation_generator()
        return {"generator": generator_state, "position": self._position,
                "augmentation": augmentation.get_state() if augmentation is not None else None}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        augmentation = self._augmentation_generator()
        if state.get("augmentation") is not None and augmentation is not None:
            augmentation.set_state(state["augmentation"])
        self._skip = int(state.get("position", 0))


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run a batch's gather and transform on one CPU thread. They are small memory-bound ops:
    with more threads, each op's synchronization costs more than it saves, and on shared
    cores it stalls (measured: 1 thread 12-19k images/s, 2 threads 1-1.5k on a loaded 2-core
    machine). Training itself keeps every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Dataset:
    """Splits as tensors. Image sets hold uint8 NCHW images plus the per-channel `mean` and
    `std` (of the training images, in [0, 1]) that `transform` normalizes with, per batch;
    `augmentation` names the data set's standard training augmentation."""

    name: str
    train: TensorData
    test: TensorData
    num_classes: int
    val: TensorData | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: str = "none"  # "crop_flip": padded random crop (H // 8 pixels) + horizontal flip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def transform(self, train: bool = False, generator: torch.Generator | None = None,
                  augment: bool = True, channels_last: bool = False) -> Callable[[Tensor], Tensor] | None:
        """The per-batch transform: normalization, plus augmentation for training batches
        (`train` and `augment`, drawn from `generator`). None for data stored as floats.
        `channels_last` lays image batches out NHWC (for CUDA: on some CPUs oneDNN's NHWC
        backward of strided 1x1 convolutions corrupts memory in torch 2.13)."""
        from gemminer.transforms import ImageTransform

        if self.mean is None or self.std is None:
            return None
        channels_last = channels_last and len(self.input_shape) == 3
        if train and augment and self.augmentation == "crop_flip":
            return ImageTransform(self.mean, self.std, crop_padding=self.input_shape[-1] // 8, flip=True,
                                  generator=generator, channels_last=channels_last)
        return ImageTransform(self.mean, self.std, channels_last=channels_last)


def default_cache_dir() -> Path:
    """``$GEMMINER_CACHE`` or ``~/.cache/gemminer``."""
    return Path(os.environ.get("GEMMINER_CACHE", Path.home() / ".cache" / "gemminer"))


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


def read_npz(path: Path, what: str, remedy: str) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file (no pickle), read at once; a zero-byte, truncated or foreign
    file is one error line, and the file is closed on every path."""
    with reading(path, what, remedy), open(path, "rb") as handle, np.load(handle, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


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


def load_dataset(name: str, data_dir: str | None = None, num_samples: int = 5000, *, download: bool = False,
                 limit: int | None = None, val_size: int = 0) -> Dataset:
    """Load a registered data set by name (``cifar10``, ``imagefolder:PATH``, ...; see
    `gemminer.datasets.DATASETS`), then hold out `val_size` training samples as the
    validation split and keep `limit` of the rest for training."""
    from gemminer.datasets import open_dataset

    dataset = open_dataset(name, Path(data_dir) if data_dir else None, num_samples=num_samples, download=download)
    return split_dataset(dataset, val_size=val_size, limit=limit)


def split_dataset(dataset: Dataset, val_size: int = 0, limit: int | None = None) -> Dataset:
    """Hold out `val_size` training samples and keep the first `limit` of the rest.

    Both subsets come from one permutation with a fixed seed, not the run seed: the
    subsets are part of the data set, the same for every run.
    """
    n = len(dataset.train)
    if val_size < 0 or (limit is not None and limit < 1):
        raise GemminerError("data val_size must be >= 0 and data limit >= 1")
    if val_size >= n:
        raise GemminerError(f"val_size {val_size} leaves no training samples (the training split has {n})")
    if val_size == 0 and (limit is None or limit >= n):
        return dataset
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    val_index, train_index = order[:val_size].sort().values, order[val_size:]
    if limit is not None:
        train_index = train_index[:limit]
    train_index = train_index.sort().values
    take = lambda index: TensorData(dataset.train.x[index], dataset.train.y[index])  # noqa: E731
    return dataclasses.replace(dataset, train=take(train_index), val=take(val_index) if val_size else dataset.val)
