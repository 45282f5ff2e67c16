"""Fundus image helpers for the dataset builders: robust decoding, field-of-view crop, Ben Graham.

Everything here is numpy + PIL (no TensorFlow, no JAX), so that it runs in the builders'
worker processes. Failures that mean "skip this image" raise `BadImageError` with a short
human-readable reason, which the builders collect into their skip report.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from drjax import errors

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels, PIL's order.
# Lesion mask channels, in this order everywhere: microaneurysms, haemorrhages, hard exudates,
# soft exudates (cotton-wool spots), neovascularisation (IDRiD's types, and NV).
LESION_TYPES = ('MA', 'HE', 'EX', 'SE', 'NV')
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.tif', '.tiff', '.bmp')


class BadImageError(errors.UserError, ValueError):
  """An image that cannot be used; `str(error)` is the reason shown in skip reports."""


def open_image(source: str | os.PathLike | bytes, min_size: int | None = None) -> Image.Image:
  """Opens and fully decodes an image file, optionally at a reduced JPEG scale.

  Args:
    source: a path or the encoded bytes.
    min_size: if given, JPEGs are decoded with PIL's `draft` at the smallest DCT scale
      (1/2, 1/4, 1/8) that keeps both sides >= `min_size`, much faster than decoding a
      large photograph in full only to shrink it.

  Returns:
    The loaded PIL image, in whatever mode the file has, EXIF orientation applied.

  Raises:
    BadImageError: unreadable, truncated or corrupt file.
  """
  try:
    fp = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    im = Image.open(fp)
    if min_size and im.format == 'JPEG':
      im.draft(im.mode if im.mode in ('L', 'RGB') else None, (min_size, min_size))
    im.load()
    return ImageOps.exif_transpose(im)
  except FileNotFoundError as e:
    raise BadImageError(f'file not found: {e.filename}') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL reports corrupt or truncated data as OSError/SyntaxError ("image file is truncated",
    # "cannot identify image file", "broken data stream").
    raise BadImageError(f'cannot decode image: {e}') from e


def decode_square(data: bytes, size: int | None = None) -> np.ndarray:
  """Encoded square image (as the builders store it) -> uint8 [size, size, 3], for training.

  A JPEG is decoded at the smallest DCT scale that keeps it >= `size` (PIL's `draft`: a
  512 px crop read for 224 px training decodes at 256 px), then any remaining difference is
  resized with antialiased bilinear filtering (torchvision's `Resize` default). At the
  stored size the pixels are those tfds decodes. Unlike `decode`, nothing is checked or
  converted beyond RGB: the builders did that when they stored the image.

  Args:
    data: the encoded bytes of a stored image (JPEG or PNG).
    size: side of the output; None: as stored.

  Returns:
    uint8 [size, size, 3].
  """
  im = Image.open(io.BytesIO(data))
  if size is not None and im.format == 'JPEG' and min(im.size) > size:
    im.draft('RGB', (size, size))
  if im.mode != 'RGB':
    im = im.convert('RGB')
  if size is not None and im.size != (size, size):
    im = im.resize((size, size), Image.BILINEAR)
  return np.asarray(im, np.uint8)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [S, S, 3] -> [size, size, 3], filtered as `decode_square` resizes."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.uint8)


def _to_uint8_scale(arr: np.ndarray) -> np.ndarray:
  """Integer/float arrays of more than 8 bits -> uint8, scaling by the inferred bit depth."""
  arr = np.asarray(arr)
  if arr.dtype == np.uint8:
    return arr
  arr = np.nan_to_num(arr.astype(np.float64))
  top = float(arr.max()) if arr.size else 0.0
  if np.issubdtype(arr.dtype, np.floating) and top <= 1.0:
    scale = 1.0  # float images in [0, 1]
  elif top <= 255:
    scale = 255.0
  else:
    # A 12-bit image stored in 16 bits (max 4095) should not come out 16x too dark.
    scale = float(2 ** math.ceil(math.log2(top + 1)) - 1)
  return np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3].

  Handles 1, L, P/PA (palette), LA/RGBA (alpha composited onto black, the fundus background),
  I;16*/I/F (high bit depth, rescaled), CMYK, YCbCr, LAB, HSV.
  """
  mode = im.mode
  if mode == 'RGB':
    return np.asarray(im, np.uint8)
  if mode in ('P', 'PA'):
    im = im.convert('RGBA')
    mode = 'RGBA'
  if mode in ('RGBA', 'LA', 'RGBa', 'La'):
    rgba = np.asarray(im.convert('RGBA'), np.float32)
    rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    return np.round(rgb).astype(np.uint8)
  if mode.startswith('I') or mode == 'F':
    gray = _to_uint8_scale(np.asarray(im))
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(im.convert('RGB'), np.uint8)


def decode(source: str | os.PathLike | bytes, min_size: int | None = None) -> np.ndarray:
  """Path or encoded bytes of any mode -> uint8 [H, W, 3]; raises BadImageError."""
  im = open_image(source, min_size=min_size)
  try:
    arr = to_rgb(im)
  except (OSError, ValueError) as e:
    raise BadImageError(f'cannot convert mode {im.mode} to RGB: {e}') from e
  if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 2:
    raise BadImageError(f'degenerate image of shape {arr.shape}')
  return arr


def field_of_view_box(image: np.ndarray, min_fraction: float = 0.01) -> Box:
  """Bounding box of the bright field of view of a fundus photograph.

  The field of view is the camera's circular aperture: pixels brighter than a threshold set
  relative to the image (a tenth of its 99th brightness percentile, at least 10/255, as
  tfds's diabetic_retinopathy_detection estimates the radius from `mean / 10`). Rows and
  columns count as inside when more than `min_fraction` of them is bright, so JPEG noise and
  text overlays in the black border don't stretch the box.

  Args:
    image: uint8 [H, W, 3].
    min_fraction: see above.

  Returns:
    (left, top, right, bottom) in pixels of `image`.

  Raises:
    BadImageError: nothing bright enough, or the bright region is a speck.
  """
  h, w = image.shape[:2]
  step = max(1, max(h, w) // 256)  # a ~256 px view is plenty for a bounding box
  v = image[::step, ::step].max(axis=-1).astype(np.float32)
  top_level = float(np.percentile(v, 99))
  thresh = max(10.0, 0.1 * top_level)
  if top_level <= thresh:
    raise BadImageError('no visible field of view (image is black)')
  bright = v > thresh
  rows = np.flatnonzero(bright.mean(axis=1) > min_fraction)
  cols = np.flatnonzero(bright.mean(axis=0) > min_fraction)
  if rows.size == 0 or cols.size == 0:
    raise BadImageError('no visible field of view')
  top, bottom = rows[0] * step, min(h, (rows[-1] + 1) * step)
  left, right = cols[0] * step, min(w, (cols[-1] + 1) * step)
  if min(bottom - top, right - left) < 0.1 * min(h, w):
    raise BadImageError('no visible field of view (bright region too small)')
  return float(left), float(top), float(right), float(bottom)


def square_box(box: Box) -> Box:
  """The square with the same centre whose side is the box's longer side.

  EyePACS and IDRiD cameras cut the circular field of view at the top and bottom; squaring
  the box pads those with black instead of squashing the eye.
  """
  left, top, right, bottom = box
  side = max(right - left, bottom - top)
  cx, cy = (left + right) / 2, (top + bottom) / 2
  return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
  """Maps a box between two resolutions of one image (sizes are (width, height))."""
  sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
  return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def crop_resize(im: Image.Image, box: Box, size: int, resample: int) -> Image.Image:
  """Crops `box` (may extend past the image: padded with zeros) and resizes it to `size`^2.

  Only the part of the box inside the image is resampled, so a 4288x4288 padded copy of an
  IDRiD mask is never materialised.
  """
  left, top, right, bottom = box
  bw, bh = right - left, bottom - top
  il, it = max(left, 0.0), max(top, 0.0)
  ir, ib = min(right, float(im.width)), min(bottom, float(im.height))
  canvas = Image.new(im.mode, (size, size))
  if ir <= il or ib <= it:
    return canvas
  ol = round((il - left) / bw * size)
  ot = round((it - top) / bh * size)
  orr = round((ir - left) / bw * size)
  ob = round((ib - top) / bh * size)
  if orr <= ol or ob <= ot:
    return canvas
  # reducing_gap: downscale by whole factors first (JPEG-draft-like), then resample the
  # last <= 2x exactly; several times faster for big reductions at no visible cost.
  part = im.resize((orr - ol, ob - ot), resample=resample, box=(il, it, ir, ib),
                   reducing_gap=None if resample in (Image.NEAREST, Image.BOX) else 2.0)
  canvas.paste(part, (ol, ot))
  return canvas


def ben_graham(image: np.ndarray, mask_ratio: float = 0.9) -> np.ndarray:
  """Ben Graham's local-average colour subtraction (Kaggle DR 2015 winner).

  As tfds's diabetic_retinopathy_detection `btgraham-300` config:
  `4 * image - 4 * gaussian_blur(image, sigma=radius / 30) + 128`, then everything outside a
  circle of `mask_ratio * radius` set to grey 128 to hide the boundary artefact. The image is
  expected to be a square crop of the field of view (radius = side / 2).

  Args:
    image: uint8 [S, S, 3] field-of-view crop.
    mask_ratio: radius of the kept disc relative to the field of view's radius.

  Returns:
    uint8 [S, S, 3].
  """
  size = image.shape[0]
  radius = size / 2
  blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=radius / 30))
  out = np.asarray(image, np.float32) - np.asarray(blurred, np.float32)
  out = np.clip(np.rint(4.0 * out + 128.0), 0, 255).astype(np.uint8)
  c = (size - 1) / 2
  yy, xx = np.ogrid[:size, :size]
  outside = (yy - c) ** 2 + (xx - c) ** 2 > (mask_ratio * radius) ** 2
  out[outside] = 128
  return out


