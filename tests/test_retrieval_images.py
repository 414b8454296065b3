"""retrieval.images.load_image and the datasets: EXIF, grayscale, RGBA, 16-bit, bad files, CSV."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.datasets import ImageFolderFiles, ImageTextCSV, collate_skip_none
from retrieval.images import ImageLoadError, load_image

from _retrieval_helpers import ToTensor8, write_captions_csv, write_color_image


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide x 20 tall: left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise to display.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.size == (20, 40)  # width, height swapped
    px = np.asarray(out).astype(int)
    # After a clockwise turn the left (red) half is on top.
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 60
    assert px[35, 10, 2] > 200 and px[35, 10, 0] < 60


def test_grayscale_palette_and_rgba(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "g.png")
    g = np.asarray(load_image(tmp_path / "g.png"))
    assert g.shape == (3, 4, 3) and (g == 77).all()

    Image.new("RGB", (4, 4), (10, 200, 30)).convert("P").save(tmp_path / "p.png")
    p = np.asarray(load_image(tmp_path / "p.png"))
    assert p.shape == (4, 4, 3)
    assert abs(int(p[0, 0, 1]) - 200) <= 8

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)   # opaque red
    rgba[0, 1] = (255, 0, 0, 0)     # fully transparent -> white background
    rgba[1, 0] = (0, 0, 0, 128)     # half-transparent black over white -> ~127
    rgba[1, 1] = (0, 255, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert a[0, 0].tolist() == [255, 0, 0]
    assert a[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in a[1, 0].tolist())
    assert a[1, 1].tolist() == [0, 255, 0]


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    arr = np.array([[0, 65535], [32896, 257 * 10]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[0, 255], [128, 10]]
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00 truncated"])
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert "broken.png" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_image_text_csv_items_and_skip_none(tmp_path):
    write_color_image(tmp_path / "imgs" / "r.png", (255, 0, 0))
    write_color_image(tmp_path / "imgs" / "b.png", (0, 0, 255))
    (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
    csv_path = write_captions_csv(tmp_path / "caps.csv", [
        ("imgs/r.png", "a red square"), ("imgs/r.png", "something red"),
        ("imgs/bad.png", "broken"), ("imgs/b.png", "a blue square"),
    ])
    ds = ImageTextCSV(csv_path, ToTensor8())
    assert len(ds) == 4
    image, caption, index = ds[0]
    assert caption == "a red square" and index == 0
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert ds[2] is None and ds.failures and "bad.png" in ds.failures[0][0]
    assert [p.name for p in ds.image_paths] == ["r.png", "bad.png", "b.png"]
    assert ds.text_to_image == [0, 0, 1, 2]
    batch = collate_skip_none([ds[i] for i in range(4)])
    images, captions, indices = batch
    assert images.shape == (3, 3, 8, 8)
    assert list(captions) == ["a red square", "something red", "a blue square"]
    assert indices.tolist() == [0, 1, 3]
    assert collate_skip_none([None, None]) is None


def test_image_text_csv_custom_columns_and_errors(tmp_path):
    write_color_image(tmp_path / "x.png", (0, 255, 0))
    csv_path = write_captions_csv(tmp_path / "c.csv", [("x.png", "green")], header=("image", "text"))
    with pytest.raises(ValueError, match="image"):
        ImageTextCSV(csv_path, ToTensor8())
    ds = ImageTextCSV(csv_path, ToTensor8(), image_col="image", caption_col="text")
    assert ds[0][1] == "green"
    with pytest.raises(ValueError, match="does not exist"):
        ImageTextCSV(tmp_path / "missing.csv", ToTensor8())


def test_image_folder_files_lists_sorted_images(tmp_path):
    write_color_image(tmp_path / "b.png", (0, 0, 255))
    write_color_image(tmp_path / "sub" / "a.jpg", (255, 0, 0))
    (tmp_path / "notes.txt").write_text("hi")
    write_color_image(tmp_path / ".hidden" / "c.png", (1, 1, 1))
    ds = ImageFolderFiles(tmp_path, ToTensor8())
    assert ds.relpaths == ["b.png", "sub/a.jpg"]
    img, idx = ds[1]
    assert idx == 1 and img.shape == (3, 8, 8)


def test_image_bytes_decode_like_files_and_are_capped(tmp_path):
    from retrieval.images import load_image_bytes

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    from_bytes = load_image_bytes(path.read_bytes(), name="up.jpg")
    assert from_bytes.size == (20, 40)  # EXIF applied, as load_image does
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(load_image(path)))
    with pytest.raises(ImageLoadError, match=r"'up\.jpg'.*40x20 is larger than 500 pixels"):
        load_image_bytes(path.read_bytes(), name="up.jpg", max_pixels=500)
    with pytest.raises(ImageLoadError, match=r"'junk\.png'.*UnidentifiedImageError"):
        load_image_bytes(b"not an image at all", name="junk.png")
    big = tmp_path / "big.jpg"
    Image.new("RGB", (400, 200), (0, 128, 0)).save(big, quality=90)
    assert load_image(big, draft=50).size == (100, 50)  # decoded at 1/4 scale, still >= 50 on both sides
    assert load_image(big).size == (400, 200)
