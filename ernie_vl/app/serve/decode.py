"""Bounded decoding of uploaded images.

A 35 KB PNG can declare 6000x6000 pixels and decode to hundreds of MB, so the server never trusts a
file's byte size:

- the pixel count is read from the header (``Image.open`` parses it without decoding) and checked
  against ``max_pixels`` before any pixel is decoded; a JPEG over the cap is decoded at 1/2, 1/4 or
  1/8 scale (libjpeg's DCT scaling) when that brings it under, else refused like any other;
- the default cap comes from the model's input size: 256x its pixels, kept within
  [2048², 4096²] (12.8 MP for a 224 px model);
- at most ``workers`` images (default: the usable cores) decode at once; the others wait on a
  semaphore holding only their compressed bytes;
- when a burst is over, freed heap memory is handed back to the OS (glibc ``malloc_trim``), so a
  burst of large uploads does not leave the process holding gigabytes.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import io
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from retrieval.images import to_rgb

MAX_AUTO_PIXELS = 4096 * 4096
MIN_AUTO_PIXELS = 2048 * 2048
PIXELS_PER_INPUT_PIXEL = 256
TRIM_DELAY_S = 0.2


class ImageRefused(ValueError):
    """An upload that is not decoded: ``status`` 413 (too many pixels) or 415 (not an image)."""

    def __init__(self, status: int, name: str, reason: str) -> None:
        super().__init__(f"{name!r}: {reason}")
        self.status, self.name, self.reason = status, name, reason


def input_side(preprocess: Any) -> Optional[int]:
    """The square input side of an image transform: ``image_size`` (ours) or the crop/resize size
    of a torchvision ``Compose`` (open_clip's); None when neither is found."""
    size = getattr(preprocess, "image_size", None)
    for t in getattr(preprocess, "transforms", ()) if size is None else ():
        size = getattr(t, "size", None)
        if size is not None and type(t).__name__ == "CenterCrop":
            break
    if isinstance(size, (tuple, list)) and size:
        size = max(size)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def default_max_pixels(preprocess: Any) -> int:
    """256x the model's input pixels, within [2048², 4096²]; 4096² when the input size is unknown."""
    side = input_side(preprocess)
    if side is None:
        return MAX_AUTO_PIXELS
    return max(MIN_AUTO_PIXELS, min(MAX_AUTO_PIXELS, PIXELS_PER_INPUT_PIXEL * side * side))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _jpeg_scale(img: Image.Image, max_pixels: int) -> int:
    """The smallest DCT scale (1, 2, 4, 8) that brings ``img`` under ``max_pixels``; 0 if none does."""
    w, h = img.size
    for s in (1, 2, 4, 8):
        if (w // s) * (h // s) <= max_pixels:
            return s
    return 0


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Image bytes -> RGB ``PIL.Image`` of at most ``max_pixels`` pixels, or ImageRefused (413 / 415)."""
    if not data:
        raise ImageRefused(415, name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own cap decides
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageRefused(413, name, f"more pixels than PIL accepts ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageRefused(415, name, "not a readable image") from None
    with img:
        w, h = img.size
        scale = _jpeg_scale(img, max_pixels) if img.format == "JPEG" else int(w * h <= max_pixels)
        if scale == 0:
            raise ImageRefused(413, name, f"{w}x{h} is {w * h} pixels; the limit is {max_pixels}")
        try:
            if scale > 1:
                img.draft("RGB", (w // scale, h // scale))
                if img.size[0] * img.size[1] > max_pixels:
                    raise ImageRefused(413, name, f"{w}x{h} is {w * h} pixels; the limit is {max_pixels}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
            try:
                out = ImageOps.exif_transpose(img)
            except Exception:          # a broken EXIF block must not lose the pixels
                out = img
            return to_rgb(out)
        except ImageRefused:
            raise
        except (OSError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError):
            raise ImageRefused(415, name, "the image data is corrupt or truncated") from None


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to trim with
        return None


@dataclass
class DecodeStats:
    decoded: int = 0
    refused: int = 0
    peak_concurrent: int = 0
    memory_trims: int = 0


class BoundedDecoder:
    """``await decoder(data, name)`` -> the preprocessed (3, H, W) tensor of an upload.

    At most ``workers`` decodes run at once (a semaphore); ``max_pixels`` caps each (see
    :func:`decode_image`); after the last decode of a burst, heap memory is returned to the OS.
    """

    def __init__(self, preprocess: Callable, max_pixels: int, workers: int, release_memory: bool = True) -> None:
        for label, value in (("max_pixels", max_pixels), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        self.preprocess, self.max_pixels, self.workers = preprocess, max_pixels, workers
        self.stats = DecodeStats()
        self._semaphore = asyncio.Semaphore(workers)
        self._active = 0
        self._trim = _malloc_trim() if release_memory else None
        self._trim_pending = False

    def _decode(self, data: bytes, name: str):
        image = decode_image(data, name, self.max_pixels)
        tensor = self.preprocess(image)
        del image                      # the full-size pixels go before the slot is given back
        return tensor

    async def __call__(self, data: bytes, name: str):
        async with self._semaphore:
            self._active += 1
            self.stats.peak_concurrent = max(self.stats.peak_concurrent, self._active)
            try:
                tensor = await run_in_threadpool(self._decode, data, name)
            except ImageRefused:
                self.stats.refused += 1
                raise
            finally:
                self._active -= 1
                self._after_decode()
        self.stats.decoded += 1
        return tensor

    def _after_decode(self) -> None:
        if self._trim is None or self._active or self._trim_pending:
            return
        self._trim_pending = True
        asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim_pending = False
        if self._active == 0 and not self._semaphore.locked():
            self.stats.memory_trims += 1
            asyncio.get_running_loop().run_in_executor(None, self._trim, 0)

    def to_dict(self) -> dict:
        return {"max_pixels": self.max_pixels, "workers": self.workers, "active": self._active, **asdict(self.stats)}
