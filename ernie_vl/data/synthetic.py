"""Synthetic benchmark data written as real files in the DESIGN.md formats.

Two generators, deterministic from a seed (every item has its own RNG stream,
``numpy.random.default_rng([seed, split, i])``), fast enough for the demo:

* :func:`make_shapes` -- captioned shapes. PNG images with one or two objects
  (colour x shape x size x position, or two objects in a "left of" / "above"
  relation) and a CSV per split (``filepath,caption``). The ``heldout`` split
  only contains images in which at least one object has a (colour, shape)
  combination that never occurs in ``train``, and every held-out caption is
  unique, so Recall@K on it measures composition, not memory.
* :func:`make_motion` -- motion actions. H.264 mp4 clips (PyAV) of one shape
  whose class is its motion alone (move left/right/up/down, rotate clockwise /
  anticlockwise, grow, shrink) with random colour, shape, start position, size
  and speed, so that no single frame tells the class. Written as
  ``ROOT/<split>/<class>/<file>.mp4`` plus ``ROOT/<split>/prompts.json``
  (class -> text prompts for zero-shot use).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 245),
    "yellow": (240, 225, 30),
    "purple": (165, 60, 225),
    "orange": (255, 140, 0),
    "cyan": (0, 215, 215),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
SIZES: dict[str, float] = {"small": 0.12, "large": 0.2}  # radius as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
BACKGROUND = (35, 35, 35)
_SUPERSAMPLE = 4

MOTION_CLASSES: tuple[str, ...] = (
    "move_left", "move_right", "move_up", "move_down",
    "rotate_clockwise", "rotate_anticlockwise", "grow", "shrink",
)
MOTION_PROMPTS: dict[str, list[str]] = {
    "move_left": ["a shape moving left", "an object sliding to the left"],
    "move_right": ["a shape moving right", "an object sliding to the right"],
    "move_up": ["a shape moving up", "an object rising upwards"],
    "move_down": ["a shape moving down", "an object falling downwards"],
    "rotate_clockwise": ["a shape rotating clockwise", "an object spinning clockwise"],
    "rotate_anticlockwise": ["a shape rotating anticlockwise", "an object spinning counterclockwise"],
    "grow": ["a shape growing bigger", "an object expanding"],
    "shrink": ["a shape shrinking smaller", "an object contracting"],
}
_SPLIT_IDS = {"train": 0, "val": 1, "heldout": 2, "test": 3}


# --------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with outer radius r, rotated by ``angle`` radians (y down)."""
    if shape == "square":
        base = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        base = [(-math.pi / 2 + k * 2 * math.pi / 3, r * 1.15) for k in range(3)]
    elif shape == "star":
        base = [(-math.pi / 2 + k * math.pi / 5, r * 1.2 if k % 2 == 0 else r * 0.5) for k in range(10)]
    elif shape == "cross":
        w = 0.36
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        base = [(math.atan2(y, x), r * math.hypot(x, y)) for x, y in pts]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}; valid: square, triangle, star, cross")
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for a, d in base]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               color: tuple[int, int, int], angle: float = 0.0, marker: bool = False) -> None:
    """Draw one filled shape; ``marker`` punches a background-coloured dot that makes rotation visible."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=color)
    if marker:
        m = 0.32 * r
        mx, my = cx + 0.5 * r * math.cos(angle - math.pi / 2), cy + 0.5 * r * math.sin(angle - math.pi / 2)
        draw.ellipse([mx - m, my - m, mx + m, my + m], fill=BACKGROUND)


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), BACKGROUND)
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str

    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class ShapesSplits:
    """What :func:`make_shapes` wrote: one CSV per split and the held-out (colour, shape) pairs."""

    root: Path
    csv: dict[str, Path]
    counts: dict[str, int]
    heldout_combos: list[tuple[str, str]] = field(default_factory=list)


def heldout_combos(colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = SHAPES) -> set[tuple[str, str]]:
    """(colour, shape) pairs never shown in training: colour i with shape i mod len(shapes).

    Every colour and every shape still occurs in training with other partners.
    """
    return {(c, shapes[i % len(shapes)]) for i, c in enumerate(colors)}


def _random_object(rng: np.random.Generator, allowed: list[tuple[str, str]]) -> ShapeObject:
    color, shape = allowed[int(rng.integers(len(allowed)))]
    return ShapeObject(color, shape, list(SIZES)[int(rng.integers(len(SIZES)))])


def _render_scene(rng: np.random.Generator, objects: list[ShapeObject], layout: str, size: int) -> tuple[Image.Image, str]:
    """Draw 1 or 2 objects; returns the image and its caption. ``layout``: a POSITIONS key, 'left of' or 'above'."""
    img, draw = _canvas(size)
    s = size * _SUPERSAMPLE
    jitter = lambda: float(rng.uniform(-0.06, 0.06))  # noqa: E731
    if len(objects) == 1:
        fx, fy = POSITIONS[layout]
        obj = objects[0]
        r = SIZES[obj.size] * s * float(rng.uniform(0.9, 1.1))
        draw_shape(draw, obj.shape, (fx + jitter()) * s, (fy + jitter()) * s, r, COLORS[obj.color])
        return _finish(img, size), f"a {obj.phrase()} {layout}"
    first, second = objects
    if layout == "left of":
        centres = [(0.27 + jitter(), 0.5 + 2 * jitter()), (0.73 + jitter(), 0.5 + 2 * jitter())]
    elif layout == "above":
        centres = [(0.5 + 2 * jitter(), 0.27 + jitter()), (0.5 + 2 * jitter(), 0.73 + jitter())]
    else:
        raise ValueError(f"unknown two-object layout {layout!r}; valid: 'left of', 'above'")
    for obj, (fx, fy) in zip(objects, centres):
        r = SIZES[obj.size] * s * float(rng.uniform(0.9, 1.1))
        draw_shape(draw, obj.shape, fx * s, fy * s, r, COLORS[obj.color])
    return _finish(img, size), f"a {first.phrase()} {layout} a {second.phrase()}"


def _sample_scene(rng: np.random.Generator, train_pairs: list[tuple[str, str]], held_pairs: list[tuple[str, str]],
                  heldout: bool, two_object_fraction: float) -> tuple[list[ShapeObject], str]:
    two = bool(rng.random() < two_object_fraction)
    if not heldout:
        objects = [_random_object(rng, train_pairs) for _ in range(2 if two else 1)]
    elif not two:
        objects = [_random_object(rng, held_pairs)]
    else:  # at least one object with an unseen combination, in a random slot
        objects = [_random_object(rng, held_pairs), _random_object(rng, train_pairs + held_pairs)]
        if rng.random() < 0.5:
            objects.reverse()
    layout = ["left of", "above"][int(rng.integers(2))] if two else list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    return objects, layout


def make_shapes(root: str | Path, num_train: int = 4000, num_val: int = 200, num_heldout: int = 200,
                image_size: int = 64, seed: int = 0, two_object_fraction: float = 0.5) -> ShapesSplits:
    """Write captioned-shape PNGs and ``train.csv`` / ``val.csv`` / ``heldout.csv`` (``filepath,caption``) under root.

    ``val`` uses training combinations (new images, unique captions); ``heldout`` uses unseen
    (colour, shape) combinations with unique captions. Deterministic in ``seed``.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_heldout", num_heldout)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    root = Path(root)
    held = heldout_combos()
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    train_pairs = [p for p in all_pairs if p not in held]
    held_pairs = sorted(held)
    csvs, counts = {}, {}
    train_captions: set[str] = set()
    for split, n in (("train", num_train), ("val", num_val), ("heldout", num_heldout)):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows: list[tuple[str, str]] = []
        seen: set[str] = set()
        attempt = 0
        while len(rows) < n:
            if attempt > 50 * max(n, 1):
                raise ValueError(f"could not draw {n} unique {split} captions; lower num_{split}")
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], attempt])
            attempt += 1
            objects, layout = _sample_scene(rng, train_pairs, held_pairs, split == "heldout", two_object_fraction)
            img, caption = _render_scene(rng, objects, layout, image_size)
            if split != "train" and (caption in seen or caption in train_captions):
                continue  # evaluation captions are unique and never a training caption
            seen.add(caption)
            name = f"{split}_{len(rows):06d}.png"
            img.save(folder / name, compress_level=1)
            rows.append((f"images/{split}/{name}", caption))
        if split == "train":
            train_captions = seen
        path = root / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "caption"])
            writer.writerows(rows)
        csvs[split], counts[split] = path, len(rows)
    return ShapesSplits(root=root, csv=csvs, counts=counts, heldout_combos=held_pairs)


