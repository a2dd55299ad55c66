import copy

import pytest
import torch
from torch import nn

from gemminer.errors import GemminerError
from gemminer.masking import (
    ScoreMask,
    ScoreMaskGroup,
    attach,
    attach_fixed_masks,
    attach_score_masks,
    clamp_scores,
    gem_mask,
    original_weight,
    owner,
    prunable_names,
    release_score_masks,
    remove_masks,
)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3))


def test_prunable_names_follow_module_order_and_skip_options():
    net = small_net()
    assert prunable_names(net) == ["0.weight", "4.weight"]
    assert prunable_names(net, prune_first=False) == ["4.weight"]
    assert prunable_names(net, prune_last=False) == ["0.weight"]
    with pytest.raises(GemminerError):
        prunable_names(nn.Sequential(nn.ReLU()))


def test_gradient_reaches_scores_through_rounding(device):
    net = small_net().to(device)
    weight = net[4].weight.detach().clone()
    masks = attach(net, ["4.weight"], lambda name, w: ScoreMask(torch.full_like(w, 0.7)))
    net[4].parametrizations.weight.original.requires_grad_(False)
    x = torch.randn(5, 1, 8).to(device)
    net(x).sum().backward()
    scores = masks["4.weight"].scores
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert scores.device.type == device.type
    # straight-through: d out / d s = d out / d w_eff * w  (r(s) passes the gradient unchanged)
    features = net[:4](x).detach()
    expected = weight * torch.ones(5, 3, device=device).t().matmul(features)
    torch.testing.assert_close(scores.grad, expected)


def test_gem_mask_gradients_frozen_out_and_trainable_weight(device):
    """ds = grad * w * alive for every score, kept or rounded off (straight-through), nothing for a
    frozen-out one; a trainable weight gets grad * r(s) * alive."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator).to(device).requires_grad_(True)
    scores = torch.rand(6, 5, generator=generator).to(device).requires_grad_(True)
    alive = (torch.rand(6, 5, generator=generator) > 0.3).float().to(device)
    grad = torch.randn(6, 5, generator=generator).to(device)
    out = gem_mask(weight, scores, alive)
    kept = ((scores > 0.5).float() * alive).detach()
    assert torch.equal(out.detach(), weight.detach() * kept)
    out.backward(grad)
    assert torch.equal(scores.grad, grad * weight.detach() * alive)
    assert (scores.grad[alive == 0] == 0).all()
    assert torch.equal(weight.grad, grad * kept)


def test_forward_uses_threshold_and_alive(device):
    net = nn.Linear(4, 1, bias=False).to(device)
    net.weight.data.fill_(1.0)
    masks = attach(net, ["weight"], lambda name, w: ScoreMask(torch.tensor([[0.2, 0.5, 0.51, 0.9]], device=device)))
    masks["weight"].alive[0, 3] = 0
    assert net.weight.tolist() == [[0.0, 0.0, 1.0, 0.0]]  # 0.5 is not > 0.5; a frozen-out weight is off


def test_remove_masks_leaves_exact_zeros(device):
    net = small_net().to(device)
    mask = torch.rand_like(net[4].weight) > 0.5
    attach_fixed_masks(net, {"4.weight": mask})
    remove_masks(net)
    assert type(net[4]) is nn.Linear
    assert (net[4].weight[~mask] == 0).all() and (net[4].weight[mask] != 0).all()


def grouped_and_alone(device):
    """Two copies of one network with the same scores (some exactly 0.5) and flags: the first computes its
    masks in a ScoreMaskGroup, the second layer by layer."""
    generator = torch.Generator().manual_seed(1)
    nets, masks = [], []
    for grouped in (True, False):
        net = small_net().to(device)
        for parameter in net.parameters():
            parameter.requires_grad_(False)
        scores = {name: torch.rand(net.get_submodule(name[0]).weight.shape, generator=generator)
                  for name in ("0.weight", "4.weight")} if not masks else {n: m.scores.detach().cpu()
                                                                             for n, m in masks[0].items()}
        if not masks:
            scores["4.weight"][0, :3] = 0.5
        attached = attach(net, list(scores), lambda name, w, scores=scores: ScoreMask(scores[name].clone().to(device)))
        attached["4.weight"].alive[1, :5] = 0
        if grouped:
            group = ScoreMaskGroup()
            for name, mask in attached.items():
                group.add(mask, original_weight(owner(net, name)))
        nets.append(net)
        masks.append(attached)
    return nets, masks


def test_group_gives_the_layerwise_values_and_gradients(device):
    """The joint foreach computation is exact: the same masked weights and the same score gradients as
    each layer alone, through forward and backward, after a step and a freezing event, and without grad;
    scores clamped by the search's `clamp_scores` too (the group then skips its own clamp)."""
    (grouped, alone), (grouped_masks, alone_masks) = grouped_and_alone(device)
    x = torch.randn(6, 1, 8, generator=torch.Generator().manual_seed(2)).to(device)
    optimizers = [torch.optim.SGD([m.scores for m in masks.values()], lr=0.3, momentum=0.9)
                  for masks in (grouped_masks, alone_masks)]
    for step in range(3):
        for net, optimizer in zip((grouped, alone), optimizers, strict=True):
            optimizer.zero_grad()
            net(x).square().sum().backward()
        for name in grouped_masks:
            assert torch.equal(grouped.get_submodule(name[0]).weight, alone.get_submodule(name[0]).weight)
            assert torch.equal(grouped_masks[name].scores.grad, alone_masks[name].scores.grad), (step, name)
        for optimizer, masks in zip(optimizers, (grouped_masks, alone_masks), strict=True):
            optimizer.step()
            with torch.no_grad():
                if masks is grouped_masks:
                    clamp_scores(list(masks.values()))
                    assert all(mask.in_range() for mask in masks.values())
                else:
                    for mask in masks.values():
                        mask.scores.clamp_(0, 1)
                if step == 1:  # a freezing event changes the flags in place
                    for mask in masks.values():
                        mask.alive[0] = 0
    with torch.no_grad():
        assert torch.equal(grouped(x), alone(x))
    group = grouped_masks["0.weight"].group
    assert group is not None and alone_masks["0.weight"].group is None
    assert grouped[0].weight is group._outputs[0]  # handed out from the joint computation


