"""Figures logged to MLflow: results people would rather see than read."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_curve(history: list[dict]):
    """Validation top-1 and training loss per epoch of one stage."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["val_top1"] for h in history], label="val top-1", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["train_loss"] for h in history], label="train loss", color="tab:red", alpha=0.6)
    ax2.set_ylabel("train loss")
    fig.legend(loc="lower right")
    fig.tight_layout()
    plt.close(fig)
    return fig


def grouped_bars(groups: dict[str, list[float]], ylabel: str, title: str):
    """Mean +- std bar per group (e.g. test accuracy per stage kind over seeds)."""
    import statistics

    names = list(groups)
    means = [statistics.mean(v) for v in groups.values()]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in groups.values()]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 2), 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue")
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.02))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    plt.close(fig)
    return fig


def peer_curves(history: list[dict], num_peers: int, title: str):
    """Every peer's validation top-1 per epoch in one figure (an online stage: do the peers keep up?)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    for k in range(num_peers):
        ax.plot(epochs, [h.get(f"peer{k}_val_top1", float("nan")) for h in history], label=f"peer {k}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    plt.close(fig)
    return fig


def image_grid(images, labels, classes: list[str], columns: int = 10):
    """A grid of generated images (first channel, or RGB for 3 channels) titled with their classes."""
    import math

    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.95), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        x = images[i].detach().float().cpu()
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
        ax.imshow(x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x[0].numpy(), cmap=None if x.shape[0] == 3
                  else "gray")
        ax.set_title(classes[int(labels[i])], fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def accuracy_matrix(acc: list[list[float]], title: str):
    """A lifelong run's accuracy matrix as a heatmap: row t = after training task t, column j = task j's test
    classes, each cell labelled with its top-1 (NaN: not measured yet)."""
    import numpy as np

    values = np.asarray(acc, dtype=float)
    n = len(values)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
    for t in range(n):
        for j in range(n):
            if values[t, j] == values[t, j]:
                ax.text(j, t, f"{values[t, j]:.2f}", ha="center", va="center",
                        color="white" if values[t, j] < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(n), [f"task {j}" for j in range(n)])
    ax.set_yticks(range(n), [f"after {t}" for t in range(n)])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained through")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    plt.close(fig)
    return fig


def bucket_bars(panels: dict[str, tuple[list[str], dict[str, list[float]]]], ylabel: str, title: str):
    """One panel per grouping (title -> bucket labels and, per series, one value per bucket), the series' bars
    side by side in each bucket (e.g. teacher and students' top-1 by node degree and by hops)."""
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (name, (labels, series)) in zip(axes.flat, panels.items()):
        width = 0.8 / max(len(series), 1)
        at = np.arange(len(labels))
        for k, (label, values) in enumerate(series.items()):
            ax.bar(at + (k - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(at, labels, fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
    axes.flat[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig
