"""IMP: the density stops, the rewind point, lr rewinding, the ticket's training start, kill and resume."""

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides
from torch import nn

from gemminer.config import FinetuneConfig
from gemminer.data import Batches, TensorData
from gemminer.errors import GemminerError
from gemminer.methods.imp import IMP, density_stops, round_epochs, stop_round
from gemminer.methods.scoring import keep_top
from gemminer.ticket import Ticket, read_safetensors


def test_a_requested_density_just_below_a_grid_point_takes_its_round():
    stops = density_stops(0.0144)  # the paper's 1.44% is 0.8^19 = 1.4412%: 19 rounds, not 20
    assert len(stops) == 19 and stops[-1] == 0.0144 and stops[-2] == pytest.approx(0.8 ** 18)
    assert len(density_stops(0.0059)) == 23  # 0.8^23 = 0.5903%
    assert density_stops(0.0144, keep=[0.0144])[-1] == 0.0144
    assert density_stops(0.4) == pytest.approx([0.8, 0.64, 0.512, 0.4096, 0.4])  # 2.3% below: a round of its own


def test_stops_are_powers_of_0_8_with_requested_densities_inserted():
    stops = density_stops(0.3, 0.2, keep=[0.5])
    assert stops == pytest.approx([0.8, 0.64, 0.512, 0.5, 0.8 ** 4, 0.8 ** 5, 0.3])
    assert density_stops(0.8 ** 3) == pytest.approx([0.8, 0.64, 0.512])  # a grid point is not repeated
    assert density_stops(0.9) == [0.9]
    for before, after in itertools.pairwise(stops):
        assert after < before and after >= before * 0.8 - 1e-12  # never more than 20% of the survivors


def test_an_off_path_density_is_a_branch_of_the_nearest_round_above_it():
    assert [stop_round(d) for d in (0.9, 0.8, 0.7, 0.64, 0.6, 0.0225, 0.02, 0.0144)] == [1, 1, 2, 2, 3, 17, 18, 19]
    # the MNIST-1D preset: 30 epochs a round, rewind to epoch 0.52; 0.02 branches off round 17's 0.8^17 = 2.25%,
    # so 18 rounds train: 30 + 17 x 29.48 = 531 epochs (not 619: one round more for each of 0.2, 0.1 and 0.05)
    from gemminer.config import resolve

    config = resolve({"method": "imp", "search": {"rewind": "epoch:0.52"}})
    cost = round_epochs(stop_round(0.02), config.search.epochs, 0.52)
    assert round(cost["remaining"]) == 531 and cost["full"] == 540
    # the paper's cost of 1.44%: 19 rounds of 150 epochs (the official code) = 2850
    assert round_epochs(stop_round(0.0144), 150, 2.6) == pytest.approx({"remaining": 2803.2, "full": 2850})


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 10))


@pytest.fixture
def stream(tiny):
    return lambda: Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(3))


RECIPE = FinetuneConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, lr_schedule="multistep", milestones=[2, 3])


def test_survivors_rewind_to_the_weights_after_e_epochs(stream):
    model = mlp()
    result = IMP(0.5, epochs=3, rewind="epoch:1.5", training=RECIPE).search(model, stream())
    steps = round(1.5 * len(stream()))
    # an independent reference: plain SGD for `steps` steps of the same batch stream
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batches, done = stream(), 0
    while done < steps:
        for inputs, targets in batches:
            optimizer.zero_grad()
            F.cross_entropy(reference(inputs), targets).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(result.start_state[name], tensor, rtol=1e-5, atol=1e-6)
    assert result.start_step == steps and result.ticket.metadata["start_step"] == steps
    # rounds 2 to 4 (stops 0.8, 0.64, 0.512, 0.5) train from step k to the end
    assert result.epochs == pytest.approx(3 + (3 - steps / len(stream())) * 3, abs=1e-5)
    total = sum(mask.numel() for mask in result.ticket.masks.values())
    assert result.ticket.remaining == round(total * 0.5)


def test_lr_rewinding_keeps_the_trained_weights_and_prunes_them(stream):
    model = mlp()
    result = IMP(0.6, epochs=2, rewind="lr", training=RECIPE).search(model, stream())
    stops = density_stops(0.6)
    assert stops == pytest.approx([0.8, 0.64, 0.6])
    initial = model.state_dict()
    assert not torch.equal(result.start_state["1.weight"], initial["1.weight"])  # trained, not rewound
    previous = result.tickets[stops[-2]].masks
    expected = keep_top({name: result.start_state[name].abs() for name in previous}, result.ticket.remaining,
                        eligible=previous)
    assert all(torch.equal(expected[name], result.ticket.masks[name]) for name in expected)
    assert result.start_step == 0 and result.start_point == "trained"


