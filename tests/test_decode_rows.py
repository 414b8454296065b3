"""The training decode path: uint8 straight from PIL (equal to the float transform's pixels), JPEG draft
decoding close to the exact path, and workers that write rows straight into shared memory."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ernie_vl.preprocess import ImageTransform


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth synthetic photo (gradients + blobs), so downscaling filters can be compared."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    chans = []
    for c in range(3):
        fx, fy = rng.uniform(1, 4, 2)
        chans.append(127 + 100 * np.sin(xx / w * fx * np.pi + c) * np.cos(yy / h * fy * np.pi))
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8))


def test_to_uint8_equals_the_float_transform_undone():
    from ernie_vl.data.sources import Normaliser

    t = ImageTransform(32)
    for size in ((32, 32), (50, 37), (37, 90), (8, 8)):
        img = _photo(size)
        exact = Normaliser(t.mean, t.std).to_uint8(t(img)).numpy()
        got = t.to_uint8(img, fast=False)
        assert got.dtype == np.uint8 and got.shape == (3, 32, 32)
        assert np.array_equal(got, exact), (size, np.abs(got.astype(int) - exact).max())
        # fast only changes images more than 3x larger than the target
        assert np.array_equal(t.to_uint8(img, fast=True), exact)


def test_fast_paths_on_a_big_jpeg_stay_within_a_few_grey_levels(tmp_path):
    from retrieval.images import load_image

    path = tmp_path / "big.jpg"
    _photo((1200, 900)).save(path, quality=95)
    t = ImageTransform(64)
    exact = t.to_uint8(load_image(path), fast=False).astype(np.int16)
    drafted = load_image(path, draft=64)
    assert min(drafted.size) >= 64 and drafted.size[0] < 1200  # decoded at a reduced DCT scale
    fast = t.to_uint8(drafted, fast=True).astype(np.int16)
    diff = np.abs(fast - exact)
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 8, (diff.mean(), diff.max())
    png = tmp_path / "big.png"
    _photo((300, 200)).save(png)
    assert load_image(png, draft=64).size == (300, 200)  # draft is for JPEG only


def _write_set(root: Path, count: int, bad: tuple[int, ...] = ()) -> list[str]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = root / f"{i:04d}.png"
        if i in bad:
            p.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_write_rows_into_shared_memory_equal_to_in_process_decoding(tmp_path, workers):
    from ernie_vl.data.image_cache import decode_images

    paths = _write_set(tmp_path / "img", 150, bad=(3, 77))
    t = ImageTransform(16)
    got = decode_images(paths, t, None, [], num_workers=workers, progress=False)
    assert [r for r, _ in got.failed] == [3, 77]
    assert got.rows.tolist() == [i for i in range(150) if i not in (3, 77)]
    for i in (0, 1, 64, 149):  # rows from different chunks and workers
        assert torch.equal(got.pixels[i], torch.from_numpy(np.ascontiguousarray(t.to_uint8(Image.open(paths[i]).convert("RGB")))))
    assert int(got.pixels[3].sum()) == 0  # a failed row stays empty


def test_the_cache_file_and_the_anonymous_mapping_hold_the_same_rows(tmp_path):
    from ernie_vl.data.image_cache import decode_images

    paths = _write_set(tmp_path / "img", 70)
    t = ImageTransform(16)
    ram = decode_images(paths, t, None, [], num_workers=2, progress=False)
    cached = decode_images(paths, t, tmp_path / "cache", ["k"], num_workers=2, progress=False)
    again = decode_images(paths, t, tmp_path / "cache", ["k"], num_workers=0, progress=False)  # mapped, not decoded
    assert cached.cache_file is not None and cached.cache_file == again.cache_file
    assert torch.equal(ram.pixels, cached.pixels) and torch.equal(ram.pixels, again.pixels)


def test_an_anonymous_row_target_refuses_to_be_pickled():
    import pickle

    from ernie_vl.data.row_writer import RowTarget

    target = RowTarget((2, 3, 4, 4))
    target.array()[1] = 7
    assert int(target.array().sum()) == 7 * 48
    with pytest.raises(TypeError, match="fork"):
        pickle.dumps(target)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_a_real_photo_decodes_like_the_eval_transform(tmp_path):
    import skimage

    src = Path(skimage.__file__).parent / "data" / "astronaut.png"
    if not src.is_file():
        pytest.skip("scikit-image's astronaut.png not shipped")
    jpg = tmp_path / "astronaut.jpg"
    Image.open(src).convert("RGB").save(jpg, quality=95)
    from ernie_vl.data.pairs import decode_uint8
    from ernie_vl.data.sources import Normaliser
    from retrieval.images import load_image

    t = ImageTransform(32)
    pixels, reason = decode_uint8(str(jpg), t)
    assert reason is None
    exact = Normaliser(t.mean, t.std).to_uint8(t(load_image(jpg))).numpy().astype(np.int16)
    assert np.abs(pixels.astype(np.int16) - exact).mean() < 3.0
