"""What no command may write onto: a run folder's own files, and the files a command reads.

A run folder is any folder holding a ``config.yaml`` beside gemminer's run files. Its own files
(ticket, initial weights, checkpoint, metrics, summary, ...) are rewritten only by the run itself,
and only when the user asks for it to be redone (``--force`` on that run); a user-named output file
(``export --out``, ``report --png``) that would land on one of them, or on one of the command's own
inputs, is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from gemminer.errors import GemminerError

# the files and folders a run writes for itself (`RunFolder.start` removes them when a run starts over)
RUN_FILES = ("summary.json", "metrics.csv", "metrics.jsonl", "checkpoint.pt", "ticket.safetensors",
             "gem.safetensors", "finetuned.safetensors", "start.safetensors", "scores.safetensors", "rounds.csv",
             "sanity.json")
RUN_DIRS = ("tickets", "sanity", "tensorboard")
OWN_FILES = frozenset({*RUN_FILES, "config.yaml", "init.safetensors", ".lock"})


def _absolute(path: Path) -> Path:
    """`path` with its folder resolved (symlinks followed) and its last part as given: an atomic write
    replaces that last part, so a symlink there is replaced, not written through."""
    try:
        return path.expanduser().parent.resolve() / path.name
    except (OSError, RuntimeError) as err:  # a symlink loop, a name too long
        raise GemminerError(f"cannot use {path}: {getattr(err, 'strerror', None) or err}") from err


def run_file_owner(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(run folder, the file's name in it) where `path` is one of a run folder's own files, else None."""
    target = _absolute(Path(path))
    parts: list[str] = []
    for folder in [target.parent, *target.parent.parents][:4]:  # a run's files lie at most 3 folders deep
        relative = "/".join([*reversed(parts), target.name])
        first = (parts[-1] if parts else target.name)
        if (folder / "config.yaml").is_file() and (first in RUN_DIRS or (not parts and target.name in OWN_FILES)):
            return folder, relative
        parts.append(folder.name)
    return None


def same_file(one: str | os.PathLike, other: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def check_output_file(path: str | os.PathLike, what: str, inputs: Iterable[str | os.PathLike] = (),
                      flag: str = "--out") -> Path:
    """`path` as a file to write `what` into, refusing a run folder's own file and this command's inputs
    (one line, before anything is written)."""
    target = Path(path)
    if not str(path).strip():
        raise GemminerError(f"the {what} path is empty; name a file with {flag}")
    for given in inputs:
        if same_file(target, given) or _absolute(target) == _absolute(Path(given)):
            raise GemminerError(f"refusing to write the {what} onto {target}: this command reads that file; "
                                f"name another file with {flag}")
    owner = run_file_owner(target)
    if owner is not None:
        folder, name = owner
        raise GemminerError(f"refusing to write the {what} onto {target}: it is the run's own {name} in {folder}; "
                            f"name another file with {flag}")
    try:
        is_dir = target.is_dir()
    except OSError as err:  # a name over NAME_MAX, a path over PATH_MAX
        raise GemminerError(f"cannot write the {what} {target}: {err.strerror}") from err
    if is_dir:
        raise GemminerError(f"the {what} path {target} is a folder; name a file with {flag}")
    return target


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (what a resume checks the files a run wrote against)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
