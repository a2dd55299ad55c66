"""Hardening, as classes of cases (issue: every file, flag and model edge case gives one clear
answer). Each class is a table over the entry points x the kinds of damage: a new entry point or
a new kind of damage is one more row, and every row must end in one `gemminer: error:` line,
exit code 2, no traceback, and nothing silently assumed."""

import dataclasses
import hashlib
import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save
from torch import nn

from gemminer.checkpoint import MAGIC, load_run_checkpoint, rng_state
from gemminer.cli import main
from gemminer.config import FinetuneConfig, RunConfig, load_yaml, resolve
from gemminer.errors import GemminerError
from gemminer.experiment import check_output_shape, load_run, mine
from gemminer.methods import METHODS, method_class
from gemminer.ticket import Ticket, read_safetensors
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data-num-samples", "500", "--model-width", "8", "--epochs", "2", "--search-freeze-period", "1",
        "--finetune-epochs", "1", "--bn-recalibration-batches", "2", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("hardening") / "run"
    assert main(["mine", "--out", str(out), "--data-dir", data_dir, "--density", "0.2", *TINY]) == 0
    return out


def one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("gemminer: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- 1. damaged or odd files -------------------------------------------------------------------
def _checkpoint_with_body(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


DAMAGE = {
    "empty": lambda original: b"",
    "binary": lambda original: bytes(range(256)) * 8,
    "not-utf8": lambda original: b"method: gem\xff\xfeminer\ndensity: 0.1\n",
    "truncated": lambda original: original[: len(original) // 2],
    "foreign": None,  # per file kind, below: valid as a format, not one of ours
}
FOREIGN = {
    "config.yaml": b"- a list\n- not a config\n",
    "ticket.safetensors": save({"x": torch.ones(3)}),
    "init.safetensors": save({"x": torch.ones(3)}),
    "finetuned.safetensors": save({"x": torch.ones(3)}),
}
# (file of the run folder, entry points that read it)
READERS = {
    "config.yaml": ["eval", "finetune", "report", "export", "sanity"],
    "ticket.safetensors": ["eval", "finetune", "report", "export", "sanity"],
    "init.safetensors": ["eval", "finetune", "export-init", "sanity"],
    "finetuned.safetensors": ["export"],
}


def _command(entry: str, run: Path, tmp: Path) -> list[str]:
    return {
        "eval": ["eval", "--run", str(run)],
        "finetune": ["finetune", "--run", str(run), "--out", str(tmp / "ft"), "--quiet"],
        "report": ["report", str(run), "--png", str(tmp / "r.png")],
        "export": ["export", "--run", str(run), "--out", str(tmp / "e.safetensors")],
        "export-init": ["export", "--run", str(run), "--weights", "init", "--out", str(tmp / "e.safetensors")],
        "sanity": ["sanity", "--run", str(run), "--checks", "shuffle", "--quiet"],
    }[entry]


CASES = [(name, damage, entry) for name, entries in READERS.items() for damage in DAMAGE for entry in entries]


@pytest.mark.parametrize("name, damage, entry", CASES, ids=["-".join(case) for case in CASES])
def test_a_damaged_run_file_is_one_line_for_every_reader(finished_run, tmp_path, capsys, name, damage, entry):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    original = (run / name).read_bytes()
    (run / name).write_bytes(FOREIGN[name] if damage == "foreign" else DAMAGE[damage](original))
    line = one_error_line(capsys, main(_command(entry, run, tmp_path)))
    assert name.split(".")[0] in line or str(run) in line, line
    assert not (tmp_path / "ft" / "summary.json").exists()  # nothing ran on a silently assumed default


@pytest.mark.parametrize("damage", [*DAMAGE, "partial"])
def test_a_damaged_config_file_is_one_line(tmp_path, data_dir, capsys, damage):
    config = tmp_path / "given.yaml"
    config.write_bytes({"foreign": FOREIGN["config.yaml"], "partial": b"method: gemminer\n"}.get(damage)
                       or DAMAGE[damage](b"method: gemminer\ndensity: 0.1\n"))
    if damage == "partial":  # a valid --config may set some keys; a run folder's must be complete
        run = tmp_path / "run"
        run.mkdir()
        shutil.copy(config, run / "config.yaml")
        one_error_line(capsys, main(["eval", "--run", str(run)]))
        return
    for command in (["mine", "--out", str(tmp_path / "m")], ["compare", "--grid", str(config), "--out",
                                                             str(tmp_path / "c")]):
        if command[0] == "mine":
            command += ["--config", str(config), "--data-dir", data_dir]
        one_error_line(capsys, main(command))
    if damage != "truncated":  # half a YAML file may still parse: its unknown or missing keys are what fail
        with pytest.raises(GemminerError):
            load_yaml(str(config))


def _forged(pipeline=None, loop=None, objects=None) -> bytes:
    """A checkpoint with a valid checksum and the right top-level keys, but inner content of its own."""
    return _checkpoint_with_body({"pipeline": pipeline or {}, "rng": rng_state(), "loop": loop,
                                  "objects": objects or {}})


IN_SEARCH = {"phase": "search", "epoch": 1, "partial": None, "history": [], "elapsed": 0.0}
FORGED = {"search-empty": lambda: _forged(pipeline={"search": {}}),
          "loop-wrong-types": lambda: _forged(loop={"phase": 3, "epoch": "one"}),
          "rows-not-rows": lambda: _forged(pipeline={"rows": [1, 2]}),
          "objects-missing": lambda: _forged(loop=IN_SEARCH),
          "objects-misfit": lambda: _forged(loop=IN_SEARCH, objects={"net": {"x": torch.zeros(1)}, "optimizer": {}})}


@pytest.mark.parametrize("body", ["list", "foreign-pickle", "missing-keys", "empty", "truncated", *FORGED])
def test_a_checkpoint_that_is_not_ours_says_so_and_how_to_start_over(finished_run, tmp_path, data_dir, capsys,
                                                                     body):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()  # an unfinished run: mine resumes from its checkpoint
    good = _checkpoint_with_body({"pipeline": {}, "rng": {}, "loop": None, "objects": {}})
    payload = {"list": _checkpoint_with_body([1, 2, 3]),
               "foreign-pickle": _checkpoint_with_body({"pipeline": {}, "x": collections_counter()}),
               "missing-keys": _checkpoint_with_body({"pipeline": {}}),
               "empty": b"",
               "truncated": good[: len(good) - 5]}[body] if body not in FORGED else FORGED[body]()
    (run / "checkpoint.pt").write_bytes(payload)
    code = main(["mine", "--out", str(run), "--data-dir", data_dir, "--density", "0.2", *TINY])
    if body in ("objects-missing", "objects-misfit"):  # read fine, so the run says it resumes; then the error
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert lines[0].startswith("resuming the unfinished run") and len(lines) == 2, err
        line = lines[-1]
        assert line.startswith("gemminer: error: cannot resume from checkpoint"), err
    else:
        line = one_error_line(capsys, code)
    assert "checkpoint" in line
    if body in ("list", "foreign-pickle", "missing-keys", *FORGED):
        assert "--force" in line
    if body not in ("objects-missing", "objects-misfit"):  # those read fine; resuming from them fails
        with pytest.raises(GemminerError):
            load_run_checkpoint(run / "checkpoint.pt")


def test_every_checkpoint_gemminer_writes_passes_the_structure_check():
    """What the writers put there: IMP's fractional search epochs (a rewind to epoch 0.5), a part-done
    epoch's sums, IMP's method state; and a forged part-done epoch is refused."""
    from gemminer.checkpoint import structure_problem

    partial = {"steps": 3, "loss_sum": torch.tensor(1.5), "correct": torch.tensor(7), "samples": 96}
    loop = {"phase": "finetune", "epoch": 1, "partial": partial, "history": [{"phase": "finetune"}], "elapsed": 2.0}
    state = {"pipeline": {"rows": [{"phase": "search"}], "search": {"epochs": 3.428571, "seconds": 1.0,
                                                                     "start_point": "rewind"},
                          "method_state": {"round": 2}}, "rng": rng_state(), "loop": loop, "objects": {}}
    assert structure_problem(state) is None
    state["loop"] = {**loop, "partial": {"x": 1}}
    assert "partial" in structure_problem(state)


def collections_counter():
    import collections

    return collections.Counter(a=1)  # a pickle weights_only refuses


@pytest.mark.parametrize("damage", ["empty", "binary", "truncated"])
def test_a_damaged_data_cache_is_one_line_and_closes_its_file(tmp_path, data_dir, capsys, damage, recwarn):
    cache = tmp_path / "mnist1d-500.npz"
    shutil.copy(Path(data_dir) / "mnist1d-500.npz", cache)
    cache.write_bytes(DAMAGE[damage](cache.read_bytes()))
    line = one_error_line(capsys, main(["mine", "--out", str(tmp_path / "m"), "--data-dir", str(tmp_path), *TINY]))
    assert "data cache" in line and "delete it" in line
    import gc

    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


DATA_FILES = {  # data set -> (the file its loader reads first, relative to --data-dir, how to make the rest)
    "mnist": "train-images-idx3-ubyte",
    "cifar10": "cifar-10-batches-py/data_batch_1",
}


@pytest.mark.parametrize("damage", ["empty", "binary", "truncated"])
@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_a_damaged_data_file_is_one_line(tmp_path, capsys, monkeypatch, name, damage):
    from tests.test_datasets import write_cifar10_python, write_idx

    monkeypatch.setenv("GEMMINER_CACHE", str(tmp_path / "cache"))
    if name == "mnist":
        import numpy as np

        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            write_idx(tmp_path / stem, np.zeros((4, 28, 28) if "images" in stem else (4,)), compress=True)
    else:
        write_cifar10_python(tmp_path)
    target = tmp_path / DATA_FILES[name]
    target.write_bytes(DAMAGE[damage](target.read_bytes()))
    line = one_error_line(capsys, main(["mine", "--out", str(tmp_path / "m"), "--data", name, "--data-dir",
                                        str(tmp_path), "--quiet"]))
    assert target.name in line


def test_api_readers_raise_the_one_error_type(tmp_path):
    for damage, make in DAMAGE.items():
        path = tmp_path / f"{damage}.safetensors"
        path.write_bytes(make(save({"x": torch.ones(4)})) if make else FOREIGN["ticket.safetensors"])
        with pytest.raises(GemminerError):
            Ticket.load(path)
        if damage != "foreign":
            with pytest.raises(GemminerError):
                read_safetensors(path, "weights")
    with pytest.raises(GemminerError, match="not a run folder"):
        load_run(tmp_path)


# ---- 2. every numeric option validated -----------------------------------------------------------
def _numeric_fields(config_type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_type)
            if f.type in ("int", "float", "int | None", "float | None", "list[int] | None")]


SECTIONS = {"": RunConfig, "data": RunConfig().data.__class__, "model": RunConfig().model.__class__,
            "finetune": FinetuneConfig}
NUMERIC = [(section, name) for section, kind in SECTIONS.items() for name in _numeric_fields(kind)]
METHOD_NUMERIC = [(method, name) for method in sorted(METHODS) for name in _numeric_fields(method_class(method).Config)]


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf])
@pytest.mark.parametrize("section, name", NUMERIC, ids=[f"{s or 'top'}.{n}" for s, n in NUMERIC])
def test_every_run_number_is_validated(section, name, bad):
    if name == "milestones":
        bad = [bad]
    if name == "seed" and bad == -1:
        bad = 2.5  # every integer is a seed
    overrides = {section: {name: bad}} if section else {name: bad}
    with pytest.raises(GemminerError, match=name):
        resolve(overrides)


