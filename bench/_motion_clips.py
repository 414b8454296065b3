"""A second motion-clip generator, unlike the demo's (``ernie_vl.data.synthetic.make_motion``).

Eight motion classes drawn differently: 16 frames at 64x64; other shapes (L-block, pie
slice, trapezoid, arrowhead, hexagon with a notch: none is symmetric under rotation),
radius 0.11-0.26 of the side, random speeds (travel 35-60% of the side, rotation 8-20 degrees
per frame, radius change 60-100% over the clip), a random background per clip (gradient,
stripes or speckle in two nearby colours), and a static distractor object (disc or square,
radius 0.05-0.1) of another colour somewhere in the frame. ``ROOT/{train,val}/<class>/*.mp4`` plus ``prompts.json`` and ``augment.json`` (the
flip and reversal partners of these classes) in each split.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("move_left", "move_right", "move_up", "move_down", "rotate_cw", "rotate_acw", "grow", "shrink")
PROMPTS = {
    "move_left": ["something travelling to the left", "a thing drifting leftwards"],
    "move_right": ["something travelling to the right", "a thing drifting rightwards"],
    "move_up": ["something travelling upwards", "a thing climbing up"],
    "move_down": ["something travelling downwards", "a thing dropping down"],
    "rotate_cw": ["something turning clockwise", "a thing spinning clockwise"],
    "rotate_acw": ["something turning anticlockwise", "a thing spinning counterclockwise"],
    "grow": ["something getting larger", "a thing swelling up"],
    "shrink": ["something getting smaller", "a thing dwindling"],
}
# a mirror swaps left/right and the rotation sense; playing backwards swaps every pair
AUGMENT = {"hflip": {"move_left": "move_right", "rotate_cw": "rotate_acw"},
           "reverse": {"move_left": "move_right", "move_up": "move_down", "rotate_cw": "rotate_acw",
                       "grow": "shrink"}}
SHAPES = ("lblock", "pie", "trapezoid", "arrowhead", "notched_hexagon")
FRAMES, SIZE, SUPER = 16, 64, 3
VERSION = 2  # of the drawing parameters; data folders carry it so clips of two versions never mix
_SPLITS = {"train": 10, "val": 11}


def _outline(shape: str) -> np.ndarray:
    """Unit outline (N, 2) of ``shape`` around the origin (radius about 1)."""
    if shape == "lblock":
        pts = [(-1, -1), (0, -1), (0, 0.3), (0.9, 0.3), (0.9, 1), (-1, 1)]
    elif shape == "pie":
        angles = np.linspace(0.0, 1.5 * math.pi, 20)
        pts = [(0.0, 0.0)] + [(math.cos(a), math.sin(a)) for a in angles]
    elif shape == "trapezoid":
        pts = [(-1, 0.7), (1, 0.7), (0.35, -0.7), (-0.6, -0.7)]
    elif shape == "arrowhead":
        pts = [(1, 0), (-0.8, 0.8), (-0.3, 0), (-0.8, -0.8)]
    else:
        angles = np.arange(6) * math.pi / 3
        pts = [(math.cos(a), math.sin(a)) for a in angles]
        pts.insert(1, (0.35, 0.2))  # the notch
    return np.asarray(pts, dtype=np.float64)


def _background(rng: np.random.Generator) -> np.ndarray:
    """(SIZE*SUPER, SIZE*SUPER, 3) float background: gradient, stripes or speckle in two random colours."""
    n = SIZE * SUPER
    a = rng.uniform(30, 225, 3)
    b = (a + rng.uniform(-70, 70, 3)).clip(0, 255)  # a soft second colour: texture, not clutter
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:n, 0:n] / n
    if kind == 0:
        theta = rng.uniform(0, 2 * math.pi)
        w = (np.cos(theta) * xx + np.sin(theta) * yy)
        w = (w - w.min()) / max(w.max() - w.min(), 1e-6)
    elif kind == 1:
        period = rng.uniform(0.15, 0.4)
        theta = rng.uniform(0, math.pi)
        w = 0.5 + 0.5 * np.sign(np.sin(2 * math.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period))
        w = 0.3 + 0.4 * w
    else:
        coarse = rng.uniform(0, 1, (8, 8))
        w = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((n, n), Image.Resampling.BICUBIC)) / 255.0
    return a * (1 - w[..., None]) + b * w[..., None]


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A saturated colour far from the background's mean ``avoid``."""
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        c[int(rng.integers(3))] = rng.choice([0.0, 255.0])
        if np.abs(c - avoid).sum() > 180:
            break
    return tuple(int(v) for v in c)


