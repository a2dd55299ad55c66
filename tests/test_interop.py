"""torch.nn.utils.prune masks <-> tickets, and dense/sparse export."""

import copy

import pytest
import torch
from torch.nn.utils import prune

from gemminer.errors import GemminerError
from gemminer.export import load_sparse, read_export, save_export, sparse_linear
from gemminer.init import init_hash
from gemminer.interop import from_prune_masks, to_prune_masks
from gemminer.methods.random import RandomTicket
from gemminer.models import build_model


def model(name="cnn1d"):
    torch.manual_seed(0)
    return build_model(name, (1, 40), 10, width=8, bias=True).eval()


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_prune_mask_round_trip_is_bit_exact(name):
    net = model(name)
    ticket = RandomTicket(0.1, seed=1).find(net, [])
    pruned = to_prune_masks(ticket, copy.deepcopy(net))
    for weight_name, mask in ticket.masks.items():
        module = pruned.get_submodule(weight_name.rsplit(".", 1)[0])
        assert hasattr(module, "weight_orig") and torch.equal(module.weight_mask != 0, mask)
    back = from_prune_masks(pruned, seed=1)
    assert list(back.masks) == list(ticket.masks)
    assert all(torch.equal(back.masks[key], ticket.masks[key]) for key in ticket.masks)
    assert back.metadata["init_hash"] == init_hash(net) and back.metadata["seed"] == 1
    masked = ticket.apply(copy.deepcopy(net))
    x = torch.randn(8, 1, 40)
    assert torch.equal(pruned(x), masked(x))  # the same function, computed the same way


def test_from_unpruned_model_is_an_error():
    with pytest.raises(GemminerError, match=r"no torch\.nn\.utils\.prune weight masks"):
        from_prune_masks(model())
    net = model()
    prune.l1_unstructured(net[0], "weight", amount=0.5)  # masks made by PyTorch itself import too
    assert from_prune_masks(net).density == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_sparse_export_outputs_equal_the_masked_dense_model(name, density, tmp_path):
    net = model(name)
    ticket = RandomTicket(density, seed=2).find(net, [])
    masked = ticket.apply(copy.deepcopy(net))
    save_export(net.state_dict(), ticket, tmp_path / "s.safetensors", "sparse")
    save_export(net.state_dict(), ticket, tmp_path / "d.safetensors", "dense")
    sparse_state, dense_state = load_sparse(tmp_path / "s.safetensors"), load_sparse(tmp_path / "d.safetensors")
    assert set(sparse_state) == set(dense_state) == set(net.state_dict())
    assert all(torch.equal(sparse_state[key], dense_state[key]) for key in dense_state)  # both exact
    for key, mask in ticket.masks.items():
        assert bool((dense_state[key][~mask] == 0).all())
    rebuilt = model(name)
    rebuilt.load_state_dict(sparse_state)
    x = torch.randn(16, 1, 40)
    with torch.no_grad():
        expected = masked(x)
        assert torch.equal(rebuilt(x), expected)
        csr = sparse_linear(rebuilt)
        assert any(type(m).__name__ == "SparseLinear" for m in csr.modules())
        torch.testing.assert_close(csr(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(csr).to("cpu")(x), expected, rtol=1e-5, atol=1e-5)
    if density < 0.1:
        assert (tmp_path / "s.safetensors").stat().st_size < (tmp_path / "d.safetensors").stat().st_size


def test_corrupt_sparse_file_is_a_clear_error(tmp_path):
    net = model("mlp")
    ticket = RandomTicket(0.1).find(net, [])
    save_export(net.state_dict(), ticket, tmp_path / "s.safetensors", "sparse")
    _, header = read_export(tmp_path / "s.safetensors")
    assert header["format"].startswith("gemminer-sparse")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "s.safetensors")
    with safe_open(tmp_path / "s.safetensors", "pt") as handle:
        metadata = handle.metadata()
    tensors["1.weight.col"] = tensors["1.weight.col"] + 10**6  # column indices out of range
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(GemminerError, match="invalid CSR parts"):
        load_sparse(tmp_path / "bad.safetensors")
