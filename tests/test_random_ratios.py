"""Random tickets' per-layer density rules: uniform, ERK (RigL) and Smart-Ratio (Su et al. 2020)."""

import math
import warnings

import pytest
import torch
from torch import nn

from gemminer.errors import GemminerError
from gemminer.masking import prunable_names, weights
from gemminer.methods.random import RandomTicket, largest_remainder_counts, smart_densities, uniform_counts
from gemminer.models import build_model


def cnn1d(width=8):
    torch.manual_seed(0)
    return build_model("cnn1d", (1, 40), 10, width=width)


class Mixed(nn.Module):
    """Conv2d, Conv1d and Linear layers: ERK's sum(shape) / prod(shape) covers any kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(3, 16, (3, 5), bias=False)
        self.conv1 = nn.Conv1d(16, 32, 3, bias=False)
        self.hidden = nn.Linear(64, 256, bias=False)
        self.head = nn.Linear(256, 10, bias=False)


def shapes_of(model):
    return {name: tuple(w.shape) for name, w in weights(model, prunable_names(model)).items()}


def counts_of(ticket):
    return {name: int(mask.sum()) for name, mask in ticket.masks.items()}


def rigl_erk(shapes, density):
    """RigL's get_sparsities_erdos_renyi, written out independently: cap the largest layer, re-solve."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    dense = set()
    while True:
        raw = {name: sum(shapes[name]) / sizes[name] for name in sizes if name not in dense}
        rhs = sum(sizes[name] * density for name in raw) - sum(sizes[name] * (1 - density) for name in dense)
        eps = rhs / sum(raw[name] * sizes[name] for name in raw)
        top = max(raw.values())
        if eps * top <= 1:
            return {name: 1.0 if name in dense else eps * raw[name] for name in sizes}
        dense.update(name for name, value in raw.items() if value == top)


def close_to(counts, sizes, densities):
    return all(abs(counts[name] - sizes[name] * densities[name]) <= 1 for name in sizes)


@pytest.mark.parametrize("density", [0.01, 0.05, 0.3, 0.6])
@pytest.mark.parametrize("make", [cnn1d, Mixed])
def test_erk_matches_the_formula_with_caps(make, density):
    model = make()
    shapes = shapes_of(model)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    counts = counts_of(RandomTicket(density, ratio="erk").find(model, []))
    assert sum(counts.values()) == round(sum(sizes.values()) * density)
    assert close_to(counts, sizes, rigl_erk(shapes, density))
    assert all(0 <= counts[name] <= sizes[name] for name in sizes)


def test_erk_caps_small_layers_dense_and_keeps_the_rest_proportional():
    model = cnn1d()
    shapes = shapes_of(model)
    counts = counts_of(RandomTicket(0.3, ratio="erk").find(model, []))
    assert counts["0.weight"] == math.prod(shapes["0.weight"])  # the first conv would exceed 1: dense
    free = [name for name in shapes if counts[name] < math.prod(shapes[name])]
    ratios = [counts[name] / math.prod(shapes[name]) / (sum(shapes[name]) / math.prod(shapes[name])) for name in free]
    assert max(ratios) / min(ratios) < 1.01  # one eps for every layer that is not dense (up to rounding)


def test_erk_on_a_conv2d_uses_every_kernel_dim():
    model = Mixed()
    counts = counts_of(RandomTicket(0.05, ratio="erk").find(model, []))
    d_conv2 = counts["conv2.weight"] / (16 * 3 * 3 * 5)
    d_hidden = counts["hidden.weight"] / (64 * 256)
    expected = ((16 + 3 + 3 + 5) / (16 * 3 * 3 * 5)) / ((64 + 256) / (64 * 256))
    assert d_conv2 / d_hidden == pytest.approx(expected, rel=0.05)


def smart_reference(sizes, density, vgg=False):
    """Su et al.'s rule without caps: last layer 30%, layer l of L density ~ (L-l+1)^2 + (L-l+1) (/ l^2)."""
    names = list(sizes)
    depth = len(names)
    share = {name: ((depth - pos + 1) ** 2 + (depth - pos + 1)) / (pos * pos if vgg else 1)
             for pos, name in enumerate(names[:-1], start=1)}
    budget = round(sum(sizes.values()) * density) - 0.3 * sizes[names[-1]]
    k = budget / sum(share[name] * sizes[name] for name in share)
    return {**{name: share[name] * k for name in share}, names[-1]: 0.3}


