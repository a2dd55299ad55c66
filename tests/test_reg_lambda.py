"""search.reg_lambda auto, the official exit, frozen-out gem weights and the per-layer floor."""

import pytest
import torch

from gemminer.cli import main
from gemminer.config import resolve
from gemminer.experiment import OffPath
from gemminer.masking import ScoreMask
from gemminer.methods.gemminer import GemMiner, freeze_lowest
from gemminer.methods.reg_lambda import AutoLambda, scheduled, speed_floor
from gemminer.models import build_model
from gemminer.sanity import replayed_lambda


def test_auto_lambda_is_the_kth_largest_pull_of_the_alive_weights():
    scores = [torch.zeros(4, requires_grad=True), torch.zeros(3, requires_grad=True)]
    alive = [torch.tensor([1.0, 1, 1, 0]), torch.ones(3)]
    auto = AutoLambda(scores, alive, target=2)
    assert auto.update() == 0.0  # no gradient seen yet: the fallback
    scores[0].grad = torch.tensor([-0.5, -0.1, 0.2, -9.0])  # -9 belongs to a frozen-out weight
    scores[1].grad = torch.tensor([-0.3, 0.0, -0.05])
    auto.accumulate()
    assert auto.update() == pytest.approx(0.2)  # pulls 0.5, 0.3, 0.1, ...: between the second and third


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_chosen_lambda_settles_the_gem_at_its_target(optimizer):
    """With a constant task gradient per score, the loop of updates and steps leaves exactly `target`
    scores above 0.5, for SGD and for Adam (coupled L2 changes the speed, not the fixed point)."""
    generator = torch.Generator().manual_seed(0)
    pull = torch.rand(200, generator=generator) * 1e-2 - 2e-3  # -g: some weights are pushed down
    scores = torch.rand(200, generator=generator).requires_grad_(True)
    auto = AutoLambda([scores], [torch.ones(200)], target=30)
    if optimizer == "sgd":
        opt = torch.optim.SGD([scores], lr=0.5, momentum=0.9)
    else:
        opt = torch.optim.Adam([scores], lr=0.01)
    for _epoch in range(60):
        for _step in range(20):
            opt.zero_grad()
            (-(pull * scores).sum()).backward()
            opt.step()
            with torch.no_grad():
                scores.clamp_(0, 1)
            auto.accumulate()
        lam = auto.update()
        for group in opt.param_groups:
            group["weight_decay"] = 2 * lam
    assert int((scores > 0.5).sum()) == 30
    assert lam == pytest.approx(float(pull.topk(31).values[-2:].mean()))