def preprocess_fundus(source: str | os.PathLike | bytes, image_size: int, crop: bool = True,
                      btgraham: bool = False) -> tuple[np.ndarray, Box, tuple[int, int]]:
  """Decode, crop to the field of view, pad to a square and resize.

  Args:
    source: path or encoded bytes.
    image_size: output side S.
    crop: crop to the field of view (else the whole image is padded to a square).
    btgraham: apply `ben_graham` after resizing.

  Returns:
    (image uint8 [S, S, 3], square crop box, (width, height) of the decoded image the box
    refers to), so that masks of a different resolution can be cropped with
    `scale_box(box, decoded_size, mask_size)`.

  Raises:
    BadImageError: undecodable, or no visible field of view.
  """
  # Decode at ~1.25x the target so that a field of view smaller than the frame still has
  # enough pixels after cropping.
  arr = decode(source, min_size=int(image_size * 1.25))
  h, w = arr.shape[:2]
  if crop:
    box = square_box(field_of_view_box(arr))
  else:
    box = square_box((0.0, 0.0, float(w), float(h)))
    if arr.max() <= 10:
      raise BadImageError('no visible field of view (image is black)')
  out = np.asarray(crop_resize(Image.fromarray(arr), box, image_size, Image.BICUBIC), np.uint8)
  if btgraham:
    out = ben_graham(out)
  return out, box, (w, h)


