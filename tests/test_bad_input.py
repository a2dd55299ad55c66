"""Bad input found in review: each is one clear error (or the right behaviour), never a traceback."""

import warnings

import pytest

from gemminer.cli import _overrides, build_parser, main
from gemminer.config import resolve
from gemminer.errors import GemminerError
from gemminer.finetune import paper_milestones

TINY = ["--data-num-samples", "500", "--model-width", "8", "--epochs", "2", "--search-freeze-period", "1",
        "--finetune-epochs", "1", "--bn-recalibration-batches", "2", "--quiet"]


def test_short_finetuning_milestones_never_drop_at_zero_or_twice():
    assert paper_milestones(150) == [80, 120]
    assert paper_milestones(1) == []
    assert paper_milestones(2) == [1]
    assert paper_milestones(30) == [15, 20]


def test_sparsity_gives_the_exact_density():
    args = build_parser().parse_args(["mine", "--out", "x", "--sparsity", "0.98"])
    assert resolve(_overrides(args)).density == 0.02


@pytest.mark.parametrize("overrides, message", [
    ({"data": 5}, "must be a section"),
    ({"model": {"width": 0}}, r"model.width must be an integer in \[1, inf\)"),
    ({"search": {"reg_lambda": float("nan")}}, "finite"),
    ({"finetune": {"lr": float("inf")}}, "finite"),
])
def test_invalid_config_values(overrides, message):
    with pytest.raises(GemminerError, match=message):
        resolve(overrides)


def test_truncated_data_cache_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "mnist1d-500.npz").write_bytes(b"PK\x03\x04 truncated")
    assert main(["mine", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path), *TINY]) == 2
    assert "cannot read data cache" in capsys.readouterr().err


def wrong_head():
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(40, 3))


def test_model_that_does_not_fit_the_data_is_rejected_before_any_folder(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert main(["mine", "--out", str(out), "--model", "tests.test_bad_input:wrong_head", "--data-dir", data_dir,
                 *TINY]) == 2
    assert "needs (10,) class scores" in capsys.readouterr().err
    assert not out.exists()


def test_compare_refuses_stale_runs_and_per_run_flags(tmp_path, data_dir, capsys):
    base = ["compare", "--out", str(tmp_path / "cmp"), "--methods", "gemminer", "--no-dense", "--data-dir", data_dir,
            *TINY]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--search-reg-lambda", "0"]) == 2
    assert "finished run with another config: search.reg_lambda" in capsys.readouterr().err
    assert main([*base, "--density", "0.3"]) == 2
    assert "compare takes --densities, not --density" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--data", "cifar10", "--data-dir", "MISSING"], "data set cifar10 not found"),
    (["--bf16", "--device", "cpu"], "bf16 autocast is for CUDA devices"),
])
def test_compare_with_bad_input_for_every_cell_is_one_line_and_writes_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = [str(tmp_path / "nodata") if flag == "MISSING" else flag for flag in flags]
    assert main(["compare", "--out", str(out), "--seeds", "0,1", *TINY, *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err and captured.err.count(message) == 1
    assert "failed" not in captured.out and not out.exists()


def test_compare_rebuilds_the_tables_of_finished_cells_without_their_device(tmp_path, data_dir, capsys):
    """A grid made on a GPU machine (`--device cuda`) is read back where the device is missing: finished
    cells need no device, data or model, only their files."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "cmp"
    base = ["compare", "--out", str(out), "--methods", "gemminer", "--no-dense", "--data-dir", data_dir, *TINY]
    assert main([*base, "--device", "cpu"]) == 0
    for config in out.glob("*/config.yaml"):  # as if the cells had run on CUDA
        config.write_text(config.read_text().replace("device: cpu", "device: cuda"))
    capsys.readouterr()
    assert main([*base, "--device", "cuda"]) == 0
    assert "gemminer" in (out / "results.md").read_text()
    assert main([*base, "--device", "cuda", "--force"]) == 2  # cells to run again do need it
    assert "CUDA" in capsys.readouterr().err


def test_bad_input_found_inside_the_search_can_be_fixed_in_the_same_folder(tmp_path, data_dir, capsys):
    """SNIP finds too few batches only once the run folder exists: the fixed command starts it over, since
    the first try computed nothing (no metrics, no checkpoint)."""
    out = tmp_path / "snip"
    flags = ["mine", "--out", str(out), "--method", "snip", "--density", "0.5", "--data-dir", data_dir,
             "--data-num-samples", "500",
             "--model-width", "8", "--finetune-epochs", "1", "--bn-recalibration-batches", "2", "--quiet"]
    assert main([*flags, "--search-batches", "1000"]) == 2
    assert "snip sums the gradients of 1000 training batches" in capsys.readouterr().err
    assert main([*flags, "--search-batches", "2"]) == 0
    assert (out / "summary.json").is_file()


def test_finetune_seed_changes_the_data_order_not_the_weights(tmp_path, data_dir):
    run = tmp_path / "run"
    assert main(["mine", "--out", str(run), "--data-dir", data_dir, *TINY]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an InitHashMismatch warning would fail here
        assert main(["finetune", "--ticket", str(run / "ticket.safetensors"), "--seed", "3", "--epochs", "1",
                     "--out", str(tmp_path / "ft"), "--quiet"]) == 0


def test_the_command_line_says_gemminers_warnings_in_one_line(tmp_path, data_dir):
    import subprocess
    import sys

    # Smart-Ratio's undefined case on cnn1d at 0.02 (30% of the 6,400-weight head is over the budget)
    flags = ["--method", "random", "--search-ratio", "smart", "--density", "0.02", "--data-dir", data_dir,
             "--data-num-samples", "500", "--finetune-epochs", "1", "--bn-recalibration-batches", "2", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "gemminer", "mine", "--out", str(tmp_path / "run"), *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # said once, without gemminer's file and source line
    assert done.stderr.startswith("gemminer: warning: Smart-Ratio: 30% of the last layer")
    # that ticket reaches nothing from the input: the off-path warning follows, one line too
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("gemminer: warning: only 0.0% of the ticket's weights")


def test_a_ticket_given_as_initial_weights_says_so(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert main(["mine", "--out", str(run), "--data-dir", data_dir, *TINY]) == 0
    capsys.readouterr()
    ticket = str(run / "ticket.safetensors")
    assert main(["eval", "--ticket", ticket, "--init", ticket]) == 2
    assert "is a ticket (masks), not initial weights" in capsys.readouterr().err
