"""`gemminer export --format mnn`: ONNX -> MNN in-process, run by MNN's CPU backend, float32 within 1e-4."""

import importlib.util
import sys

import pytest
import torch

from gemminer.cli import main
from gemminer.masking import attach_fixed_masks
from gemminer.models import build_model
from tests.test_cli import flags
from tests.test_compact import random_masks

needs_mnn = pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ("MNN", "_tools", "onnx")),
                               reason="needs the mnn extra (pip install 'gemminer[mnn]')")


def test_without_the_extra_the_error_is_one_line(tmp_path, monkeypatch):
    from gemminer.errors import GemminerError
    from gemminer.mnn_export import MNNModel, onnx_to_mnn

    monkeypatch.setitem(sys.modules, "_tools", None)  # import fails as where mnn is not installed
    monkeypatch.setitem(sys.modules, "MNN", None)
    with pytest.raises(GemminerError, match="gemminer\\[mnn\\]"):
        onnx_to_mnn(tmp_path / "m.onnx", tmp_path / "m.mnn")
    with pytest.raises(GemminerError, match="gemminer\\[mnn\\]"):
        MNNModel(tmp_path / "m.mnn")


@needs_mnn

@pytest.mark.parametrize("name,shape,width,density", [("resnet20", (3, 16, 16), 8, 0.05),
                                                        ("vgg16", (3, 32, 32), 16, 0.5)])
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_cifar_models_run_in_mnn_within_tolerance(tmp_path, sparse, name, shape, width, density):
    from gemminer.mnn_export import MNNModel, export_mnn

    torch.manual_seed(0)
    model = build_model(name, shape, 10, width=width)
    masks = random_masks(model, density)
    attach_fixed_masks(model, masks)
    with torch.no_grad():  # BatchNorm statistics of the masked network, so its outputs are of order one
        for _ in range(3):
            model(torch.randn(32, *shape))
    model.eval()
    path = export_mnn(model, shape, tmp_path / "r.mnn", sparse=sparse)
    inputs = torch.randn(5, *shape)
    with torch.no_grad():
        expected = model(inputs)
    got = MNNModel(path)(inputs)
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert "MNN.tools" not in sys.modules  # the wrapper that logs over the network and pip-installs


@needs_mnn
def test_export_mnn_and_verify(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["mine", "--out", str(run), *flags(data_dir)]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--format", "mnn", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert (run / "export-finetuned-mnn.mnn").is_file() and (run / "export-finetuned-mnn.mnn.json").is_file()
    assert "ok" in printed
