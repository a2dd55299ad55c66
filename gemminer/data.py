"""Data sets as tensors, and batches sliced from them (no per-sample Python work)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from gemminer.datasets.mnist1d import load_mnist1d
from gemminer.datatypes import Dataset, TensorData, default_cache_dir, read_npz
from gemminer.errors import GemminerError

__all__ = ["AUTO_EVAL_BATCH", "Batches", "Dataset", "TensorData", "default_cache_dir", "load_dataset", "load_mnist1d",
           "one_thread_on_cpu", "read_npz", "split_dataset"]
# data.eval_batch_size "auto" per device type. CPU: a ResNet-20 pass over CIFAR-10's test split
# takes 14.0 s at 256 and 16.6 s at 1000 on 2 cores; CUDA: 0.041 s at 1000 on one H100, within 7 ms of
# the fastest batch (benchmarks/eval_batch.py; docs/benchmarks.md, "Evaluation batch size").
AUTO_EVAL_BATCH = {"cpu": 256, "cuda": 1000}


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
