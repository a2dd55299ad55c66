"""Edge-popup (Ramanujan et al. 2020): fixed weights, top-k scores, straight-through gradients."""

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gemminer import EdgePopup, RandomTicket
from gemminer.checkpoint import Checkpointer, StopRequested
from gemminer.data import Batches
from gemminer.errors import GemminerError
from gemminer.masking import GlobalTopK, TopKScoreMask, prunable_names, top_k_mask, weights
from gemminer.methods.random import uniform_counts
from gemminer.methods.scoring import keep_top, keep_top_per_layer
from gemminer.models import build_model
from gemminer.train import masked_accuracy

FAST = {"epochs": 3, "lr": 0.1}


def cnn1d(width=8):
    torch.manual_seed(0)
    return build_model("cnn1d", (1, 40), 10, width=width)


def counts_of(ticket):
    return {name: int(mask.sum()) for name, mask in ticket.masks.items()}


def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_exact_per_layer_counts_and_the_forward_mask_is_the_ticket(batches):
    model = cnn1d()
    result = EdgePopup(0.1, **FAST).search(model, batches)
    sizes = {name: mask.numel() for name, mask in result.ticket.masks.items()}
    assert counts_of(result.ticket) == uniform_counts(sizes, 0.1)
    masks = [m for m in result.network.modules() if isinstance(m, TopKScoreMask)]
    for (name, mask), parametrization in zip(result.ticket.masks.items(), masks, strict=True):
        assert torch.equal(parametrization.mask().cpu(), mask), name
        assert torch.equal(result.scores[name], parametrization.scores.detach().abs())
    assert result.gem is result.ticket and result.epochs == 3 and len(result.history) == 3


def test_global_scope_keeps_the_exact_total_over_all_layers(batches):
    model = cnn1d()
    result = EdgePopup(0.1, scope="global", **FAST).search(model, batches)
    assert result.ticket.remaining == round(result.ticket.total * 0.1)
    expected = keep_top(result.scores, round(result.ticket.total * 0.1))
    assert all(torch.equal(result.ticket.masks[name], expected[name]) for name in expected)
    sizes = {name: mask.numel() for name, mask in result.ticket.masks.items()}
    assert counts_of(result.ticket) != uniform_counts(sizes, 0.1)  # layers compete for the budget


@pytest.mark.parametrize("scale", [False, True])
def test_fixed_weights_stay_fixed(batches, scale):
    model = cnn1d()
    before = snapshot(model)
    result = EdgePopup(0.25, scale_weights=scale, **FAST).search(model, batches)
    names = prunable_names(model)
    factor = 1 / math.sqrt(0.25) if scale else 1.0
    searched = weights(result.network, names)
    for name in names:
        assert torch.equal(searched[name], before[name] * factor)
        assert not searched[name].requires_grad
    trainable = [name for name, p in result.network.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".scores") for name in trainable)
    # the ticket names the model's own (unscaled) weights, and the model is untouched
    assert all(torch.equal(tensor, before[key]) for key, tensor in model.state_dict().items())
    assert not any(parametrize.is_parametrized(module) for module in model.modules())


def test_straight_through_gradient_reaches_unselected_scores():
    layer = nn.Linear(8, 4, bias=False)
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    mask = TopKScoreMask(scores, keep=5)
    parametrize.register_parametrization(layer, "weight", mask)
    selected = mask.mask()
    assert int(selected.sum()) == 5
    layer(torch.randn(16, 8)).sum().backward()
    grad = mask.scores.grad
    assert grad is not None and bool((grad[~selected] != 0).all())
    # the reference passes the gradient through |s|: d|s|/ds = sign(s)
    weight = layer.parametrizations.weight.original.detach()
    x = torch.randn(3, 8)
    mask.scores.grad = None
    layer(x).sum().backward()
    expected = x.sum(0).expand(4, 8) * weight * torch.sign(scores)  # d out / d w_eff, times w, times sign(s)
    assert torch.allclose(mask.scores.grad, expected, atol=1e-6)


