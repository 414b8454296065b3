"""Robust image loading: EXIF orientation, grayscale, palette, RGBA and 16-bit images -> RGB PIL."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


class ImageLoadError(ValueError):
    """An image file could not be read or decoded; ``path`` names the file."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path!r}: {reason}")


def is_image_path(path: PathLike) -> bool:
    """True when the file name has a known image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float single-channel image -> 8-bit "L", scaled by its bit depth."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (arr.dtype == np.uint16):
        scaled = arr.astype(np.float32) / 65535.0
    elif img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr.astype(np.float32) - lo) / (hi - lo) if hi > lo else np.zeros_like(arr, np.float32)
    else:  # mode "I": 32-bit ints; PNG 16-bit files decode to "I" with values in [0, 65535]
        hi = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        scaled = np.clip(arr.astype(np.float32), 0, None) / hi
    return Image.fromarray(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over ``background``."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _high_depth_to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decode(source: Union[PathLike, io.BytesIO], name: PathLike, prepare: Callable[[Image.Image], None]) -> Image.Image:
    """Open ``source``, let ``prepare(img)`` check or steer the decode (a pixel cap, a JPEG draft), decode it,
    apply the EXIF orientation and convert to RGB; ImageLoadError naming ``name`` when any of it fails."""
    try:
        with Image.open(source) as img:
            prepare(img)
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block must not lose the pixels
                pass
            return to_rgb(img)
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as err:
        raise ImageLoadError(name, f"{type(err).__name__}: {err}") from err


def load_image_bytes(data: bytes, name: str = "<upload>", max_pixels: Optional[int] = None) -> Image.Image:
    """Decode image bytes like :func:`load_image`; ``max_pixels`` refuses larger images (ImageLoadError)."""
    if not data:
        raise ImageLoadError(name, "empty file")

    def cap(img: Image.Image) -> None:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageLoadError(name, f"{img.width}x{img.height} is larger than {max_pixels} pixels")

    return _decode(io.BytesIO(data), name, cap)


def load_image(path: PathLike, draft: Optional[int] = None) -> Image.Image:
    """Read ``path`` as an RGB ``PIL.Image``, applying the EXIF orientation.

    ``draft``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose both sides are still
    at least ``draft`` pixels (``Image.draft``), several times faster for a photo much larger than
    the size it will be resized to; other formats ignore it.

    Grayscale, palette, RGBA (over white), CMYK and 16-bit images are converted.
    Raises :class:`ImageLoadError` naming the file when it is missing, not an
    image, truncated or otherwise undecodable.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(p, "no such file")

    def shrink(img: Image.Image) -> None:
        if draft and img.format == "JPEG":
            img.draft(img.mode, (draft, draft))

    return _decode(p, p, shrink)
