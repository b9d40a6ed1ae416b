"""Figures of a run as PNG: training curves from the metrics log (loss and lr per step, validation top-1/5) and
the validation confusion matrix. Both go into the bundle and its model card."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_log: Path, out_png: Path, title: str = "") -> Path | None:
    if not metrics_log.exists():
        return None
    rows = [json.loads(line) for line in metrics_log.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if r.get("split") == "val"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], lw=1, color="tab:orange")
    axes[1].set(title="learning rate", xlabel="step")
    if val:
        axes[2].plot([r["step"] for r in val], [r["top1"] for r in val], marker="o", label="top-1")
        axes[2].plot([r["step"] for r in val], [r["top5"] for r in val], marker=".", label="top-5")
        axes[2].legend()
    axes[2].set(title="validation accuracy", xlabel="step", ylim=(0, 1.02))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_confusion(confusion: list[list[int]], labels: list[str], out_png: Path, title: str = "") -> Path | None:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG; None when it is empty. Class names
    are shown up to 40 classes (cut to 20 characters), counts in the cells up to 20 classes."""
    n = len(confusion)
    if n == 0 or any(len(row) != n for row in confusion):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = min(12.0, 3.0 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 40:
        names = [name if len(name) <= 20 else name[:19] + "~" for name in labels]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7 if n > 15 else 9)
        ax.set_yticks(range(n), names, fontsize=7 if n > 15 else 9)
    if n <= 20:
        top = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                            color="white" if count > top / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