def test_global_top_k_ranks_over_layers_and_follows_the_scores():
    first, second = torch.tensor([[0.9, -0.1, 0.5]]), torch.tensor([[-0.8, 0.2, 0.05, 0.7]])
    shared = GlobalTopK(3)
    members = [TopKScoreMask(first.clone(), shared=shared), TopKScoreMask(second.clone(), shared=shared)]
    assert members[0].mask().tolist() == [[True, False, False]]
    assert members[1].mask().tolist() == [[True, False, False, True]]
    with torch.no_grad():
        members[1].scores.mul_(0.1)  # an optimizer step changes the scores in place
    assert members[0].mask().tolist() == [[True, True, True]]
    assert members[1].mask().tolist() == [[False, False, False, False]]
    with pytest.raises(GemminerError):
        TopKScoreMask(first.clone())


def test_ties_go_to_the_lower_index_as_in_scoring():
    scores = torch.tensor([0.5, -0.5, 0.2, 0.5, -0.2, 0.0, 0.5, 0.1])
    for keep in range(scores.numel() + 1):
        expected = keep_top_per_layer({"w": scores.abs()}, {"w": keep})["w"]
        assert torch.equal(top_k_mask(scores, keep), expected), keep


def test_search_learns_and_beats_a_random_ticket(tiny, batches):
    model = cnn1d(width=16)
    result = EdgePopup(0.3, epochs=8, init="signed_constant", seed=0).search(model, batches)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] - 0.1
    initial = copy.deepcopy(model)
    initial.load_state_dict(result.init_state)
    recalibration = Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(1))
    train_eval = Batches(tiny.train, 400)
    found = masked_accuracy(initial, result.ticket.masks, train_eval, recalibration, 3)
    random = RandomTicket(0.3, init="signed_constant").find(model, batches)
    chance = masked_accuracy(initial, random.masks, train_eval, recalibration, 3)
    assert found > chance + 0.1


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_deterministic_under_a_seed(tiny, scope):
    def stream():
        return Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(0))

    model = cnn1d()
    first = EdgePopup(0.1, scope=scope, seed=3, **FAST).search(model, stream())
    again = EdgePopup(0.1, scope=scope, seed=3, **FAST).search(model, stream())
    for name in first.ticket.masks:
        assert torch.equal(first.ticket.masks[name], again.ticket.masks[name])
        assert torch.equal(first.scores[name], again.scores[name])
    assert [row["train_loss"] for row in first.history] == [row["train_loss"] for row in again.history]
    other = EdgePopup(0.1, scope=scope, seed=4, epochs=1).search(model, stream())
    assert not all(torch.equal(first.scores[name], other.scores[name]) for name in first.scores)


def test_a_stopped_search_resumes_to_the_same_ticket(tiny, tmp_path: Path):
    def stream():
        return Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(0))

    class StopAfter:
        """Reports a SIGTERM once the loop has asked `steps` times (mid-epoch)."""

        def __init__(self, steps):
            self.steps = steps

        @property
        def signal_name(self):
            self.steps -= 1
            return "SIGTERM" if self.steps < 0 else None

    model = cnn1d()
    reference = EdgePopup(0.1, scope="global", epochs=3).search(model, stream())
    path = tmp_path / "checkpoint.pt"
    method = EdgePopup(0.1, scope="global", epochs=3)
    with pytest.raises(StopRequested):  # 7 steps per epoch: stops inside the second epoch
        method.search(model, stream(), checkpoint=Checkpointer(path, stop=StopAfter(10)))
    saved = Checkpointer(path).phase_state("search")
    assert saved["epoch"] == 1 and saved["partial"]["steps"] == 3
    # another seed draws other scores: only the restored state can give the reference ticket
    resumed = EdgePopup(0.1, scope="global", epochs=3, seed=7).search(model, stream(), checkpoint=Checkpointer(path))
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in reference.history]
    assert all(torch.equal(resumed.ticket.masks[name], reference.ticket.masks[name]) for name in reference.scores)
    assert all(torch.equal(resumed.scores[name], reference.scores[name]) for name in reference.scores)


@pytest.mark.parametrize("bad", [{"scope": "block"}, {"optimizer": "lbfgs"}, {"lr_schedule": "step"}, {"lr": 0.0},
                                 {"momentum": 1.0}, {"weight_decay": -1e-4}, {"lr": float("nan")}, {"epochs": 0}])
def test_bad_options_are_one_line_errors(bad):
    with pytest.raises(GemminerError) as error:
        EdgePopup(0.1, **bad)
    assert "\n" not in str(error.value)
