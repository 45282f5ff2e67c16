"""Fundus images with lesion masks for the CAM study: synthetic, IDRiD, or one image's files."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from scipy import ndimage

from drjax import errors
from drjax.data import images as dimages
from drjax.data import synthetic

LESION_TYPES = dimages.LESION_TYPES
IMAGE_EXTENSIONS = dimages.IMAGE_EXTENSIONS


@dataclasses.dataclass
class Example:
  """One fundus image at the model's input size with its lesion masks."""
  id: str
  image: np.ndarray                       # uint8 [S, S, 3]
  masks: np.ndarray | None = None          # uint8 [S, S, 5] in LESION_TYPES order
  grade: int | None = None
  # Measured at the source resolution, where a microaneurysm is still more than a pixel.
  area_fraction: dict[str, float] | None = None            # type -> total area / image
  component_fractions: dict[str, list[float]] | None = None  # type -> each lesion / image


def _mask_stats(mask: np.ndarray) -> tuple[float, list[float]]:
  """Area fraction of a 2-D mask and of each of its connected lesions."""
  mask = np.asarray(mask) > 0
  labels, count = ndimage.label(mask)
  sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0)
  return float(mask.mean()), [float(s) / mask.size for s in sizes]


def lesion_stats(masks: np.ndarray) -> tuple[dict[str, float], dict[str, list[float]]]:
  """Per lesion type of `masks [H, W, 5]`: total area fraction and that of each lesion."""
  stats = {t: _mask_stats(masks[..., k]) for k, t in enumerate(LESION_TYPES)}
  return {t: s[0] for t, s in stats.items()}, {t: s[1] for t, s in stats.items()}


def synthetic_examples(num_images: int, image_size: int, seed: int = 0,
                       stats_size: int = 1024) -> list[Example]:
  """Synthetic fundus images of grades 1-4 (so that lesions exist) with their masks.

  The area statistics come from a rendering at `stats_size` px, closer to a real
  fundus photograph than the model's input size.
  """
  out = []
  for i in range(num_images):
    grade = 1 + i % 4
    big = synthetic.generate_example(seed + i, grade, image_size=stats_size)
    total, parts = lesion_stats(big['masks'])
    small = synthetic.generate_example(seed + i, grade, image_size=image_size)
    # The big scene's masks any-pooled down, so that a lesion smaller than an input pixel
    # still marks it, as for IDRiD.
    box = (0, 0, stats_size, stats_size)
    masks = np.stack([dimages.resize_mask(big['masks'][..., k], box, image_size)
                      for k in range(len(LESION_TYPES))], -1)
    out.append(Example(id=f'synthetic_{seed + i:05d}', image=small['image'], masks=masks,
                       grade=grade, area_fraction=total, component_fractions=parts))
  return out


def _idrid_mask_files(masks_dir: pathlib.Path) -> dict[str, dict[str, pathlib.Path]]:
  """image stem -> lesion type -> IDRiD-style mask file (`<stem>_MA.tif`, ...)."""
  # tensorflow_datasets (imported by the builder) loads only when IDRiD masks are read.
  from drjax.data.builders import idrid
  return idrid.mask_files(masks_dir)


def _open_masks(files: dict[str, pathlib.Path], box, decoded) -> dict[str, tuple]:
  """Lesion type -> (mask image, `box` scaled to the mask's resolution), for the types present."""
  out = {}
  for t in LESION_TYPES:
    if t in files:
      mask = dimages.load_mask(files[t])
      out[t] = mask, dimages.scale_box(box, decoded, mask.size)
  return out


def _stack_resized(opened: dict[str, tuple], image_size: int) -> np.ndarray:
  """uint8 `[S, S, 5]` masks, any-pooled to `image_size`; zeros for the types absent."""
  return dimages.stack_masks([dimages.resize_mask(*opened[t], image_size) if t in opened
                              else None for t in LESION_TYPES], image_size)


def idrid_examples(idrid_dir: str | os.PathLike, num_images: int, image_size: int,
                   btgraham: bool = False) -> list[Example]:
  """IDRiD segmentation-set photographs with their lesion masks (the raw upstream layout).

  Images are cropped to the field of view as in the tfds builder
  (drjax.data.builders.idrid); masks are cropped alike and downsampled so that a
  pixel is lesion if any full-resolution pixel under it is. Area statistics are
  measured on the full-resolution crop.
  """
  root = pathlib.Path(idrid_dir) / 'A. Segmentation'
  image_dir = root / '1. Original Images' / 'a. Training Set'
  gt = _idrid_mask_files(root / '2. All Segmentation Groundtruths' / 'a. Training Set')
  files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
  out = []
  for path in files[:num_images]:
    image, box, decoded = dimages.preprocess_fundus(path, image_size, btgraham=btgraham)
    opened = _open_masks(gt.get(path.stem, {}), box, decoded)
    total, parts = {t: 0.0 for t in LESION_TYPES}, {t: [] for t in LESION_TYPES}
    for t, (mask, mbox) in opened.items():
      total[t], parts[t] = _mask_stats(mask.crop(tuple(int(round(v)) for v in mbox)))
    out.append(Example(id=path.stem, image=image, masks=_stack_resized(opened, image_size),
                       area_fraction=total, component_fractions=parts))
  return out


def load_examples(dataset: str, num_images: int, image_size: int, *, seed: int = 0,
                  idrid_dir: str | None = None, btgraham: bool = False,
                  stats_size: int = 1024) -> list[Example]:
  """`num_images` examples of 'synthetic_fundus' or of 'idrid' (read from `idrid_dir`)."""
  if dataset == 'synthetic_fundus':
    return synthetic_examples(num_images, image_size, seed, stats_size)
  if dataset == 'idrid':
    if idrid_dir is None:
      raise errors.ConfigError('--idrid_dir is required for dataset idrid')
    return idrid_examples(idrid_dir, num_images, image_size, btgraham)
  raise errors.ConfigError(f'Unknown dataset {dataset!r}; expected synthetic_fundus or idrid')


def load_masks_for(stem: str, masks_dir: pathlib.Path, box, decoded,
                   image_size: int) -> np.ndarray | None:
  """Lesion masks of one image, uint8 `[S, S, 5]`, or None if `masks_dir` has none for it.

  Read from `<stem>.npz` ('masks' `[H, W, 5]` aligned with the original image, or already
  `[S, S, 5]`) or from IDRiD-style `<stem>_MA.tif`, `<stem>_HE.tif`, ... files; `box` and
  `decoded` are what `drjax.data.images.preprocess_fundus` returned for the image.
  """
  masks_dir = pathlib.Path(masks_dir)
  npz = masks_dir / f'{stem}.npz'
  if npz.exists():
    masks = np.load(npz)['masks']
    if masks.shape[:2] == (image_size, image_size):
      return (masks > 0).astype(np.uint8)
    mbox = dimages.scale_box(box, decoded, (masks.shape[1], masks.shape[0]))
    return np.stack([dimages.resize_mask(masks[..., k], mbox, image_size)
                     for k in range(masks.shape[-1])], -1)
  files = _idrid_mask_files(masks_dir).get(stem)
  if not files:
    return None
  return _stack_resized(_open_masks(files, box, decoded), image_size)
