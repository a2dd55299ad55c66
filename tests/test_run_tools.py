"""Run-folder tools: export, report (MACs, density chart), metrics.jsonl, --tensorboard."""

import json
import subprocess
import sys

import pytest
import torch

from gemminer.cli import main
from gemminer.config import resolve
from gemminer.experiment import load_run, mine, setup
from gemminer.export import load_model, load_sparse
from gemminer.masking import attach_fixed_masks
from gemminer.report import layer_macs
from gemminer.ticket import read_safetensors
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "mlp"
    mine(resolve(tiny_overrides(data_dir, model={"name": "mlp", "width": 32, "bias": True})), out, progress=False)
    return out


@pytest.mark.parametrize("weights", ["finetuned", "init"])
def test_sparse_export_of_a_run_matches_the_masked_dense_model(run_dir, weights, tmp_path):
    out = tmp_path / "s.safetensors"
    assert main(["export", "--run", str(run_dir), "--format", "sparse", "--weights", weights, "--out", str(out)]) == 0
    assert main(["export", "--run", str(run_dir), "--weights", weights]) == 0  # dense, default file name
    dense_file = run_dir / f"export-{weights}-dense.safetensors"
    config, ticket, _, init = load_run(run_dir)
    source = init if weights == "init" else read_safetensors(run_dir / "finetuned.safetensors", "weights")[0]
    reference = setup(config, init_state=source).model.cpu().eval()
    attach_fixed_masks(reference, ticket.masks)  # fine-tuned weights are not the ticket's init: no hash check
    dense = load_sparse(dense_file)
    for name, mask in ticket.masks.items():
        assert bool((dense[name][~mask] == 0).all())
    x = torch.randn(32, 1, 40)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(load_model(out, sparse=True)(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(load_model(dense_file, sparse=False)(x), expected)
    assert out.stat().st_size < dense_file.stat().st_size


def test_bad_export_format_is_one_line(run_dir, capsys):
    assert main(["export", "--run", str(run_dir), "--format", "coo"]) == 2
    assert "unknown export format 'coo'; allowed: dense, sparse" in capsys.readouterr().err


def test_report_adds_up_and_writes_the_chart(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["layer", "shape", "params", "remaining", "density"] and "MACs" in lines[0]
    _, ticket, _, _ = load_run(run_dir)
    rows = [line.split() for line in lines[1:1 + len(ticket.masks)]]
    total = lines[1 + len(ticket.masks)].split()
    assert sum(int(row[3]) for row in rows) == int(total[2]) == ticket.remaining
    assert sum(int(row[2]) for row in rows) == int(total[1]) == ticket.total
    assert float(total[3]) == pytest.approx(ticket.density, abs=1e-4)
    assert sum(int(row[6]) for row in rows) == int(total[5])
    png = run_dir / "layer_density.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_macs_of_linear_and_conv():
    from torch import nn

    model = nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.Flatten(), nn.Linear(3 * 40, 7))
    assert layer_macs(model, (2, 40)) == {"0.weight": 3 * 2 * 5 * 40, "2.weight": 3 * 40 * 7}


def test_metrics_jsonl_holds_every_row(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == ["search"] * 4 + ["finetune"] * 2
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + len(rows)


def test_tensorboard_without_the_package_is_one_line(tmp_path, data_dir):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    out = tmp_path / "tb"
    flags = ["--density", "0.1", "--epochs", "2", "--search-freeze-period", "1", "--finetune-epochs", "1",
             "--model-width", "8", "--data-num-samples", "500", "--data-dir", data_dir, "--quiet"]
    result = subprocess.run([sys.executable, "-m", "gemminer", "mine", "--out", str(out), "--tensorboard", *flags],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--tensorboard needs the tensorboard package" in result.stderr
    assert not out.exists()


def test_tensorboard_logs_when_installed(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    mine(resolve(tiny_overrides(data_dir, tensorboard=True)), out, progress=False)
    assert any((out / "tensorboard").iterdir())


def test_collapsed_layer_is_flagged_in_table_and_chart(tmp_path, capsys):
    from gemminer.ticket import Ticket

    ticket = Ticket({"a.weight": torch.ones(4, 3, dtype=torch.bool), "b.weight": torch.zeros(2, 4, dtype=torch.bool)})
    ticket.save(tmp_path / "t.safetensors")
    assert main(["report", str(tmp_path / "t.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "warning: layer collapse" in out and (tmp_path / "t-density.png").is_file()


def test_force_clears_what_export_report_and_tensorboard_left_of_the_old_run(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    mine(resolve(tiny_overrides(data_dir)), out, progress=False)
    assert main(["export", "--run", str(out)]) == 0
    assert main(["export", "--run", str(out), "--format", "sparse", "--weights", "init"]) == 0
    assert main(["report", str(out)]) == 0
    assert main(["report", str(out / "ticket.safetensors")]) == 0
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.old").write_bytes(b"old")
    left = ["export-finetuned-dense.safetensors", "export-init-sparse.safetensors", "layer_density.png",
            "ticket-density.png", "tensorboard"]
    assert all((out / name).exists() for name in left)
    mine(resolve(tiny_overrides(data_dir, density=0.2)), out, force=True, progress=False)
    assert not any((out / name).exists() for name in left)
    assert json.loads((out / "summary.json").read_text())["density_target"] == 0.2


def test_a_new_run_in_a_folder_of_the_users_keeps_the_users_files(tmp_path, data_dir):
    out = tmp_path / "mine"
    (out / "tensorboard").mkdir(parents=True)
    users = ["export-finetuned-dense.safetensors", "layer_density.png", "ticket-density.png", "notes.txt",
             "tensorboard/events.out.tfevents.mine"]
    for name in users:
        (out / name).write_bytes(b"the user's")
    mine(resolve(tiny_overrides(data_dir)), out, progress=False)
    assert all((out / name).read_bytes() == b"the user's" for name in users)


def test_a_run_records_the_code_that_made_it_and_compare_reports_that(tmp_path, data_dir):
    import csv

    from gemminer import __version__
    from gemminer.runs import code_commit

    out = tmp_path / "cmp"
    flags = ["compare", "--out", str(out), "--methods", "random", "--no-dense", "--sanity", "none",
             "--data-dir", data_dir, "--data-num-samples", "500", "--model-width", "8", "--finetune-epochs", "1",
             "--bn-recalibration-batches", "2", "--quiet"]
    assert main(flags) == 0
    cell = next(out.glob("random-*"))
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["gemminer_version"] == __version__ and summary["git_commit"] == code_commit()
    # a cell made by other code keeps saying so when the tables are rebuilt here
    (cell / "summary.json").write_text(json.dumps({**summary, "git_commit": "0123abc", "gemminer_version": "0.0.1"}))
    assert main(flags) == 0
    row = next(csv.DictReader((out / "results.csv").open()))
    assert (row["git_commit"], row["gemminer_version"]) == ("0123abc", "0.0.1")
