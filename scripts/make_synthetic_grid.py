r"""Writes docs/synthetic_grid.png: synthetic fundus photographs per DR grade, with lesion masks.

Rows are grades 0-4; each example is shown as the photograph and, beside it, the
same photograph with its lesion masks outlined (MA green, HE blue, EX yellow,
SE white, NV magenta).

  python scripts/make_synthetic_grid.py --output docs/synthetic_grid.png
"""

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from drjax import runtime
from drjax.data import synthetic

_OUTPUT = flags.DEFINE_string('output', 'docs/synthetic_grid.png', 'PNG to write.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Side of each rendered photograph, in pixels.')
_PER_GRADE = flags.DEFINE_integer('per_grade', 3, 'Examples per grade (columns of pairs).')
_SEED = flags.DEFINE_integer('seed', 0, 'First example seed.')
_COLOURS = flags.DEFINE_integer('colours', 256, 'Palette size of the PNG (0: full RGB).')

# One colour per lesion type, in synthetic.LESION_TYPES order.
MASK_COLOURS = np.array([
    (0, 255, 0),  # MA
    (0, 160, 255),  # HE
    (255, 235, 0),  # EX
    (255, 255, 255),  # SE
    (255, 0, 255),  # NV
], np.uint8)
_LABEL_HEIGHT = 18


def outline_masks(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Image [S, S, 3] with each mask [S, S, K] tinted and outlined in its colour."""
  out = image.astype(np.float32)
  for k in range(masks.shape[-1]):
    m = masks[..., k].astype(bool)
    if not m.any():
      continue
    # The mask's outer border: pixels next to the mask but not in it (4-neighbourhood).
    grown = m.copy()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    out[m] = 0.5 * out[m] + 0.5 * MASK_COLOURS[k]
    out[grown & ~m] = MASK_COLOURS[k]
  return out.astype(np.uint8)


def render_grid(image_size: int = 224, per_grade: int = 3, seed: int = 0) -> Image.Image:
  """The grid as a PIL image: one row per grade, (photograph, masks) pairs."""
  gap = 4
  tile = image_size + gap
  width = 2 * per_grade * tile + gap
  height = 5 * (tile + _LABEL_HEIGHT) + _LABEL_HEIGHT + gap
  canvas = Image.new('RGB', (width, height), (24, 24, 24))
  draw = ImageDraw.Draw(canvas)
  for grade in range(5):
    y = grade * (tile + _LABEL_HEIGHT)
    for j in range(per_grade):
      ex = synthetic.generate_example(seed + 10 * grade + j, grade, image_size)
      present = [t for k, t in enumerate(synthetic.LESION_TYPES) if ex['masks'][..., k].any()]
      x = gap + 2 * j * tile
      draw.text((x, y + 3), f"grade {grade}, {ex['eye']} eye: {', '.join(present) or 'no lesions'}",
                fill=(230, 230, 230))
      canvas.paste(Image.fromarray(ex['image']), (x, y + _LABEL_HEIGHT))
      overlay = outline_masks(ex['image'], ex['masks'])
      canvas.paste(Image.fromarray(overlay), (x + tile, y + _LABEL_HEIGHT))
  # Legend.
  x, y = gap, height - _LABEL_HEIGHT
  for k, name in enumerate(synthetic.LESION_TYPES):
    draw.rectangle([x, y + 4, x + 10, y + 14], fill=tuple(int(c) for c in MASK_COLOURS[k]))
    draw.text((x + 14, y + 3), name, fill=(230, 230, 230))
    x += 60
  return canvas


def to_palette(image: Image.Image, colours: int = 256) -> Image.Image:
  """Adaptive palette that keeps the mask and text colours exact.

  Photographs with sensor noise compress poorly as RGB PNG; a palette keeps the
  file well under 1 MB.
  """
  fixed = [*MASK_COLOURS.tolist(), [230, 230, 230], [24, 24, 24]]
  adaptive = image.quantize(colours - len(fixed), method=Image.Quantize.MEDIANCUT)
  palette = adaptive.getpalette()[:3 * (colours - len(fixed))] + [c for rgb in fixed for c in rgb]
  holder = Image.new('P', (1, 1))
  holder.putpalette(palette)
  return image.quantize(palette=holder, dither=Image.Dither.NONE)


def main(argv):
  del argv
  grid = render_grid(_SIZE.value, _PER_GRADE.value, _SEED.value)
  if _COLOURS.value:
    grid = to_palette(grid, _COLOURS.value)
  grid.save(_OUTPUT.value, optimize=True)
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  runtime.run(main)