def clip_frames(rng: np.random.Generator, action: str) -> np.ndarray:
    """(FRAMES, SIZE, SIZE, 3) uint8 of one clip of ``action``."""
    n = SIZE * SUPER
    bg = _background(rng)
    shape = _outline(SHAPES[int(rng.integers(len(SHAPES)))])
    colour = _colour(rng, bg.mean((0, 1)))
    t = np.arange(FRAMES) - (FRAMES - 1) / 2.0
    r = np.full(FRAMES, rng.uniform(0.18, 0.26))
    angle = np.full(FRAMES, rng.uniform(0, 2 * math.pi))
    cx, cy = np.full(FRAMES, rng.uniform(0.3, 0.7)), np.full(FRAMES, rng.uniform(0.3, 0.7))
    if action.startswith("move"):
        travel = rng.uniform(0.35, 0.6)
        r[:] = rng.uniform(0.11, 0.16)
        dx, dy = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}[action]
        lo, hi = 0.12 + travel / 2, 0.88 - travel / 2
        cx = (rng.uniform(lo, hi) if dx else rng.uniform(0.2, 0.8)) + dx * travel * t / (FRAMES - 1)
        cy = (rng.uniform(lo, hi) if dy else rng.uniform(0.2, 0.8)) + dy * travel * t / (FRAMES - 1)
    elif action.startswith("rotate"):
        omega = math.radians(rng.uniform(8, 20))
        angle = angle + (1 if action == "rotate_cw" else -1) * omega * t  # image y points down: + is clockwise
    else:
        change = rng.uniform(0.6, 1.0)  # of the mean radius over the clip
        base = rng.uniform(0.14, 0.2)
        r = base * (1 + (1 if action == "grow" else -1) * change * t / (FRAMES - 1))
    # a static distractor: a disc or a square of another colour, away from the centre of the action
    d_colour = _colour(rng, np.asarray(colour, dtype=np.float64))
    d_pos = rng.uniform(0.1, 0.9, 2)
    d_r = rng.uniform(0.05, 0.1)
    d_square = bool(rng.integers(2))
    out = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    base_img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    for i in range(FRAMES):
        img = base_img.copy()
        draw = ImageDraw.Draw(img)
        box = [(d_pos[0] - d_r) * n, (d_pos[1] - d_r) * n, (d_pos[0] + d_r) * n, (d_pos[1] + d_r) * n]
        (draw.rectangle if d_square else draw.ellipse)(box, fill=d_colour)
        c, s = math.cos(angle[i]), math.sin(angle[i])
        pts = shape @ np.array([[c, s], [-s, c]]) * r[i] * n + np.array([cx[i] * n, cy[i] * n])
        draw.polygon([tuple(p) for p in pts], fill=colour)
        out[i] = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX))
    return out


def make_clips(root: str | Path, train_per_class: int, val_per_class: int = 32, seed: int = 0) -> dict[str, Path]:
    """Write the two splits (skipping files already there); clip i of a class depends only on (seed, split, class, i)."""
    from ernie_vl.data.synthetic import write_mp4

    root = Path(root)
    folders = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        folder = root / split
        for ci, action in enumerate(CLASSES):
            (folder / action).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / action / f"{action}_{i:04d}.mp4"
                if not path.is_file():
                    write_mp4(path, clip_frames(np.random.default_rng([seed, _SPLITS[split], ci, i]), action), fps=16)
        (folder / "prompts.json").write_text(json.dumps(PROMPTS, indent=1))
        (folder / "augment.json").write_text(json.dumps(AUGMENT, indent=1))
        folders[split] = folder
    return folders
