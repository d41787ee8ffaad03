"""Every notebook in notebooks/ runs top to bottom in a fresh kernel, on the CPU, with the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


COLAB = "https://colab.research.google.com/github/OWNER/mistral_jax/blob/main/notebooks/{}.ipynb"


def _setup_cell(path):
    return next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source


def test_the_three_notebooks_exist_and_open_with_the_colab_setup_cell():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "research", "finetune"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first_code = _setup_cell(path)
        assert "pip" in first_code and "find_spec" in first_code, path.name
        # the badge opens this very notebook, and the text says what the reader must set
        assert COLAB.format(path.stem) in nb.cells[0].source, path.name
        assert "REPO_URL" in nb.cells[0].source and "placeholder" in nb.cells[0].source, path.name


def _run_setup(source, monkeypatch, cwd, repo_url=None):
    """Runs a notebook's setup cell as if mistral_jax were not installed; returns the pip commands."""
    import importlib.util
    import subprocess

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mistral_jax" else real_find_spec(name, *a))
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    monkeypatch.chdir(cwd)
    if repo_url is not None:
        source = source.replace('"https://github.com/OWNER/mistral_jax"', repr(repo_url))
    exec(compile(source, "setup-cell", "exec"), {})
    return commands


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_outside_a_checkout_installs_from_repo_url_or_says_to_set_it(
        path, tmp_path, monkeypatch):
    source = _setup_cell(path)
    (tmp_path / "content").mkdir()  # Colab's working folder: no checkout above it
    with pytest.raises(RuntimeError, match="set REPO_URL"):
        _run_setup(source, monkeypatch, tmp_path / "content")
    commands = _run_setup(source, monkeypatch, tmp_path / "content",
                          repo_url="https://github.com/someone/mistral_jax")
    assert commands[0][-1] == "mistral_jax[notebooks] @ git+https://github.com/someone/mistral_jax"
    # inside the checkout the package is used from there, and nothing is installed
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    assert _run_setup(source, monkeypatch, NOTEBOOK_DIR) == []


def test_notebooks_are_stored_with_their_outputs_and_figures_and_stay_small():
    images = {}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{path.name}: not run"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], path.name
        images[path.stem] = sum("image/png" in o.get("data", {}) for o in outputs)
    # saliency, residual norms, logit lens, vmap scores, gradient norms, layer edits, head ablation
    assert images["research"] >= 7 and images["finetune"] >= 1, images
    assert sum(p.stat().st_size for p in NOTEBOOKS) < 400_000  # readable on a repository page


def test_readme_links_every_notebook_to_colab_and_says_what_to_set():
    readme = (NOTEBOOK_DIR.parent / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in readme and COLAB.format(path.stem) in readme, path.name
    assert "set `REPO_URL`" in readme and "placeholder" in readme


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_without_error(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # run from a clean slate, as a reader opening it would
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first failure
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
