"""benchmarks/gpu_check.sh --dry-run end to end on CPU, so the GPU check is known to work before a GPU
is at hand (a check that breaks on the GPU machine wastes its time there); --only reruns the named steps."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["smoke", "setup", "tests", "mine", "torchrun", "resume", "speed", "evalbatch", "compile", "reference"]


def gpu_check(out: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-check")
    return base, gpu_check(base / "out", base / "work")


def test_dry_run_runs_every_step_and_reports_each(checked):
    base, done = checked
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((base / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] is True and list(report["steps"]) == STEPS
    for name, entry in report["steps"].items():
        if name == "reference":  # opt-in: only when --only names it
            assert entry == {"status": "not run"}
            continue
        # compiling is not exercised on CPU (tens of seconds); every other step ran and held
        assert entry["status"] == ("skipped" if name == "compile" else "ok"), (name, entry.get("error"))
        assert entry["seconds"] >= 0 and entry["invocation"] == 1
    steps = {name: entry.get("details", {}) for name, entry in report["steps"].items()}
    assert steps["setup"]["train"] > 0 and steps["setup"]["classes"] == 10
    assert "passed" in steps["tests"]["summary"]
    probe = steps["torchrun"]["probe"]
    assert probe["backend"] == "gloo" and probe["wrapped"] and all(wrapped["ddp"] for wrapped in probe["wrapped"])
    assert steps["resume"]["deterministic"]["identical"] and steps["resume"]["deterministic"]["metrics_identical"]
    speed = steps["speed"]["fp32"]
    assert speed["search_img_per_s"] > 0 and speed["dense_train_img_per_s"] > 0 and speed["projected_paper_run_s"] > 0
    evalbatch = steps["evalbatch"]
    assert set(evalbatch["seconds_per_pass"]) == {"16", "64"} and evalbatch["fastest_batch"] in (16, 64)
    # what comes back from a GPU machine: one report, one log
    assert sorted(path.name for path in (base / "out").iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_only_reruns_the_named_steps_and_keeps_the_others(checked, tmp_path):
    base, _ = checked
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    before = json.loads((out / "gpu_check.json").read_text())
    log_before = (out / "gpu_check.log").read_text()
    done = gpu_check(out, base / "work", "--only", "compile,smoke")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["invocations"][-1]["steps"] == ["smoke", "compile"]  # in the check's order
    assert {name for name, entry in report["steps"].items() if entry.get("invocation") == 2} == {"smoke", "compile"}
    assert all(report["steps"][name] == before["steps"][name] for name in STEPS if name not in ("smoke", "compile"))
    assert report["steps"]["smoke"]["status"] == "ok"
    new_log = (out / "gpu_check.log").read_text()[len(log_before):]
    assert "[smoke]" in new_log and "[tests]" not in new_log and "[mine]" not in new_log

    done = gpu_check(out, base / "work", "--only", "reference")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = json.loads((out / "gpu_check.json").read_text())["steps"]["reference"]
    assert reference["status"] == "ok" and reference["invocation"] == 3, reference
    assert reference["details"]["epochs"] == 2 and reference["details"]["acc_after_finetune"] is not None
    assert reference["details"]["published"] == 0.9125

    wrong = gpu_check(out, base / "work", "--only", "smoke,bogus")
    assert wrong.returncode == 2 and "unknown step(s) bogus" in wrong.stderr


def test_timing_and_tolerance_rules():
    driver = load_driver()
    # cumulative seconds of 6 epochs, evaluated after epochs 3 and 6: training 1 s, evaluation 0.5 s
    rows = [{"phase": "search", "seconds": str(s)} for s in (3.0, 4.0, 5.5, 6.5, 7.5, 9.0)]
    timing = driver.phase_timing(rows, "search", eval_every=3)
    assert timing["train_epoch_s"] == pytest.approx(1.0) and timing["eval_s"] == pytest.approx(0.5)
    assert timing["first_epoch_s"] == 3.0
    reference = [{"phase": "search", "epoch": "1", "test_acc": "0.50", "train_loss": "2.00", "seconds": "1"}]
    close = [{"phase": "search", "epoch": "1", "test_acc": "0.51", "train_loss": "2.05", "seconds": "9"}]
    far = [{"phase": "search", "epoch": "1", "test_acc": "0.55", "train_loss": "2.00", "seconds": "1"}]
    assert driver.compare_metrics(reference, close, driver.TOLERANCE) == []
    assert len(driver.compare_metrics(reference, close, None)) == 2  # the clock column never counts
    assert "test_acc" in driver.compare_metrics(reference, far, driver.TOLERANCE)[0]


def test_a_compiled_run_that_finished_slow_or_recompiling_fails_the_step():
    driver = load_driver()
    assert driver.compile_problems("all well\n", {"search_img_per_s": 2.82}) == []
    assert driver.compile_problems("", None) == []  # no eager baseline to compare with: nothing to say
    slow = driver.compile_problems("", {"search_img_per_s": 0.29})
    assert len(slow) == 1 and "0.29x" in slow[0]
    log = ("W1126 13:13:57 convert_frame.py:1743] [2/8] torch._dynamo hit config.recompile_limit (8)\n"
           "W1126 13:13:58 convert_frame.py:1743] [9/8] torch._dynamo hit config.recompile_limit (8)\n")
    limit = driver.compile_problems(log, {"search_img_per_s": 3.0})
    assert len(limit) == 1 and "recompile limit (2 lines" in limit[0]


STEP_ROWS = [f"| {name} |" for name in STEPS if name != "reference"]


@pytest.mark.parametrize(("folder", "quoted"), [
    ("h100-2026-11-26-s8", [*STEP_ROWS, "| eager fp32 |", "| eager bf16 |", "| seconds per pass |",
                            "| 1 | resnet20 | grouped |", "| 2 | resnet20 | grouped |"]),
    ("h100-2026-11-26-s8/compile-fixed", ["| `--compile` fp32 |"]),
    ("h100-2026-11-26", ["| 1 | resnet20 | grouped |", "| 2 | resnet20 | layer by layer |"]),  # the group's runs
    ("h200-2026-11-26", ["| search | 150 |", "| finetune | 104 |"]),  # the full paper run
])
def test_the_results_page_quotes_the_stored_gpu_results(folder, quoted):
    """The GPU tables of docs/benchmarks.md are the ones gpu_tables.py prints from the stored results."""
    results = REPO / "benchmarks" / "gpu-results" / folder
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_tables.py"), str(results)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    page = (REPO / "docs" / "benchmarks.md").read_text()
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    for prefix in quoted:
        rows = [row for row in table_rows if row.startswith(prefix)]
        assert rows, prefix
        for row in rows:
            assert row in page, row


def test_source_digest_follows_the_files_not_git(tmp_path):
    """The report names what ran by the code's bytes: a copy of the tree with a stale .git still tells."""
    driver = load_driver()
    (tmp_path / "gemminer").mkdir()
    (tmp_path / "gemminer" / "masking.py").write_text("x = 1\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_check.sh").write_text("echo\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = driver.source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("changed, still not code")
    assert driver.source_digest(tmp_path) == first
    (tmp_path / "gemminer" / "masking.py").write_text("x = 2\n")
    assert driver.source_digest(tmp_path) != first
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--source-digest"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == driver.source_digest()


def test_gpu_tables_print_what_a_report_lacks_as_n_a(tmp_path):
    """A report cut short or an unmeasurable figure (evaluation within the noise) prints n/a, not a crash."""
    report = {"steps": {"smoke": {"status": "ok", "details": {"nvidia_smi": "card"}},
                        "speed": {"status": "ok", "details": {"fp32": {
                            "search_img_per_s": 100.0, "dense_train_img_per_s": 120.0, "eval_img_per_s": None,
                            "projected_paper_run_min": 3.0}}},
                        "compile": {"status": "skipped"},
                        "reference": {"status": "ok", "details": {
                            "data": "the copy", "epochs": 150, "acc_after_finetune": 0.8931, "acc_best_finetune": None,
                            "published": 0.9125, "wall_s": 250.0}}},
              "invocations": []}
    (tmp_path / "gpu_check.json").write_text(json.dumps(report))
    (tmp_path / "search_overhead.txt").write_text('old {"model": "cnn1d", "dense_step_ms": 2.0, "search_step_ms": 2.5, '
                                                  '"search_over_dense_per_step": 1.25, "masked_weights_ms": 0.4, '
                                                  '"clamp_ms": 0.02, "freezing_event_ms": 3.0, '
                                                  '"epoch_statistics_ms": 0.8}\n')
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_tables.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| eager fp32 | 100 | 120 | n/a | 1.20 | 3.0 min |" in done.stdout
    assert "| 1 old | cnn1d | layer by layer | 2.00 | 2.50 | 1.25 |" in done.stdout
    assert ("Dense ResNet-20, 150 epochs on the copy: 89.31% test accuracy after the last epoch (best n/a), "
            "1.94 points below the published 91.25%; 250.0 s.") in done.stdout
