"""Image decoding and encoding shared by the builders, the pipeline and the fallback reader.

Build side: `check_images` validates every dataset file cheaply before a build writes anything
(header, size, end of file; raising `LayoutError`), `read_image_rgb` fully decodes one (raising
`LayoutError` on corrupt or truncated files), `encode_resized` LANCZOS-resizes and re-encodes
it, `encoded_examples` yields the builders' examples on a thread pool. Read side:
`decode_image` turns stored bytes back into uint8 [H, W, 3].
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from maumjax.data.layouts import LayoutError, Record
from maumjax.errors import one_line

IMAGE_FORMATS = ("png", "jpeg")
_T = TypeVar("_T")
_R = TypeVar("_R")
# What PIL raises on a corrupt, truncated or foreign file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                  Image.DecompressionBombError)
_FIX = "it is corrupt or truncated, re-extract the dataset archive"
# A JPEG ends with the end-of-image marker; some writers append a little after it.
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL = 1024
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(error: BaseException) -> str:
  """A short, one-line description of a decoding error, without object reprs."""
  if isinstance(error, Image.UnidentifiedImageError):
    return "not a JPEG, PNG or BMP image"
  text = one_line(_OBJECT_REPR.sub("the file", str(error)))
  return text or type(error).__name__


def _decode_error(path: Path, error: BaseException) -> LayoutError:
  return LayoutError(f"cannot decode image {str(path)!r} ({_reason(error)}); {_FIX}")


def decode_image(data: bytes) -> np.ndarray:
  """Encoded PNG/JPEG/BMP bytes -> uint8 [H, W, 3] (grey images become 3-channel)."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"))


def read_image_rgb(path: str | os.PathLike[str]) -> Image.Image:
  """Fully decodes an image file as 3-channel RGB (IR and thermal grey become 3 channels).

  Raises:
    LayoutError: the file is unreadable, not an image, or truncated.
  """
  path = Path(path)
  try:
    data = path.read_bytes()
    image = Image.open(io.BytesIO(data))
    # PIL raises on truncated files only while ImageFile.LOAD_TRUNCATED_IMAGES is off; any
    # module may switch it on, and then PIL pads silently. JPEG files must end with EOI.
    if image.format == "JPEG" and _JPEG_EOI not in data[-_JPEG_TAIL:]:
      raise OSError("JPEG end-of-image marker missing")
    image.load()
    return image.convert("RGB")
  except _DECODE_ERRORS as e:
    raise _decode_error(path, e) from e


def check_image(path: str | os.PathLike[str]) -> None:
  """Checks one image file cheaply, without decoding its pixels.

  Parses the header (format, size), then checks the end of the file: a JPEG must end with
  its end-of-image marker, a PNG must pass PIL's chunk checksums (`verify`), and an
  uncompressed image (BMP, ...) must hold the pixel bytes its header announces. Catches
  truncated files and foreign or random contents; damage in the middle of a JPEG surfaces
  only when the build decodes it (`read_image_rgb`).

  Raises:
    LayoutError: the file is unreadable, not an image, or truncated; the message names it.
  """
  path = Path(path)
  try:
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      with Image.open(f) as image:
        width, height = image.size
        if width < 1 or height < 1:
          raise ValueError(f"image size {width}x{height}")
        if image.format == "JPEG":
          f.seek(max(0, size - _JPEG_TAIL))
          if _JPEG_EOI not in f.read():
            raise OSError("JPEG end-of-image marker missing")
        elif image.format == "PNG":
          image.verify()
        else:
          for codec, extents, offset, args, *_ in image.tile:
            # Uncompressed pixels: (raw mode, row stride, direction) after a fixed offset.
            args = args if isinstance(args, tuple) else ()
            if codec == "raw" and len(args) >= 2 and isinstance(args[1], int):
              needed = offset + max(args[1], 0) * (extents[3] - extents[1])
              if size < needed:
                raise OSError(f"{size} bytes, the header announces {needed}")
  except _DECODE_ERRORS as e:
    raise _decode_error(path, e) from e


def check_images(root: Path, records: Iterable[Record], *,
                 num_threads: int | None = None) -> int:
  """Runs `check_image` on every record's file (threads hide the file-system latency).

  Returns:
    The number of files checked.

  Raises:
    LayoutError: the first bad file in record order.
  """
  count = 0
  for _ in ordered_map(lambda r: check_image(root / str(r["path"])), records,
                       num_threads=num_threads):
    count += 1
  return count


def encode_resized(path: str | os.PathLike[str], *, height: int, width: int,
                   image_format: str) -> bytes:
  """Decodes, LANCZOS-resizes to (height, width) and re-encodes one image.

  AGW-family code pre-resizes with LANCZOS (protocol.md 4.1). PNG is lossless; JPEG uses
  quality 95.

  Args:
    path: the image file.
    height, width: output size.
    image_format: 'png' or 'jpeg'.

  Returns:
    The encoded bytes.

  Raises:
    LayoutError: the image cannot be decoded.
    ValueError: unknown `image_format`.
  """
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"unknown image_format {image_format!r}; choose one of {IMAGE_FORMATS}")
  image = read_image_rgb(path).resize((width, height), Image.LANCZOS)
  buffer = io.BytesIO()
  if image_format == "png":
    # zlib level 1: measured 4x faster to encode than the default 6 at 288x144, files 20%
    # larger, decoding equally fast; the build is dominated by this encode.
    image.save(buffer, format="PNG", compress_level=1)
  else:
    image.save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], *, num_threads: int | None = None,
                window: int = 256) -> Iterator[_R]:
  """Maps `fn` over `items` on a thread pool, yielding results in input order.

  PIL releases the GIL while decoding and resizing (PNG's zlib encode scales less), so
  threads help on many-core build machines; the bounded window keeps at most `window`
  results in memory when the consumer is slower.
  """
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending: collections.deque[concurrent.futures.Future[_R]] = collections.deque()
    try:
      for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      # On an error or an abandoned generator, skip the queued work instead of finishing it.
      for future in pending:
        future.cancel()


def encoded_examples(root: Path, records: Sequence[Record], *, height: int, width: int,
                     image_format: str) -> Iterator[tuple[str, dict[str, int | str | bytes]]]:
  """Yields `(path, record + encoded image)` in record order, for the TFDS builders.

  The path is a unique, deterministic key; the image is already encoded because TFDS cannot
  encode NumPy images without TensorFlow (protocol.md 7.3).
  """
  def encode(record: Record) -> bytes:
    return encode_resized(root / str(record["path"]), height=height, width=width,
                          image_format=image_format)

  for record, image in zip(records, ordered_map(encode, records), strict=True):
    yield str(record["path"]), {**record, "image": image}
