"""Pruned models as files: dense (pruned weights exactly 0) or sparse (CSR parts).

safetensors holds no sparse tensors, so the sparse form stores each masked weight as
three dense tensors, ``<name>.crow``, ``<name>.col`` and ``<name>.values`` (a convolution's
weight viewed as out_channels x (in_channels/groups * kernel)), and the weight's true
shape in the header. Every other tensor (biases, BatchNorm statistics) is stored as is.
`load_sparse` gives the dense state dict back; `sparse_linear` swaps a model's
nn.Linear layers for CSR matmuls. Convolutions stay dense: PyTorch has no sparse
convolution kernel on CPU, so their zeros are stored compactly but still multiplied.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gemminer.data import load_dataset
from gemminer.errors import GemminerError
from gemminer.experiment import load_run
from gemminer.models import build_model, default_model
from gemminer.runs import RunFolder
from gemminer.safety import check_output_file
from gemminer.ticket import Ticket, decode_header, read_safetensors, save_state

EXPORT_FORMATS = ("dense", "sparse", "compact", "mnn")  # compact: gemminer.compact; mnn: gemminer.mnn_export
EXPORT_SUFFIX = {"mnn": ".mnn"}  # the others are safetensors
EXPORT_WEIGHTS = ("finetuned", "init", "start")
SPARSE_FORMAT = "gemminer-sparse-csr-1"
CSR_PARTS = ("crow", "col", "values")


def masked_state(state: dict[str, Tensor], ticket: Ticket) -> dict[str, Tensor]:
    """`state` with every weight the ticket prunes set to exactly 0 (a new dict)."""
    missing = [name for name in ticket.masks if name not in state]
    if missing:
        raise GemminerError(f"the weights have no tensor {missing[0]!r} that the ticket masks")
    out = dict(state)
    for name, mask in ticket.masks.items():
        if tuple(state[name].shape) != tuple(mask.shape):
            raise GemminerError(f"{name} has shape {tuple(state[name].shape)}, the ticket's mask {tuple(mask.shape)}")
        out[name] = state[name].masked_fill(~mask.to(state[name].device), 0)
        tied = ticket.metadata.get("tied") or {}
        for alias in tied.get(name, []) if isinstance(tied, dict) else []:  # the copies of a tied weight
            if alias in out and tuple(out[alias].shape) == tuple(mask.shape):
                out[alias] = out[alias].masked_fill(~mask.to(out[alias].device), 0)
    return out


def to_csr_parts(weight: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """CSR parts of `weight` at the positions `mask` keeps (int32 indices, row-major)."""
    rows = mask.to("cpu").reshape(mask.shape[0], -1)
    crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int64)
    crow[1:] = rows.sum(1).cumsum(0)
    if crow[-1] >= 2**31:
        raise GemminerError("a layer with 2^31 or more remaining weights does not fit int32 CSR indices")
    col = rows.nonzero()[:, 1]
    values = weight.detach().to("cpu").reshape(rows.shape)[rows]
    return {"crow": crow.to(torch.int32), "col": col.to(torch.int32), "values": values.contiguous()}


def save_export(state: dict[str, Tensor], ticket: Ticket, path: str | os.PathLike, export_format: str = "dense",
                metadata: dict[str, Any] | None = None) -> Path:
    """Write `state` under `ticket` as dense or sparse safetensors; `metadata` (JSON values)
    goes into the header, e.g. the model spec `load_model` rebuilds from."""
    if export_format not in ("dense", "sparse"):
        raise GemminerError(f"unknown export format {export_format!r}; allowed: dense, sparse")
    state = {name: tensor.detach().to("cpu") for name, tensor in masked_state(state, ticket).items()}
    header = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    header["density"] = repr(ticket.density)
    if export_format == "sparse":
        shapes = {}
        for name, mask in ticket.masks.items():
            for part, tensor in to_csr_parts(state.pop(name), mask).items():
                state[f"{name}.{part}"] = tensor
            shapes[name] = list(mask.shape)
        header.update(format=SPARSE_FORMAT, sparse_shapes=json.dumps(shapes))
    else:
        header["format"] = "dense"
    save_state(state, path, metadata=header)
    return Path(path)


def read_export(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The dense state dict of an exported file (sparse or dense) and its header."""
    tensors, header = read_safetensors(path, what="exported model")
    metadata = decode_header(header)
    if metadata.get("format") == "dense":
        return tensors, metadata
    if metadata.get("format") != SPARSE_FORMAT:
        raise GemminerError(f"{path} is not a gemminer export (format {metadata.get('format')!r})")
    for name, shape in metadata["sparse_shapes"].items():
        try:
            crow, col, values = (tensors.pop(f"{name}.{part}") for part in CSR_PARTS)
        except KeyError as err:
            raise GemminerError(f"{path} lacks the CSR part {err.args[0]!r}") from None
        tensors[name] = csr_matrix(crow, col, values, (shape[0], math.prod(shape[1:]))).to_dense().view(shape)
    return tensors, metadata


def load_sparse(path: str | os.PathLike) -> dict[str, Tensor]:
    """The dense state dict stored in an export file (pruned entries are 0)."""
    return read_export(path)[0]