def test_init_rewinding_trains_every_round_from_step_zero(stream):
    result = IMP(0.64, epochs=2, training=RECIPE).search(mlp(), stream())
    assert result.start_state is None and result.start_point == "init" and result.epochs == 4
    assert [row["round"] for row in result.tables["rounds.csv"]] == [1, 2]
    first, second = result.tickets[0.8].masks, result.ticket.masks
    assert all((second[name] <= first[name]).all() for name in first)  # survivors only shrink


def test_imp_trains_its_ticket_as_its_last_round_and_prunes(data_dir):
    from gemminer.config import resolve

    with pytest.raises(GemminerError, match="must equal search"):
        resolve({"method": "imp", "search": {"epochs": 3}, "finetune": {"epochs": 2}})
    assert resolve({"method": "imp", "search": {"epochs": 3}}).finetune.epochs == 3
    with pytest.raises(GemminerError, match="below 1"):
        resolve({"method": "imp", "density": 1.0})


def test_bad_rewind_is_one_line():
    for rewind in ("epoch:0", "epoch:5", "epoch:x", "later"):
        with pytest.raises(GemminerError):
            IMP(0.5, epochs=5, rewind=rewind)
    with pytest.raises(GemminerError, match="prune_fraction"):
        IMP(0.5, prune_fraction=1.0)


