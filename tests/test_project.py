"""The project speaks of itself: its files name no step of how it was built, and `--version` says
which code runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gemminer import __version__
from gemminer.cli import main

REPO = Path(__file__).resolve().parents[1]

# Each pattern is written in two parts joined at run time, so that this file does not match itself.
_PARTS = [
    (r"\bses", r"sions? \d"),  # numbered work sessions
    (r"\bthis ses", r"sion\b"),
    (r"\bgpu ses", r"sion"),
    (r"\bses", r"sions? (that|which) "),
    (r"help", r"er's call"),
    (r"\breview(ing)? hel", r"pers?\b"),
    (r"\bdevice to", r"ol"),
    (r"\brun\(comm", r"and="),
    (r"\bcar", r"ry="),
    (r"\ble", r"nt\b"),
    (r"\bdrawn f", r"or a gpu"),
    (r"\biss", r"ue #?\d"),
    (r"\bthe iss", r"ue's\b"),
]
BUILD_WORDS = re.compile("|".join(first + second for first, second in _PARTS), re.IGNORECASE)


def tracked_text_files() -> list[Path]:
    """The repository's tracked files that are text."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no list of the project's files")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    texts = []
    for name in filter(None, listed):
        path = REPO / name
        try:
            data = path.read_bytes()
        except OSError:  # listed but deleted in the working tree
            continue
        if b"\0" in data:
            continue
        try:
            data.decode()
        except UnicodeDecodeError:
            continue
        texts.append(path)
    return texts


def test_the_patterns_catch_build_words_and_leave_ordinary_ones():
    for phrase in ["measured in ses" + "sion 8", "a reviewing hel" + "per read it", "the device to" + "ol sends",
                   "run(comm" + "and=\"bash x\", car" + "ry=[\"gpu-carry\"])", "no GPU was le" + "nt to it",
                   "the iss" + "ue's goal", "iss" + "ue 11"]:
        assert BUILD_WORDS.search(phrase), phrase
    for phrase in ['@pytest.fixture(scope="session")', "torchrun helpers", "with run_session(config)",
                   "recompilation issues", "weights drawn from the seed", "a session-wide cache"]:
        assert not BUILD_WORDS.search(phrase), phrase


def test_no_file_tells_how_the_project_was_built():
    files = tracked_text_files()
    assert any(path.name == "README.md" for path in files)
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}"
             for path in files for number, line in enumerate(path.read_text().splitlines(), 1)
             if BUILD_WORDS.search(line)]
    assert not found, "files that tell how the project was built, not what it is:\n" + "\n".join(found)


def test_version_prints_the_version_and_the_commit(capsys, monkeypatch):
    monkeypatch.setattr("gemminer.runs.code_commit", lambda: "abc1234-dirty")
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"gemminer {__version__} (commit abc1234-dirty)\n"
    monkeypatch.setattr("gemminer.runs.code_commit", lambda: "")  # outside a git checkout
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"gemminer {__version__}\n"


def test_the_package_version_is_the_one_pyproject_and_the_changelog_name():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject
    assert re.search(rf"^## \[{re.escape(__version__)}\]", (REPO / "CHANGELOG.md").read_text(), re.MULTILINE)