def csr_matrix(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor, its invariants checked (a corrupt file must not crash the process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        try:
            return torch.sparse_csr_tensor(crow.long(), col.long(), values, size, check_invariants=True)
        except RuntimeError as err:
            raise GemminerError(f"invalid CSR parts: {err}") from err


class SparseLinear(nn.Module):
    """nn.Linear with a CSR weight: the multiply skips the pruned weights.

    The CSR parts are buffers, so `.to()` and `state_dict` work; the CSR tensor over them
    is cached (rebuilt after `.to()` and the like) and left out of copies, since PyTorch
    cannot deep-copy a CSR tensor.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        dense = weight.detach()
        for part, tensor in to_csr_parts(dense, dense != 0).items():
            # int64 indices: the CPU kernel converts int32 ones on every call
            self.register_buffer(part, tensor.to(dense.device, torch.int64 if part != "values" else tensor.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = dense.shape
        self._csr: Tensor | None = None
        with warnings.catch_warnings():  # PyTorch warns "beta" once per process: take that warning here
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            _ = self.weight

    @property
    def weight(self) -> Tensor:
        if self._csr is None:  # no invariant check: to_csr_parts made the parts
            self._csr = torch.sparse_csr_tensor(self.crow, self.col, self.values,
                                                (self.out_features, self.in_features), check_invariants=False)
        return self._csr

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        self._csr = None  # .to(), .double(), ...: the buffers are replaced, rebuild the view
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_csr": None}

    def forward(self, inputs: Tensor) -> Tensor:
        # W @ x^T with x^T contiguous is the fast CSR x dense kernel (several times faster
        # than F.linear(x, W_csr) on CPU). The result is returned as a transposed view, so
        # the next SparseLinear's x^T is contiguous already and costs no copy.
        columns = inputs.reshape(-1, self.in_features).T.contiguous()
        if self.bias is None:
            out = torch.mm(self.weight, columns)
        else:
            out = torch.addmm(self.bias[:, None], self.weight, columns)
        return out.T.reshape(*inputs.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


def sparse_linear(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a SparseLinear holding its nonzero
    weights. For inference only (no gradients); convolutions are left dense."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            replacement = SparseLinear(module.weight, module.bias)
            if name:
                setattr(parent, name.rsplit(".", 1)[-1], replacement)
            else:
                return replacement
    return model


def load_model(path: str | os.PathLike, sparse: bool = True) -> nn.Module:
    """Rebuild the registered model an export was written for (its spec is in the header),
    in eval mode; with `sparse`, its Linear layers run as CSR matmuls."""
    state, metadata = read_export(path)
    spec = metadata.get("model_spec")
    if not isinstance(spec, dict):
        raise GemminerError(f"{path} names no registered model (no model_spec): load its state with load_sparse")
    model = load_model_state(state, spec, f"the weights in {path}")
    return sparse_linear(model) if sparse else model


def export_filename(weights: str, export_format: str) -> str:
    """The default file name of an export in its run folder."""
    return f"export-{weights}-{export_format}{EXPORT_SUFFIX.get(export_format, '.safetensors')}"


def load_model_state(state: dict[str, Tensor], spec: dict[str, Any], source: str = "the weights") -> nn.Module:
    """The registered model of `spec` holding `state` (`source` names them in an error), in eval mode."""
    model = build_model(spec["name"], tuple(spec["input_shape"]), spec["num_classes"],
                        affine_bn=spec.get("affine_bn", False), bias=spec.get("bias", False), width=spec.get("width"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise GemminerError(f"{source} do not fit model {spec['name']}: {str(err).splitlines()[0]}") from err
    return model.eval()


def model_spec(config: Any, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """What `load_model` needs to rebuild a registered model of a run config."""
    return {"name": config.model.name, "input_shape": list(input_shape), "num_classes": num_classes,
            "affine_bn": config.model.affine_bn, "bias": config.model.bias, "width": config.model.width}


def export_run(run_dir: str | os.PathLike, export_format: str = "dense", weights: str = "finetuned",
               out: str | os.PathLike | None = None) -> Path:
    """Export a run folder's fine-tuned (or initial) weights under its ticket; returns the file.

    Default file: ``<run>/export-<weights>-<format>.safetensors``.
    """
    if weights not in EXPORT_WEIGHTS:
        raise GemminerError(f"unknown weights {weights!r}; allowed: {', '.join(EXPORT_WEIGHTS)}")
    if export_format not in EXPORT_FORMATS:
        raise GemminerError(f"unknown export format {export_format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    if out is not None:  # before anything is read: never onto a run's own files
        check_output_file(out, "export")
    config, ticket, _, init = load_run(run_dir)
    folder = RunFolder(run_dir)
    if weights == "start" and not folder.file("start.safetensors").is_file():
        raise GemminerError(f"{run_dir} has no start weights (start.safetensors): its ticket trains from init")
    files = {"finetuned": ("finetuned.safetensors", "fine-tuned weights"),
             "start": ("start.safetensors", "start weights")}
    state = init if weights == "init" else read_safetensors(folder.file(files[weights][0]), what=files[weights][1])[0]
    if weights != "init":
        ticket.check_state(state, f"{files[weights][1]} file {folder.file(files[weights][0])}")
    dataset = load_dataset(config.data.name, config.data.dir, config.data.num_samples)  # for the input shape
    config.model.name = config.model.name or default_model(dataset.name)
    metadata = {"model_spec": model_spec(config, dataset.input_shape, dataset.num_classes), "weights": weights,
                "method": ticket.metadata.get("method", "unknown"), "seed": config.seed}
    out = Path(out) if out else folder.file(export_filename(weights, export_format))
    if export_format == "compact":
        from gemminer.compact import export_compact

        model = load_model_state(masked_state(state, ticket), metadata["model_spec"])
        return export_compact(model, ticket, metadata, out)
    if export_format == "mnn":
        from gemminer.mnn_export import export_mnn

        model = load_model_state(masked_state(state, ticket), metadata["model_spec"])
        return export_mnn(model, dataset.input_shape, out, sparse=True, metadata=metadata)
    return save_export(state, ticket, out, export_format, metadata)
