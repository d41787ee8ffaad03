"""Draw the demo model's loss curve from the CSV `train_demo_model.py` writes.

    python scripts/plot_loss.py                                   # scripts/demo_loss.csv -> docs/demo_loss.png
    python scripts/plot_loss.py --csv /tmp/loss.csv --png /tmp/loss.png

Needs matplotlib (the `notebooks` extra). Bad input (a missing file, a CSV without the
step / train_loss / val_loss columns) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("step", "train_loss", "val_loss")


def read_curve(csv_path: Path) -> dict[str, list[float]]:
    """The CSV's step, train_loss, val_loss (and tokens, when present) columns as floats."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(c not in rows[0] for c in COLUMNS):
        raise ValueError(f"{csv_path}: expected a header with the columns {', '.join(COLUMNS)} "
                         "and at least one row")
    names = [c for c in (*COLUMNS, "tokens") if c in rows[0]]
    try:
        return {c: [float(r[c]) for r in rows] for c in names}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{csv_path}: a value that is not a number ({e})") from None


def plot_loss_curve(csv_path: Path, png_path: Path, dpi: int = 90) -> Path:
    """Writes the train and held-out loss against the step as a PNG; returns `png_path`."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no window: works without a display
    import matplotlib.pyplot as plt

    curve = read_curve(csv_path)
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=dpi)
    ax.plot(curve["step"], curve["train_loss"], "o-", ms=3, label="train (mean since last point)")
    ax.plot(curve["step"], curve["val_loss"], "s-", ms=3, label="held-out")
    final = curve["val_loss"][-1]
    ax.set(xlabel="step", ylabel="loss (nats per token)",
           title=f"demo model training: held-out loss {final:.2f} after {curve['step'][-1]:.0f} steps")
    if "tokens" in curve:  # a second axis in tokens: how much text the model has seen
        per_step = curve["tokens"][-1] / curve["step"][-1]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step / 1e6,
                                                    lambda t: t * 1e6 / per_step))
        top.set_xlabel("tokens seen (millions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, default=REPO / "scripts" / "demo_loss.csv")
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "demo_loss.png")
    opts = ap.parse_args(argv)
    try:
        print(plot_loss_curve(opts.csv, opts.png))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
