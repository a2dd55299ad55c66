"""Channel liveness and the density on path: exact counts on hand-built masks, and a gradient check on
the registered models (a kept weight has a gradient for some input exactly when it is on a path)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gemminer.liveness import LivenessError, analyse, channel_liveness, density_on_path
from gemminer.masking import PRUNABLE_TYPES, attach_fixed_masks, original_weight
from gemminer.models import MODELS, build_model

SHAPES = {"mlp": (1, 40), "cnn1d": (1, 40), "lenet300100": (1, 28, 28)}


def dense_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": torch.ones_like(module.weight, dtype=torch.bool)
            for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)}


def conv_stack(batch_norm: bool = False, affine: bool = False) -> nn.Sequential:
    layers = [nn.Conv1d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1, bias=False)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(4, affine=affine))
    layers += [nn.ReLU(), nn.Conv1d(4, 2, 3, padding=1, bias=False)]
    return nn.Sequential(*layers).eval()


def stack_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    masks = dense_masks(model)
    middle = "2.weight"
    masks[middle][1] = False  # filter 1 of the middle layer: its channel is dead
    masks[middle][:, 2] = False  # nothing reads channel 2 of the first layer
    return masks


def test_dead_channel_in_a_conv_stack():
    model = conv_stack()
    masks = stack_masks(model)
    kept = 12 + (48 - 12 - 9) + 24
    # off path: the first layer's filter 2 (3 weights, unread), the last layer's reads of channel 1 (2 x 3)
    assert density_on_path(model, masks, torch.randn(2, 1, 8)) == (kept - 3 - 6) / kept
    layers = channel_liveness(model, masks, torch.randn(2, 1, 8))
    assert layers["0.weight"].out_read.tolist() == [True, True, False, True]
    assert layers["4.weight"].in_nonzero.tolist() == [True, False, True, True]
    assert layers["4.weight"].in_live.tolist() == [True, False, True, True]


def test_batch_norm_zero_and_constant():
    model = conv_stack(batch_norm=True)
    masks = stack_masks(model)
    kept = 12 + 27 + 24
    assert density_on_path(model, masks, torch.randn(2, 1, 8)) == (kept - 9) / kept  # non-affine: still 0
    affine = conv_stack(batch_norm=True, affine=True)
    with torch.no_grad():
        affine[3].bias.fill_(0.5)  # the dead channel becomes the constant 0.5: counted as live
    layers = channel_liveness(affine, masks, torch.randn(2, 1, 8))
    assert layers["5.weight"].in_nonzero.tolist() == [True, True, True, True]
    assert layers["5.weight"].in_live.tolist() == [True, False, True, True]
    assert density_on_path(affine, masks, torch.randn(2, 1, 8)) == (kept - 3) / kept


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(1, 4, 3, padding=1, bias=False)
        self.conv1 = nn.Conv1d(4, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv1d(4, 2, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(x)
        return self.conv2(F.relu(h + self.conv1(F.relu(h))))


def test_residual_add():
    model = Residual().eval()
    masks = dense_masks(model)
    masks["conv0.weight"][3] = False
    # the branch still writes channel 3: the add keeps it live, only conv1's reads of channel 3 are off path
    assert density_on_path(model, masks, torch.randn(1, 1, 8)) == (81 - 12) / 81
    masks["conv1.weight"][3] = False  # now channel 3 is dead in both addends
    assert density_on_path(model, masks, torch.randn(1, 1, 8)) == (69 - 9 - 6) / 69


class Concatenation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(1, 3, 3, padding=1, bias=False)
        self.b = nn.Conv1d(1, 2, 3, padding=1, bias=False)
        self.c = nn.Conv1d(5, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), F.relu(self.b(x))], dim=1))


def test_concatenation():
    model = Concatenation().eval()
    masks = dense_masks(model)
    masks["b.weight"][0] = False  # channel 3 of the concatenation is dead
    masks["c.weight"][:, 1] = False  # nothing reads a's channel 1
    kept = 9 + 3 + 8
    assert density_on_path(model, masks, torch.randn(1, 1, 8)) == (kept - 3 - 2) / kept
    assert channel_liveness(model, masks, torch.randn(1, 1, 8))["c.weight"].in_nonzero.tolist() == [
        True, True, True, False, True]


def test_fully_dead_layer_and_dense_masks():
    model = conv_stack()
    masks = dense_masks(model)
    assert density_on_path(model, masks, torch.randn(1, 1, 8)) == 1.0
    masks["2.weight"][:] = False
    assert density_on_path(model, masks, torch.randn(1, 1, 8)) == 0.0


def test_taps_that_only_meet_padding_are_off_path():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False)).eval()
    assert density_on_path(model, dense_masks(model), torch.randn(1, 1, 1, 1)) == 1 / 9


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_trace(name):
    shape = SHAPES.get(name, (3, 32, 32))
    model = build_model(name, shape, 10, width=None if name in ("mlp", "cnn1d") else 4).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert density_on_path(model, dense_masks(model), torch.randn(1, *shape)) == 1.0


@pytest.mark.parametrize("name", ["cnn1d", "resnet20", "wrn28_2", "mobilenet_v2"])
def test_on_path_is_where_gradients_reach(name, monkeypatch):
    """With an odd activation (tanh: no sign ever kills a path) and eval BatchNorm, a kept weight gets a
    nonzero gradient for random inputs exactly when it is on a path: option-A shortcuts, flatten and
    residual adds included."""
    monkeypatch.setattr(F, "relu", torch.tanh)
    torch.manual_seed(0)
    shape = SHAPES.get(name, (3, 16, 16))
    model = build_model(name, shape, 10, width=8).eval().double()
    for module_name, module in list(model.named_modules()):
        if isinstance(module, nn.ReLU | nn.ReLU6):
            parent, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Tanh())
    masks = {name: torch.rand(mask.shape) < 0.08 for name, mask in dense_masks(model).items()}
    layers = channel_liveness(model, masks, torch.randn(1, *shape, dtype=torch.double))
    attach_fixed_masks(model, masks)
    out = model(torch.randn(32, *shape, dtype=torch.double))
    (out * torch.randn_like(out)).sum().backward()
    for weight_name, mask in masks.items():
        gradient = original_weight(model.get_submodule(weight_name.rsplit(".", 1)[0])).grad
        assert torch.equal((gradient != 0) & mask, layers[weight_name].on_path), weight_name


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.fc(x), x.transpose(-1, -2))


@pytest.mark.parametrize("model", [DataDependent(), Attention()], ids=["untraceable", "unknown-operation"])
def test_unanalysable_model_gives_none_and_one_warning(model):
    masks = dense_masks(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert density_on_path(model, masks, torch.randn(2, 4)) is None
    assert len(caught) == 1 and "density on path unavailable" in str(caught[0].message)
    with pytest.raises(LivenessError):
        analyse(model, masks, torch.randn(2, 4))