def resize_mask(mask: np.ndarray | Image.Image, box: Box, size: int) -> np.ndarray:
  """A binary lesion mask cropped to `box` and downsampled to [size, size] uint8 {0, 1}.

  A pixel of the result is lesion if any source pixel under it is (box filter, then > 0):
  nearest-neighbour downsampling by 8x would drop most microaneurysms, which are a few
  pixels across at full resolution.
  """
  if isinstance(mask, np.ndarray):
    mask = Image.fromarray((mask > 0).astype(np.uint8) * 255)
  out = crop_resize(mask, box, size, Image.BOX)
  return (np.asarray(out) > 0).astype(np.uint8)


def load_mask(path: str | os.PathLike) -> Image.Image:
  """A lesion mask file -> PIL 'L' image with 255 = lesion, 0 = background.

  IDRiD masks are palette TIFFs with index 1 = lesion; other tools save them as grayscale or
  RGB (red lesion on black). Any non-zero palette index, or any non-zero channel, is lesion.
  """
  im = open_image(path)
  if im.mode in ('P', 'L', '1', 'I', 'I;16', 'I;16B', 'I;16L', 'F'):
    arr = np.asarray(im)
  else:
    arr = np.asarray(im.convert('RGB')).max(axis=-1)
  return Image.fromarray(((arr > 0) * 255).astype(np.uint8))


def encode(image: np.ndarray, image_format: str = 'png', quality: int = 95) -> bytes:
  """uint8 [H, W, C] -> PNG or JPEG bytes (what tfds's Image feature stores, TF-free)."""
  buf = io.BytesIO()
  pil = Image.fromarray(image)
  if image_format == 'png':
    pil.save(buf, format='PNG', compress_level=1)
  elif image_format == 'jpeg':
    pil.save(buf, format='JPEG', quality=quality)
  else:
    raise ValueError(f'image_format must be png or jpeg, got {image_format!r}')
  return buf.getvalue()


def stack_masks(masks: Sequence[np.ndarray | None], size: int) -> np.ndarray:
  """Per-type masks (None = no lesion of that type) -> uint8 [size, size, K]."""
  out = np.zeros((size, size, len(masks)), np.uint8)
  for k, m in enumerate(masks):
    if m is not None:
      out[..., k] = m
  return out