def test_group_clamps_scores_changed_after_the_search_clamped_them(device):
    """Scores known to be in [0, 1] skip the clamp; any later in-place change (or `release`) brings it back,
    so a score of 1.7 still counts once (round(1.7) alone would be 2)."""
    (grouped, _), (masks, _) = grouped_and_alone(device)
    mask = masks["4.weight"]
    clamp_scores(list(masks.values()))
    assert mask.in_range()
    with torch.no_grad():
        mask.scores[0, 0], mask.scores[0, 1] = 1.7, -0.7
    assert not mask.in_range()
    weight = original_weight(grouped[4])
    expected = weight * (mask.scores > 0.5) * mask.alive
    assert torch.equal(grouped[4].weight, expected) and grouped[4].weight[0, 0] == weight[0, 0]
    clamp_scores(list(masks.values()))
    mask.release()
    assert not mask.in_range()


def test_group_recomputes_when_asked_twice_and_falls_back_for_other_weights(device):
    (grouped, _), (masks, _) = grouped_and_alone(device)
    group = masks["0.weight"].group
    x = torch.randn(4, 1, 8).to(device)
    grouped(x).sum().backward()
    grouped(x).sum().backward()  # no step between: a fresh graph, not the freed one
    first = grouped[4].weight
    assert grouped[4].weight is not first  # asked twice: computed again
    other = torch.randn_like(masks["4.weight"].scores)
    assert group.masked(masks["4.weight"], other) is None  # not the weight it was added with
    alone = masks["4.weight"](other)
    assert torch.equal(alone, other * (masks["4.weight"].scores > 0.5) * masks["4.weight"].alive)


def test_a_deep_copy_keeps_its_own_group(device):
    (grouped, _), (masks, _) = grouped_and_alone(device)
    twin = copy.deepcopy(grouped)
    twin_masks = [m for m in twin.modules() if isinstance(m, ScoreMask)]
    assert twin_masks[0].group is twin_masks[1].group is not masks["0.weight"].group
    with torch.no_grad():
        twin_masks[0].scores.fill_(1.0)
    assert torch.equal(twin[0].weight, twin[0].parametrizations.weight.original * twin_masks[0].alive)
    assert not torch.equal(grouped[0].weight, twin[0].weight)  # the original kept its own scores


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.left, self.right = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, head: str = "both", checkpointed: bool | None = None) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = self.trunk(x) if checkpointed is None else checkpoint(self.trunk, x, use_reentrant=checkpointed)
        return {"left": self.left(x), "right": self.right(x), "both": self.left(x) + self.right(x)}[head]


def two_heads(grouped: bool, trainable: str | None = None):
    torch.manual_seed(0)
    net = TwoHeads()
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(name == trainable)
    generator = torch.Generator().manual_seed(1)
    names = ["trunk.weight", "left.weight", "right.weight"]
    masks = attach_score_masks(net, names, lambda name, w: ScoreMask(torch.rand(w.shape, generator=generator)),
                               grouped=grouped)
    return net, masks


