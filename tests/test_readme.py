"""The README and docs/*.md stay true: every shell command in them that needs no downloaded
weights runs here.

Commands that need a real checkpoint ($CKPT, /path/to/...), a full-size preset (mistral-7b,
mixtral-8x7b: gigabytes of random weights, which CI's memory cannot hold beside a second test
worker), or minutes of work (training the demo model, the 2 GB converter benchmark) are left out
by the patterns below;
`pip install` and `pytest` are what `.ci/run` itself runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_HERE = re.compile(r"\$CKPT|path/to|/models/|mistral-7b|mixtral-8x|codestral-22b|--gb |train_demo_model|pytest")
# What an interactive command reads from stdin here.
STDIN = {"mistral_jax.chat": "What does json.dumps do?\n/quit\n"}


# The README and the reference pages it links (docs/*.md; docs/design holds notes, no commands).
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    """Shell commands of the ```bash blocks of the README and docs/*.md, continuation lines
    joined."""
    text = "\n".join(page.read_text() for page in PAGES)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


RUNNABLE = [c for c in readme_commands()
            if c.startswith(("python ", "mistral-jax-")) and not NOT_HERE.search(c)]


def test_readme_has_the_install_and_test_commands_first():
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert 'pip install -e ".[test]"' in first_block
    # the runtime install and both CUDA extras come first too
    assert "pip install .  " in first_block
    assert 'pip install ".[cuda13]"' in first_block and 'pip install ".[cuda12]"' in first_block
    assert "python -m pytest -n 2 -q" in first_block
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m pytest -n 2 -q" in ci and 'pip install -q -e ".[test]"' in ci
    # The commands this file runs include the demo model's and the benchmark's.
    assert any(c.startswith("python -m mistral_jax.sample") for c in RUNNABLE)
    assert any(c.startswith("python -m mistral_jax.bench --preset tiny") for c in RUNNABLE)


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, tmp_path):
    stdin = next((v for k, v in STDIN.items() if k in command), "")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = command.replace("python ", f"{sys.executable} ", 1)
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, input=stdin, text=True,
                          capture_output=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{command}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip(), f"{command} printed nothing on stdout"


def test_readme_pure_function_snippet_runs_on_the_demo_model():
    """The README's `forward` / `init_cache` block runs as written, given a `model`."""
    from mistral_jax.transformer import Transformer

    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if "from mistral_jax import forward, init_cache" in b)
    namespace = {"model": Transformer.from_folder(REPO / "mistral_jax" / "demo_model",
                                                  dtype="float32")}
    exec(block, namespace)
    assert namespace["logits"].shape == (1, 1, namespace["model"].args.vocab_size)


def test_python_dash_m_of_an_imported_module_prints_no_runpy_warning():
    """`python -m mistral_jax.sharding ...` runs a module the package imports; runpy's
    RuntimeWarning about that is filtered, so the README's output is all there is."""
    proc = subprocess.run([sys.executable, "-m", "mistral_jax.sharding", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr, proc.stderr


def test_pyproject_extras_match_the_readme_install_lines():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["cuda12"] == ["jax[cuda12]"] and extras["cuda"] == extras["cuda12"]
    assert extras["cuda13"][0].startswith("jax[cuda13]")
    # matplotlib draws the notebooks' figures: an extra (and a test dependency), not a runtime one
    assert "matplotlib" in extras["notebooks"] and "matplotlib" in extras["test"]
    assert not [d for d in project["dependencies"] if d.startswith("matplotlib")]


def test_readme_links_every_reference_page_and_stays_short():
    """The README is what a user needs in the first ten minutes; the reference material is in
    docs/, every page of which the README links."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in text, page.name
