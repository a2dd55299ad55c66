"""Image files in folders: ``imagefolder:PATH`` (class folders) and Tiny ImageNet's official layout.

Decoded once with Pillow (threads: decoding releases the GIL) into uint8 arrays, then
cached; a changed folder (any file's size or mtime) is decoded again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gemminer.datasets.common import Source, cached_arrays, image_dataset, missing
from gemminer.datasets.download import Archive, fetch
from gemminer.datatypes import Dataset
from gemminer.errors import GemminerError, reading

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TINY_IMAGENET = Archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de", True)

Labeled = list[tuple[Path, int]]


def decode_images(files: Sequence[Path], size: tuple[int, int] | None = None) -> np.ndarray:
    """(N, 3, H, W) uint8 RGB. Images of another size than `size` (default: the first
    image's) are resized to it, bilinear."""
    from PIL import Image, UnidentifiedImageError

    if not files:
        return np.zeros((0, 3, *(size or (1, 1))), dtype=np.uint8)

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise GemminerError(f"cannot decode image {path}: {err}") from None

    if size is None:
        first = read(files[0])
        size = first.shape[:2]
    out = np.empty((len(files), 3, *size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for index, image in enumerate(pool.map(read, files, chunksize=256)):
            out[index] = image.transpose(2, 0, 1)
    return out


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in sorted order (os.walk: one listing per folder)."""
    found = []
    for parent, subfolders, files in os.walk(folder):
        subfolders.sort()
        found += sorted(Path(parent, name) for name in files if name.lower().endswith(IMAGE_SUFFIXES))
    return found


def _class_folder_files(split: Path, classes: list[str]) -> Labeled:
    labeled = []
    for label, name in enumerate(classes):
        if (split / name).is_dir():
            labeled += [(path, label) for path in _image_files(split / name)]
    return labeled


def _decode_splits(train: Labeled, test: Labeled) -> dict[str, np.ndarray]:
    x_train = decode_images([path for path, _ in train])
    x_test = decode_images([path for path, _ in test], size=x_train.shape[2:])
    return {"x_train": x_train, "y_train": np.array([label for _, label in train], dtype=np.int64),
            "x_test": x_test, "y_test": np.array([label for _, label in test], dtype=np.int64)}


def load_image_folder(source: Source) -> Dataset:
    """PATH/train/<class>/*.jpg and PATH/test/<class>/* (or PATH/val/<class>/*); classes are
    the train/ subfolders in sorted order (for CIFAR-10 this is its standard label order)."""
    if not source.path:
        raise GemminerError("imagefolder needs a path: --data imagefolder:PATH")
    root = Path(source.path).expanduser()
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise missing(source, f"{root}/train/<class>/<image> and {root}/test/<class>/<image> "
                              f"(or {root}/val/<class>/<image>)", downloadable=False)
    classes = sorted(entry.name for entry in (root / "train").iterdir() if entry.is_dir())
    unknown = sorted({entry.name for entry in test_dir.iterdir() if entry.is_dir()} - set(classes))
    if not classes or unknown:
        raise GemminerError(f"{root}: " + (f"{test_dir.name}/ has classes not in train/: {', '.join(unknown[:5])}"
                                           if classes else "train/ has no class folders"))
    if len(classes) < 2:  # one class trains to 100% on everything and measures nothing
        raise GemminerError(f"{root}/train has {len(classes)} class folder ({classes[0]}); a classifier needs at "
                            "least 2")
    train = _class_folder_files(root / "train", classes)
    if not train:
        raise GemminerError(f"{root}/train holds no images ({', '.join(IMAGE_SUFFIXES)})")
    with_images = {label for _, label in train}
    if len(with_images) < 2:
        empty = ", ".join(name for label, name in enumerate(classes) if label not in with_images)[:200]
        raise GemminerError(f"{root}/train has images of {len(with_images)} class; a classifier needs at least 2 "
                            f"(class folders without images: {empty})")
    test = _class_folder_files(test_dir, classes)
    if not test:
        raise GemminerError(f"{test_dir} holds no images: there would be nothing to measure accuracy on")
    key = "imagefolder-" + "".join(c if c.isalnum() else "_" for c in root.resolve().name)[:40]
    files = [path for path, _ in train + test]
    arrays = cached_arrays(key, files, lambda: _decode_splits(train, test))
    return image_dataset("imagefolder", arrays, len(classes), augmentation="crop_flip")


def load_tiny_imagenet(source: Source) -> Dataset:
    """tiny-imagenet-200/: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG with
    val/val_annotations.txt. The labeled val split is the test split (test/ has no labels).
    Classes are the sorted wnids."""
    root = source.root
    folder = next((path for path in (root / "tiny-imagenet-200", root) if (path / "wnids.txt").is_file()), None)
    if folder is None and source.download:
        fetch(TINY_IMAGENET, root)
        folder = root / "tiny-imagenet-200"
    expected = [folder / "wnids.txt", folder / "train", folder / "val" / "val_annotations.txt"] if folder else []
    if folder is None or not all(path.exists() for path in expected):
        raise missing(source, f"{root / 'tiny-imagenet-200'}/ with wnids.txt, train/<wnid>/images/*.JPEG, "
                              "val/images/*.JPEG and val/val_annotations.txt")
    with reading(folder / "wnids.txt", "Tiny ImageNet class list"):
        classes = sorted(line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip())
    label_of = {wnid: label for label, wnid in enumerate(classes)}
    train = [(path, label) for wnid, label in label_of.items() for path in _image_files(folder / "train" / wnid)]
    test = []
    with reading(folder / "val" / "val_annotations.txt", "Tiny ImageNet validation labels"):
        annotations = (folder / "val" / "val_annotations.txt").read_text().splitlines()
    for line in annotations:
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in label_of:
            test.append((folder / "val" / "images" / parts[0], label_of[parts[1]]))
    files = [folder / "wnids.txt", folder / "val" / "val_annotations.txt"] + [path for path, _ in train + test]
    arrays = cached_arrays("tiny-imagenet", files, lambda: _decode_splits(train, test))
    return image_dataset("tiny-imagenet", arrays, len(classes), augmentation="crop_flip")
