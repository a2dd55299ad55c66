"""Tickets: one 0/1 mask per prunable weight, saved as safetensors with metadata."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from gemminer.checkpoint import write_bytes_atomic
from gemminer.errors import GemminerError, reading
from gemminer.init import init_hash
from gemminer.masking import attach_fixed_masks, original_weight, owner, prunable_layers

FORMAT_VERSION = "1"


class InitHashMismatch(UserWarning):
    """The ticket was found on other initial weights than the ones it is applied to."""


@dataclass
class LayerDensity:
    name: str
    shape: tuple[int, ...]
    parameters: int
    remaining: int

    @property
    def density(self) -> float:
        return self.remaining / self.parameters


@dataclass
class Ticket:
    """A binary mask per prunable weight name, plus where it came from.

    `metadata` holds strings and numbers (method, density_target, seed, model,
    init_hash, ...); it is written into the safetensors header.
    """

    masks: dict[str, Tensor]
    metadata: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.masks:
            raise GemminerError("a ticket needs at least one mask")
        checked = {}
        for name, mask in self.masks.items():
            if mask.dtype != torch.bool:
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise GemminerError(f"mask {name} is not binary")
                mask = mask != 0
            checked[name] = mask.detach().to("cpu")
        self.masks = checked

    # ---- numbers -------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(mask.numel() for mask in self.masks.values())

    @property
    def remaining(self) -> int:
        return sum(int(mask.sum()) for mask in self.masks.values())

    @property
    def density(self) -> float:
        """Fraction of prunable weights that remain (sparsity = 1 - density)."""
        return self.remaining / self.total

    def same_masks(self, other: Ticket) -> bool:
        return self.masks.keys() == other.masks.keys() and all(
            torch.equal(mask, other.masks[name]) for name, mask in self.masks.items())

    def layers(self) -> list[LayerDensity]:
        return [
            LayerDensity(name, tuple(mask.shape), mask.numel(), int(mask.sum())) for name, mask in self.masks.items()
        ]

    def layer_report(self, macs: dict[str, int] | None = None) -> str:
        """A per-layer table: name, shape, parameters, remaining, density; with `macs`
        (dense multiply-accumulates per weight name, `gemminer.report.layer_macs`) also
        the MACs that remain (dense MACs x layer density)."""
        header = ["layer", "shape", "params", "remaining", "density"] + (["MACs", "MACs remaining"] if macs else [])
        rows, macs_total, macs_left = [header], 0, 0
        for layer in self.layers():
            row = [layer.name, "x".join(map(str, layer.shape)), str(layer.parameters), str(layer.remaining),
                   f"{layer.density:.4f}"]
            if macs:
                left = macs[layer.name] * layer.remaining // layer.parameters  # exact: MACs = params x positions
                macs_total, macs_left = macs_total + macs[layer.name], macs_left + left
                row += [str(macs[layer.name]), str(left)]
            rows.append(row)
        rows.append(["total", "", str(self.total), str(self.remaining), f"{self.density:.4f}"]
                    + ([str(macs_total), str(macs_left)] if macs else []))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                           for column, (cell, width) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]
        if any(layer.remaining == 0 for layer in self.layers()):
            lines.append("warning: layer collapse: at least one layer has no weight left")
        return "\n".join(lines)

    # ---- model ---------------------------------------------------------------------
    def check(self, model: nn.Module, strict_init: bool = False) -> None:
        """Raise if names or shapes do not match `model`; warn (or raise) on another init."""
        prunable = {f"{name}.weight" if name else "weight" for name, _ in prunable_layers(model)}
        for name, mask in self.masks.items():
            if name not in prunable:  # e.g. a name that lands on a BatchNorm layer of another model
                raise GemminerError(f"ticket does not fit the model: it has no prunable weight {name!r} (a ticket "
                                    f"of another model?)")
            weight = original_weight(owner(model, name))
            if tuple(weight.shape) != tuple(mask.shape):
                raise GemminerError(
                    f"ticket does not fit the model: {name} has shape {tuple(weight.shape)}, "
                    f"the ticket's mask {tuple(mask.shape)}"
                )
        expected = self.metadata.get("init_hash")
        # a ticket trained from other start weights (IMP's rewind point) fits those too
        if expected and init_hash(model) not in (expected, self.metadata.get("start_hash")):
            message = "the model's weights are not the initial weights this ticket was found on"
            if strict_init:
                raise GemminerError(message)
            warnings.warn(message, InitHashMismatch, stacklevel=2)

    def check_state(self, state: dict[str, Tensor], source: str) -> None:
        """Raise unless the weights `state` (read from `source`) hold every masked tensor in its shape."""
        for name, mask in self.masks.items():
            if name not in state or tuple(state[name].shape) != tuple(mask.shape):
                found = "missing" if name not in state else f"of shape {tuple(state[name].shape)}"
                raise GemminerError(f"{source} does not fit the ticket: its {name!r} is {found}, the mask "
                                    f"{tuple(mask.shape)}; the file is damaged or belongs to another run")

    def apply(self, model: nn.Module, strict_init: bool = False) -> nn.Module:
        """Mask `model` in place (parametrize); `gemminer.masking.remove_masks` undoes it."""
        self.check(model, strict_init)
        attach_fixed_masks(model, self.masks)
        return model

    # ---- files ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: masks as bool tensors, metadata as header strings."""
        header = {"format_version": FORMAT_VERSION, "density_actual": repr(self.density),
                  "names": json.dumps(list(self.masks)),  # safetensors sorts tensors; keep layer order
                  "masks_sha256": masks_digest(self.masks)}
        header.update({key: value if isinstance(value, str) else json.dumps(value)
                       for key, value in self.metadata.items() if key not in header})
        payload = safetensors_bytes({name: mask.contiguous() for name, mask in self.masks.items()}, header)
        write_bytes_atomic(Path(path), payload, "ticket")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ticket:
        masks, header = read_safetensors(path, what="ticket")
        if header.get("format_version") != FORMAT_VERSION:
            raise GemminerError(f"{path} is not a gemminer ticket (format_version {header.get('format_version')!r})")
        # these are always strings, even when they look like numbers
        metadata = decode_header(header, keep_strings=("init_hash", "start_hash", "model", "method", "data",
                                                       "format_version", "mask", "rewind", "start_point"))
        expected = metadata.pop("masks_sha256", None)
        if expected is not None and expected != masks_digest(masks):
            raise GemminerError(f"ticket file {path} is corrupt (checksum mismatch)")
        names = metadata.pop("names", None)
        if isinstance(names, list) and sorted(names) == sorted(masks):
            masks = {name: masks[name] for name in names}
        return cls(masks, metadata)


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header of a safetensors file, with one clear error if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise GemminerError(f"{what} file not found: {path}")
    with reading(path, f"{what} file"):
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    if "weights" in what and "format_version" in header and "density_actual" in header:  # a ticket's header
        raise GemminerError(f"{path} is a ticket (masks), not {what}: give a weights file (such as the "
                            "init.safetensors of its run folder)")
    return tensors, header


