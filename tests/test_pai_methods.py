"""Pruning at initialization: SNIP, GraSP, SynFlow and magnitude against hand computations."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from gemminer.errors import GemminerError
from gemminer.init import initialize_weights
from gemminer.masking import prunable_names
from gemminer.methods.grasp import Grasp, class_balanced_samples, gradient_and_hessian_gradient, halves
from gemminer.methods.magnitude import Magnitude
from gemminer.methods.scoring import keep_bottom, keep_top
from gemminer.methods.snip import Snip
from gemminer.methods.synflow import SynFlow, synflow_scores

CLASSES, LENGTH = 3, 12


def conv_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Conv + BatchNorm + linear, with biases: every kind of tensor the methods must handle."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * LENGTH, CLASSES)).to(dtype)


def mlp(seed: int = 0, sizes: tuple[int, ...] = (LENGTH, 32, 16, CLASSES)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_batches(seed: int = 0, samples: int = 48, batch: int = 16, scale: float = 1.0
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(samples, 1, LENGTH, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name.rsplit(".", 1)[0]).weight for name in prunable_names(model)}


METHODS = {"snip": (Snip, {}), "grasp": (Grasp, {"samples_per_class": 4}), "synflow": (SynFlow, {"iterations": 10}),
           "magnitude": (Magnitude, {})}


# every method ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_deterministic_exact_and_leaves_the_model_alone(name):
    cls, options = METHODS[name]
    model = conv_net()
    model[0].bias.requires_grad_(False)  # the copy may change requires_grad; the caller's must stay as it was
    model.eval()
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    grads_before = {key: p.requires_grad for key, p in model.named_parameters()}
    total = sum(w.numel() for w in prunable_weights(model).values())
    for density in (0.05, 0.37, 1.0):
        first = cls(density, **options).search(model, make_batches())
        second = cls(density, **options).search(model, make_batches())
        assert first.ticket.remaining == round(total * density)
        assert all(torch.equal(first.ticket.masks[k], second.ticket.masks[k]) for k in first.ticket.masks)
        assert all(torch.equal(first.scores[k], second.scores[k]) for k in first.scores)
        assert set(first.scores) == set(first.ticket.masks)
        assert all(s.device.type == "cpu" for s in first.scores.values())
        ranked = keep_top(first.scores, first.ticket.remaining)
        assert all(torch.equal(ranked[k], first.ticket.masks[k]) for k in ranked)
        assert first.epochs == 0 and first.seconds >= 0 and first.ticket.metadata["method"] == name
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert {key: p.requires_grad for key, p in model.named_parameters()} == grads_before
    assert not model.training


@pytest.mark.parametrize(("cls", "options", "message"), [
    (Snip, {"batches": 0}, r"search.batches must be an integer in \[1, inf\)"),
    (Grasp, {"temperature": 0.0}, r"search.temperature must be a finite number in \(0, inf\)"),
    (Grasp, {"temperature": math.inf}, r"search.temperature must be a finite number in \(0, inf\)"),
    (Grasp, {"samples_per_class": 0}, r"search.samples_per_class must be an integer in \[1, inf\)"),
    (SynFlow, {"iterations": 0}, r"search.iterations must be an integer in \[1, inf\)"),
    (SynFlow, {"dtype": "float16"}, "unknown search.dtype 'float16'; allowed: float64, float32"),
    (SynFlow, {"prune": "middle"}, "unknown search.prune 'middle'; allowed: lowest, highest"),
])
def test_bad_options_are_one_line_errors(cls, options, message):
    with pytest.raises(GemminerError, match=message):
        cls(0.1, **options)


@pytest.mark.parametrize("cls", [Snip, Grasp, SynFlow])
def test_empty_training_data_is_an_error(cls):
    with pytest.raises(GemminerError, match="empty"):
        cls(0.1).search(conv_net(), [])


# SNIP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("count", "bn_mode"), [(1, "eval"), (2, "eval"), (1, "train")])
def test_snip_scores_are_the_summed_gradient_saliency(count, bn_mode):
    model, data = conv_net(), make_batches()
    result = Snip(0.2, batches=count, bn_mode=bn_mode).search(model, data)
    # eval (the default): BatchNorm on its running statistics, as the SNIP and Synaptic-Flow code score
    reference = copy.deepcopy(model).train(bn_mode == "train")
    params = list(prunable_weights(reference).values())
    loss = sum(F.cross_entropy(reference(x), y) for x, y in data[:count])
    grads = torch.autograd.grad(loss, params)
    for (name, w), g in zip(prunable_weights(reference).items(), grads, strict=True):
        torch.testing.assert_close(result.scores[name], (w * g).abs().detach(), rtol=1e-5, atol=1e-8)
    total = sum(p.numel() for p in params)
    assert result.ticket.remaining == round(total * 0.2) and result.ticket.metadata["snip_batches"] == count


def test_snip_bn_mode_changes_the_ticket_and_old_runs_read_back_as_train(tmp_path):
    from gemminer.config import dump_yaml, load_run_config, resolve

    model, data = conv_net(), make_batches()
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    masks = [Snip(0.2, bn_mode=mode).find(model, data).masks for mode in ("eval", "train")]
    assert any(not torch.equal(masks[0][name], masks[1][name]) for name in masks[0])
    with pytest.raises(GemminerError, match=r"unknown search\.bn_mode"):
        Snip(0.2, bn_mode="inference")
    # a run folder from before the option scored in train mode: it reads back so, and is stale against the default
    text = dump_yaml(resolve({"method": "snip"})).replace("  bn_mode: eval\n", "")
    assert "bn_mode" not in text
    (tmp_path / "config.yaml").write_text(text)
    assert load_run_config(tmp_path / "config.yaml").search.bn_mode == "train"


def test_snip_refuses_fewer_batches_than_asked_and_closes_the_pass():
    closed = []

    class Stream:
        def __iter__(self):
            try:
                yield from make_batches()
            finally:
                closed.append(True)

    model = conv_net()
    with pytest.raises(GemminerError, match="10 training batches; the training data has 3"):
        Snip(0.2, batches=10).search(model, make_batches())  # 3 batches only: not the method asked for
    assert Snip(0.2, batches=3).search(model, make_batches()).ticket.metadata["snip_batches"] == 3
    Snip(0.2, batches=1).search(model, Stream())
    assert closed == [True]  # the generator was closed after one batch, not left suspended


# GraSP -----------------------------------------------------------------------------------------
def _gradient(net: nn.Module, names: list[str], parts, temperature: float) -> list[torch.Tensor]:
    params = list(prunable_weights(net).values())
    loss = sum(F.cross_entropy(net(x) / temperature, y) for x, y in parts)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("temperature", [1.0, 200.0])
@pytest.mark.parametrize("make", [conv_net, mlp])
def test_grasp_hessian_gradient_matches_finite_differences(make, temperature):
    net = make(dtype=torch.float64) if make is conv_net else make().double()
    net.train()
    x, y = make_batches(samples=12)[0]
    parts = halves(x.double(), y)
    names = prunable_names(net)
    g, hg = gradient_and_hessian_gradient(net, names, parts, temperature)
    torch.testing.assert_close(list(g.values()), _gradient(net, names, parts, temperature))
    eps = 1e-5 / max(float(v.abs().max()) for v in g.values())  # small: no ReLU kink crossed
    shifted = []
    for sign in (1, -1):
        other = copy.deepcopy(net)
        with torch.no_grad():
            for name, w in prunable_weights(other).items():
                w.add_(sign * eps * g[name])
        shifted.append(_gradient(other, names, parts, temperature))
    for name, plus, minus in zip(names, *shifted, strict=True):
        finite = (plus - minus) / (2 * eps)
        torch.testing.assert_close(hg[name], finite, rtol=1e-5, atol=1e-7 * float(finite.abs().max()))


@pytest.mark.filterwarnings("ignore:grasp.*fewer than samples_per_class")  # one sample, of class 0 only
def test_grasp_sign_worked_by_hand():
    """logits = (w0, w1) for x = 1, label 0, T = 1: g = (-p1, p1), H = p0 p1 [[1, -1], [-1, 1]], so
    H g = 2 p0 p1^2 (-1, 1) and w * Hg = 2 p0 p1^2 (-w0, w1). GraSP keeps the largest: w1, the
    smaller weight (removing w0 raises the gradient norm, removing w1 lowers it); SNIP keeps w0."""
    net = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0], [0.5]]))
    data = [(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0]))]
    result = Grasp(0.5, samples_per_class=1, temperature=1.0).search(net, data)
    p = torch.softmax(torch.tensor([1.0, 0.5], dtype=torch.float64), 0)
    by_hand = 2 * p[0] * p[1] ** 2 * torch.tensor([[-1.0], [0.5]], dtype=torch.float64)
    torch.testing.assert_close(result.scores["weight"], by_hand)
    assert result.ticket.masks["weight"].flatten().tolist() == [False, True]
    assert Grasp(0.5, samples_per_class=1).search(net, data).ticket.masks["weight"].flatten().tolist() == [False, True]
    assert Snip(0.5).search(net, data).ticket.masks["weight"].flatten().tolist() == [True, False]


def test_grasp_scores_on_class_balanced_halves():
    """The whole search against torch.func: the first 2 samples of each class, grouped by class,
    two halves, g summed over them, H g as a vector-Hessian product of the summed loss."""
    model, data = conv_net(), make_batches(samples=64)
    result = Grasp(0.3, samples_per_class=2, temperature=200.0).search(model, data)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    chosen = [int(i) for label in range(CLASSES) for i in (y == label).nonzero().flatten()[:2]]
    parts = halves(x[chosen], y[chosen])
    reference = copy.deepcopy(model).train()
    reference[1].track_running_stats = False  # batch statistics as in train mode, no buffer update under torch.func
    names = prunable_names(reference)
    fixed = {key: value for key, value in reference.named_parameters() if key not in names}

    def loss(params):
        return sum(F.cross_entropy(torch.func.functional_call(reference, {**fixed, **params}, (xs,)) / 200.0, ys)
                   for xs, ys in parts)

    params = {name: w.detach() for name, w in prunable_weights(reference).items()}
    g = torch.func.grad(loss)(params)
    hg = torch.func.vjp(torch.func.grad(loss), params)[1](g)[0]  # H symmetric: g^T H = (H g)^T
    for name in names:
        torch.testing.assert_close(result.scores[name], params[name] * hg[name], rtol=1e-4, atol=1e-12)
    assert result.ticket.metadata["grasp_samples"] == 6
    assert result.ticket.remaining == round(sum(p.numel() for p in params.values()) * 0.3)


def test_class_balanced_samples_stop_when_full_or_exhausted():
    seen = []

    def stream():
        for batch in make_batches(samples=64, batch=8):
            seen.append(batch)
            yield batch

    x, y = class_balanced_samples(stream(), 2, CLASSES)
    assert y.tolist() == [0, 0, 1, 1, 2, 2] and len(seen) < 8  # stopped once every class had 2
    flat_x, flat_y = torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen])
    assert torch.equal(x[0], flat_x[(flat_y == 0).nonzero()[0, 0]])
    x, y = class_balanced_samples(make_batches(samples=64), 1000, lambda inputs: CLASSES)
    assert x.shape[0] == 64 and y.tolist() == sorted(y.tolist())


# SynFlow ---------------------------------------------------------------------------------------
def _synflow_by_hand(model: nn.Module) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    params = prunable_weights(net)
    flow = net(torch.ones(1, 1, LENGTH, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(flow, list(params.values()))
    return {name: (w * g).abs().detach() for (name, w), g in zip(params.items(), grads, strict=True)}


def test_synflow_scores_by_hand_and_one_shot_ticket():
    model = conv_net()
    with torch.no_grad():  # running statistics away from (0, 1), some negative: they enter as |.|
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    net = copy.deepcopy(model).double().eval()
    state = {key: tensor.clone() for key, tensor in net.state_dict().items()}
    by_hand = _synflow_by_hand(model)
    scores = synflow_scores(net, prunable_names(net), (1, LENGTH))
    for name in by_hand:
        torch.testing.assert_close(scores[name], by_hand[name])
    assert all(torch.equal(net.state_dict()[key], state[key]) for key in state)  # signs and values restored
    result = SynFlow(0.3, iterations=1).search(model, make_batches())
    expected = keep_top(by_hand, round(sum(s.numel() for s in by_hand.values()) * 0.3))
    assert all(torch.equal(result.ticket.masks[k], expected[k]) for k in expected)


def test_synflow_is_iterative_on_the_masked_network():
    model = mlp()
    names = prunable_names(model)
    total = sum(w.numel() for w in prunable_weights(model).values())
    net = copy.deepcopy(model).double().eval()
    first = keep_top(synflow_scores(net, names, (1, LENGTH)), round(total * 0.04 ** 0.5))
    second = keep_top(synflow_scores(net, names, (1, LENGTH), first), round(total * 0.04), eligible=first)
    result = SynFlow(0.04, iterations=2).search(model, make_batches())
    assert all(torch.equal(result.ticket.masks[k], second[k]) for k in names)
    assert all(torch.equal(keep_top(result.scores, int(sum(m.sum() for m in first.values())))[k], first[k])
               for k in names)  # the ranking also orders the earlier rounds


def test_inverted_synflow_prunes_the_highest_in_every_round():
    """Frankle et al. 2021's inverted SynFlow: each round drops the highest-scored survivors and the next
    round re-scores what is left; not the bottom of the normal run's ranking (but that, in one shot)."""
    model = mlp()
    names = prunable_names(model)
    total = sum(w.numel() for w in prunable_weights(model).values())
    net = copy.deepcopy(model).double().eval()

    def lowest_first(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: -score for name, score in scores.items()}

    first = keep_top(lowest_first(synflow_scores(net, names, (1, LENGTH))), round(total * 0.04 ** 0.5))
    second = keep_top(lowest_first(synflow_scores(net, names, (1, LENGTH), first)), round(total * 0.04),
                      eligible=first)
    inverted = SynFlow(0.04, iterations=2, prune="highest").search(model, make_batches())
    assert all(torch.equal(inverted.ticket.masks[k], second[k]) for k in names)
    ranked = keep_top(inverted.scores, inverted.ticket.remaining)  # its ranking still gives its ticket
    assert all(torch.equal(ranked[k], inverted.ticket.masks[k]) for k in names)
    assert inverted.ticket.metadata["synflow_prune"] == "highest"
    normal = SynFlow(0.04, iterations=2).search(model, make_batches())
    assert "synflow_prune" not in normal.ticket.metadata
    bottom = keep_bottom(normal.scores, normal.ticket.remaining)
    assert not all(torch.equal(bottom[k], inverted.ticket.masks[k]) for k in names)
    one_shot = SynFlow(0.04, iterations=1, prune="highest").search(model, make_batches()).ticket
    bottom = keep_bottom(SynFlow(0.04, iterations=1).search(model, make_batches()).scores, one_shot.remaining)
    assert all(torch.equal(bottom[k], one_shot.masks[k]) for k in names)


