"""Training curves as PNG from the metrics log (loss and lr per step, validation top-1)."""

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