@pytest.mark.parametrize("case", ["heads in turn", "checkpoint", "checkpoint reentrant", "trainable weight"])
def test_group_agrees_with_layers_alone_where_one_graph_would_not_do(case):
    """Backward runs that the group's one shared node could break: heads used in turn with the gradients
    accumulated, activation checkpointing, a weight that trains: the group path gives the gradients of
    the layer-by-layer path, without autograd errors."""
    grads = []
    for grouped in (True, False):
        net, masks = two_heads(grouped, trainable="left.weight" if case == "trainable weight" else None)
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), requires_grad=case.startswith("checkpoint"))
        checkpointed = {"checkpoint": False, "checkpoint reentrant": True}.get(case)
        heads = ["left", "right", "both"] if case != "trainable weight" else ["both", "both", "left"]
        for head in heads:
            net(x, head, checkpointed).square().sum().backward()
        grads.append([masks[name].scores.grad.clone() for name in masks])
        if case == "trainable weight":
            grads[-1].append(net.left.parametrizations.weight.original.grad.clone())
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_group_after_inference_mode_and_a_search_network_holds_no_computed_tensors():
    net, masks = two_heads(grouped=True)
    x = torch.randn(2, 4)
    net(x).sum().backward()
    copy.deepcopy(net)  # with the group's outputs still in a graph
    with torch.inference_mode():
        net.double()  # every tensor an inference tensor: no version counters
        inferred = net(x.double())
    assert torch.equal(net(x.double()), inferred)
    release_score_masks(list(masks.values()))
    group = masks["trunk.weight"].group
    assert group._outputs == [] and all(mask._weight_alive is None for mask in masks.values())


class _NoGradientBack(torch.autograd.Function):
    """An op that passes no gradient to its input (a user's quantizer, say)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> None:
        return None


def test_group_backward_when_no_gradient_reaches_the_masked_weights():
    """Every use of the group's outputs gives None back: the backward runs through, as layer by layer."""
    for grouped in (True, False):
        torch.manual_seed(0)
        layer = nn.Linear(4, 4, bias=False).requires_grad_(False)
        masks = attach_score_masks(layer, ["weight"], lambda name, w: ScoreMask(torch.rand(w.shape)), grouped=grouped)
        x = torch.randn(3, 4, requires_grad=True)
        (x @ _NoGradientBack.apply(layer.weight).t()).sum().backward()
        assert masks["weight"].scores.grad is None and x.grad is not None


def test_scores_in_the_weights_layout_keep_masked_weights_channels_last(device):
    """On CUDA the network is channels_last; scores made with `like_weight` keep the masked weights (grouped
    or layer by layer) and the scores' gradients in that layout, with the values of a contiguous network."""
    from gemminer.masking import like_weight

    channels_last = torch.channels_last
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for layout in (torch.contiguous_format, channels_last):
        for grouped in (True, False):
            torch.manual_seed(0)
            net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),
                                nn.Flatten(), nn.Linear(16, 2, bias=False)).to(device, memory_format=layout)
            net.requires_grad_(False)
            generator = torch.Generator().manual_seed(1)
            masks = attach_score_masks(net, prunable_names(net), lambda name, w, generator=generator: ScoreMask(
                like_weight(torch.rand(w.shape, generator=generator), w)), grouped=grouped)
            weights_now = [net[0].weight, net[2].weight]
            net(x.contiguous(memory_format=layout)).square().sum().backward()
            for weight, mask in zip(weights_now, (masks["0.weight"], masks["2.weight"]), strict=True):
                assert weight.is_contiguous(memory_format=layout), (layout, grouped)
                assert all(t.is_contiguous(memory_format=layout) for t in (mask.scores, mask.alive))
                assert mask.scores.grad.is_contiguous(memory_format=layout)
            results.append(([w.detach() for w in weights_now], [m.scores.grad for m in masks.values()]))
    for weights_now, grads in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights_now, results[0][0], strict=True))
        # the convolutions' backward differs by layout in the last bits (on CUDA: other cuDNN kernels, TF32)
        tolerance = 1e-5 if device.type == "cpu" else 1e-2
        assert all(torch.allclose(a, b, rtol=tolerance, atol=tolerance / 10)
                   for a, b in zip(grads, results[0][1], strict=True))


def test_kth_smallest_is_kthvalue():
    """numpy's selection on the CPU gives kthvalue's value: ties, signed zeros, float64, every k at the ends."""
    from gemminer.masking import kth_smallest

    generator = torch.Generator().manual_seed(0)
    draws = [torch.rand(1000, generator=generator), torch.randint(0, 5, (999,), generator=generator).float(),
             torch.tensor([0.0, -0.0, 0.0, 1.0, -1.0]), torch.rand(257, generator=generator, dtype=torch.float64)]
    for values in draws:
        for k in (1, 2, values.numel() // 2, values.numel() - 1, values.numel()):
            expected = torch.kthvalue(values, k).values
            found = kth_smallest(values, k)
            assert found.dtype == values.dtype and found.dim() == 0 and found == expected, (k, found, expected)
