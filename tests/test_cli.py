import json
import subprocess
import sys

import pytest
import torch

from gemminer.cli import main
from gemminer.config import resolve
from gemminer.experiment import mine
from gemminer.ticket import Ticket
from tests.conftest import tiny_overrides

TINY_FLAGS = ["--density", "0.1", "--epochs", "4", "--search-freeze-period", "1", "--finetune-epochs", "2",
              "--model-width", "8", "--data-num-samples", "500", "--data-batch-size", "64",
              "--bn-recalibration-batches", "3", "--quiet"]


def flags(data_dir):
    return [*TINY_FLAGS, "--data-dir", data_dir]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "x"
    assert main(["mine", "--out", str(out), *flags(data_dir)]) == 0
    return out


def test_mine_writes_a_complete_run_folder(run_dir):
    for name in ("config.yaml", "metrics.csv", "init.safetensors", "ticket.safetensors", "gem.safetensors",
                 "finetuned.safetensors", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("method", "density_target", "density_actual", "density_gem", "acc_before_finetune",
                "acc_ticket_at_init", "acc_after_finetune", "search_seconds", "finetune_seconds",
                "epochs_to_ticket"):
        assert key in summary, key
    assert summary["method"] == "gemminer" and summary["epochs_to_ticket"] == 4
    ticket = Ticket.load(run_dir / "ticket.safetensors")
    assert summary["density_actual"] == ticket.density and ticket.remaining == round(ticket.total * 0.1)
    for value in (summary["acc_before_finetune"], summary["acc_after_finetune"], summary["density_gem"]):
        assert 0 <= value <= 1
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("phase,epoch") and len(rows) == 1 + 4 + 2


def test_eval_reproduces_at_init_accuracies(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acc_before_finetune"] == summary["acc_before_finetune"]
    assert result["acc_ticket_at_init"] == summary["acc_ticket_at_init"]
    assert main(["eval", "--ticket", str(run_dir / "ticket.safetensors"),
                 "--init", str(run_dir / "init.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["acc_ticket_at_init"] == summary["acc_ticket_at_init"]


def test_finetune_a_saved_ticket(run_dir, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--ticket", str(run_dir / "ticket.safetensors"), "--init",
                 str(run_dir / "init.safetensors"), "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune_epochs"] == 1 and summary["density_actual"] == pytest.approx(0.1, abs=1e-3)


def test_same_seed_same_ticket_with_and_without_data_cache(tmp_path):
    tickets = []
    for index in range(2):  # the first run builds the cache, the second reads it
        overrides = tiny_overrides(str(tmp_path / "data"))
        mine(resolve(overrides), tmp_path / f"r{index}", progress=False)
        tickets.append(Ticket.load(tmp_path / f"r{index}" / "ticket.safetensors"))
    assert all(torch.equal(tickets[0].masks[n], tickets[1].masks[n]) for n in tickets[0].masks)


@pytest.mark.parametrize("bad, message", [
    (["--density", "0"], "density must be a finite number in (0, 1]"),
    (["--density", "1.5"], "density must be a finite number in (0, 1]"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'; allowed: cnn1d, conv2"),
    (["--data", "imagenet"], "unknown data set 'imagenet'; allowed: cifar10, cifar100"),
    (["--method", "magic"], "unknown method 'magic'; allowed:"),
    (["--epochs", "3", "--search-freeze-period", "5"], "needs at least 6 search epochs"),
])
def test_bad_input_is_one_line_exit_2_and_no_finished_folder(bad, message, tmp_path, data_dir):
    out = tmp_path / "bad"
    result = subprocess.run([sys.executable, "-m", "gemminer", "mine", "--out", str(out), *flags(data_dir), *bad],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "summary.json").exists()


def test_ticket_for_another_model_and_truncated_file(run_dir, tmp_path, capsys):
    assert main(["finetune", "--ticket", str(run_dir / "ticket.safetensors"), "--model", "mlp",
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not fit" in capsys.readouterr().err
    broken = tmp_path / "t.safetensors"
    broken.write_bytes((run_dir / "ticket.safetensors").read_bytes()[:100])
    assert main(["report", str(broken)]) == 2
    assert "cannot read ticket" in capsys.readouterr().err


def test_finished_run_is_not_overwritten(run_dir, capsys, data_dir):
    assert main(["mine", "--out", str(run_dir), *flags(data_dir)]) == 2
    assert "--force" in capsys.readouterr().err


def test_sparsity_and_yaml_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("density: 0.3\nsearch:\n  reg_lambda: 1.0e-5\n")
    from gemminer.cli import _overrides, build_parser

    args = build_parser().parse_args(["mine", "--out", "x", "--config", str(path), "--search-lr", "0.5"])
    config = resolve(_overrides(args))
    assert config.density == 0.3 and config.search.reg_lambda == 1e-5 and config.search.lr == 0.5
    args = build_parser().parse_args(["mine", "--out", "x", "--sparsity", "0.98"])
    assert resolve(_overrides(args)).density == pytest.approx(0.02)
    path.write_text("search:\n  reg_lamda: 1.0\n")
    from gemminer.errors import GemminerError

    with pytest.raises(GemminerError, match=r"did you mean search\.reg_lambda"):
        args = build_parser().parse_args(["mine", "--out", "x", "--config", str(path)])
        resolve(_overrides(args))


def test_paper_preset_keeps_paper_defaults():
    paper = resolve({"preset": "paper"})
    assert (paper.search.epochs, paper.search.freeze_period, paper.search.reg_lambda, paper.search.lr) == (
        150, 5, 1e-4, 0.1)
    assert paper.finetune.epochs == 150 and paper.finetune.lr == 0.01 and paper.model.weight_init == "signed_constant"
