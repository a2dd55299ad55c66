"""Every registered model: forward/backward at its input size and one Gem-Miner search; user models."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from gemminer.cli import main
from gemminer.data import Batches, TensorData
from gemminer.errors import GemminerError
from gemminer.masking import prunable_names
from gemminer.methods.gemminer import GemMiner
from gemminer.models import DEFAULT_MODEL_FOR_DATA, MODELS, build_model
from gemminer.train import enable_autocast, forward


@pytest.fixture(autouse=True)
def _one_thread():
    """Batches of 2: threads only add synchronization (and stall badly on a loaded machine)."""
    torch.set_num_threads(1)


# name: (input shape, width); small widths keep the suite fast, the structure is the paper's
CASES = {
    "mlp": ((1, 40), 16), "cnn1d": ((1, 40), 8), "lenet300100": ((1, 28, 28), 30),
    "conv2": ((3, 32, 32), 4), "conv4": ((3, 32, 32), 4), "conv6": ((3, 32, 32), 4),
    "resnet20": ((3, 32, 32), 4), "resnet32": ((3, 32, 32), 4), "resnet56": ((3, 32, 32), 4),
    "vgg16": ((3, 32, 32), 4), "wrn28_2": ((3, 32, 32), 4), "mobilenet_v2": ((3, 32, 32), 8),
    "resnet18": ((3, 64, 64), 4), "resnet50": ((3, 32, 32), 4),
}


def test_every_registered_model_has_a_case():
    assert set(CASES) == set(MODELS)
    assert set(DEFAULT_MODEL_FOR_DATA.values()) <= set(MODELS)


def tiny_batches(shape, num_classes=10, n=4, batch_size=2):
    generator = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn((n, *shape), generator=generator), torch.randint(0, num_classes, (n,),
                                                                                    generator=generator))
    return Batches(data, batch_size, shuffle=True, generator=generator)


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_forward_backward_and_one_gemminer_search(name):
    shape, width = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, shape, 10, width=width)
    if len(shape) == 3 and torch.cuda.is_available():
        # NHWC as the toolkit runs it on CUDA; not on CPU, where oneDNN's NHWC backward of strided
        # 1x1 convolutions corrupts the heap on some processors (torch 2.13, AVX2)
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    # paper defaults: BatchNorm without affine parameters, no biases
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in model.modules())
    assert not any(getattr(m, "bias", None) is not None for m in model.modules() if isinstance(m, (nn.Conv2d,
                                                                                                    nn.Linear)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = GemMiner(0.5, epochs=2, freeze_period=1, device="cpu").search(model, tiny_batches(shape))
    total = sum(mask.numel() for mask in result.ticket.masks.values())
    assert list(result.ticket.masks) == prunable_names(model)
    assert result.ticket.density == round(total * 0.5) / total
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # `model` untouched


def test_affine_bn_and_bias_options():
    model = build_model("resnet20", (3, 32, 32), 10, affine_bn=True, bias=True, width=4)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.affine for m in norms)
    assert all(m.bias is not None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_resnet_stem_follows_input_size():
    cifar = build_model("resnet18", (3, 32, 32), 10, width=4)
    tiny = build_model("resnet18", (3, 64, 64), 200, width=4)
    assert cifar.stem[0].kernel_size == (3, 3) and cifar.stem[0].stride == (1, 1)
    assert tiny.stem[0].kernel_size == (7, 7) and isinstance(tiny.stem[-1], nn.MaxPool2d)


def test_published_sizes():
    count = lambda name, shape=(3, 32, 32): sum(p.numel() for p in build_model(name, shape, 10).parameters())  # noqa: E731
    assert count("lenet300100", (1, 28, 28)) == 266_200
    assert count("resnet20") == 268_336  # 0.27M, He et al.
    assert 14_700_000 < count("vgg16") < 14_750_000
    assert 11_100_000 < count("resnet18") < 11_200_000


def test_image_model_on_1d_data_is_an_error():
    with pytest.raises(GemminerError, match="needs image inputs"):
        build_model("resnet20", (1, 40), 10)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def small(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

        def fixed():
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

        def not_a_model(**kwargs):
            return 42

        def broken(num_classes, input_shape):
            raise RuntimeError("boom")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_user_model_factory(user_module):
    model = build_model(f"{user_module}:small", (3, 32, 32), 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert build_model(f"{user_module}:fixed", (3, 32, 32), 10)[1].out_features == 10
    for spec, message in ((f"{user_module}:not_a_model", "not a torch.nn.Module"),
                          (f"{user_module}:broken", "RuntimeError: boom"),
                          (f"{user_module}:missing", "has no 'missing'"),
                          ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'")):
        with pytest.raises(GemminerError, match=message) as err:
            build_model(spec, (3, 32, 32), 10)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_library_models_when_they_import(library):
    try:
        __import__("timm" if library == "timm" else "torchvision.models")
    except Exception as err:  # PyPI's torchvision does not import beside the local torch build
        pytest.skip(f"{library} does not import here: {type(err).__name__}")
    name = "resnet18"
    model = build_model(f"{library}:{name}", (3, 32, 32), 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_missing_library_is_one_line():
    try:
        import timm  # noqa: F401
        pytest.skip("timm imports here")
    except Exception:
        pass
    with pytest.raises(GemminerError, match="needs the timm package"):
        build_model("timm:resnet18", (3, 32, 32), 10)


def test_autocast_opt_in_runs_bf16_and_returns_fp32():
    model = enable_autocast(build_model("resnet20", (3, 32, 32), 10, width=4), torch.bfloat16)
    logits = forward(model, torch.randn(2, 3, 32, 32))  # CPU autocast: the same code path as CUDA's
    assert logits.dtype == torch.float32 and logits.shape == (2, 10)


def test_cli_mines_a_cifar_ticket_with_a_paper_model_and_a_user_model(tmp_path, monkeypatch, user_module):
    from test_datasets import write_cifar10_python

    monkeypatch.setenv("GEMMINER_CACHE", str(tmp_path / "cache"))
    write_cifar10_python(tmp_path / "data", per_batch=4)
    common = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--search-freeze-period",
              "1", "--finetune-epochs", "1", "--density", "0.2", "--data-batch-size", "8",
              "--bn-recalibration-batches", "2", "--data-limit", "16", "--device", "cpu", "--quiet"]
    assert main(["mine", *common, "--model", "resnet20", "--model-width", "4", "--out", str(tmp_path / "r20")]) == 0
    summary = (tmp_path / "r20" / "summary.json").read_text()
    assert '"model": "resnet20"' in summary and '"data": "cifar10"' in summary
    assert main(["mine", *common, "--model", f"{user_module}:small", "--out", str(tmp_path / "user")]) == 0
    assert main(["eval", "--run", str(tmp_path / "user")]) == 0
    assert main(["mine", *common, "--bf16", "--out", str(tmp_path / "bf16")]) == 2  # bf16 is for CUDA