def test_synflow_is_data_free():
    model = conv_net()
    one = SynFlow(0.1, iterations=5).search(model, make_batches(seed=1))
    two = SynFlow(0.1, iterations=5).search(model, make_batches(seed=2, samples=7, batch=7, scale=100.0))
    assert all(torch.equal(one.ticket.masks[k], two.ticket.masks[k]) for k in one.ticket.masks)
    assert all(torch.equal(one.scores[k], two.scores[k]) for k in one.scores)


def test_synflow_leaves_no_layer_empty():
    model = mlp(sizes=(LENGTH, 256, 64, CLASSES))  # 3072, 16384 and 192 weights
    total = sum(w.numel() for w in prunable_weights(model).values())
    for density in (0.1, 0.01):
        ticket = SynFlow(density).search(model, make_batches()).ticket
        assert ticket.remaining == round(total * density)
        assert all(int(mask.sum()) > 0 for mask in ticket.masks.values())


def test_synflow_float32_and_batchnorm():
    model = conv_net()
    result = SynFlow(0.2, iterations=3, dtype="float32").search(model, make_batches())
    assert result.ticket.remaining == round(sum(w.numel() for w in prunable_weights(model).values()) * 0.2)
    assert all(w.dtype == torch.float32 for w in model.parameters())


# magnitude -------------------------------------------------------------------------------------
def test_magnitude_keeps_the_largest_weights():
    model = mlp()
    result = Magnitude(0.15).search(model, make_batches())
    flat = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    kept = torch.cat([m.flatten() for m in result.ticket.masks.values()])
    keep = round(flat.numel() * 0.15)
    assert int(kept.sum()) == keep
    assert set(kept.nonzero().flatten().tolist()) == set(torch.topk(flat, keep).indices.tolist())
    assert float(flat[kept].min()) >= float(flat[~kept].max())


def test_magnitude_refuses_signed_constant_weights():
    model = mlp()
    with pytest.raises(GemminerError, match=r"needs weights of varying magnitude.*--model-weight-init kaiming_normal"):
        Magnitude(0.1, init="signed_constant").search(model, make_batches())
    initialize_weights(model, prunable_names(model), "signed_constant", torch.Generator().manual_seed(0))
    with pytest.raises(GemminerError, match=r"all \|w\| are equal in 1.weight, 3.weight, 5.weight"):
        Magnitude(0.1).search(model, make_batches())
    assert Magnitude(0.1, init="kaiming_normal").search(model, make_batches()).ticket.remaining > 0


def test_grasp_warns_when_a_class_is_short_of_samples():
    """Fewer samples of a class than samples_per_class: a warning naming the class, and the ticket
    records how many were scored."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, CLASSES, bias=False))
    inputs = torch.randn(7, 4)
    targets = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # class 2 has one sample
    with pytest.warns(UserWarning, match=r"1 class\(es\) \(2: 1\); it scores on 7 samples, not 9"):
        result = Grasp(0.5, samples_per_class=3).search(model, [(inputs, targets)])
    assert result.ticket.metadata["grasp_samples"] == 7
