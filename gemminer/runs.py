"""Run folders: resolved config, metrics CSV, safetensors artifacts, and summary.json last."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from gemminer.config import RunConfig, dump_yaml
from gemminer.errors import GemminerError

METRIC_COLUMNS = ["phase", "epoch", "lr", "train_loss", "reg_loss", "train_acc", "test_acc", "density",
                  "density_gem", "freeze_event", "seconds"]


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunFolder:
    """One run's folder. `summary.json` is written last: its presence means finished.

    Metrics go to metrics.csv and metrics.jsonl (every key of every row), and to
    TensorBoard event files under ``tensorboard/`` when the config asks for them.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tensorboard: Any = None  # a SummaryWriter while a run with `tensorboard: true` is open

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.file("summary.json").is_file()

    def start(self, config: RunConfig, force: bool = False) -> None:
        """Create the folder (refusing a finished run unless `force`) and write the config."""
        if self.finished and not force:
            raise GemminerError(f"{self.path} holds a finished run; pass --force to overwrite it")
        if getattr(config, "tensorboard", False):  # before anything is written: a missing package is bad input
            self.tensorboard = tensorboard_writer(self.file("tensorboard"))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GemminerError(f"cannot create run folder {self.path}: {err.strerror}") from err
        self.file("summary.json").unlink(missing_ok=True)  # never look finished while rerunning
        self.file("metrics.csv").unlink(missing_ok=True)
        self.file("metrics.jsonl").unlink(missing_ok=True)
        write_atomic(self.file("config.yaml"), dump_yaml(config))

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row to metrics.csv and metrics.jsonl (and TensorBoard)."""
        with open(self.file("metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tensorboard.add_scalar(f"{row.get('phase', 'run')}/{key}", value, row.get("epoch", 0))
        path = self.file("metrics.csv")
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, METRIC_COLUMNS, extrasaction="ignore", restval="")
            if new:
                writer.writeheader()
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                             for key, value in row.items()})

    def finish(self, summary: dict[str, Any]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        write_atomic(self.file("summary.json"), json.dumps(summary, indent=2) + "\n")

    def summary(self) -> dict[str, Any]:
        if not self.finished:
            raise GemminerError(f"{self.path} holds no finished run (no summary.json)")
        return json.loads(self.file("summary.json").read_text())


def tensorboard_writer(log_dir: Path) -> Any:
    """A TensorBoard SummaryWriter, or one clear error when tensorboard is not installed
    (it is optional: metrics always go to CSV and JSONL)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GemminerError("--tensorboard needs the tensorboard package (pip install tensorboard); "
                            "metrics.csv and metrics.jsonl are written without it") from None
    return SummaryWriter(log_dir=str(log_dir))
