"""`--download`: fetch an official archive, check its published checksum, unpack it.

Only used when asked for; tests never call it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gemminer.errors import GemminerError


@dataclass(frozen=True)
class Archive:
    """One published file: where it is, its md5 (as published), and whether to unpack it."""

    url: str
    md5: str
    unpack: bool = False

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def fetch(archive: Archive, folder: Path, timeout: float = 60.0) -> Path:
    """Download `archive` into `folder` (kept if already there with the right checksum),
    verify its md5, and unpack tar/zip archives into `folder`. Returns the file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / archive.filename
    if not (target.is_file() and md5_of(target) == archive.md5):
        tmp = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(archive.url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            tmp.unlink(missing_ok=True)
            reason = getattr(err, "reason", None) or err
            raise GemminerError(f"cannot download {archive.url} ({reason}); without network, fetch it by hand "
                                f"into {folder}") from None
        digest = md5_of(tmp)
        if digest != archive.md5:
            tmp.unlink(missing_ok=True)
            raise GemminerError(f"{archive.url}: md5 {digest} differs from the published {archive.md5}; "
                                "the download is corrupt, try again")
        os.replace(tmp, target)
    if archive.unpack:
        unpack(target, folder)
    return target


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack(path: Path, folder: Path) -> None:
    """Unpack a tar or zip archive; members that would land outside `folder` are refused."""
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as archive:
            archive.extractall(folder, filter="data")
    elif path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            root = folder.resolve()
            for member in archive.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise GemminerError(f"{path}: member {member!r} points outside {folder}")
            archive.extractall(folder)
    else:
        raise GemminerError(f"do not know how to unpack {path}")