@pytest.mark.parametrize(("variant", "density"), [("resnet", 0.1), ("vgg", 0.05)])
def test_smart_ratio_matches_the_formula(variant, density):
    model = cnn1d(width=64)
    sizes = {name: math.prod(shape) for name, shape in shapes_of(model).items()}
    counts = counts_of(RandomTicket(density, ratio="smart", smart_variant=variant).find(model, []))
    reference = smart_reference(sizes, density, vgg=variant == "vgg")
    assert max(reference.values()) < 1  # no cap at this density: the plain formula
    assert close_to(counts, sizes, reference)
    assert sum(counts.values()) == round(sum(sizes.values()) * density)
    densities = [counts[name] / sizes[name] for name in list(sizes)[:-1]]
    assert densities == sorted(densities, reverse=True)  # density falls with depth


def test_smart_ratio_caps_and_redistributes():
    model = cnn1d()
    sizes = {name: math.prod(shape) for name, shape in shapes_of(model).items()}
    counts = counts_of(RandomTicket(0.5, ratio="smart").find(model, []))
    assert sum(counts.values()) == round(sum(sizes.values()) * 0.5)
    assert all(counts[name] <= sizes[name] for name in sizes)
    assert counts["0.weight"] == sizes["0.weight"] and counts["3.weight"] == sizes["3.weight"]  # capped
    assert counts["13.weight"] == round(0.3 * sizes["13.weight"])
    # as the authors' code (and the official Gem-Miner code) caps: the rule's densities scaled to the budget,
    # (L-l+1)^2 + (L-l+1) = 30, 20, 12, 6; a layer over 1 keeps all and hands its surplus on, in layer order
    names = ["0.weight", "3.weight", "6.weight", "9.weight"]
    budget = round(sum(sizes.values()) * 0.5) - round(0.3 * sizes["13.weight"])
    share = dict(zip(names, (30, 20, 12, 6), strict=True))
    scale = budget / sum(share[name] * sizes[name] for name in names)
    expected, surplus = {}, 0.0
    for name in names:
        density = scale * share[name]
        if density >= 1:
            surplus, density = surplus + (density - 1) * sizes[name], 1.0
        else:
            taken = min(surplus, (1 - density) * sizes[name])
            density, surplus = density + taken / sizes[name], surplus - taken
        expected[name] = density
    assert expected["0.weight"] == expected["3.weight"] == 1.0 and surplus == 0
    assert expected["9.weight"] == pytest.approx(scale * 6)  # the surplus stopped at layer 6: 9 keeps its share
    for name in names:
        assert counts[name] == pytest.approx(expected[name] * sizes[name], abs=1)


def test_smart_ratio_overflow_warns_and_keeps_one_weight_per_layer():
    model = cnn1d(width=64)  # 30% of the classifier is more than the whole budget at density 0.02
    sizes = {name: math.prod(shape) for name, shape in shapes_of(model).items()}
    assert 0.3 * sizes["13.weight"] > round(sum(sizes.values()) * 0.02)
    with pytest.warns(UserWarning, match="Smart-Ratio"):
        counts = counts_of(RandomTicket(0.02, ratio="smart").find(model, []))
    assert sum(counts.values()) == round(sum(sizes.values()) * 0.02)
    assert all(count >= 1 for count in counts.values())
    assert all(counts[name] == 1 for name in list(sizes)[:-1])


def test_smart_ratio_below_one_weight_per_layer_is_an_error():
    with pytest.raises(GemminerError, match="fewer than the 3 layers"):
        smart_densities({"a": 10, "b": 10, "c": 100}, 2)


