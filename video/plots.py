"""Confusion matrix as PNG (matplotlib, headless) and JSON."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from retrieval.names import json_text, printable


def save_confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str], png_path: str | os.PathLike | None = None,
                          json_path: str | os.PathLike | None = None, title: str = "Confusion matrix") -> None:
    """Write ``confusion`` (C,C) counts, rows = true class, columns = predicted.

    The PNG shows row-normalised rates (labels drawn up to 60 classes); the JSON
    holds the class names and the raw counts.
    """
    confusion = torch.as_tensor(confusion)
    c = len(class_names)
    if confusion.shape != (c, c):
        raise ValueError(f"confusion matrix of shape {tuple(confusion.shape)} does not match {c} class names")
    if json_path is not None:
        Path(json_path).write_text(json_text({"classes": list(class_names), "rows": "true", "columns": "predicted",
                                              "counts": confusion.long().tolist()}) + "\n", encoding="utf-8")
    if png_path is None:
        return
    from encoders.lazy import MissingExtraError, require

    try:
        matplotlib = require("matplotlib", "plots", "the confusion matrix figure")
    except MissingExtraError as err:  # the figures are optional: the JSON above is written
        warnings.warn(f"{err}; {png_path} not written", stacklevel=2)
        return
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    side = min(max(4.0, 0.35 * c + 2.0), 30.0)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    try:
        image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if c <= 60:
            labels = [printable(name) for name in class_names]  # a non-UTF-8 folder name as \xNN
            ax.set_xticks(range(c), labels=labels, rotation=90, fontsize=8)
            ax.set_yticks(range(c), labels=labels, fontsize=8)
        if c <= 20:
            for i in range(c):
                for j in range(c):
                    if confusion[i, j]:
                        ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if rates[i, j] > 0.5 else "black")
        fig.tight_layout()
        fig.savefig(png_path)
    finally:
        plt.close(fig)
