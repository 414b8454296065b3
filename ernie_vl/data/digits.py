"""scikit-learn's handwritten digits (1,797 real 8x8 scans, UCI) written as files in the DESIGN.md formats.

:func:`make_digits` writes every digit as a PNG (grey levels 0-16 scaled to 0-255, upscaled with
nearest-neighbour so the pixels stay sharp) and, per split (stratified, seeded):
``<split>.csv`` (``filepath,caption``, caption "a photo of the digit 3") for training and
``<split>_labels.csv`` (``path,label``) for image classification; plus ``classes.txt``
and ``templates.txt`` for ``ernie-vl eval-zeroshot``. Needs scikit-learn (the ``dev`` extra).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CAPTION = "a photo of the digit {}"


@dataclass
class DigitsSplits:
    """Paths written by :func:`make_digits`; ``pixels``/``labels`` of each split for pixel baselines."""

    root: Path
    csv: dict[str, Path]
    labels_csv: dict[str, Path]
    classes: Path
    templates: Path
    pixels: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def make_digits(root: str | Path, test_fraction: float = 0.25, size: int = 32, seed: int = 0) -> DigitsSplits:
    """Write the digits under ``root`` as ``train`` and ``test`` splits; see the module docstring."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if size < 8:
        raise ValueError(f"size must be >= 8 (the scans are 8x8), got {size}")
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    images, targets = load_digits(return_X_y=True)
    index = np.arange(len(targets))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=targets)
    splits = {"train": np.sort(train), "test": np.sort(test)}
    csv, labels_csv = {}, {}
    for name, rows in splits.items():
        pairs, labelled = ["filepath,caption"], ["path,label"]
        for i in rows:
            rel = f"img/{i:04d}.png"
            pixels = (images[i].reshape(8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST).save(root / rel)
            pairs.append(f"{rel},{CAPTION.format(targets[i])}")
            labelled.append(f"{rel},{targets[i]}")
        csv[name], labels_csv[name] = root / f"{name}.csv", root / f"{name}_labels.csv"
        csv[name].write_text("\n".join(pairs) + "\n")
        labels_csv[name].write_text("\n".join(labelled) + "\n")
    (root / "classes.txt").write_text("\n".join(str(d) for d in range(10)) + "\n")
    (root / "templates.txt").write_text(CAPTION.replace("{}", "{label}") + "\n")
    return DigitsSplits(root, csv, labels_csv, root / "classes.txt", root / "templates.txt",
                        {k: images[v] for k, v in splits.items()}, {k: targets[v] for k, v in splits.items()})