def test_smart_ratio_without_a_pruned_classifier_follows_the_share_rule_everywhere():
    model = cnn1d()
    sizes = {name: math.prod(shape) for name, shape in shapes_of(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counts = counts_of(RandomTicket(0.05, ratio="smart", prune_last=False).find(model, []))
    names = list(sizes)[:-1]
    assert list(counts) == names and sum(counts.values()) == round(sum(sizes[n] for n in names) * 0.05)
    # positions 1..4 of a 5-layer network: shares 30, 20, 12, 6
    k = counts["9.weight"] / sizes["9.weight"] / 6
    expected = {name: share * k for name, share in zip(names, [30, 20, 12, 6], strict=True)}
    assert close_to(counts, {name: sizes[name] for name in names}, expected)


@pytest.mark.parametrize("ratio", ["uniform", "erk", "smart"])
@pytest.mark.parametrize("density", [0.05, 0.137, 0.5, 0.99, 1.0])
def test_every_ratio_keeps_the_exact_total(ratio, density):
    model = Mixed()
    sizes = {name: math.prod(shape) for name, shape in shapes_of(model).items()}
    ticket = RandomTicket(density, ratio=ratio).find(model, [])
    counts = counts_of(ticket)
    assert ticket.remaining == round(sum(sizes.values()) * density)
    assert all(0 <= counts[name] <= sizes[name] for name in sizes)
    assert ticket.metadata["ratio"] == ratio


def old_uniform_counts(sizes, density):
    exact = {name: size * density for name, size in sizes.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    leftover = round(sum(sizes.values()) * density) - sum(counts.values())
    for name in sorted(exact, key=lambda name: -(exact[name] - counts[name]))[:leftover]:
        counts[name] += 1
    return counts


def test_uniform_is_the_default_and_unchanged():
    model = cnn1d()
    sizes = {name: math.prod(shape) for name, shape in shapes_of(model).items()}
    assert counts_of(RandomTicket(0.05).find(model, [])) == uniform_counts(sizes, 0.05)
    for density in (0.05, 0.137, 0.5):  # the same split as before the ratio rules existed
        assert uniform_counts({"a": 333, "b": 77, "c": 1000}, density) == old_uniform_counts(
            {"a": 333, "b": 77, "c": 1000}, density)
    assert uniform_counts({"a": 333, "b": 77, "c": 1000}, 0.05) == {"a": 16, "b": 4, "c": 50}  # 70 = round(70.5)


def test_largest_remainder_counts_are_exact_and_bounded():
    sizes = {"a": 10, "b": 10, "c": 10}
    assert largest_remainder_counts(sizes, {"a": 0.12, "b": 0.28, "c": 1.0}, 14) == {"a": 1, "b": 3, "c": 10}
    assert largest_remainder_counts(sizes, {"a": 1.0, "b": 1.0, "c": 0.99}, 30) == {"a": 10, "b": 10, "c": 10}
    with pytest.raises(GemminerError):
        largest_remainder_counts(sizes, dict.fromkeys(sizes, 1.0), 31)


def test_unknown_ratio_and_variant_are_errors():
    with pytest.raises(GemminerError, match=r"unknown search\.ratio 'magic'; allowed: uniform, erk, smart"):
        RandomTicket(0.1, ratio="magic")
    with pytest.raises(GemminerError, match=r"unknown search\.smart_variant 'alexnet'"):
        RandomTicket(0.1, ratio="smart", smart_variant="alexnet")


@pytest.mark.parametrize("ratio", ["erk", "smart"])
def test_deterministic_under_a_seed(ratio):
    model = cnn1d(width=64)
    first = RandomTicket(0.1, ratio=ratio, seed=4).find(model, [])
    again = RandomTicket(0.1, ratio=ratio, seed=4).find(model, [])
    other = RandomTicket(0.1, ratio=ratio, seed=5).find(model, [])
    assert all(torch.equal(first.masks[name], again.masks[name]) for name in first.masks)
    assert not all(torch.equal(first.masks[name], other.masks[name]) for name in first.masks)
    assert counts_of(first) == counts_of(other)  # the seed moves positions, never counts


def test_like_ticket_overrides_the_ratio(tmp_path):
    model = cnn1d()
    reference = RandomTicket(0.1, ratio="erk").find(model, [])
    reference.save(tmp_path / "t.safetensors")
    shuffled = RandomTicket(0.1, ratio="smart", like_ticket=str(tmp_path / "t.safetensors"), seed=1).find(model, [])
    assert counts_of(shuffled) == counts_of(reference)
