"""The demo model's loss curve picture (docs/demo_loss.png) and the script that draws it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

plt = pytest.importorskip("matplotlib.pyplot")

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plot_loss():
    spec = importlib.util.spec_from_file_location("plot_loss", REPO / "scripts" / "plot_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_loss_draws_a_png_from_the_training_csv(tmp_path):
    csv = tmp_path / "loss.csv"
    csv.write_text("step,tokens,train_loss,val_loss,lr,seconds\n"
                   "10,2560,9.1,8.0,1e-3,1.0\n20,5120,7.5,7.2,1e-3,2.0\n30,7680,6.9,6.8,1e-3,3.0\n")
    png = _plot_loss().plot_loss_curve(csv, tmp_path / "out" / "loss.png", dpi=50)
    assert png.read_bytes()[:8] == PNG_MAGIC
    image = plt.imread(png)                      # [H, W, 4] at 6 x 3.4 inches, 50 dpi
    assert image.shape[:2] == (170, 300)
    assert image[..., :3].std() > 0.05           # something was drawn, not a blank canvas


def test_plot_loss_refuses_a_csv_without_the_loss_columns_in_one_line(tmp_path, capsys):
    csv = tmp_path / "other.csv"
    csv.write_text("step,loss\n1,2.0\n")
    assert _plot_loss().main(["--csv", str(csv), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val_loss" in err and str(csv) in err
    assert not (tmp_path / "x.png").exists()


def test_readme_shows_the_committed_demo_loss_curve():
    assert "](docs/demo_loss.png)" in (REPO / "README.md").read_text()
    png = REPO / "docs" / "demo_loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size < 100_000
