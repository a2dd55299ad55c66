import copy

import pytest
import torch

from gemminer.errors import GemminerError
from gemminer.init import parameters_state
from gemminer.masking import ScoreMask, prunable_names
from gemminer.methods.gemminer import GemMiner, freeze_lowest, freeze_schedule, lowest
from gemminer.models import build_model


def test_schedule_matches_paper_and_ends_at_target():
    schedule = freeze_schedule(1_000_000, 0.0144, epochs=150, period=5)
    assert len(schedule) == 29 and min(schedule) == 5 and max(schedule) == 145
    assert schedule[5] == round(1_000_000 * 0.0144 ** (1 / 29))  # 13.6% frozen at the first event
    assert schedule[145] == 14400
    assert freeze_schedule(100, 0.5, epochs=10, period=0) == {}


def test_exact_density_after_every_event_with_ties():
    torch.manual_seed(0)
    # scores on a coarse grid: many exact ties, across two layers
    masks = [ScoreMask(torch.randint(0, 4, (7, 5)).float() / 4), ScoreMask(torch.randint(0, 4, (13,)).float() / 4)]
    total = 7 * 5 + 13
    schedule = freeze_schedule(total, 0.1, epochs=9, period=2)
    previous = torch.ones(total, dtype=torch.bool)
    for _epoch, keep in sorted(schedule.items()):
        freeze_lowest(masks, keep)
        alive = torch.cat([m.alive.flatten() for m in masks]).bool()
        assert int(alive.sum()) == keep
        assert not (alive & ~previous).any()  # frozen-out weights never return
        previous = alive
        for m in masks:  # scores of frozen weights rise: they must still stay out
            m.scores.data[~m.alive.bool()] = 1.0
    assert int(previous.sum()) == round(total * 0.1)