def test_run_folder_trains_the_ticket_from_the_rewind_point(data_dir, tmp_path, monkeypatch):
    from gemminer import experiment
    from gemminer.config import resolve

    seen = {}
    original = experiment.finetune

    def spy(model, *args, **kwargs):
        from gemminer.init import parameters_state

        seen.update(weights=copy.deepcopy(parameters_state(model)), start_step=kwargs.get("start_step"))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(experiment, "finetune", spy)
    def imp_overrides(**extra):
        overrides = tiny_overrides(data_dir, method="imp", **extra)
        overrides["search"] = {"epochs": 2, **extra.get("search", {})}  # no Gem-Miner keys
        return overrides

    config = resolve(imp_overrides(density=0.5, search={"rewind": "epoch:0.5", "keep_densities": [0.7]}))
    assert config.model.weight_init == "kaiming_normal" and config.finetune.lr == 0.1  # IMP's own recipe
    summary = experiment.mine(config, tmp_path / "run", progress=False)
    start, _ = read_safetensors(tmp_path / "run" / "start.safetensors", "start")
    assert all(torch.equal(seen["weights"][name], start[name]) for name in seen["weights"])
    assert seen["start_step"] == summary["start_step"] > 0
    assert summary["acc_before_finetune_weights"] == "epoch:0.5" and not summary["acc_before_finetune_at_init"]
    # the path 0.8, 0.64, 0.512 and the branches 0.7 (off 0.8) and 0.5 (off 0.512): 4 rounds, not 5; round 1
    # trains 2 epochs, the 3 others from step 4 of 7 on
    assert summary["epochs_to_ticket"] == pytest.approx(2 + 3 * (2 - 4 / 7), abs=1e-5)
    tickets = sorted(p.name for p in (tmp_path / "run" / "tickets").iterdir())
    assert tickets == ["d0.5.safetensors", "d0.512.safetensors", "d0.64.safetensors", "d0.7.safetensors",
                       "d0.8.safetensors"]
    rounds = (tmp_path / "run" / "rounds.csv").read_text().splitlines()
    assert rounds[0] == ("round,density,pruned_to,kept,branch,test_acc,epochs,epochs_remaining,epochs_full,"
                         "seconds") and len(rounds) == 6
    assert Ticket.load(tmp_path / "run" / "tickets" / "d0.7.safetensors").metadata["density_target"] == 0.7
    # its ticket fine-tunes again from the run folder, under the run's own search epochs (not the preset's)
    from gemminer.cli import main

    assert main(["finetune", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["acc_after_finetune"] > 0
    # --force clears every IMP file of the old run before the new one writes its own
    (tmp_path / "run" / "sanity" / "shuffle").mkdir(parents=True)
    (tmp_path / "run" / "sanity.json").write_text("{}")
    config2 = resolve(imp_overrides(density=0.8))
    experiment.mine(config2, tmp_path / "run", force=True, progress=False)
    assert not (tmp_path / "run" / "sanity").exists() and not (tmp_path / "run" / "sanity.json").exists()
    assert not (tmp_path / "run" / "start.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "tickets").iterdir()) == ["d0.8.safetensors"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["start_point"] == "init"


IMP_FLAGS = ["--method", "imp", "--density", "0.4", "--epochs", "3", "--search-rewind", "epoch:0.5",
             "--model-width", "16", "--data-num-samples", "1000", "--data-batch-size", "32",
             "--bn-recalibration-batches", "3", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def imp_rows(path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.startswith("imp-round-"))
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("checkpoint_every", ["1", "0"])  # 0: the last checkpoint is the end of a round
def test_sigkill_mid_round_then_resume_gives_the_same_ticket(checkpoint_every, tmp_path, data_dir):
    def command(out):
        return [sys.executable, "-m", "gemminer", "mine", "--out", str(out), *IMP_FLAGS, "--data-dir", data_dir,
                "--checkpoint-every", checkpoint_every]

    subprocess.run(command(tmp_path / "reference"), check=True, capture_output=True, env=ENV)
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while imp_rows(out / "metrics.csv") < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # the kill lands inside round 2 (3 rows a round)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(command(out), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the unfinished run" in resumed.stderr
    for name in ("ticket.safetensors", "start.safetensors", "finetuned.safetensors"):
        first, _ = read_safetensors(tmp_path / "reference" / name, name)
        second, _ = read_safetensors(out / name, name)
        assert all(torch.equal(first[key], second[key]) for key in first), name

    def without_clock(path):
        return [",".join(line.split(",")[:-1]) for line in path.read_text().splitlines()]

    assert without_clock(out / "metrics.csv") == without_clock(tmp_path / "reference" / "metrics.csv")
    assert without_clock(out / "rounds.csv") == without_clock(tmp_path / "reference" / "rounds.csv")


def test_data_for_imp_is_a_plain_tensor_stream():
    """A DataLoader-like stream without a length cannot rewind to a fraction of an epoch."""
    data = TensorData(torch.randn(8, 1, 40), torch.randint(0, 10, (8,)))
    stream = iter([(data.x, data.y)])
    with pytest.raises(GemminerError, match="length"):
        IMP(0.5, epochs=2, rewind="epoch:1").search(mlp(), stream)


def rounds_by_kept(result) -> dict[int, dict]:
    return {row["kept"]: row for row in result.tables["rounds.csv"]}


@pytest.mark.parametrize("rewind", ["epoch:1", "lr"])
def test_a_stops_ticket_and_epochs_do_not_depend_on_the_other_stops(stream, rewind):
    alone = IMP(0.6, epochs=2, rewind=rewind, training=RECIPE).search(mlp(), stream())
    among = IMP(0.45, epochs=2, rewind=rewind, keep_densities=[0.7, 0.6], training=RECIPE).search(mlp(), stream())
    total = sum(mask.numel() for mask in alone.ticket.masks.values())
    for density, ticket in among.tickets.items():  # branches and path points keep exactly round(N x density)
        assert ticket.remaining == round(total * density)
    ticket = among.tickets[0.6]
    assert all(torch.equal(alone.ticket.masks[name], ticket.masks[name]) for name in ticket.masks)
    kept = round(total * 0.6)
    own, shared = rounds_by_kept(alone)[kept], rounds_by_kept(among)[kept]
    assert own == {**shared, "seconds": own["seconds"]} and own["round"] == 3 and own["branch"]
    assert alone.epochs == rounds_by_kept(among)[kept]["epochs"]
    if rewind == "lr":  # its training starts from the weights its branch was pruned from, in both runs
        start = among.start_states[0.6]
        assert all(torch.equal(alone.start_state[name], start[name]) for name in start)
    # the path is the same too: 0.45 branches off round 4's 0.512, not off a round at 0.6
    assert among.tickets[0.512].remaining == round(total * 0.512) and rounds_by_kept(among)[round(total * 0.45)][
        "round"] == 4


def test_a_full_round_after_the_rewind_trains_the_whole_schedule(stream):
    full = IMP(0.6, epochs=3, rewind="epoch:1", round_length="full", training=RECIPE).search(mlp(), stream())
    remaining = IMP(0.6, epochs=3, rewind="epoch:1", training=RECIPE).search(mlp(), stream())
    assert full.start_step == 0 and full.ticket.metadata["start_step"] == 0 and remaining.start_step == len(stream())
    assert full.epochs == 9 and remaining.epochs == 3 + 2 * 2
    assert all(torch.equal(full.start_state[name], remaining.start_state[name]) for name in full.start_state)
    for rows in (full.tables["rounds.csv"], remaining.tables["rounds.csv"]):  # both counts, either way it ran
        assert [(row["epochs_remaining"], row["epochs_full"]) for row in rows] == [(3, 3), (5, 6), (7, 9)]
    with pytest.raises(GemminerError, match="round_length"):
        IMP(0.5, round_length="half")
