"""The Python API: `find(model, data) -> Ticket` on a user's own module and DataLoader."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from gemminer import METHODS, GemMiner, Ticket, finetune, remove_masks
from gemminer.errors import GemminerError
from gemminer.init import init_hash


class UserNet(nn.Module):
    """A model gemminer has never seen: its own layer names, conv + BatchNorm + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 * 40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.stem(x))).flatten(1))


@pytest.fixture
def user_data():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 40, generator=generator), torch.randint(0, 10, (96,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=generator)


def user_net() -> UserNet:
    torch.manual_seed(0)
    return UserNet()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def options(name: str) -> dict:
    return {"gemminer": {"epochs": 3, "freeze_period": 1}, "imp": {"epochs": 1}, "edge-popup": {"epochs": 2},
            "synflow": {"iterations": 5}}.get(name, {})


@pytest.mark.parametrize("init", ["keep", "signed_constant"])
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.filterwarnings("ignore:grasp.*fewer than samples_per_class")  # tiny data: a few per class
def test_find_never_changes_the_model(name, init, user_data):
    if name == "magnitude" and init == "signed_constant":
        pytest.skip("magnitude refuses constant-magnitude weights (tested in test_pai_methods)")
    model = user_net()
    before, hash_before = snapshot(model), init_hash(model)
    result = METHODS[name](0.1, init=init, **options(name)).search(model, user_data)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert all(parameter.requires_grad for parameter in model.parameters())
    if init == "keep":
        assert result.ticket.metadata["init_hash"] == hash_before and result.init_state is None
    else:  # the ticket names the re-drawn weights, which `initialize` and `init_state` both give back
        redrawn = METHODS[name](0.1, init=init, **options(name)).initialize(copy.deepcopy(model))
        assert result.ticket.metadata["init_hash"] == init_hash(redrawn) != hash_before
        loaded = copy.deepcopy(model)
        loaded.load_state_dict(result.init_state)
        assert init_hash(loaded) == init_hash(redrawn)


def test_round_trip_on_a_user_module_with_a_dataloader(user_data, tmp_path):
    model = user_net()
    ticket = GemMiner(density=0.1, epochs=3, freeze_period=1).find(model, user_data)
    assert ticket.remaining == round(ticket.total * 0.1)
    assert list(ticket.masks) == ["stem.weight", "head.weight"]
    ticket.apply(model)
    history = finetune(model, user_data, user_data, epochs=2)
    assert [row["epoch"] for row in history] == [1, 2] and 0 <= history[-1]["test_acc"] <= 1
    ticket.save(tmp_path / "t.safetensors")
    other, fresh = Ticket.load(tmp_path / "t.safetensors").apply(user_net()), user_net()
    for name, mask in ticket.masks.items():
        layer = name.rsplit(".", 1)[0]
        assert torch.equal(other.get_submodule(layer).weight, fresh.get_submodule(layer).weight * mask)
    remove_masks(model)
    assert bool((model.head.weight[~ticket.masks["head.weight"]] == 0).all())


def test_unknown_init_is_an_error():
    with pytest.raises(GemminerError, match="unknown init 'zeros'; allowed: signed_constant"):
        GemMiner(density=0.1, init="zeros")


def test_api_redraw_is_the_cli_draw(data_dir):
    """init="signed_constant" with seed s gives the weights `gemminer mine --seed s` starts from."""
    from gemminer.config import resolve
    from gemminer.experiment import setup
    from gemminer.models import build_model
    from tests.conftest import tiny_overrides

    run = setup(resolve(tiny_overrides(data_dir, seed=3)))
    torch.manual_seed(123)  # other layer draws: the re-draw must not depend on them
    model = build_model("cnn1d", (1, 40), 10, width=8)
    assert init_hash(GemMiner(density=0.1, seed=3, init="signed_constant").initialize(model)) == init_hash(run.model)


# ---- misuse found in review: one GemminerError each, before anything is copied or trained ----------------
class TupleNet(UserNet):
    """A model with an auxiliary output, as some user models have."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(x)
        return logits, logits.detach()


SHORT = {"gemminer": {"epochs": 1, "freeze_period": 0}, "edge-popup": {"epochs": 1}}  # options of a short search


@pytest.mark.parametrize("method", ["gemminer", "snip", "grasp", "synflow"])
def test_a_model_returning_a_tuple_is_one_error(method, user_data):
    torch.manual_seed(0)
    with pytest.raises(GemminerError, match="the model returns a tuple"):
        METHODS[method](0.5, **SHORT.get(method, {})).find(TupleNet(), user_data)


@pytest.mark.parametrize("method", ["gemminer", "snip", "edge-popup"])
def test_a_layer_under_a_prune_hook_is_refused_by_name_before_any_copy(method, user_data):
    from torch.nn.utils import prune

    net = user_net()
    prune.l1_unstructured(net.head, "weight", 0.5)
    with pytest.raises(GemminerError, match=r"layer head: .*torch\.nn\.utils\.prune\.remove"):
        METHODS[method](0.5, **SHORT.get(method, {})).find(net, user_data)


def test_a_dataloader_over_an_iterable_dataset_trains(user_data):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(user_data.dataset)

    loader = DataLoader(Stream(), batch_size=32)
    with pytest.raises(TypeError):
        len(loader)  # it has __len__, which raises: the case this covers
    ticket = GemMiner(0.5, epochs=2, freeze_period=1).find(user_net(), loader)
    assert ticket.density == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("make, message", [
    (lambda: GemMiner("0.1"), "density must be a number in"),
    (lambda: GemMiner(0.1, seed=1.5), "seed must be an integer"),
    (lambda: GemMiner(0.1, 3), "config is a GemMinerConfig, not a int"),
    (lambda: GemMiner(0.1, bn_recalibration_batches=-1), "bn_recalibration_batches must be an integer >= 0"),
    (lambda: GemMiner(0.1, training={"lr": 0.1}), "training is a FinetuneConfig, not a dict"),
    (lambda: GemMiner(0.1, lr=-1), r"search.lr must be a finite number in \(0, inf\), got -1"),
])
def test_wrong_types_and_values_through_the_api_are_one_error(make, message):
    with pytest.raises(GemminerError, match=message):
        make()


def test_numpy_scalars_are_taken_as_plain_numbers():
    import numpy as np

    method = GemMiner(np.float32(0.25), seed=np.int64(3))
    assert type(method.density) is float and type(method.seed) is int and method.seed == 3


@pytest.mark.parametrize("options, message", [
    ({"start_step": -5}, "start_step must be an integer >= 0"),
    ({"eval_every": 0}, "eval_every must be an integer >= 1"),
    ({"config": {"lr": 0.1}}, "config is a FinetuneConfig"),
])
def test_finetune_refuses_bad_arguments(options, message, user_data):
    with pytest.raises(GemminerError, match=message):
        finetune(user_net(), user_data, epochs=1, **options)


def test_tensor_data_needs_one_label_per_input():
    from gemminer.data import TensorData

    with pytest.raises(GemminerError, match="10 inputs and 9 labels"):
        TensorData(torch.zeros(10, 1, 40), torch.zeros(9, dtype=torch.long))