# --------------------------------------------------------------------------- motion
@dataclass
class MotionSplits:
    """What :func:`make_motion` wrote: one ``ROOT/<split>`` folder per split (Kinetics layout)."""

    root: Path
    folders: dict[str, Path]
    counts: dict[str, int]
    classes: list[str]
    prompts: dict[str, list[str]]


def motion_frames(rng: np.random.Generator, action: str, num_frames: int, size: int) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of one clip of ``action`` with random shape, colour, position and speed."""
    if action not in MOTION_CLASSES:
        raise ValueError(f"unknown motion class {action!r}; valid: {list(MOTION_CLASSES)}")
    s = size * _SUPERSAMPLE
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS.values())[int(rng.integers(len(COLORS)))]
    steps = np.arange(num_frames, dtype=np.float64) - (num_frames - 1) / 2.0  # centred time
    r = np.full(num_frames, float(rng.uniform(0.13, 0.2)))
    angle = np.full(num_frames, float(rng.uniform(0, 2 * math.pi)))
    cx = np.full(num_frames, float(rng.uniform(0.3, 0.7)))
    cy = np.full(num_frames, float(rng.uniform(0.3, 0.7)))
    if action.startswith("move"):
        speed = float(rng.uniform(0.5, 0.65)) / max(num_frames - 1, 1)  # total travel 50-65% of the side
        dx, dy = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}[action]
        travel = speed * (num_frames - 1) / 2
        # start anywhere that keeps the whole path inside the frame
        lo, hi = 0.15 + travel, 0.85 - travel
        cx = (rng.uniform(lo, hi) if dx else rng.uniform(0.2, 0.8)) + dx * speed * steps
        cy = (rng.uniform(lo, hi) if dy else rng.uniform(0.2, 0.8)) + dy * speed * steps
        r = np.full(num_frames, float(rng.uniform(0.13, 0.18)))
    elif action.startswith("rotate"):
        omega = float(rng.uniform(math.radians(15), math.radians(30)))
        r = np.full(num_frames, float(rng.uniform(0.2, 0.26)))
        angle = angle + (1 if action == "rotate_clockwise" else -1) * omega * steps  # y axis points down
    else:
        rate = float(rng.uniform(0.022, 0.03))  # the radius changes by 0.15-0.21 of the side
        r = float(rng.uniform(0.18, 0.22)) + (1 if action == "grow" else -1) * rate * steps
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        img, draw = _canvas(size)
        draw_shape(draw, shape, cx[t] * s, cy[t] * s, r[t] * s, color, angle=float(angle[t]), marker=True)
        frames[t] = np.asarray(_finish(img, size))
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, crf: int = 12) -> None:
    """Write (T, H, W, 3) uint8 frames as H.264 (yuv420p) mp4 with PyAV; H and W must be even."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sides, got {h}x{w}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast", "tune": "zerolatency"}
        for i in range(t):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_motion(root: str | Path, num_train_per_class: int = 64, num_val_per_class: int = 16, num_frames: int = 8,
                size: int = 32, seed: int = 0, fps: int = 8,
                classes: Sequence[str] = MOTION_CLASSES) -> MotionSplits:
    """Write motion-action clips ``ROOT/{train,val}/<class>/<class>_NNNN.mp4`` and ``prompts.json`` per split."""
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 (the class is the motion), got {num_frames}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    unknown = [c for c in classes if c not in MOTION_CLASSES]
    if unknown or not classes:
        raise ValueError(f"unknown motion classes {unknown}; valid: {list(MOTION_CLASSES)}")
    root = Path(root)
    prompts = {c: list(MOTION_PROMPTS[c]) for c in classes}
    folders, counts = {}, {}
    for split, per_class in (("train", num_train_per_class), ("val", num_val_per_class)):
        folder = root / split
        for ci, action in enumerate(classes):
            (folder / action).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], MOTION_CLASSES.index(action), i])
                write_mp4(folder / action / f"{action}_{i:04d}.mp4", motion_frames(rng, action, num_frames, size), fps=fps)
        with open(folder / "prompts.json", "w", encoding="utf-8") as f:
            json.dump(prompts, f, indent=1)
        folders[split], counts[split] = folder, per_class * len(classes)
    return MotionSplits(root=root, folders=folders, counts=counts, classes=list(classes), prompts=prompts)


def load_prompts(video_root: str | Path) -> dict[str, list[str]] | None:
    """Class -> prompts from ``video_root/prompts.json`` (as written by :func:`make_motion`), or None if absent."""
    path = Path(video_root) / "prompts.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise ValueError(f"{str(path)!r} must map each class name to a non-empty list of prompts")
    return {str(k): [str(p) for p in v] for k, v in data.items()}
