"""The documentation cannot rot: the python blocks of docs/ run (docs/api.md's in order, in one namespace;
every other page in one namespace of its own), its run-config and grid YAML blocks resolve, every page is in
the site's navigation, the site builds with `mkdocs build --strict`, and README.md stays short."""

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
API_DOC = DOCS / "api.md"
PAGES = sorted(DOCS.rglob("*.md"))  # pages in sub-folders (results/) too
README_LIMIT = 15_000  # bytes: an overview, the manual is docs/


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)


def run_blocks(page: Path, blocks: list[str]) -> dict:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example that warns is a wrong example
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for index, block in enumerate(blocks):
            try:
                exec(compile(block, f"{page.name} block {index + 1}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"docs/{page.name} block {index + 1} failed: {err!r}\n{block}") from err
    return namespace


def test_api_examples_run(tmp_path, monkeypatch, data_dir, tiny):
    monkeypatch.setenv("GEMMINER_CACHE", data_dir)  # the test run's 500-sample MNIST-1D cache
    monkeypatch.chdir(tmp_path)  # examples write files
    blocks = python_blocks(API_DOC.read_text())
    assert len(blocks) >= 12
    run_blocks(API_DOC, blocks)
    assert (tmp_path / "density.png").is_file()


@pytest.mark.parametrize("page", [page for page in PAGES if page != API_DOC and python_blocks(page.read_text())],
                         ids=lambda page: page.name)
def test_the_python_blocks_of_every_page_run(page, tmp_path, monkeypatch, data_dir, tiny):
    monkeypatch.setenv("GEMMINER_CACHE", data_dir)
    monkeypatch.chdir(tmp_path)
    run_blocks(page, python_blocks(page.read_text()))


def test_several_pages_have_blocks_that_run():
    assert len([page for page in PAGES if python_blocks(page.read_text())]) >= 4


@pytest.mark.parametrize("page", [page for page in PAGES if yaml_blocks(page.read_text())], ids=lambda page: page.name)
def test_the_yaml_blocks_of_every_page_resolve(page, tmp_path):
    """A block with `variants` is a grid file; any other is a run config (`--config`)."""
    from gemminer.config import resolve
    from gemminer.grid import load_grid

    for index, block in enumerate(yaml_blocks(page.read_text())):
        document = yaml.safe_load(block)
        assert isinstance(document, dict), (page.name, index)
        if "variants" in document:
            path = tmp_path / f"grid{index}.yaml"
            path.write_text(block)
            grid = load_grid(path)
            assert grid.variants
        else:
            assert resolve(document).method == document.get("method", "gemminer")


def mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):  # mkdocs' own tags (`!relative`) read as plain strings
        pass

    Loader.add_constructor("!relative", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def test_every_page_is_in_the_navigation_and_every_entry_is_a_page():
    config = mkdocs_config()
    listed = nav_pages(config["nav"])
    assert sorted(listed) == sorted(page.relative_to(DOCS).as_posix() for page in PAGES)
    assert len(listed) == len(set(listed))
    assert config["validation"]["nav"]["omitted_files"] == "warn"  # `--strict` turns warnings into errors


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").read_text().count("GemMiner") > 3  # docstrings rendered


def test_the_readme_is_an_overview():
    readme = (REPO / "README.md").read_bytes()
    assert len(readme) <= README_LIMIT, f"README.md is {len(readme)} bytes; the manual is docs/"
    first_screen = readme.decode()[:2500]
    assert "pip install torch==2.13.0" in first_screen and "gemminer compare --seeds 0,1,2" in first_screen
    assert "bash .ci/run" in first_screen
