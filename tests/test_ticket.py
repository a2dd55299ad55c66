import pytest
import torch

from gemminer.errors import GemminerError
from gemminer.finetune import finetune
from gemminer.init import init_hash
from gemminer.masking import remove_masks
from gemminer.methods.random import RandomTicket, uniform_counts
from gemminer.models import build_model
from gemminer.ticket import InitHashMismatch, Ticket


def model(name="cnn1d", seed=0):
    torch.manual_seed(seed)
    return build_model(name, (1, 40), 10, width=8)


def test_round_trip_is_bit_exact(tmp_path):
    net = model()
    ticket = RandomTicket(0.3, seed=3).find(net, [])
    ticket.metadata["model"] = "cnn1d"
    ticket.save(tmp_path / "t.safetensors")
    loaded = Ticket.load(tmp_path / "t.safetensors")
    assert list(loaded.masks) == list(ticket.masks)
    for name, mask in ticket.masks.items():
        assert loaded.masks[name].dtype == torch.bool and torch.equal(loaded.masks[name], mask)
    assert loaded.metadata["init_hash"] == init_hash(net)
    assert loaded.metadata["method"] == "random" and loaded.metadata["seed"] == 3
    assert loaded.metadata["density_actual"] == ticket.density
    assert loaded.metadata["format_version"] == "1"


def test_exact_uniform_density():
    counts = uniform_counts({"a": 333, "b": 77, "c": 1000}, 0.05)
    assert sum(counts.values()) == round(1410 * 0.05)
    ticket = RandomTicket(0.05).find(model(), [])
    assert ticket.remaining == round(ticket.total * 0.05)


def test_mismatched_model_is_rejected():
    ticket = RandomTicket(0.3).find(model("cnn1d"), [])
    with pytest.raises(GemminerError, match="does not fit"):
        ticket.apply(model("mlp"))
    wider = build_model("cnn1d", (1, 40), 10, width=16)
    with pytest.raises(GemminerError, match="shape"):
        ticket.apply(wider)


def test_init_hash_mismatch_warns_or_fails():
    ticket = RandomTicket(0.3).find(model(seed=0), [])
    with pytest.warns(InitHashMismatch):
        ticket.apply(model(seed=1))
    with pytest.raises(GemminerError, match="initial weights"):
        ticket.apply(model(seed=1), strict_init=True)


def test_truncated_file_is_a_clear_error(tmp_path):
    ticket = RandomTicket(0.3).find(model(), [])
    path = tmp_path / "t.safetensors"
    ticket.save(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(GemminerError, match="cannot read ticket"):
        Ticket.load(path)
    with pytest.raises(GemminerError, match="not found"):
        Ticket.load(tmp_path / "missing.safetensors")


def test_non_binary_mask_rejected():
    with pytest.raises(GemminerError, match="binary"):
        Ticket({"w": torch.tensor([0.0, 0.5])})


def test_pruned_weights_stay_zero_through_finetuning(tiny, device_batches, device):
    net = build_model("cnn1d", tiny.input_shape, 10, width=8).to(device)
    ticket = RandomTicket(0.2, device=device).find(net, [])
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    ticket.apply(net)
    finetune(net, device_batches, epochs=2)
    masks = {name: mask.to(device) for name, mask in ticket.masks.items()}
    for name, mask in masks.items():
        module = net.get_submodule(name.rsplit(".", 1)[0])
        assert (module.weight[~mask] == 0).all()
    remove_masks(net)
    for name, mask in masks.items():
        weight = dict(net.named_parameters())[name]
        assert (weight[~mask] == 0).all()
        assert not torch.equal(weight[mask], initial[name][mask])  # the kept weights did train


def test_layer_report_adds_up():
    ticket = RandomTicket(0.25).find(model(), [])
    report = ticket.layer_report()
    assert report.splitlines()[-1].split()[-1] == f"{ticket.density:.4f}"
    assert sum(layer.remaining for layer in ticket.layers()) == ticket.remaining
