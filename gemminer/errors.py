"""The one exception type that means "the user asked for something invalid", and the guard that
turns any failure to read a file into it."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager


class GemminerError(Exception):
    """Bad input: the CLI prints the message as one line and exits with code 2."""


@contextmanager
def reading(path: str | os.PathLike, what: str, remedy: str = "") -> Iterator[None]:
    """Whatever goes wrong while reading and parsing `path` (a damaged, empty, binary, truncated or
    foreign file) becomes one GemminerError line that names the file and the way out: every file the
    toolkit reads passes through here, so none ends in a traceback or is half-read silently.
    ``GEMMINER_DEBUG=1`` lets the original exception through."""
    try:
        yield
    except GemminerError:
        raise
    except Exception as err:  # a parser's failure modes are open-ended; all mean "unreadable"
        if os.environ.get("GEMMINER_DEBUG"):  # a developer wants the parser's own traceback
            raise
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise GemminerError(f"cannot read {what} {path}: {reason}" + (f"; {remedy}" if remedy else "")) from err


def os_error_line(err: OSError) -> str:
    """An OSError as one line naming the path and the reason (a full disk, a name over NAME_MAX, ...)."""
    path = err.filename if err.filename is not None else "a file"
    reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err) or type(err).__name__)
    return f"cannot use {path}: {reason}"
