"""Run folders: resolved config, metrics CSV, safetensors artifacts, checkpoint, and summary.json last."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from gemminer.checkpoint import write_bytes_atomic
from gemminer.config import RunConfig, dump_yaml, flatten, load_yaml, resolve, to_dict
from gemminer.errors import GemminerError
from gemminer.ticket import Ticket, save_state

METRIC_COLUMNS = ["phase", "epoch", "lr", "train_loss", "reg_loss", "train_acc", "test_acc", "density",
                  "density_gem", "freeze_event", "seconds"]


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    write_bytes_atomic(path, text.encode(), "file")


def _format_row(row: dict[str, Any]) -> dict[str, Any]:
    return {key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()}


class RunFolder:
    """One run's folder. `summary.json` is written last: its presence means finished.

    Only the writer (rank 0 under torchrun) touches the disk; other ranks' calls are no-ops.
    """

    def __init__(self, path: str | os.PathLike, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.file("summary.json").is_file()

    def start(self, config: RunConfig, force: bool = False) -> None:
        """Create the folder (refusing a finished run unless `force`) and write the config."""
        if self.finished and not force:
            raise GemminerError(f"{self.path} holds a finished run; pass --force to overwrite it")
        if not self.writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GemminerError(f"cannot create run folder {self.path}: {err.strerror}") from err
        for stale in ("summary.json", "metrics.csv", "checkpoint.pt"):  # never look finished while rerunning
            self.file(stale).unlink(missing_ok=True)
        write_atomic(self.file("config.yaml"), dump_yaml(config))

    def check_same_config(self, config: RunConfig) -> None:
        """Refuse to resume under another config, naming the keys that differ."""
        saved = flatten(to_dict(resolve(load_yaml(str(self.file("config.yaml"))))))
        now = flatten(to_dict(config))
        differing = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
        if differing:
            details = ", ".join(f"{key} ({saved.get(key)!r} -> {now.get(key)!r})" for key in differing[:6])
            raise GemminerError(f"{self.path} holds an unfinished run with another config: {details}; "
                                "pass --force to start it over")

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row to metrics.csv."""
        if not self.writer:
            return
        path = self.file("metrics.csv")
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, METRIC_COLUMNS, extrasaction="ignore", restval="")
            if new:
                writer.writeheader()
            writer.writerow(_format_row(row))

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.csv by `rows` (on resume: rows after the checkpoint are cut)."""
        if not self.writer:
            return
        self.file("metrics.csv").unlink(missing_ok=True)
        for row in rows:
            self.log(row)

    def write_state(self, state: dict[str, Tensor], name: str) -> None:
        if self.writer:
            save_state(state, self.file(name))

    def write_ticket(self, ticket: Ticket, name: str) -> None:
        if self.writer:
            ticket.save(self.file(name))

    def finish(self, summary: dict[str, Any]) -> None:
        if self.writer:
            write_atomic(self.file("summary.json"), json.dumps(summary, indent=2) + "\n")

    def summary(self) -> dict[str, Any]:
        if not self.finished:
            raise GemminerError(f"{self.path} holds no finished run (no summary.json)")
        return json.loads(self.file("summary.json").read_text())
