"""docs/api.md's examples run, in order, in one namespace: the docs cannot rot."""

import re
import warnings
from pathlib import Path

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_api_examples_run(tmp_path, monkeypatch, data_dir, tiny):
    monkeypatch.setenv("GEMMINER_CACHE", data_dir)  # the session's 500-sample MNIST-1D cache
    monkeypatch.chdir(tmp_path)  # examples write files
    blocks = python_blocks(API_DOC.read_text())
    assert len(blocks) >= 12
    namespace: dict = {"__name__": "docs_api"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example that warns is a wrong example
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for index, block in enumerate(blocks):
            try:
                exec(compile(block, f"{API_DOC.name} block {index + 1}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"docs/api.md block {index + 1} failed: {err!r}\n{block}") from err
    assert (tmp_path / "density.png").is_file()
