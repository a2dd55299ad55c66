"""Sanity checks: shuffle keeps per-layer counts, reinit keeps the mask on new weights, invert keeps the
lowest-ranked weights (iterative methods: a search with every step inverted); the command writes one run
folder per check and sanity.json."""

import json

import pytest
import torch

from gemminer.cli import main
from gemminer.config import load_run_config
from gemminer.errors import GemminerError
from gemminer.sanity import invert_ranking, shuffle_layers
from gemminer.ticket import Ticket, read_safetensors

FLAGS = ["--density", "0.1", "--finetune-epochs", "2", "--data-num-samples", "500", "--data-batch-size", "64",
         "--model-width", "8", "--bn-recalibration-batches", "3", "--quiet"]


def ticket() -> Ticket:
    generator = torch.Generator().manual_seed(0)
    masks = {"a.weight": torch.rand(6, 5, generator=generator) < 0.3, "b.weight": torch.rand(40, generator=generator)
             < 0.5}
    return Ticket(masks, {"method": "snip"})


def test_shuffle_keeps_every_layer_count_and_moves_the_weights():
    original = ticket()
    shuffled = shuffle_layers(original, torch.Generator().manual_seed(1))
    for name, mask in original.masks.items():
        assert int(shuffled.masks[name].sum()) == int(mask.sum()) and shuffled.masks[name].shape == mask.shape
    assert not original.same_masks(shuffled)


def test_invert_keeps_the_count_and_takes_the_lowest_ranked():
    original = ticket()
    scores = {"a.weight": torch.arange(30.0).view(6, 5), "b.weight": torch.arange(30.0, 70.0)}
    inverted = invert_ranking(original, scores)
    assert inverted.remaining == original.remaining
    flat = torch.cat([inverted.masks["a.weight"].flatten(), inverted.masks["b.weight"]])
    assert bool(flat[:original.remaining].all()) and not bool(flat[original.remaining:].any())


def test_sanity_command_on_a_gemminer_run(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["mine", "--out", str(run), "--epochs", "3", "--search-freeze-period", "1", *FLAGS,
                 "--data-dir", data_dir]) == 0
    assert main(["sanity", "--run", str(run), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert all(check in printed for check in ("shuffle", "reinit", "invert"))
    report = json.loads((run / "sanity.json").read_text())
    assert set(report["checks"]) == {"shuffle", "reinit", "invert"}
    ticket_ = Ticket.load(run / "ticket.safetensors")
    shuffled = Ticket.load(run / "sanity" / "shuffle" / "ticket.safetensors")
    assert [layer.remaining for layer in shuffled.layers()] == [layer.remaining for layer in ticket_.layers()]
    assert not shuffled.same_masks(ticket_)
    reinit = Ticket.load(run / "sanity" / "reinit" / "ticket.safetensors")
    assert reinit.same_masks(ticket_)
    first, _ = read_safetensors(run / "init.safetensors", "init")
    second, _ = read_safetensors(run / "sanity" / "reinit" / "init.safetensors", "init")
    name = next(iter(ticket_.masks))
    assert not torch.equal(first[name], second[name])  # new weights ...
    assert torch.equal(first[name].abs(), second[name].abs())  # ... of the same signed-constant scheme
    inverted = Ticket.load(run / "sanity" / "invert" / "ticket.safetensors")
    assert inverted.remaining == ticket_.remaining and not inverted.same_masks(ticket_)
    for check in report["checks"].values():
        assert check["drop"] == pytest.approx(report["acc_after_finetune"] - check["acc_after_finetune"])


def test_invert_of_a_ranked_method_and_refusal_without_ranking(tmp_path, data_dir, capsys):
    run = tmp_path / "snip"
    assert main(["mine", "--method", "snip", "--out", str(run), *FLAGS, "--data-dir", data_dir]) == 0
    assert main(["sanity", "--run", str(run), "--checks", "invert", "--quiet"]) == 0
    scores, _ = read_safetensors(run / "scores.safetensors", "scores")
    ticket_ = Ticket.load(run / "ticket.safetensors")
    inverted = Ticket.load(run / "sanity" / "invert" / "ticket.safetensors")
    kept = torch.cat([scores[n].flatten()[inverted.masks[n].flatten()] for n in ticket_.masks])
    dropped = torch.cat([scores[n].flatten()[~inverted.masks[n].flatten()] for n in ticket_.masks])
    assert kept.max() <= dropped.min()  # the lowest-ranked weights, nothing above them
    random_run = tmp_path / "random"
    assert main(["mine", "--method", "random", "--out", str(random_run), *FLAGS, "--data-dir", data_dir]) == 0
    capsys.readouterr()
    assert main(["sanity", "--run", str(random_run), "--checks", "invert"]) == 2
    assert "cannot be inverted" in capsys.readouterr().err
    with pytest.raises(GemminerError, match="unknown sanity check"):
        from gemminer.sanity import sanity

        sanity(random_run, "shuffle,flip")


# keeping the lowest flow empties whole layers of the tiny net: expected of an inverted ticket, and warned about
@pytest.mark.filterwarnings("ignore::gemminer.experiment.LayerCollapse")
def test_invert_of_synflow_prunes_the_highest_in_every_round(tmp_path, data_dir):
    """Iterative SynFlow inverts inside its loop (Frankle et al. 2021): a new search with search.prune highest
    on the run's own weights, not the bottom of the saved ranking."""
    run = tmp_path / "synflow"
    assert main(["mine", "--method", "synflow", "--search-iterations", "5", "--out", str(run), *FLAGS,
                 "--data-dir", data_dir]) == 0
    assert main(["sanity", "--run", str(run), "--checks", "invert", "--quiet"]) == 0
    variant = run / "sanity" / "invert"
    config = load_run_config(variant / "config.yaml")
    assert config.search.prune == "highest" and config.search.iterations == 5
    assert load_run_config(run / "config.yaml").search.prune == "lowest"
    first, _ = read_safetensors(run / "init.safetensors", "init")
    second, _ = read_safetensors(variant / "init.safetensors", "init")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # same weights
    ticket_ = Ticket.load(run / "ticket.safetensors")
    inverted = Ticket.load(variant / "ticket.safetensors")
    assert inverted.remaining == ticket_.remaining and inverted.metadata["synflow_prune"] == "highest"
    scores, _ = read_safetensors(run / "scores.safetensors", "scores")
    assert not inverted.same_masks(invert_ranking(ticket_, scores))  # the per-round rule, not the bottom d*N
    # a variant made by the earlier rule (the bottom of the ranking, under the run's own config) is made again
    text = (variant / "config.yaml").read_text()
    assert "prune: highest" in text
    (variant / "config.yaml").write_text(text.replace("prune: highest", "prune: lowest"))
    assert main(["sanity", "--run", str(run), "--checks", "invert", "--quiet"]) == 0
    assert load_run_config(variant / "config.yaml").search.prune == "highest"
    assert Ticket.load(variant / "ticket.safetensors").same_masks(inverted)
    # and so is one of the earlier rule that stopped halfway (no summary.json): not refused as another config
    (variant / "config.yaml").write_text(text.replace("prune: highest", "prune: lowest"))
    (variant / "summary.json").unlink()
    assert main(["sanity", "--run", str(run), "--checks", "invert", "--quiet"]) == 0
    assert load_run_config(variant / "config.yaml").search.prune == "highest"
    assert (variant / "summary.json").is_file()
