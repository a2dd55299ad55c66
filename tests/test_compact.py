"""Exact channel compaction: every registered model and a user model with a residual, in float64, and
`gemminer export --format compact --verify` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gemminer.cli import main
from gemminer.compact import Plan, compact, compact_from_plan, load_compact, macs, save_compact
from gemminer.masking import PRUNABLE_TYPES, attach_fixed_masks
from gemminer.models import MODELS, build_model
from gemminer.ticket import Ticket
from tests.test_cli import flags

SHAPES = {"mlp": (1, 40), "cnn1d": (1, 40), "lenet300100": (1, 28, 28)}


def random_masks(model: nn.Module, density: float, dead_filters: float = 0.3) -> dict[str, torch.Tensor]:
    """Random masks with whole filters and whole input columns removed, as global pruning leaves them."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            mask = torch.rand(module.weight.shape) < density
            mask[torch.rand(mask.shape[0]) < dead_filters] = False
            if mask.shape[1] > 1:
                mask[:, torch.rand(mask.shape[1]) < dead_filters] = False
            masks[f"{name}.weight"] = mask
    return masks


def assert_exact(model: nn.Module, masks: dict[str, torch.Tensor], shape: tuple[int, ...]):
    inputs = torch.randn(4, *shape, dtype=torch.float64)
    compacted = compact(model, masks, inputs)
    attach_fixed_masks(model, masks)
    with torch.no_grad():
        expected, got = model(inputs), compacted.model(inputs)
    assert got.shape == expected.shape
    assert float((expected - got).abs().max()) <= 1e-10 * max(1.0, float(expected.abs().max()))
    return compacted


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("affine", [False, True])
def test_compaction_is_exact_on_every_registered_model(name, affine):
    torch.manual_seed(0)
    shape = SHAPES.get(name, (3, 32, 32))
    model = build_model(name, shape, 10, width=None if name in ("mlp", "cnn1d") else 8, affine_bn=affine,
                        bias=affine).eval().double()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_var.uniform_(0.5, 2.0)  # statistics of a used network; means stay 0
            if affine:
                module.bias.data.normal_()  # a dead filter then makes a constant channel: kept
    masks = random_masks(model, 0.2)
    compacted = assert_exact(model, masks, shape)
    if not affine and name in ("cnn1d", "resnet20", "vgg16", "conv4"):
        assert any(kept_out < out for _, _, kept_out, out in compacted.layers.values()), "nothing was removed"


class UserResidual(nn.Module):
    """A user's model: a residual block with a concatenation and a channel-padding shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.branch(h))
        h = torch.cat([h, self.side(h)], dim=1)
        h = F.max_pool2d(h, 2)
        return self.head(h.view(h.size(0), -1))


def test_compaction_is_exact_on_a_user_model_with_a_residual():
    torch.manual_seed(1)
    model = UserResidual().eval().double()
    masks = random_masks(model, 0.5)
    masks["stem.weight"][2] = False  # a dead stem filter: channel 2 stays only if the branch writes it
    assert_exact(model, masks, (3, 8, 8))


class WithParameters(nn.Module):
    """Parameters used directly in the graph: a per-channel offset, a feature offset, a fixed-batch view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1, bias=False)
        self.offset = nn.Parameter(torch.randn(1, 6, 1))
        self.fc = nn.Linear(6 * 5, 4, bias=False)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)) * self.offset
        return self.fc(h.reshape(-1, 6 * 5)) + self.shift


def test_compaction_is_exact_with_parameters_in_the_graph():
    torch.manual_seed(4)
    model = WithParameters().eval().double()
    masks = random_masks(model, 0.6)
    masks["conv.weight"][1] = False
    compacted = assert_exact(model, masks, (2, 5))
    assert compacted.layers["conv.weight"][2] < 6


def test_saved_plan_and_weights_rebuild_the_model(tmp_path):
    torch.manual_seed(2)
    model = build_model("resnet20", (3, 16, 16), 10, width=8).eval()
    masks = random_masks(model, 0.1)
    compacted = compact(model, masks, torch.zeros(1, 3, 16, 16))
    plan = Plan.from_json(compacted.plan.to_json())
    rebuilt = compact_from_plan(build_model("resnet20", (3, 16, 16), 10, width=8).eval(), plan).model
    rebuilt.load_state_dict(compacted.model.state_dict(), strict=True)
    inputs = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt(inputs), compacted.model(inputs))
    assert macs(compacted.model, (3, 16, 16)) < macs(model, (3, 16, 16))


def test_export_compact_and_verify(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["mine", "--out", str(run), *flags(data_dir), "--density", "0.05"]) == 0
    out = tmp_path / "c.safetensors"
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--format", "compact", "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "ok" in printed and "0.weight: in" in printed and "MACs" in printed
    model = load_compact(out)
    assert model(torch.zeros(2, 1, 40)).shape == (2, 10)
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["macs_density"] <= 1
    ticket = Ticket.load(run / "ticket.safetensors")
    assert summary["macs_remaining"] <= summary["macs_total"] and ticket.density > 0


def test_verify_fails_above_the_tolerance(tmp_path, data_dir):
    from gemminer.ticket import read_safetensors, save_state
    from gemminer.verify import verify_export

    run = tmp_path / "run"
    assert main(["mine", "--out", str(run), *flags(data_dir)]) == 0
    out = tmp_path / "c.safetensors"
    assert main(["export", "--run", str(run), "--format", "compact", "--out", str(out)]) == 0
    assert verify_export(run, out).ok
    tensors, header = read_safetensors(out, what="compacted model")
    name = next(key for key in tensors if key.endswith("weight"))
    tensors[name] = tensors[name] + 0.5  # a damaged export
    save_state(tensors, out, metadata=header)
    result = verify_export(run, out)
    assert not result.ok and "FAILED" in result.lines()[0]


def test_load_compact_on_the_test_device(tmp_path, device):
    torch.manual_seed(3)
    spec = {"name": "resnet20", "input_shape": [3, 16, 16], "num_classes": 10, "width": 8}
    model = build_model("resnet20", (3, 16, 16), 10, width=8).eval()
    compacted = compact(model, random_masks(model, 0.1), torch.zeros(1, 3, 16, 16))
    save_compact(compacted, tmp_path / "c.safetensors", {"model_spec": spec})
    loaded = load_compact(tmp_path / "c.safetensors", device)
    inputs = torch.randn(2, 3, 16, 16)
    expected = compacted.model(inputs)
    got = loaded(inputs.to(device)).cpu()
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_the_docs_example_runs(tmp_path, monkeypatch):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
    blocks = [block.split("```", 1)[0] for block in page.split("```python\n")[1:]]
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/inference.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 10)
