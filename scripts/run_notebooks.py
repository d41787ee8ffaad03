"""Run the notebooks top to bottom and store them with their outputs (figures included).

    python scripts/run_notebooks.py                  # all of notebooks/*.ipynb
    python scripts/run_notebooks.py notebooks/research.ipynb

The stored outputs are what a reader sees on the repository page without running anything;
run this after editing a notebook. Needs the notebooks extra (matplotlib) and nbclient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def run(path: Path) -> None:
    """Executes `path` in a fresh kernel (cwd: its folder) and writes it back with its outputs."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata.get("language_info", {}).pop("version", None)  # not a property of the notebook
    nbformat.write(nb, path)
    print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB")


def main(argv: list[str] | None = None) -> None:
    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    for path in paths or sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        run(path)


if __name__ == "__main__":
    main()
