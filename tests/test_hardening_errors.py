"""A traceback where one line belongs: names the file system refuses, a user model whose import fails
or exits, an unreachable Ray head, a forged checkpoint. Every row ends in one `gemminer: error:` line,
exit 2, and writes nothing."""

import hashlib
import io
import os
import shutil
import time

import pytest
import torch

from gemminer.checkpoint import MAGIC
from gemminer.cli import main
from tests.test_hardening import TINY, one_error_line
from tests.test_hardening_files import snapshot

LONG_NAME = "n" * 300  # over NAME_MAX (255) on every common file system
LONG_PATH = "/".join(["p" * 200] * 25)  # over PATH_MAX (4096), each part a legal name


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["mine", "--out", str(out), "--data-dir", data_dir, "--density", "0.2", *TINY]) == 0
    return out


NAMES = {  # (case) -> command, given the run r, a scratch folder t and the data dir d
    "mine-name-max": lambda r, t, d: ["mine", "--out", str(t / LONG_NAME), "--data-dir", d, *TINY],
    "mine-path-max": lambda r, t, d: ["mine", "--out", str(t / LONG_PATH), "--data-dir", d, *TINY],
    "finetune-name-max": lambda r, t, d: ["finetune", "--run", str(r), "--out", str(t / LONG_NAME), "--quiet"],
    "export-name-max": lambda r, t, d: ["export", "--run", str(r), "--out", str(t / (LONG_NAME + ".safetensors"))],
    "export-path-max": lambda r, t, d: ["export", "--run", str(r), "--out", str(t / LONG_PATH / "x.safetensors")],
    "export-tmp-name-over-max": lambda r, t, d: ["export", "--run", str(r), "--out", str(t / ("e" * 253))],
    "report-png-name-max": lambda r, t, d: ["report", str(r), "--png", str(t / (LONG_NAME + ".png"))],
    "report-png-not-an-image-format": lambda r, t, d: ["report", str(r), "--png", str(t / "chart.safetensors")],
    "report-png-no-suffix": lambda r, t, d: ["report", str(r), "--png", str(t / "chart")],
    "compare-name-max": lambda r, t, d: ["compare", "--methods", "random", "--out", str(t / LONG_NAME),
                                         "--data-dir", d],
}


@pytest.mark.parametrize("case", sorted(NAMES))
def test_a_name_the_file_system_refuses_is_one_line(finished, tmp_path, data_dir, capsys, case):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = snapshot(finished, scratch)
    line = one_error_line(capsys, main(NAMES[case](finished, scratch, data_dir)))
    assert len(line) < 12000
    assert snapshot(finished, scratch) == before


MODULES = {  # module source -> what the one line must say
    "raises": ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    "syntax-error": ("def factory(:\n", "SyntaxError"),
    "exits-0": ("import sys\nsys.exit(0)\n", "sys.exit(0)"),
    "exits-3": ("import sys\nsys.exit(3)\n", "sys.exit(3)"),
    "exits-message": ("import sys\nsys.exit('bye')\n", "sys.exit('bye')"),
    "imports-a-missing-package": ("import not_installed_anywhere\n", "not_installed_anywhere"),
    "factory-exits": ("import sys\ndef factory(num_classes):\n    sys.exit(4)\n", "sys.exit(4)"),
    "factory-raises": ("def factory(num_classes):\n    raise ValueError('bad width')\n", "ValueError: bad width"),
}


@pytest.mark.parametrize("case", sorted(MODULES))
def test_a_user_model_whose_import_fails_or_exits_is_one_line(tmp_path, data_dir, capsys, monkeypatch, case):
    source, said = MODULES[case]
    name = "usermod_" + case.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("GEMMINER_DEBUG", raising=False)
    out = tmp_path / "run"
    line = one_error_line(capsys, main(["mine", "--out", str(out), "--model", f"{name}:factory", "--data-dir",
                                        data_dir, "--method", "magnitude", "--data-num-samples", "500", "--quiet"]))
    assert said in line and "GEMMINER_DEBUG=1" in line
    if not case.startswith("factory"):
        assert name in line
    assert not out.exists()


def test_gemminer_debug_shows_the_users_traceback(tmp_path, data_dir, capsys, monkeypatch):
    (tmp_path / "usermod_debug.py").write_text("def helper():\n    raise RuntimeError('deep')\nhelper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GEMMINER_DEBUG", "1")
    assert main(["mine", "--out", str(tmp_path / "run"), "--model", "usermod_debug:factory", "--data-dir", data_dir,
                 "--method", "magnitude", "--data-num-samples", "500", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "helper()" in err and err.strip().splitlines()[-1].startswith("gemminer: error:")


RAY = {  # address -> what the line says; each answered within seconds, before Ray is imported
    "127.0.0.1:1": "cannot reach a Ray head at 127.0.0.1:1",
    "bogus://nowhere:99": "unknown scheme bogus://",
    "ray://127.0.0.1:1": "cannot reach a Ray head",
    "127.0.0.1:99999": "not an address",
    "127.0.0.1:port": "not an address",
}


@pytest.mark.parametrize("address", sorted(RAY))
def test_an_unreachable_or_malformed_ray_address_is_one_line_and_no_folder(tmp_path, data_dir, capsys, address):
    out = tmp_path / "grid"
    started = time.monotonic()
    line = one_error_line(capsys, main(["compare", "--methods", "random", "--out", str(out), "--ray", address,
                                        "--data-dir", data_dir]))
    assert RAY[address] in line
    assert time.monotonic() - started < 30
    assert not out.exists()


def _checkpoint(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo forged",))


FORGED = {
    "os-system": lambda: _checkpoint({"pipeline": {}, "x": _RunsACommand()}),
    "exec-builtin": lambda: _checkpoint({"pipeline": {}, "x": _Exec()}),
}


class _Exec:
    def __reduce__(self):
        return (exec, ("print('forged')",))


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_checkpoint_says_what_gemminer_says_not_torchs_advice(finished, tmp_path, data_dir, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    (run / "checkpoint.pt").write_bytes(FORGED[case]())
    before = snapshot(run)
    line = one_error_line(capsys, main(["mine", "--out", str(run), "--data-dir", data_dir, "--density", "0.2", *TINY]))
    assert "not a checkpoint this gemminer wrote" in line and "--force" in line
    assert "weights_only" not in line and "Re-running" not in line
    assert "forged" not in capsys.readouterr().out
    assert snapshot(run) == before
