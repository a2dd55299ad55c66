import pytest
import torch
from torch import nn

from gemminer.errors import GemminerError
from gemminer.masking import ScoreMask, attach, attach_fixed_masks, gem_mask, prunable_names, remove_masks


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
