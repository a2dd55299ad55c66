import pytest
import torch

from gemminer.data import Batches, load_dataset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A session-wide MNIST-1D cache with a small data set (500 samples)."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny(data_dir):
    return load_dataset("mnist1d", data_dir, num_samples=500)


@pytest.fixture
def batches(tiny):
    return Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _cpu_threads():
    # One thread: the test models are tiny, and on a busy machine (other jobs on the 2 cores)
    # two OpenMP threads made them up to 40x slower (whole suite 3m41s vs 27s under load).
    torch.set_num_threads(1)


def tiny_overrides(data_dir, **extra):
    """Config overrides for a run that takes a second or two."""
    overrides = {"density": 0.1, "seed": 0, "data": {"dir": data_dir, "num_samples": 500, "batch_size": 64},
                 "model": {"width": 8}, "search": {"epochs": 4, "freeze_period": 1}, "finetune": {"epochs": 2},
                 "bn_recalibration_batches": 3}
    for key, value in extra.items():
        if isinstance(value, dict):
            overrides.setdefault(key, {}).update(value)
        else:
            overrides[key] = value
    return overrides
