"""Tests of image decoding/encoding shared by the builders and the pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from maumjax.data import images


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(images.LayoutError) as info:
    fn(*args, **kwargs)
  return str(info.value)


def test_read_image_rgb_converts_grey_to_three_channels(tmp_path):
  path = tmp_path / "grey.bmp"
  Image.new("L", (4, 6), 77).save(path)
  image = images.read_image_rgb(path)
  assert image.mode == "RGB" and np.asarray(image).shape == (6, 4, 3)
  assert (np.asarray(image) == 77).all()


@pytest.mark.parametrize("load_truncated", [False, True])
@pytest.mark.parametrize("fmt", ["jpg", "bmp"])
def test_truncated_or_garbage_images_raise(tmp_path, monkeypatch, fmt, load_truncated):
  # Another module may have set PIL's global switch; truncated JPEGs must still fail.
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
  path = tmp_path / f"x.{fmt}"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 32, 3), np.uint8)).save(path)
  path.write_bytes(path.read_bytes()[:-40])
  if fmt == "jpg" or not load_truncated:
    message = _error(images.read_image_rgb, path)
    assert repr(str(path)) in message and "re-extract" in message
  (tmp_path / "garbage.jpg").write_bytes(b"not an image")
  assert "garbage.jpg" in _error(images.read_image_rgb, tmp_path / "garbage.jpg")


def test_encode_resized_matches_pil_lanczos(tmp_path):
  path = tmp_path / "x.jpg"
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 20, 3), np.uint8)).save(path)
  data = images.encode_resized(path, height=16, width=8, image_format="png")
  expected = Image.open(path).convert("RGB").resize((8, 16), Image.LANCZOS)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(expected))
  with pytest.raises(ValueError, match="png"):
    images.encode_resized(path, height=16, width=8, image_format="webp")


def test_ordered_map_keeps_order_with_small_window():
  out = list(images.ordered_map(lambda x: x * x, range(50), num_threads=3, window=4))
  assert out == [x * x for x in range(50)]


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "JPEG"])
def test_decode_image_returns_three_channel_uint8(fmt):
  grey = np.arange(24, dtype=np.uint8).reshape(6, 4) * 10
  buf = io.BytesIO()
  Image.fromarray(grey, mode="L").save(buf, format=fmt)
  out = images.decode_image(buf.getvalue())
  assert out.shape == (6, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  if fmt != "JPEG":  # lossless formats round-trip exactly
    np.testing.assert_array_equal(out[..., 1], grey)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_check_image_catches_truncated_and_random_files_cheaply(tmp_path, fmt):
  path = tmp_path / "x.img"
  Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 32, 3), np.uint8)).save(
      path, format=fmt)
  images.check_image(path)
  data = path.read_bytes()
  for name, content in (("half", data[:len(data) // 2]), ("short", data[:-20]),
                        ("random", np.random.default_rng(3).bytes(len(data)))):
    bad = tmp_path / f"{name}.img"
    bad.write_bytes(content)
    message = _error(images.check_image, bad)
    assert repr(str(bad)) in message and "re-extract" in message
    assert "\n" not in message and " at 0x" not in message  # one line, no object repr
  assert images.check_images(tmp_path, [{"path": "x.img"}] * 3) == 3
  with pytest.raises(images.LayoutError, match="half.img"):
    images.check_images(tmp_path, [{"path": "x.img"}, {"path": "half.img"}])
