"""A ticket for MNN's CPU runtime (the ``mnn`` extra): PyTorch -> ONNX -> MNN, and a runner.

MNN (Apache-2.0) runs convolutions whose weights are mostly zero with sparse kernels on x86
(AVX2/AVX-512) and ARM when its converter is asked to detect sparse weights. The converter is called
in-process through MNN's extension module ``_tools``, never through the ``mnnconvert`` console script or
``MNN.tools``, whose Python wrapper sends usage logs to a remote endpoint and pip-installs a package at
run time: nothing here touches the network or installs anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gemminer.errors import GemminerError

EXTRA = "pip install 'gemminer[mnn]' (mnn, onnx, onnxscript)"


@contextlib.contextmanager
def quiet_stdout() -> Iterator[Path]:
    """Send the process's stdout (C++ prints included) to a file for the duration; yields the file."""
    sys.stdout.flush()
    with tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False) as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            yield Path(log.name)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    path.unlink(missing_ok=True)
    return lines[-1][:200] if lines else "no output"


def mnn_module() -> Any:
    """The MNN runtime module, or one clear error without the extra."""
    try:
        with quiet_stdout() as log:
            import MNN  # prints the CPU's features on import
        log.unlink(missing_ok=True)
    except ImportError:
        raise GemminerError(f"the MNN runtime is not installed: {EXTRA}") from None
    return MNN


def to_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike) -> Path:
    """Export `model` (eval mode) to ONNX with a dynamic batch dimension: input "input", output "output".

    The TorchScript exporter goes first (about a second for ResNet-20); where it fails, the
    torch.export-based one (which needs onnxscript, and takes tens of seconds)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise GemminerError(f"ONNX export needs onnx: {EXTRA}") from None
    example = torch.zeros((2, *input_shape))
    names = {"input_names": ["input"], "output_names": ["output"]}
    with warnings.catch_warnings(), quiet_stdout() as log:
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, **names,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception:  # the deprecated exporter has many ways to fail: the maintained one decides
            torch.onnx.export(model.eval(), (example,), str(path), dynamo=True, **names,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=True, external_data=False)
    log.unlink(missing_ok=True)
    return Path(path)


def onnx_to_mnn(onnx_path: str | os.PathLike, path: str | os.PathLike, sparse: bool = True) -> Path:
    """Convert with MNN's converter library; `sparse` asks it to store sparse weights where its sparse
    kernels are faster (``--detectSparseSpeedUp``)."""
    try:
        with quiet_stdout() as log:
            import _tools  # MNN's converter, from the mnn package
        log.unlink(missing_ok=True)
    except ImportError:
        raise GemminerError(f"the MNN converter is not installed: {EXTRA}") from None
    path = Path(path)
    path.unlink(missing_ok=True)
    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(path), "--bizCode",
            "gemminer"] + (["--detectSparseSpeedUp"] if sparse else [])
    with quiet_stdout() as log:
        _tools.mnnconvert(argv)
    reason = _last_line(log)
    if not path.is_file():
        raise GemminerError(f"MNN could not convert {onnx_path}: {reason}")
    return path


def export_mnn(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, sparse: bool = True,
               metadata: dict[str, Any] | None = None) -> Path:
    """`model` as an MNN file at `path`, with `metadata` (JSON) beside it in ``<path>.json``."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as folder:
        onnx_to_mnn(to_onnx(model, input_shape, Path(folder) / "model.onnx"), path, sparse)
    Path(f"{path}.json").write_text(json.dumps({**(metadata or {}), "format": "mnn", "sparse": sparse}, indent=1))
    return path


class MNNModel:
    """An MNN file run by MNN's CPU backend on `threads` threads, called like a module on float tensors."""

    def __init__(self, path: str | os.PathLike, threads: int = 1, precision: str = "high") -> None:
        self.mnn = mnn_module()
        if not Path(path).is_file():
            raise GemminerError(f"MNN file not found: {path}")
        with quiet_stdout() as log:
            self.interpreter = self.mnn.Interpreter(str(path))
            self.session = self.interpreter.createSession({"backend": "CPU", "numThread": threads,
                                                           "precision": precision})
        log.unlink(missing_ok=True)
        self.input = self.interpreter.getSessionInput(self.session)
        self.shape: tuple[int, ...] | None = None

    def __call__(self, inputs: Tensor) -> Tensor:
        mnn = self.mnn
        shape = tuple(inputs.shape)
        if shape != self.shape:
            self.interpreter.resizeTensor(self.input, shape)
            self.interpreter.resizeSession(self.session)
            self.shape = shape
        array = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        self.input.copyFrom(mnn.Tensor(shape, mnn.Halide_Type_Float, array, mnn.Tensor_DimensionType_Caffe))
        self.interpreter.runSession(self.session)
        output = self.interpreter.getSessionOutput(self.session)
        out_shape = tuple(output.getShape())
        host = mnn.Tensor(out_shape, mnn.Halide_Type_Float, np.zeros(out_shape, np.float32),
                          mnn.Tensor_DimensionType_Caffe)
        output.copyToHostTensor(host)
        return torch.from_numpy(np.array(host.getNumpyData(), dtype=np.float32).reshape(out_shape))

    def eval(self) -> MNNModel:  # so that it stands in for a module in verify and benchmarks
        return self
