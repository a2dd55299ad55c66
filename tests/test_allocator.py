"""The CPU allocator setting (gemminer.allocator): applied on glibc unless the user set glibc's own
variables or opted out, and applied by the command line before anything else."""

import ctypes
import sys

import pytest

from gemminer import allocator, cli


def glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt") and \
            hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not glibc(), reason="glibc only")
def test_applied_on_glibc(monkeypatch):
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True  # again: the same values


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_users_own_settings_win(monkeypatch, name):
    monkeypatch.setenv(name, "1")
    assert allocator.keep_freed_memory() is False


def test_command_line_applies_it_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["mine", "--out", "x", "--density", "2"]) == 2  # refused, after the setting
    assert calls == [True]
    assert "density" in capsys.readouterr().err


@pytest.mark.skipif(not glibc(), reason="glibc only")
def test_opt_out_set_to_0_is_no_opt_out(monkeypatch):
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMMINER_KEEP_MALLOC", "0")
    assert allocator.keep_freed_memory() is True