def test_speed_floor_lets_an_unheld_score_fall_to_half_within_the_reach():
    """Under SGD with momentum a score with no task gradient shrinks by lr_eff * 2 lambda * s per step; at the
    floor it goes from 1 to 0.5 over the first half of the cosine schedule."""
    epochs, steps, lr = 10, 7, 0.2
    floor = speed_floor("sgd", lr, 0.0, "cosine", epochs, steps)
    score = torch.ones(1, requires_grad=True)
    opt = torch.optim.SGD([score], lr=lr, weight_decay=2 * floor)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _epoch in range(epochs // 2):
        for _step in range(steps):
            score.grad = torch.zeros(1)
            opt.step()
        schedule.step()
    assert float(score.detach()) == pytest.approx(0.5, abs=0.01)
    assert speed_floor("adam", lr, 0.9, "cosine", epochs, steps) == 0.0
    assert speed_floor("sgd", lr, 0.9, "cosine", epochs, None) == 0.0  # a stream of unknown length


def _cnn(tiny, width=16):
    torch.manual_seed(0)
    return build_model("cnn1d", tiny.input_shape, 10, width=width)


def _small_batches(tiny):
    from gemminer.data import Batches

    return Batches(tiny.train, 32, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("optimizer,lr", [("sgd", 3.0), ("adam", 0.1)])
def test_auto_lambda_keeps_every_freezing_event_out_of_the_gem(tiny, optimizer, lr):
    """A short search whose scores move fast enough to follow lambda: the gem settles at or below the
    target, and no freezing event removes a weight with score > 0.5, where a fixed lambda too small for
    the target has its last events cut into the gem (next test)."""
    rows = []
    result = GemMiner(0.05, epochs=16, freeze_period=2, reg_lambda="auto", optimizer=optimizer, lr=lr).search(
        _cnn(tiny, 8), _small_batches(tiny), log=rows.append)
    trajectory = result.summary["reg_lambda_trajectory"]
    data = _small_batches(tiny)
    floor = speed_floor(optimizer, lr, 0.9, "cosine", 16, len(data))
    assert (floor > 0) == (optimizer == "sgd")  # Adam's step does not scale with lambda: no speed floor
    assert len(trajectory) == 16 and trajectory[0] == floor  # the first epoch: the floor, before any gradient
    assert min(trajectory) >= floor and max(trajectory) > max(floor, 1e-4)  # then the equilibrium moves it
    assert [row["reg_lambda"] for row in rows] == trajectory  # metrics.csv's column
    assert result.summary["reg_lambda_mode"] == "auto"
    assert result.ticket.remaining == round(result.ticket.total * 0.05)
    assert 0 < result.gem.remaining <= result.ticket.remaining
    events = [row for row in rows if row["freeze_event"]]
    assert len(events) == 7 and all(row["frozen_gem"] == 0 for row in events)
    assert result.summary["frozen_gem"] == 0


def test_a_fixed_lambda_too_small_for_the_target_freezes_out_gem_weights(tiny):
    rows = []
    GemMiner(0.05, epochs=16, freeze_period=2, reg_lambda=1e-4, lr=3.0).search(
        _cnn(tiny, 8), _small_batches(tiny), log=rows.append)
    assert rows[-2]["frozen_gem"] > 0  # the last event cut into the gem: the column makes it visible
    assert all(row["reg_lambda"] == 1e-4 for row in rows)


def test_official_exit_when_no_score_is_above_half(tiny, batches):
    rows = []
    # lambda 100 drives every score to 0 within the first epoch: nothing can grow back
    result = GemMiner(0.05, epochs=8, freeze_period=2, reg_lambda=100.0).search(_cnn(tiny), batches,
                                                                                  log=rows.append)
    assert result.summary["search_exit_epoch"] == 1 and rows[-1]["search_exit"] == 1
    assert result.epochs == len(rows) == 1  # epochs_to_ticket counts the epochs run
    assert result.ticket.remaining == round(result.ticket.total * 0.05)  # pruned to the target by score
    assert result.gem.remaining == 0


def test_replayed_schedule_is_the_lambda_of_every_epoch(tiny, batches):
    rows = []
    schedule = [0.0, 1e-4, 2e-4]
    GemMiner(0.2, epochs=5, freeze_period=2, reg_lambda_schedule=schedule).search(_cnn(tiny), batches,
                                                                                   log=rows.append)
    assert [row["reg_lambda"] for row in rows] == [0.0, 1e-4, 2e-4, 2e-4, 2e-4]
    assert scheduled(schedule, 10) == 2e-4


def test_invert_variant_of_an_auto_run_replays_its_lambda():
    auto = resolve({"method": "gemminer"})
    assert auto.search.reg_lambda == "auto"  # the MNIST-1D preset's default (resume tests run it)
    assert replayed_lambda(auto, {"reg_lambda_trajectory": [0.0, 3e-4]}) == {"reg_lambda_schedule": [0.0, 3e-4]}
    fixed = resolve({"method": "gemminer", "search": {"reg_lambda": 1e-4}})
    assert replayed_lambda(fixed, {"reg_lambda_trajectory": [1e-4]}) == {}
    assert resolve({"method": "gemminer", "preset": "paper"}).search.reg_lambda == 1e-4


def test_layer_floor_spares_each_layers_best_weights():
    masks = [ScoreMask(torch.linspace(0.0, 0.1, 10)), ScoreMask(torch.linspace(0.5, 1.0, 10))]
    freeze_lowest(masks, keep=6)
    assert int(masks[0].alive.sum()) == 0  # the paper's global ranking empties the first layer
    masks = [ScoreMask(torch.linspace(0.0, 0.1, 10)), ScoreMask(torch.linspace(0.5, 1.0, 10))]
    freeze_lowest(masks, keep=6, layer_floor=2)
    assert masks[0].alive.tolist()[-2:] == [1.0, 1.0] and int(masks[0].alive.sum()) == 2
    assert int(masks[1].alive.sum()) == 4 and masks[1].alive.tolist()[-4:] == [1.0] * 4


@pytest.mark.parametrize("flags,message", [
    (["--search-reg-lambda", "auto", "--search-freeze-period", "0"], "needs freezing events"),
    (["--method", "imp", "--search-reg-lambda", "auto"], "unrecognized arguments: --search-reg-lambda"),
    (["--search-reg-lambda", "auto", "--compile"], "give a number with --compile"),
    (["--search-reg-lambda", "often"], "must be a number >= 0 or auto"),
    (["--search-layer-floor", "-1"], "search.layer_floor"),
])
def test_bad_lambda_settings_are_one_line(flags, message, tmp_path, capsys, data_dir):
    code = main(["mine", "--out", str(tmp_path / "run"), "--density", "0.1", "--data-dir", data_dir, *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


FAST = ["--epochs", "4", "--search-freeze-period", "1", "--finetune-epochs", "1", "--model-width", "8",
        "--data-num-samples", "500", "--bn-recalibration-batches", "2", "--quiet"]


def test_summary_report_and_warning_give_the_on_path_density(tmp_path, capsys, data_dir):
    import json

    healthy = tmp_path / "healthy"
    assert main(["mine", "--out", str(healthy), "--density", "0.2", "--data-dir", data_dir, *FAST]) == 0
    summary = json.loads((healthy / "summary.json").read_text())
    assert 0.5 <= summary["density_on_path"] <= 1 and summary["reg_lambda_mode"] == "auto"
    assert len(summary["reg_lambda_trajectory"]) == summary["epochs_to_ticket"] == 4
    capsys.readouterr()
    assert main(["report", str(healthy)]) == 0
    assert f"density on path: {summary['density_on_path']:.4f}" in capsys.readouterr().out

    # lambda 100 empties the gem in the first epoch: the exit keeps the target by score, all scores tie
    # at 0, and the tie rule keeps the last layers only: nothing reaches them from the input
    broken = tmp_path / "broken"
    with pytest.warns(OffPath, match=r"only 0\.0% of the ticket's weights lie on an input-to-output path"):
        assert main(["mine", "--out", str(broken), "--density", "0.05", "--data-dir", data_dir, *FAST,
                     "--search-reg-lambda", "100"]) == 0
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["density_on_path"] == 0.0 and summary["search_exit_epoch"] == 1
    assert summary["epochs_to_ticket"] == 1
    metrics = (broken / "metrics.csv").read_text().splitlines()
    assert "frozen_gem" in metrics[0] and "search_exit" in metrics[0]
