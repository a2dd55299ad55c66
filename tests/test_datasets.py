"""Loaders on tiny files written in each official format; splits, cache, augmentation."""

import gzip
import os
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch

from gemminer.data import Batches, load_dataset
from gemminer.errors import GemminerError
from gemminer.transforms import ImageTransform, crop_and_flip


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMINER_CACHE", str(tmp_path / "cache"))


def images_and_labels(n, num_classes, shape=(3, 32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.int64)


def write_python_batch(path, images, labels, label_key=b"labels"):
    """As the official release: a pickled dict with bytes keys, the array rebuilt through
    numpy.core.multiarray._reconstruct. (Protocol 3: protocol 2 from Python 3 would encode
    bytes through _codecs.encode, which a Python 2 pickle does not need.)"""
    batch = {b"batch_label": b"training batch", label_key: labels.tolist(), b"data": images.reshape(len(images), -1),
             b"filenames": [b"x.png"] * len(images)}
    path.write_bytes(pickle.dumps(batch, protocol=3).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def write_cifar10_python(root, per_batch=4, test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for index in range(1, 6):
        x, y = images_and_labels(per_batch, 10, seed=index)
        write_python_batch(folder / f"data_batch_{index}", x, y)
        xs.append(x)
        ys.append(y)
    x_test, y_test = images_and_labels(test, 10, seed=9)
    write_python_batch(folder / "test_batch", x_test, y_test)
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test


def test_cifar10_python_release(tmp_path):
    x, y, x_test, y_test = write_cifar10_python(tmp_path)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.train.x.shape == (20, 3, 32, 32) and data.train.x.dtype == torch.uint8
    assert data.test.x.shape == (3, 3, 32, 32) and data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert np.array_equal(data.train.x.numpy(), x) and np.array_equal(data.train.y.numpy(), y)
    assert np.array_equal(data.test.x.numpy(), x_test) and np.array_equal(data.test.y.numpy(), y_test)
    assert data.train.y.dtype == torch.int64 and data.augmentation == "crop_flip"
    assert np.allclose(data.mean, x.reshape(20, 3, -1).transpose(1, 0, 2).reshape(3, -1).mean(1) / 255)


def test_cifar_unpickler_refuses_other_globals(tmp_path):
    write_cifar10_python(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as handle:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"payload": os.getcwd}, handle,
                    protocol=3)
    with pytest.raises(GemminerError, match="not allowed"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar100_python_release_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x, y = images_and_labels(6, 100)
    x_test, y_test = images_and_labels(2, 100, seed=1)
    write_python_batch(folder / "train", x, y, label_key=b"fine_labels")
    write_python_batch(folder / "test", x_test, y_test, label_key=b"fine_labels")
    data = load_dataset("cifar100", str(tmp_path))
    assert data.num_classes == 100 and len(data.train) == 6 and len(data.test) == 2
    assert np.array_equal(data.train.y.numpy(), y) and np.array_equal(data.test.x.numpy(), x_test)


@pytest.mark.parametrize(("name", "folder", "train_files", "test_file", "label_bytes", "classes"), [
    ("cifar10", "cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin", 1, 10),
    ("cifar100", "cifar-100-binary", ["train.bin"], "test.bin", 2, 100),
])
def test_cifar_binary_release(tmp_path, name, folder, train_files, test_file, label_bytes, classes):
    (tmp_path / folder).mkdir()

    def write(path, seed, n=3):
        x, y = images_and_labels(n, classes, seed=seed)
        labels = np.stack([y // 5, y] if label_bytes == 2 else [y], 1).astype(np.uint8)  # (coarse, fine)
        np.concatenate([labels, x.reshape(n, -1)], 1).tofile(path)
        return x, y

    parts = [write(tmp_path / folder / file, seed) for seed, file in enumerate(train_files)]
    x_test, y_test = write(tmp_path / folder / test_file, 99)
    data = load_dataset(name, str(tmp_path))
    assert len(data.train) == 3 * len(train_files) and data.num_classes == classes
    assert np.array_equal(data.train.y.numpy(), np.concatenate([y for _, y in parts]))
    assert np.array_equal(data.test.x.numpy(), x_test) and np.array_equal(data.test.y.numpy(), y_test)


def write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize(("name", "subfolder", "compress"), [("mnist", "", True), ("fashion-mnist", "fashion-mnist",
                                                                                        False)])
def test_idx_loaders(tmp_path, name, subfolder, compress):
    folder = tmp_path / subfolder
    folder.mkdir(exist_ok=True)
    x, y = images_and_labels(7, 10, shape=(28, 28))
    x_test, y_test = images_and_labels(4, 10, shape=(28, 28), seed=1)
    suffix = ".gz" if compress else ""
    for stem, array in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                        ("t10k-images-idx3-ubyte", x_test), ("t10k-labels-idx1-ubyte", y_test)):
        write_idx(folder / (stem + suffix), array, compress)
    data = load_dataset(name, str(tmp_path))
    assert data.train.x.shape == (7, 1, 28, 28) and data.test.x.shape == (4, 1, 28, 28)
    assert np.array_equal(data.train.x[:, 0].numpy(), x) and np.array_equal(data.test.y.numpy(), y_test)
    assert data.augmentation == "none"


def test_idx_bad_header_is_one_line_error(tmp_path):
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"short")
    with pytest.raises(GemminerError, match="header says"):
        load_dataset("mnist", str(tmp_path))


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    def write(path, n, seed):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels = rng.integers(1, 11, (n, 1)).astype(np.float64)  # 1..10, 10 is the digit 0
        savemat(path, {"X": images, "y": labels})
        return images, labels

    x, y = write(tmp_path / "train_32x32.mat", 5, 0)
    write(tmp_path / "test_32x32.mat", 2, 1)
    data = load_dataset("svhn", str(tmp_path))
    assert data.train.x.shape == (5, 3, 32, 32) and len(data.test) == 2
    assert np.array_equal(data.train.x[2].numpy(), x[:, :, :, 2].transpose(2, 0, 1))
    assert np.array_equal(data.train.y.numpy(), y.reshape(-1).astype(int) % 10)


def write_image(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.transpose(1, 2, 0)).save(path)


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=3, test_name="test", size=8):
    expected = {}
    for split, count in (("train", per_class), (test_name, 1)):
        for label, name in enumerate(classes):
            for index in range(count):
                image, _ = images_and_labels(1, 1, shape=(3, size, size), seed=label * 10 + index)
                write_image(root / split / name / f"{index:04d}.png", image[0])
                expected.setdefault(split, []).append((image[0], label))
    return expected


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_imagefolder_decodes_and_caches(tmp_path, monkeypatch, test_name):
    root = tmp_path / "pictures"
    expected = write_image_folder(root, test_name=test_name)
    data = load_dataset(f"imagefolder:{root}")
    assert data.num_classes == 3 and data.train.x.shape == (9, 3, 8, 8) and len(data.test) == 3
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted class folders
    assert np.array_equal(data.train.x.numpy(), np.stack([image for image, _ in expected["train"]]))
    assert len(list((tmp_path / "cache" / "arrays").glob("imagefolder-*.npz"))) == 1

    import gemminer.datasets.folders as folders

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(folders, "decode_images", no_decoding)
    again = load_dataset(f"imagefolder:{root}")
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.test.y, data.test.y)
    monkeypatch.undo()
    monkeypatch.setenv("GEMMINER_CACHE", str(tmp_path / "cache"))
    write_image(root / "train" / "cat" / "extra.png", expected["train"][0][0])  # a changed folder is rebuilt
    assert len(load_dataset(f"imagefolder:{root}").train) == 10


def test_imagefolder_resizes_to_the_first_image(tmp_path):
    root = tmp_path / "mixed"
    write_image_folder(root, classes=("a", "b"), per_class=1)
    big, _ = images_and_labels(1, 1, shape=(3, 12, 12))
    write_image(root / "test" / "b" / "big.png", big[0])
    data = load_dataset(f"imagefolder:{root}")
    assert data.test.x.shape == (3, 3, 8, 8)


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for index, wnid in enumerate(wnids):
        for k in range(2):
            image, _ = images_and_labels(1, 1, shape=(3, 64, 64), seed=index * 5 + k)
            write_image(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", image[0])
    lines = []
    for k, wnid in enumerate(["n01", "n02", "n02"]):
        image, _ = images_and_labels(1, 1, shape=(3, 64, 64), seed=50 + k)
        write_image(root / "val" / "images" / f"val_{k}.JPEG", image[0])
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset("tiny-imagenet", str(tmp_path))
    assert data.input_shape == (3, 64, 64) and data.num_classes == 2
    assert data.train.y.tolist() == [0, 0, 1, 1]  # sorted wnids: n01 -> 0, n02 -> 1
    assert data.test.y.tolist() == [0, 1, 1] and data.test.x.dtype == torch.uint8
    (root / "val" / "val_annotations.txt").write_text("\n".join([*lines, "val_9.JPEG\tn01\t0\t0\t63\t63"]))
    with pytest.raises(GemminerError, match=r"cannot read .*val_9\.JPEG"):
        load_dataset("tiny-imagenet", str(tmp_path))


@pytest.mark.parametrize(("name", "expected"), [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-binary"), ("mnist", "train-images-idx3-ubyte"),
    ("fashion-mnist", "t10k-labels-idx1-ubyte"), ("svhn", "test_32x32.mat"), ("tiny-imagenet", "wnids.txt"),
])
def test_missing_data_set_is_one_clear_line(tmp_path, monkeypatch, name, expected):
    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be downloaded without --download")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(GemminerError) as err:
        load_dataset(name, str(tmp_path))
    message = str(err.value)
    assert expected in message and str(tmp_path) in message and "--download" in message and "\n" not in message


def test_imagefolder_missing_and_unknown_names(tmp_path):
    with pytest.raises(GemminerError, match="train/<class>"):
        load_dataset(f"imagefolder:{tmp_path}")
    with pytest.raises(GemminerError, match="unknown data set 'cifar11'"):
        load_dataset("cifar11")


def test_download_without_network_fails_with_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(GemminerError, match=r"cannot download https://www\.cs\.toronto\.edu") as err:
        load_dataset("cifar10", str(tmp_path), download=True)
    assert "\n" not in str(err.value) and not list(tmp_path.glob("*.part"))


def test_validation_split_and_limit(tmp_path):
    write_cifar10_python(tmp_path, per_batch=10)
    full = load_dataset("cifar10", str(tmp_path))
    data = load_dataset("cifar10", str(tmp_path), val_size=10, limit=15)
    assert len(data.val) == 10 and len(data.train) == 15 and len(data.test) == len(full.test)
    rows = lambda d: {bytes(image.numpy().tobytes()) for image in d.x}  # noqa: E731
    assert not rows(data.val) & rows(data.train) and rows(data.val) | rows(data.train) <= rows(full.train)
    again = load_dataset("cifar10", str(tmp_path), val_size=10, limit=15)
    assert torch.equal(again.train.x, data.train.x)  # the subset is fixed, not drawn per run
    with pytest.raises(GemminerError, match="leaves no training samples"):
        load_dataset("cifar10", str(tmp_path), val_size=50)


def test_crop_and_flip_keep_shapes_and_label_alignment():
    n = 64
    labels = torch.arange(1, n + 1) % 200 + 1
    images = labels.to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()  # image i is all labels[i]
    out = crop_and_flip(images, 4, True, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out.amax(dim=(1, 2, 3)), labels.to(torch.uint8))  # each image keeps its own content
    assert (out == 0).flatten(1).any(1).float().mean() > 0.5  # most crops show some padding
    again = crop_and_flip(images, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    nhwc = crop_and_flip(images, 4, True, torch.Generator().manual_seed(0), channels_last=True)
    assert torch.equal(nhwc, out) and nhwc.is_contiguous(memory_format=torch.channels_last)


def test_flip_mirrors_about_half_and_crop_moves():
    images = torch.arange(32, dtype=torch.uint8).view(1, 1, 1, 32).expand(200, 3, 32, 32).contiguous()
    flipped = crop_and_flip(images, 0, True, torch.Generator().manual_seed(1))
    mirrored = (flipped[:, 0, 0, 0] == 31)
    assert 0.3 < mirrored.float().mean() < 0.7
    assert torch.equal(flipped[mirrored], images[mirrored].flip(-1)) and torch.equal(flipped[~mirrored],
                                                                                     images[~mirrored])
    cropped = crop_and_flip(images, 4, False, torch.Generator().manual_seed(2))
    shifts = {int(row[0, 4, :].float().argmax()) for row in cropped}
    assert len(shifts) > 3


def test_normalization_and_training_batches_stay_aligned(tmp_path):
    write_cifar10_python(tmp_path, per_batch=20)
    data = load_dataset("cifar10", str(tmp_path))
    plain = data.transform(train=False, channels_last=True)
    assert isinstance(plain, ImageTransform) and not plain.augments
    normalized = plain(data.train.x)
    assert normalized.dtype == torch.float32 and normalized.is_contiguous(memory_format=torch.channels_last)
    assert normalized.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (normalized.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    # a training pass: every sample once, each label with its own (augmented) image
    data.train.x = (data.train.y + 1).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    generator = torch.Generator().manual_seed(0)
    augment = lambda x: crop_and_flip(x, 4, True, generator)  # noqa: E731
    batches = Batches(data.train, 16, shuffle=True, generator=torch.Generator().manual_seed(0), transform=augment)
    seen = []
    threads = torch.get_num_threads()
    for x, y in batches:
        assert torch.get_num_threads() == threads  # the batch was made on one thread; training gets them all
        assert x.shape[1:] == (3, 32, 32) and torch.equal(x.amax(dim=(1, 2, 3)), (y + 1).to(torch.uint8))
        seen.append(y)
    assert torch.equal(torch.cat(seen).sort().values, data.train.y.sort().values)
    assert data.transform(train=True, generator=generator).augments
    assert torch.equal(next(iter(Batches(data.train, 4)))[0], data.train.x[:4])  # no transform: raw uint8


def test_setup_batches_are_on_device_normalized_and_seeded(tmp_path):
    from gemminer.config import resolve
    from gemminer.experiment import setup

    write_cifar10_python(tmp_path, per_batch=8)
    overrides = {"data": {"name": "cifar10", "dir": str(tmp_path), "batch_size": 8, "val_size": 8,
                          "eval_split": "val"}, "model": {"name": "resnet20", "width": 4}, "device": "cpu"}
    run = setup(resolve(overrides))
    nhwc = run.device.type == "cuda"  # NHWC on CUDA only (see Setup.channels_last)
    assert run.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last) == nhwc
    first = next(iter(run.batches("search-order")))
    assert first[0].dtype == torch.float32 and first[0].is_contiguous(memory_format=torch.channels_last) == nhwc
    again = next(iter(setup(resolve(overrides)).batches("search-order")))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # order and augmentation: the seed's
    other = next(iter(run.batches("finetune-order")))
    assert not torch.equal(first[0], other[0])
    test_inputs, _ = next(iter(run.test))
    assert len(run.test.data) == 8 and len(run.dataset.train) == 32  # eval_split val: the held-out 8
    assert torch.equal(test_inputs, run.dataset.transform()(run.dataset.val.x))  # evaluation: not augmented