@pytest.mark.parametrize("method, name", METHOD_NUMERIC, ids=[f"{m}.{n}" for m, n in METHOD_NUMERIC])
def test_every_method_number_is_validated_on_cli_yaml_and_api(method, name, capsys):
    default = getattr(method_class(method).Config(), name)
    bad = -1 if isinstance(default, int) else -1.0
    overrides = {"method": method, "density": 0.5, "search": {name: bad}}
    with pytest.raises(GemminerError, match=f"search.{name}"):
        resolve(overrides)
    with pytest.raises(GemminerError, match=name):
        method_class(method)(0.5, **{name: bad})
    if isinstance(default, float):
        with pytest.raises(GemminerError, match=name):
            method_class(method)(0.5, **{name: math.nan})
    flag = f"--search-{name.replace('_', '-')}"
    one_error_line(capsys, main(["mine", "--method", method, "--density", "0.5", flag, str(bad), "--out", "unused"]))


# ---- 3. writes that cannot happen ------------------------------------------------------------------
def test_unwritable_and_degenerate_output_paths(finished_run, tmp_path, data_dir, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    below = str(blocker / "sub")  # ENOTDIR, for root too
    monkeypatch.chdir(tmp_path)
    cases = [
        ["mine", "--out", below, "--data-dir", data_dir, *TINY],
        ["mine", "--out", "", "--data-dir", data_dir, *TINY],
        ["mine", "--out", ".", "--data-dir", data_dir, *TINY],
        ["mine", "--out", str(blocker), "--data-dir", data_dir, *TINY],
        ["mine", "--out", str(tmp_path / "m"), "--data-dir", below, *TINY],
        ["finetune", "--run", str(finished_run), "--out", below, "--quiet"],
        ["finetune", "--run", str(finished_run), "--out", "", "--quiet"],
        ["export", "--run", str(finished_run), "--out", str(Path(below) / "x.safetensors")],
        ["compare", "--methods", "random", "--densities", "0.5", "--out", below, "--data-dir", data_dir],
        ["compare", "--methods", "random", "--densities", "0.5", "--out", "", "--data-dir", data_dir],
    ]
    for command in cases:
        one_error_line(capsys, main(command))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written into the current folder
    with pytest.raises(GemminerError, match="empty"):
        mine(resolve(tiny_overrides(data_dir)), "", progress=False)


# ---- 4. tickets and weights that identify themselves -------------------------------------------------
def test_equal_runs_give_byte_identical_files_across_processes(tmp_path, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "random"}
    digests = []
    for index in range(2):
        out = tmp_path / f"run{index}"
        subprocess.run([sys.executable, "-m", "gemminer", "mine", "--out", str(out), "--data-dir", data_dir, *TINY],
                       check=True, env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "gemminer", "export", "--run", str(out), "--out",
                        str(out / "export.safetensors")], check=True, env=env, capture_output=True)
        digests.append({name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in
                        ("ticket.safetensors", "gem.safetensors", "init.safetensors", "finetuned.safetensors",
                         "export.safetensors")})
    assert digests[0] == digests[1]


