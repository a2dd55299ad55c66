"""No input silently ignored: a key given twice, a misspelt name, a file that does not fit, a value
that would be dropped, a path that cannot be a folder. Each is one `gemminer: error:` line naming what
was wrong, exit 2, and nothing written."""

import shutil

import pytest

from gemminer.cli import main
from gemminer.config import load_yaml
from gemminer.errors import GemminerError
from tests.test_hardening import TINY, one_error_line
from tests.test_hardening_files import snapshot

GRID_TAIL = "densities: [0.5]\nseeds: [0]\n"
DUPLICATES = {  # file text -> the key the line must name
    "grid-variant-twice": ("variants:\n  a: {method: random}\n  a: {method: snip}\n" + GRID_TAIL, "'a' on line 3"),
    "grid-top-level-twice": ("variants:\n  a: {method: random}\ndensities: [0.1]\n" + GRID_TAIL, "'densities'"),
    "grid-base-nested-twice": ("base:\n  model:\n    width: 8\n    width: 16\nvariants:\n  a: {method: random}\n"
                               + GRID_TAIL, "'width' on line 4"),
    "grid-variant-option-twice": ("variants:\n  a:\n    method: random\n    method: snip\n" + GRID_TAIL, "'method'"),
    "config-top-level-twice": ("density: 0.1\nmethod: random\ndensity: 0.5\n", "'density' on line 3"),
    "config-section-twice": ("data:\n  num_samples: 500\nmodel:\n  width: 8\ndata:\n  batch_size: 32\n", "'data'"),
    "config-flow-mapping-twice": ("search: {epochs: 2, epochs: 3}\n", "'epochs'"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_a_key_given_twice_in_a_config_or_grid_file_is_refused_by_name_and_line(tmp_path, data_dir, capsys, case):
    text, said = DUPLICATES[case]
    path = tmp_path / "file.yaml"
    path.write_text(text)
    with pytest.raises(GemminerError, match="duplicate key"):
        load_yaml(str(path))
    if case.startswith("grid"):
        command = ["compare", "--grid", str(path), "--out", str(tmp_path / "out")]
    else:
        command = ["mine", "--config", str(path), "--out", str(tmp_path / "out"), "--data-dir", data_dir]
    line = one_error_line(capsys, main(command))
    assert "duplicate key" in line and said in line
    assert not (tmp_path / "out").exists()


def test_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "file.yaml"
    path.write_text("common: &c {epochs: 2, freeze_period: 1}\nsearch:\n  <<: *c\n  epochs: 3\n")
    assert load_yaml(str(path))["search"] == {"epochs": 3, "freeze_period": 1}


SANITY_VARIANTS = {  # --sanity-variants value with --methods gemminer,random -> refused name
    "misspelt": ("gemminr", "'gemminr'"),
    "one-of-two-misspelt": ("gemminer,randm", "'randm'"),
    "a-method-not-in-the-grid": ("snip", "'snip'"),
}


@pytest.mark.parametrize("case", sorted(SANITY_VARIANTS))
def test_an_unknown_sanity_variant_is_refused_with_the_valid_ones(tmp_path, data_dir, capsys, case):
    value, said = SANITY_VARIANTS[case]
    line = one_error_line(capsys, main(["compare", "--methods", "gemminer,random", "--sanity-variants", value,
                                        "--out", str(tmp_path / "out"), "--data-dir", data_dir]))
    assert said in line and "gemminer, random" in line
    assert not (tmp_path / "out").exists()


def test_the_default_sanity_variant_need_not_be_in_the_grid(tmp_path, data_dir):
    from gemminer.grid import grid_from_flags

    grid = grid_from_flags({}, ["random"], [0.5], [0], sanity=["shuffle"], sanity_variants=["gemminer"])
    assert [variant.sanity for variant in grid.variants] == [[]]


@pytest.fixture(scope="module")
def wide_ticket(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("wide") / "run"
    assert main(["mine", "--out", str(out), "--data-dir", data_dir, "--method", "magnitude", "--density", "0.1",
                 "--data-num-samples", "500", "--model-width", "16", "--finetune-epochs", "1", "--quiet"]) == 0
    return out / "ticket.safetensors"


MISFITS = {  # (case) -> extra flags of a `mine --method random --search-like-ticket <16-wide ticket>` run
    "another-width": ["--model-width", "8"],
    "another-model": ["--model", "mlp"],
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_like_ticket_that_does_not_fit_the_model_is_refused_before_the_run(wide_ticket, tmp_path, data_dir,
                                                                             capsys, case):
    out = tmp_path / "run"
    line = one_error_line(capsys, main(["mine", "--out", str(out), "--method", "random", "--density", "0.1",
                                        "--search-like-ticket", str(wide_ticket), "--data-dir", data_dir,
                                        "--data-num-samples", "500", *MISFITS[case], "--quiet"]))
    assert str(wide_ticket) in line and ("does not fit" in line or "other layers" in line)
    assert not out.exists()


def test_a_like_ticket_of_the_same_model_still_runs(wide_ticket, tmp_path, data_dir):
    from gemminer.ticket import Ticket

    out = tmp_path / "run"
    assert main(["mine", "--out", str(out), "--method", "random", "--density", "0.1", "--search-like-ticket",
                 str(wide_ticket), "--data-dir", data_dir, "--data-num-samples", "500", "--model-width", "16",
                 "--finetune-epochs", "1", "--quiet"]) == 0
    assert Ticket.load(out / "ticket.safetensors").density == pytest.approx(Ticket.load(wide_ticket).density)


KEEP = {"one-below": ("0.6,0.2", "0.2"), "all-below": ("0.1", "0.1"), "far-below": ("0.01,0.3", "0.01, 0.3")}


@pytest.mark.parametrize("case", sorted(KEEP))
def test_an_imp_keep_density_below_the_target_is_refused_by_value(tmp_path, data_dir, capsys, case):
    value, said = KEEP[case]
    out = tmp_path / "run"
    line = one_error_line(capsys, main(["mine", "--out", str(out), "--method", "imp", "--density", "0.4",
                                        "--search-keep-densities", value, "--epochs", "1", "--data-dir", data_dir,
                                        "--data-num-samples", "500", "--quiet"]))
    assert f"keep_densities {said} lie below the target density 0.4" in line
    assert not out.exists()


OUTS = {  # what --out is -> what the line must say
    "dangling-symlink": (lambda path: path.symlink_to(path.parent / "gone"), "which does not exist"),
    "symlink-loop": (lambda path: path.symlink_to(path), "symlink loop"),
    "a-file": (lambda path: path.write_text("x"), "is a file, not a folder"),
}


@pytest.mark.parametrize("command", ["mine", "finetune", "compare"])
@pytest.mark.parametrize("case", sorted(OUTS))
def test_an_out_that_cannot_be_a_folder_says_the_real_reason(finished_run_for_outs, tmp_path, data_dir, capsys,
                                                              case, command):
    make, said = OUTS[case]
    out = tmp_path / "out"
    make(out)
    before = snapshot(tmp_path)
    argv = {"mine": ["mine", "--data-dir", data_dir, *TINY],
            "finetune": ["finetune", "--run", str(finished_run_for_outs), "--quiet"],
            "compare": ["compare", "--methods", "random", "--data-dir", data_dir]}[command]
    line = one_error_line(capsys, main([*argv, "--out", str(out)]))
    assert said in line and "keeps being removed" not in line
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def finished_run_for_outs(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("outs") / "run"
    assert main(["mine", "--out", str(out), "--data-dir", data_dir, "--density", "0.2", *TINY]) == 0
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    return out
