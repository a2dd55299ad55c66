"""Checkpoints: the complete state of a run, written atomically with a checksum.

File format: one header line ``GEMMINER-CHECKPOINT 1 <sha256 of the rest>`` followed by
a `torch.save` payload of tensors and plain containers only, read back with
``torch.load(weights_only=True)`` — loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import pickle
import random
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemminer.errors import GemminerError, reading

MAGIC = b"GEMMINER-CHECKPOINT 1 "
CHECKPOINT_KEYS = frozenset({"pipeline", "rng", "loop", "objects"})  # what Checkpointer.save writes
FOREIGN = "it is not a checkpoint this gemminer wrote; delete it, or pass --force to start the run over"


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run should exit."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def write_bytes_atomic(path: Path, payload: bytes, what: str) -> None:
    """Write to a temporary file and rename; on failure the previous file is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # the temporary file may be as unwritable as the target
            tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        kept = f"; the previous {what} {path} is intact" if path.exists() else ""
        raise GemminerError(f"cannot write {what} {path}: {reason}{kept}") from err


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    write_bytes_atomic(Path(path), header + payload, "checkpoint")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint; a corrupt or truncated file is a clear error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise GemminerError(f"cannot read checkpoint {path}: {err.strerror}") from err
    newline = raw.find(b"\n")
    if not raw.startswith(MAGIC[:len(raw)]) or (raw.startswith(MAGIC) is False and len(raw) >= len(MAGIC)):
        raise GemminerError(f"{path} is not a gemminer checkpoint")
    if newline < 0:
        raise GemminerError(f"checkpoint {path} is corrupt or truncated (incomplete header)")
    expected, payload = raw[len(MAGIC):newline].decode(errors="replace"), raw[newline + 1:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise GemminerError(f"checkpoint {path} is corrupt or truncated (checksum mismatch); "
                            "delete it to restart the run, or use --force")
    with reading(path, "checkpoint", FOREIGN), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings about a foreign file: the one line below says it
        try:
            state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError:  # weights_only refused an object: torch's text would advise loading unsafely
            raise GemminerError(f"cannot read checkpoint {path}: it holds objects other than tensors and plain "
                                f"containers, which gemminer never loads; {FOREIGN}") from None
    if not isinstance(state, dict):
        raise GemminerError(f"cannot read checkpoint {path}: not the expected structure; {FOREIGN}")
    return state


# what `Checkpointer.save` and the pipeline put in a checkpoint, by key: the type each value must have
LOOP_TYPES = {"phase": str, "epoch": int, "partial": (dict, type(None)), "history": list, "elapsed": (int, float)}
PIPELINE_TYPES = {"rows": list, "search": dict, "method_state": dict, "files": dict}
SEARCH_TYPES = {"epochs": (int, float), "seconds": (int, float)}  # IMP's epochs are fractional after epoch:x.y
PARTIAL_TYPES = {"steps": int, "loss_sum": torch.Tensor, "correct": torch.Tensor, "samples": int}


def structure_problem(state: dict[str, Any]) -> str | None:
    """Where a checkpoint's content is not what `Checkpointer.save` writes (None: it is). A file with a
    valid checksum can still be forged or come from elsewhere; this is checked before anything reads it."""
    if not CHECKPOINT_KEYS <= state.keys():
        return f"missing {', '.join(sorted(CHECKPOINT_KEYS - state.keys()))}"
    pipeline, loop, objects, rng = state["pipeline"], state["loop"], state["objects"], state["rng"]
    if not isinstance(pipeline, dict) or not isinstance(objects, dict) or not isinstance(rng, dict):
        return "pipeline, objects and rng must be mappings"
    if not {"python", "numpy", "torch"} <= rng.keys():
        return "rng lacks a generator state"
    if loop is not None:
        if not isinstance(loop, dict) or not all(isinstance(loop.get(key), kind) for key, kind in LOOP_TYPES.items()):
            return "loop is not a training loop's state"
        if not all(isinstance(row, dict) for row in loop["history"]):
            return "loop.history holds something other than metric rows"
        partial = loop["partial"]
        if partial is not None and not all(isinstance(partial.get(key), kind) for key, kind in PARTIAL_TYPES.items()):
            return "loop.partial is not a part-done epoch's sums"
    for key, kind in PIPELINE_TYPES.items():
        if key in pipeline and not isinstance(pipeline[key], kind):
            return f"pipeline.{key} is a {type(pipeline[key]).__name__}"
    if not all(isinstance(row, dict) for row in pipeline.get("rows", [])):
        return "pipeline.rows holds something other than metric rows"
    search = pipeline.get("search")
    if search is not None and not all(isinstance(search.get(key), kind) for key, kind in SEARCH_TYPES.items()):
        return "pipeline.search lacks its epochs or seconds"
    return None


def load_run_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint (what `Checkpointer.save` writes), refusing any other structure in one line."""
    state = load_checkpoint(path)
    problem = structure_problem(state)
    if problem is not None:
        raise GemminerError(f"cannot read checkpoint {path}: not the expected structure ({problem}); {FOREIGN}")
    return state


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's global generator states, as weights_only-safe values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                     has_gauss, cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after each step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name


class Checkpointer:
    """Saves and restores a run's state at epoch ends, freezing events and on a stop request.

    The pipeline owns one per run; training loops hand it their stateful objects
    (anything with state_dict / load_state_dict) under a phase name.
    """

    def __init__(self, path: Path, every_epochs: int = 1, stop: StopFlag | None = None,
                 is_writer: bool = True, barrier: Callable[[], None] | None = None) -> None:
        self.path, self.every_epochs, self.stop = path, every_epochs, stop
        self.is_writer, self.barrier = is_writer, barrier
        self.state: dict[str, Any] = load_run_checkpoint(path) if path.is_file() else {}
        self.pipeline: dict[str, Any] = self.state.get("pipeline", {})

    def phase_state(self, phase: str) -> dict[str, Any] | None:
        """The saved loop state of `phase`, if the run stopped inside it."""
        loop = self.state.get("loop")
        return loop if loop and loop["phase"] == phase else None

    def save(self, loop: dict[str, Any] | None, objects: dict[str, Any] | None = None) -> None:
        state = {"pipeline": self.pipeline, "rng": rng_state(), "loop": loop,
                 "objects": {name: obj.state_dict() for name, obj in (objects or {}).items()}}
        self.state = state
        if self.is_writer:
            save_checkpoint(self.path, state)
        if self.barrier is not None:
            self.barrier()

    def restore_objects(self, objects: dict[str, Any]) -> None:
        """Each object's saved state, then the generators'; a saved state that does not fit (a forged or
        foreign file with a valid checksum) is one clear error, not a traceback."""
        saved = self.state["objects"]
        try:
            for name, obj in objects.items():
                if name not in saved:
                    raise KeyError(f"no saved state of {name}")
                obj.load_state_dict(saved[name])
            set_rng_state(self.state["rng"])
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in newer releases
            raise  # not the file's doing
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            detail = str(err).splitlines()[0] if str(err) else ""
            raise GemminerError(f"cannot resume from checkpoint {self.path}: a saved state does not fit this run "
                                f"({type(err).__name__}: {detail}); if the machine or the number of processes "
                                "changed, resume where it was written; otherwise delete it, or pass --force to "
                                "start the run over") from err

    def stop_requested(self) -> str | None:
        return self.stop.signal_name if self.stop is not None else None