def test_lowest_picks_what_a_stable_sort_picks():
    """The linear-time selection behind freezing: the `count` lowest values, equal ones by index,
    already frozen (-inf) first; exactly `count` of them, as the first `count` of a stable sort."""
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 7, 50, 333):
        values = torch.randint(0, 5, (size,), generator=generator).float() / 4  # many ties
        values[torch.rand(size, generator=generator) < 0.3] = float("-inf")
        if size >= 7:
            values[torch.rand(size, generator=generator) < 0.2] = float("nan")  # a diverged search: NaN last
        order = torch.sort(values, stable=True).indices
        for count in sorted({0, 1, size // 3, size // 2, size - 1, size}):
            expected = torch.zeros(size, dtype=torch.bool)
            expected[order[:count]] = True
            assert torch.equal(lowest(values, count), expected), (size, count)


def test_ties_broken_by_global_index():
    masks = [ScoreMask(torch.full((3,), 0.5)), ScoreMask(torch.full((3,), 0.5))]
    freeze_lowest(masks, keep=2)
    assert torch.cat([m.alive for m in masks]).tolist() == [0, 0, 0, 0, 1, 1]


@pytest.fixture
def searched(tiny, device_batches, device):
    torch.manual_seed(0)
    model = build_model("cnn1d", tiny.input_shape, 10, affine_bn=True, bias=True, width=8)
    before = copy.deepcopy(parameters_state(model))
    miner = GemMiner(0.1, epochs=4, freeze_period=1, lr=5.0, device=device)  # a large lr tests the clamp
    return model, before, miner.search(model, device_batches)


def test_search_reaches_exact_density_and_keeps_weights_fixed(searched):
    model, before, result = searched
    total = sum(m.numel() for m in result.ticket.masks.values())
    assert result.ticket.remaining == round(total * 0.1)
    assert result.gem.remaining <= result.ticket.remaining
    gem_inside_ticket = all((result.gem.masks[n] <= result.ticket.masks[n]).all() for n in result.ticket.masks)
    assert gem_inside_ticket
    after = parameters_state(result.network)
    assert set(after) == set(before)
    for name in before:  # conv/linear weights, biases and BN affine parameters
        assert torch.equal(before[name], after[name].cpu()), name
    for name in before:  # and the caller's model is untouched
        assert torch.equal(before[name], parameters_state(model)[name])


def test_scores_stay_in_unit_interval(searched):
    _, _, result = searched
    scores = [m.scores for m in result.network.modules() if isinstance(m, ScoreMask)]
    scores = [s.detach() for s in scores]
    assert scores and all(float(s.min()) >= 0 and float(s.max()) <= 1 for s in scores)
    assert any(float(s.min()) == 0 or float(s.max()) == 1 for s in scores)  # lr 5 did push against the bounds


def test_regularizer_as_weight_decay_matches_explicit_loss(tiny):
    """lambda * sum(s^2) in the loss and weight decay 2 * lambda give the same SGD step."""
    torch.manual_seed(0)
    scores = torch.rand(10, requires_grad=True)
    explicit = scores.detach().clone().requires_grad_(True)
    lam = 0.3
    grad = torch.randn(10)
    opt_a = torch.optim.SGD([scores], lr=0.1, momentum=0.9, weight_decay=2 * lam)
    opt_b = torch.optim.SGD([explicit], lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.zero_grad()
        (scores * grad).sum().backward()
        opt_a.step()
        opt_b.zero_grad()
        ((explicit * grad).sum() + lam * (explicit ** 2).sum()).backward()
        opt_b.step()
    torch.testing.assert_close(scores, explicit)


def test_unflag_off_and_no_freezing(tiny, batches):
    model = build_model("mlp", tiny.input_shape, 10, width=16)
    no_unflag = GemMiner(0.2, epochs=3, freeze_period=1, unflag=False).search(model, batches)
    assert no_unflag.ticket.remaining == no_unflag.gem.remaining
    free = GemMiner(0.2, epochs=2, freeze_period=0, reg_lambda=0.0).search(model, batches)
    assert free.ticket.density == free.gem.density  # Gem-Miner(0): finds its own density
    assert 0.3 < free.ticket.density < 0.7


def test_bad_settings_are_rejected():
    with pytest.raises(GemminerError, match="needs at least 6"):
        GemMiner(0.1, epochs=5, freeze_period=5)
    with pytest.raises(GemminerError, match="density"):
        GemMiner(0.0)
    with pytest.raises(GemminerError, match="allowed: sgd, adam"):
        GemMiner(0.1, optimizer="rmsprop")


def test_same_seed_same_ticket(tiny, device):
    from gemminer.data import Batches

    def run(seed):
        model = build_model("mlp", tiny.input_shape, 10, width=16)
        torch.manual_seed(1)
        model = build_model("mlp", tiny.input_shape, 10, width=16)
        data = Batches(tiny.train.to(device), 64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        # no convolution: cuBLAS matmuls on one stream repeat bit for bit, so this holds on CUDA too
        return GemMiner(0.1, epochs=3, freeze_period=1, seed=seed, device=device).find(model, data)

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first.masks[n], second.masks[n]) for n in first.masks)
    assert any(not torch.equal(first.masks[n], other.masks[n]) for n in first.masks)
    assert prunable_names(build_model("mlp", tiny.input_shape, 10, width=16)) == list(first.masks)


def test_per_epoch_evaluation_does_not_change_the_ticket(tiny):
    from gemminer.data import Batches

    def run(evaluate):
        torch.manual_seed(1)
        model = build_model("cnn1d", tiny.input_shape, 10, width=8)
        data = Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(0))
        extra = {}
        if evaluate:
            extra = {"test": Batches(tiny.test, 100),
                     "recalibration": Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(9))}
        rows = []
        ticket = GemMiner(0.1, epochs=3, freeze_period=1, bn_recalibration_batches=2).search(
            model, data, log=rows.append, **extra).ticket
        return ticket, rows

    (plain, _), (evaluated, rows) = run(False), run(True)
    assert all(torch.equal(plain.masks[n], evaluated.masks[n]) for n in plain.masks)
    assert all(0 <= row["test_acc"] <= 1 for row in rows)


@pytest.mark.parametrize("method", ["gemminer", "edge-popup"])
def test_scores_take_the_weights_channels_last_layout(method, device):
    """On CUDA the network is channels_last: the search's scores, flags and masked weights follow it
    (NCHW scores made the grouped masked weights NCHW beside NHWC inputs, a conversion per layer and step)."""
    from gemminer.data import Batches, TensorData
    from gemminer.methods import method_class

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 6, 6, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    data = Batches(TensorData(x, torch.randint(0, 2, (32,), generator=generator).to(device)), 16, shuffle=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, affine=False),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 2, bias=False))
    model = model.to(device, memory_format=torch.channels_last)
    options = {"freeze_period": 1} if method == "gemminer" else {}
    result = method_class(method)(0.5, epochs=2, device=device, **options).search(model, data)
    conv = result.network[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.parametrizations.weight[0].scores.is_contiguous(memory_format=torch.channels_last)
    assert result.ticket.density == pytest.approx(0.5, abs=1 / result.ticket.total)


def test_epoch_statistics_do_not_depend_on_the_scores_layout():
    """The logged penalty sums the squares in index order: a channels_last network logs what a contiguous one does."""
    from gemminer.methods.gemminer import score_statistics

    for seed in range(8):  # float32 sums in memory order differed for about half of such draws
        values = torch.rand(64, 64, 3, 3, generator=torch.Generator().manual_seed(seed))
        layouts = [ScoreMask(values.clone()), ScoreMask(values.contiguous(memory_format=torch.channels_last))]
        assert layouts[1].scores.is_contiguous(memory_format=torch.channels_last)
        assert score_statistics(layouts[:1]) == score_statistics(layouts[1:])
