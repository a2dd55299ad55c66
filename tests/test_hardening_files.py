"""Nothing of the user's is damaged: no command writes onto a run's own files or its inputs, the lock
file is never written through, a refused command writes nothing, and a resume does not build on a file
changed since the run wrote it. Every row ends in one `gemminer: error:` line, exit 2, and the run
folder (and the user's files) byte for byte as they were."""

import errno
import hashlib
import shutil
from pathlib import Path

import pytest

from gemminer import experiment
from gemminer.checkpoint import StopRequested
from gemminer.cli import main
from tests.test_hardening import TINY, one_error_line


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under `roots` (symlinks as their target, folders as such, files by digest)."""
    entries = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            if path.is_symlink():
                entries[str(path)] = "link:" + str(path.readlink())
            elif path.is_dir():
                entries[str(path)] = "dir"
            elif path.is_file():
                entries[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:  # a FIFO: never read (it would block)
                entries[str(path)] = "other"
    return entries


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("files") / "run"
    assert main(["mine", "--out", str(out), "--data-dir", data_dir, "--density", "0.2", *TINY]) == 0
    return out


# (case, command given run folder r, a scratch folder t and the data dir) -> writes nothing, one line
ONTO_RUN_FILES = {
    "export-onto-ticket": lambda r, t, d: ["export", "--run", str(r), "--out", str(r / "ticket.safetensors")],
    "export-onto-init": lambda r, t, d: ["export", "--run", str(r), "--weights", "init", "--out",
                                         str(r / "init.safetensors")],
    "export-onto-summary": lambda r, t, d: ["export", "--run", str(r), "--out", str(r / "summary.json")],
    "export-onto-metrics": lambda r, t, d: ["export", "--run", str(r), "--out", str(r / "metrics.csv")],
    "export-onto-config": lambda r, t, d: ["export", "--run", str(r), "--out", str(r / "config.yaml")],
    "export-onto-checkpoint": lambda r, t, d: ["export", "--run", str(r), "--out", str(r / "checkpoint.pt")],
    "export-onto-lock": lambda r, t, d: ["export", "--run", str(r), "--out", str(r / ".lock")],
    "export-onto-another-runs-ticket": lambda r, t, d: ["export", "--run", str(r), "--out",
                                                        str(t / "other" / "ticket.safetensors")],
    "export-into-a-run-subfolder": lambda r, t, d: ["export", "--run", str(r), "--out",
                                                    str(r / "tickets" / "d0.5.safetensors")],
    "export-via-dotdot": lambda r, t, d: ["export", "--run", str(r), "--out",
                                          str(r / "tickets" / ".." / "finetuned.safetensors")],
    "report-png-onto-init": lambda r, t, d: ["report", str(r), "--png", str(r / "init.safetensors")],
    "report-png-onto-its-ticket-file": lambda r, t, d: ["report", str(t / "own.safetensors"), "--png",
                                                        str(t / "own.safetensors")],
}


@pytest.mark.parametrize("case", sorted(ONTO_RUN_FILES))
def test_no_command_writes_onto_a_runs_own_files_or_its_inputs(finished, tmp_path, data_dir, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "tickets").mkdir()
    shutil.copytree(finished, tmp_path / "other")
    shutil.copy(finished / "ticket.safetensors", tmp_path / "own.safetensors")
    before = snapshot(tmp_path)
    line = one_error_line(capsys, main(ONTO_RUN_FILES[case](run, tmp_path, data_dir)))
    assert "refusing to write" in line
    assert snapshot(tmp_path) == before


def test_the_default_export_and_chart_still_go_into_the_run_folder(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert main(["export", "--run", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    assert (run / "export-finetuned-dense.safetensors").is_file() and (run / "layer_density.png").is_file()


# what `.lock` may be that is not a file of the run's own; each is refused before anything is written
LOCKS = {
    "symlink-to-a-user-file": lambda lock, victim: lock.symlink_to(victim),
    "dangling-symlink": lambda lock, victim: lock.symlink_to(victim.parent / "nowhere"),
    "directory": lambda lock, victim: lock.mkdir(),
    "hard-link-to-a-user-file": lambda lock, victim: lock.hardlink_to(victim),
    "fifo": lambda lock, victim: __import__("os").mkfifo(lock),
}


@pytest.mark.parametrize("kind", sorted(LOCKS))
@pytest.mark.parametrize("force", [False, True])
def test_a_lock_that_is_not_a_regular_file_of_the_run_is_refused(finished, tmp_path, data_dir, capsys, kind, force):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / ".lock").unlink(missing_ok=True)
    (run / "summary.json").unlink()  # an unfinished run: without --force it would resume
    victim = tmp_path / "user-file.txt"
    victim.write_text("the user's data\n")
    LOCKS[kind](run / ".lock", victim)
    before = snapshot(tmp_path)
    command = ["mine", "--out", str(run), "--data-dir", data_dir, "--density", "0.2", *TINY]
    line = one_error_line(capsys, main(command + (["--force"] if force else [])))
    assert ".lock" in line and "not gemminer's lock file" in line
    assert snapshot(tmp_path) == before
    assert victim.read_text() == "the user's data\n"


def test_a_full_disk_while_writing_the_holder_line_is_one_line_and_leaves_no_folder(tmp_path, data_dir, capsys,
                                                                                     monkeypatch):
    import os

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("gemminer.runs.os.pwrite", full)
    out = tmp_path / "new" / "run"
    line = one_error_line(capsys, main(["mine", "--out", str(out), "--data-dir", data_dir, *TINY]))
    assert "lock file" in line and "disk is full" in line
    assert not (tmp_path / "new").exists()


GRID_CHANGES = {  # a grid run once, then changed: the same --out is refused before anything runs
    "training-epochs-changed": ["--finetune-epochs", "2"],
    "model-width-changed": ["--model-width", "4"],
}


@pytest.mark.parametrize("change", sorted(GRID_CHANGES))
def test_a_refused_grid_writes_nothing_not_even_empty_tables(tmp_path, data_dir, capsys, change):
    out = tmp_path / "grid"
    base = ["compare", "--methods", "random", "--densities", "0.5", "--no-dense", "--sanity", "none", "--out",
            str(out), "--data-dir", data_dir, "--data-num-samples", "500", "--model-width", "8",
            "--finetune-epochs", "1", "--quiet"]
    assert main(base) == 0
    capsys.readouterr()
    results = (out / "results.csv").read_text()
    assert "random" in results
    before = snapshot(out)
    line = one_error_line(capsys, main(base + GRID_CHANGES[change]))
    assert "another config" in line and "nothing was run or written" in line
    assert snapshot(out) == before


def _stopped_in_finetuning(out: Path, command: list[str], monkeypatch) -> None:
    """Run `command` until its search is done and fine-tuning starts, then stop it as SIGTERM would."""
    def stop(*args, **kwargs):
        raise StopRequested("SIGTERM")

    with monkeypatch.context() as patch:
        patch.setattr(experiment, "train_ticket", stop)
        assert main(command) == 143
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()


def flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


IMP = ["--method", "imp", "--density", "0.4", "--epochs", "1", "--search-rewind", "epoch:0.5",
       "--search-keep-densities", "0.6", "--data-num-samples", "500", "--model-width", "8",
       "--bn-recalibration-batches", "2", "--quiet"]
RESUME_DAMAGE = {  # (file a resume would carry forward, what was done to it)
    "rounds-truncated": ("rounds.csv", lambda path: path.write_bytes(path.read_bytes()[:20])),
    "rounds-edited": ("rounds.csv", lambda path: path.write_text(path.read_text().replace("1", "2"))),
    "rounds-binary": ("rounds.csv", lambda path: path.write_bytes(bytes(range(256)))),
    "rounds-deleted": ("rounds.csv", lambda path: path.unlink()),
    "ticket-edited": ("ticket.safetensors", lambda path: flip_last_byte(path)),
    "stop-ticket-deleted": ("tickets/d0.6.safetensors", lambda path: path.unlink()),
    "init-truncated": ("init.safetensors", lambda path: path.write_bytes(path.read_bytes()[:100])),
    "start-weights-edited": ("start.safetensors", lambda path: flip_last_byte(path)),
}


@pytest.fixture(scope="module")
def stopped_imp(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("imp") / "run"
    with pytest.MonkeyPatch.context() as patch:
        _stopped_in_finetuning(out, ["mine", "--out", str(out), "--data-dir", data_dir, *IMP], patch)
    return out


@pytest.mark.parametrize("case", sorted(RESUME_DAMAGE))
def test_a_resume_refuses_a_file_changed_since_the_run_wrote_it(stopped_imp, tmp_path, data_dir, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(stopped_imp, run)
    name, damage = RESUME_DAMAGE[case]
    damage(run / name)
    before = snapshot(run)
    line = one_error_line(capsys, main(["mine", "--out", str(run), "--data-dir", data_dir, *IMP]))
    assert name in line and "--force" in line
    assert snapshot(run) == before


def test_an_intact_stopped_run_still_resumes_to_the_end(stopped_imp, tmp_path, data_dir):
    run = tmp_path / "run"
    shutil.copytree(stopped_imp, run)
    assert main(["mine", "--out", str(run), "--data-dir", data_dir, *IMP]) == 0
    assert (run / "summary.json").is_file() and (run / "rounds.csv").is_file()


USER_FOLDERS = {  # a folder of the user's (no config.yaml) holding a file of a run's name -> command run into it
    "mine-into-a-folder-with-a-ticket": ("ticket.safetensors", lambda u, r, d: [
        "mine", "--out", str(u), "--data-dir", d, *TINY]),
    "mine-into-a-folder-with-metrics": ("metrics.csv", lambda u, r, d: ["mine", "--out", str(u), "--data-dir", d,
                                                                        *TINY]),
    "mine-into-a-folder-with-tickets": ("tickets/mine.safetensors", lambda u, r, d: [
        "mine", "--out", str(u), "--data-dir", d, *TINY]),
    "finetune-its-input-ticket-folder": ("ticket.safetensors", lambda u, r, d: [
        "finetune", "--ticket", str(u / "ticket.safetensors"), "--init", str(r / "init.safetensors"), "--out", str(u),
        "--quiet"]),
    "finetune-its-input-init-folder": ("init.safetensors", lambda u, r, d: [
        "finetune", "--ticket", str(r / "ticket.safetensors"), "--init", str(u / "init.safetensors"), "--out", str(u),
        "--quiet"]),
}


@pytest.mark.parametrize("case", sorted(USER_FOLDERS))
def test_a_run_into_a_users_folder_never_removes_or_replaces_the_users_files(finished, tmp_path, data_dir, capsys,
                                                                             case):
    name, command = USER_FOLDERS[case]
    user = tmp_path / "mine"
    (user / name).parent.mkdir(parents=True, exist_ok=True)
    source = finished / Path(name).name if (finished / Path(name).name).is_file() else finished / "ticket.safetensors"
    shutil.copy(source, user / name)
    before = snapshot(tmp_path)
    line = one_error_line(capsys, main(command(user, finished, data_dir)))
    assert "no gemminer run" in line
    after = snapshot(tmp_path)
    assert after == before
