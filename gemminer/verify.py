"""`gemminer export --verify`: run an exported model beside the masked model it came from.

The reference is the run's registered model holding the exported weights (the ones the export header
names) with the ticket applied; both run in eval mode on the first test samples of the run's data.
The check passes when the largest output difference, relative to the largest reference output, is at
most the tolerance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gemminer.errors import GemminerError, reading


@dataclass
class Verification:
    """Largest absolute and relative output difference, and the channels kept per prunable layer
    (kept in, in, kept out, out) where the export says."""

    max_abs: float
    max_relative: float
    tolerance: float
    samples: int
    channels: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_relative <= self.tolerance

    def lines(self) -> list[str]:
        out = [f"verify: {self.samples} test samples, largest output difference {self.max_abs:.3g} "
               f"({self.max_relative:.3g} of the largest output; tolerance {self.tolerance:g}): "
               + ("ok" if self.ok else "FAILED")]
        for name, (kept_in, full_in, kept_out, full_out) in self.channels.items():
            out.append(f"  {name}: in {kept_in}/{full_in}, out {kept_out}/{full_out}")
        return out


def compare_outputs(reference: nn.Module, exported: Any, inputs: Tensor, tolerance: float) -> Verification:
    """Both models on `inputs` (eval mode, no gradients)."""
    with torch.no_grad():
        expected, got = reference.eval()(inputs), exported.eval()(inputs)
    if expected.shape != got.shape:
        raise GemminerError(f"the exported model's output has shape {tuple(got.shape)}, the ticket's "
                            f"{tuple(expected.shape)}")
    difference = float((expected - got).abs().max())
    scale = max(float(expected.abs().max()), torch.finfo(expected.dtype).tiny)
    return Verification(difference, difference / scale, tolerance, len(inputs))


def verify_export(run_dir: str | os.PathLike, path: str | os.PathLike, tolerance: float = 1e-4,
                  samples: int = 256) -> Verification:
    """Verify the export file `path` of the run folder `run_dir` (any export format)."""
    from gemminer.data import load_dataset
    from gemminer.experiment import load_run
    from gemminer.export import load_model_state, masked_state
    from gemminer.runs import RunFolder
    from gemminer.ticket import read_safetensors

    if tolerance < 0 or samples < 1:
        raise GemminerError("verify needs a tolerance >= 0 and at least one sample")
    metadata = export_metadata(path)
    spec, weights = metadata.get("model_spec"), metadata.get("weights", "finetuned")
    if not isinstance(spec, dict):
        raise GemminerError(f"{path} names no model (no model_spec): it cannot be verified")
    config, ticket, _, init = load_run(run_dir)
    files = {"finetuned": "finetuned.safetensors", "start": "start.safetensors"}
    state = init if weights == "init" else read_safetensors(RunFolder(run_dir).file(files[weights]),
                                                           what=f"{weights} weights")[0]
    reference = load_model_state(masked_state(state, ticket), spec)
    exported = load_exported(path, metadata.get("format"))
    dataset = load_dataset(config.data.name, config.data.dir, config.data.num_samples)
    inputs = dataset.test.x[:samples]
    transform = dataset.transform()
    inputs = transform(inputs) if transform is not None else inputs.float()
    result = compare_outputs(reference, exported, inputs, tolerance)
    layers = metadata.get("layers")
    result.channels = dict(layers) if isinstance(layers, dict) else {}
    return result


def export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """An export's metadata: its safetensors header, or an MNN file's ``<file>.json``."""
    from gemminer.ticket import decode_header, read_safetensors

    if Path(path).suffix == ".mnn":
        sidecar = Path(f"{path}.json")
        if not sidecar.is_file():
            raise GemminerError(f"{path} has no {sidecar.name} beside it (written by gemminer export --format mnn)")
        with reading(sidecar, "export metadata"):
            return json.loads(sidecar.read_text())
    _, header = read_safetensors(path, what="exported model")
    return decode_header(header, keep_strings=("plan",))


def load_exported(path: str | os.PathLike, export_format: object) -> Any:
    """The runnable model of an export file, by its format."""
    from gemminer.compact import COMPACT_FORMAT, load_compact
    from gemminer.export import load_model

    if export_format == COMPACT_FORMAT:
        return load_compact(path)
    if export_format == "mnn":
        from gemminer.mnn_export import MNNModel

        return MNNModel(path)
    return load_model(Path(path), sparse=True)
