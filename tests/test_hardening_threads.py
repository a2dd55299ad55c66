"""Said, and recorded: every training command takes `--threads N|auto` and writes the thread count it
trained with into its summary.json (a grid's cells too, with `--jobs` each worker's share), so two
results that differ in float-sum order can be told apart; `auto` follows its documented rule."""

import json
import os

import pytest
import torch

from gemminer.cli import main
from gemminer.config import dump_yaml, load_run_config, resolve
from gemminer.errors import GemminerError
from gemminer.threads import SMALL_STEP_MACS, auto_threads, parse_threads, usable_cores
from tests.test_hardening import TINY, one_error_line

BIG = 50 * SMALL_STEP_MACS
AUTO = [  # (MACs per training step, usable cores, busy cores) -> threads
    ((BIG, 2, 0.0), 2),  # idle machine, large step: every core
    ((BIG, 2, 1.0), 1),  # one core busy with other work (a CPU hog): the other
    ((BIG, 2, 6.0), 1),  # a busy machine (load 6 on 2 cores): one thread, never 0
    ((BIG, 16, 3.2), 13),
    ((BIG, 16, 0.4), 16),
    ((BIG, 1, 0.0), 1),
    ((SMALL_STEP_MACS / 10, 16, 0.0), 1),  # a small step (cnn1d on MNIST-1D): one thread even when idle
    ((None, 4, 1.0), 3),  # a model whose size is unknown: the cores alone
]


@pytest.mark.parametrize("given, expected", AUTO, ids=[f"{g[0]}-{g[1]}-{g[2]}" for g, _ in AUTO])
def test_the_auto_rule(given, expected):
    assert auto_threads(*given) == expected


def test_usable_cores_honour_an_omp_num_threads_cap(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert usable_cores() == 1 and auto_threads(BIG) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= usable_cores() <= affinity


@pytest.mark.parametrize("value, expected", [("auto", None), ("AUTO", None), (None, None), ("3", 3), (2, 2)])
def test_threads_values(value, expected):
    assert parse_threads(value) == expected


BAD = ["0", "-1", "x", "1.5", "true"]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("command", ["mine", "finetune", "compare", "sanity"])
def test_a_bad_thread_count_is_one_line_for_every_training_command(finished, tmp_path, data_dir, capsys, bad,
                                                                   command):
    argv = {"mine": ["mine", "--out", str(tmp_path / "m"), "--data-dir", data_dir, *TINY],
            "finetune": ["finetune", "--run", str(finished), "--out", str(tmp_path / "f"), "--quiet"],
            "compare": ["compare", "--methods", "random", "--out", str(tmp_path / "c"), "--data-dir", data_dir],
            "sanity": ["sanity", "--run", str(finished), "--checks", "shuffle", "--quiet"]}[command]
    line = one_error_line(capsys, main([*argv, "--threads", bad]))
    assert "threads" in line
    assert not any((tmp_path / name).exists() for name in "mfc")
    with pytest.raises(GemminerError):
        parse_threads(bad) if command in ("finetune", "sanity") else resolve({"threads": bad})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("threads") / "run"
    assert main(["mine", "--out", str(out), "--data-dir", data_dir, "--density", "0.2", *TINY]) == 0
    return out


def _threads(summary_path) -> tuple[int, object]:
    summary = json.loads(summary_path.read_text())
    return summary["threads"], summary["threads_requested"]


@pytest.mark.parametrize("requested", ["1", "2", "auto"])
def test_every_training_command_records_its_threads_in_summary_json(finished, tmp_path, data_dir, requested):
    flag = ["--threads", requested]
    assert main(["mine", "--out", str(tmp_path / "m"), "--data-dir", data_dir, *TINY, *flag]) == 0
    assert main(["finetune", "--run", str(finished), "--out", str(tmp_path / "f"), "--quiet", *flag]) == 0
    run = tmp_path / "run"
    import shutil

    shutil.copytree(finished, run)
    assert main(["sanity", "--run", str(run), "--checks", "shuffle", "--quiet", *flag]) == 0
    assert main(["compare", "--methods", "random", "--densities", "0.5", "--no-dense", "--sanity", "none", "--out",
                 str(tmp_path / "c"), "--data-dir", data_dir, "--data-num-samples", "500", "--model-width", "8",
                 "--finetune-epochs", "1", "--quiet", *flag]) == 0
    summaries = [tmp_path / "m" / "summary.json", tmp_path / "f" / "summary.json",
                 run / "sanity" / "shuffle" / "summary.json", tmp_path / "c" / "random-d0.5-s0" / "summary.json"]
    for path in summaries:
        threads, asked = _threads(path)
        if requested == "auto":
            assert asked == "auto" and threads == 1  # tiny cnn1d steps: one thread by the rule
        else:
            assert asked == int(requested) and threads == int(requested), path
    torch.set_num_threads(1)


def test_grid_workers_keep_their_share_of_the_cores_and_record_it(tmp_path, data_dir):
    out = tmp_path / "c"
    assert main(["compare", "--methods", "random,magnitude", "--densities", "0.5", "--no-dense", "--sanity", "none",
                 "--jobs", "2", "--out", str(out), "--data-dir", data_dir, "--data-num-samples", "500",
                 "--model-width", "8", "--finetune-epochs", "1", "--quiet", "--threads", "auto"]) == 0
    share = max(1, (os.cpu_count() or 1) // 2)
    for cell in ("random-d0.5-s0", "magnitude-d0.5-s0"):
        assert _threads(out / cell / "summary.json") == (share, share)


def test_a_run_folder_written_before_the_threads_key_still_loads(tmp_path):
    config = resolve({"method": "random", "density": 0.5})
    text = "\n".join(line for line in dump_yaml(config).splitlines() if not line.startswith("threads:"))
    (tmp_path / "config.yaml").write_text(text + "\n")
    assert load_run_config(tmp_path / "config.yaml").threads is None