# ---- 5. models a user really has ---------------------------------------------------------------------
class TiedNet(nn.Module):
    """A weight-tied model: an embedding-like first layer and a decoder share one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.encoder = nn.Linear(40, 16, bias=False)
        self.middle = nn.Linear(16, 40, bias=False)
        self.decoder = nn.Linear(40, 16, bias=False)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(16, 10, bias=False)

    def forward(self, x):
        return self.head(self.decoder(torch.relu(self.middle(torch.relu(self.encoder(self.flatten(x)))))))


def test_tied_weights_get_one_mask_counted_once(batches):
    from gemminer.finetune import finetune
    from gemminer.methods import Magnitude

    model = TiedNet()
    ticket = Magnitude(0.3).find(model, batches)
    assert "decoder.weight" not in ticket.masks and "encoder.weight" in ticket.masks
    assert ticket.total == sum(p.numel() for p in model.parameters())  # the tied tensor counted once
    ticket.apply(model)
    finetune(model, batches, epochs=1)
    assert torch.equal(model.encoder.weight, model.decoder.weight)
    assert model.encoder.parametrizations.weight.original is model.decoder.parametrizations.weight.original


def tied_factory(num_classes):
    return TiedNet()


def test_tied_weights_end_to_end_run_export_report_and_prune_interop(tmp_path, data_dir, capsys):
    from gemminer.export import read_export
    from gemminer.interop import from_prune_masks, to_prune_masks
    from gemminer.masking import prunable_names

    run = tmp_path / "run"
    assert main(["mine", "--out", str(run), "--model", "tests.test_hardening:tied_factory", "--method", "magnitude",
                 "--density", "0.3", "--data-dir", data_dir, "--data-num-samples", "500", "--finetune-epochs", "1",
                 "--quiet"]) == 0
    ticket = Ticket.load(run / "ticket.safetensors")
    assert ticket.metadata["tied"] == {"encoder.weight": ["decoder.weight"]}
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "e.safetensors")]) == 0
    model = TiedNet()
    model.load_state_dict(read_export(tmp_path / "e.safetensors")[0])  # the tied copy is masked too
    assert int((model.encoder.weight == 0).sum()) == ticket.masks["encoder.weight"].numel() - int(
        ticket.masks["encoder.weight"].sum())
    assert main(["report", str(run), "--png", str(tmp_path / "r.png")]) == 0
    assert "2080" in capsys.readouterr().out  # the tied layer's MACs count under its mask's name
    from gemminer.ticket import InitHashMismatch

    with pytest.warns(InitHashMismatch):  # a fresh TiedNet, not the run's initial weights: masks apply anyway
        pruned = to_prune_masks(ticket, TiedNet())
    assert torch.equal(pruned.encoder.weight, pruned.decoder.weight)
    assert sorted(from_prune_masks(pruned).masks) == sorted(ticket.masks)
    tied_last = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    tied_last[2].weight = tied_last[0].weight
    assert prunable_names(tied_last, prune_last=False) == ["1.weight"]  # the last layer's Parameter stays dense


def test_a_layer_parametrized_by_the_user_is_refused_with_the_real_reason(batches):
    from gemminer.methods import Magnitude

    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.nn.utils.parametrizations.weight_norm(model[1])
    with pytest.raises(GemminerError, match=r"layer 1: .*already parametrized .*remove_parametrizations"):
        Magnitude(0.5).find(model, batches)
    hooked = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(hooked[3])  # the old hook-based kind
    with pytest.raises(GemminerError, match=r"layer 3: .*computed by a hook"):
        Magnitude(0.5).find(hooked, batches)
    assert Magnitude(0.5, prune_last=False).find(hooked, batches).density == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_empty_training_data_is_an_error_for_methods_that_learn_from_it(method):
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    options = {"imp": {"epochs": 1}, "edge-popup": {"epochs": 1}, "gemminer": {"epochs": 1, "freeze_period": 0}}
    instance = method_class(method)(0.5, **options.get(method, {}))
    if method_class(method).needs_data:
        with pytest.raises(GemminerError, match="empty"):
            instance.find(model, [])
    elif method != "synflow":  # synflow takes the input shape from one batch: it says so
        assert instance.find(model, []).density == pytest.approx(1.0 if method == "dense" else 0.5, abs=0.01)


def test_a_method_that_asks_for_k_batches_refuses_fewer(batches):
    from gemminer.methods import Snip

    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(GemminerError, match="100 training batches"):
        Snip(0.5, batches=100).find(model, batches)


def test_a_ticket_of_another_model_does_not_fit(tmp_path, data_dir, capsys):
    mlp = tmp_path / "mlp"
    assert main(["mine", "--out", str(mlp), "--model", "mlp", "--data-dir", data_dir, *TINY]) == 0
    line = one_error_line(capsys, main(["finetune", "--ticket", str(mlp / "ticket.safetensors"), "--model", "cnn1d",
                                        "--out", str(tmp_path / "ft"), "--data-dir", data_dir, "--quiet"]))
    assert "does not fit" in line


def test_a_one_class_image_folder_is_refused(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "imgs" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / split / "cat" / "a.png")
    line = one_error_line(capsys, main(["mine", "--out", str(tmp_path / "m"), "--data",
                                        f"imagefolder:{tmp_path / 'imgs'}", "--quiet"]))
    assert "at least 2" in line


def test_a_user_model_beside_the_user_imports_from_the_console_script(tmp_path, data_dir):
    (tmp_path / "mymod.py").write_text("from torch import nn\n\ndef factory(num_classes):\n"
                                       "    return nn.Sequential(nn.Flatten(), nn.Linear(40, num_classes))\n")
    script = Path(sys.executable).parent / "gemminer"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from gemminer.cli import "
                                                                           "main; sys.exit(main())"]
    result = subprocess.run([*command, "mine", "--out", str(tmp_path / "run"), "--model", "mymod:factory",
                             "--data-dir", data_dir, "--method", "magnitude", "--data-num-samples", "500",
                             "--finetune-epochs", "1", "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr


def test_the_output_shape_probe_builds_no_autograd_graph():
    """The probe before a run is one forward pass without gradients: no graph kept over the model."""
    grad_modes = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 10))
    model.register_forward_hook(lambda module, inputs, output: grad_modes.append(torch.is_grad_enabled()))
    dataset = SimpleNamespace(transform=lambda: None, test=SimpleNamespace(x=torch.randn(4, 1, 40)),
                              name="probe", input_shape=(1, 40), num_classes=10)
    check_output_shape(model, dataset)
    assert grad_modes == [False] and model.training