def decode_header(header: dict[str, str], keep_strings: tuple[str, ...] = ()) -> dict[str, Any]:
    """A safetensors header's values parsed as JSON where they are JSON, else kept as strings."""
    metadata: dict[str, Any] = {}
    for key, value in header.items():
        try:
            metadata[key] = value if key in keep_strings else json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return metadata


def save_state(state: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically."""
    tensors, seen = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()  # tied weights: safetensors holds no shared storage, so each use gets a copy
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    payload = safetensors_bytes(tensors, metadata)
    write_bytes_atomic(Path(path), payload, "file")


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file whose bytes depend only on its contents, so that `sha256sum` identifies
    equal tickets and weights: the writer keeps the metadata in a map whose order changes per process,
    so the JSON header is written again with sorted keys (the tensor data and offsets stay as they are)."""
    payload = save(tensors, metadata=metadata)
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8:8 + length])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    canonical += b" " * (-len(canonical) % 8)  # the data stays 8-byte aligned, as the writer leaves it
    return len(canonical).to_bytes(8, "little") + canonical + payload[8 + length:]


def masks_digest(masks: dict[str, Tensor]) -> str:
    """sha256 over mask names and bits, in sorted name order (stored in the ticket header)."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].to("cpu", torch.bool).contiguous()
        digest.update(f"{name}|{tuple(mask.shape)}|".encode())
        digest.update(mask.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
