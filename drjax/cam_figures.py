"""Heatmap figures: the paper's Figure 5 (fundus | heatmap | overlay), panels and grids.

`grid` is the one writer; `figure5` and `save_panel` are layouts of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np

# A bare Figure (no pyplot) renders with the Agg canvas: no global backend switch, no
# display needed, and figures are freed with their last reference.
from matplotlib.figure import Figure

from drjax import evaluate, gradcam, localize


def colorize(heatmap: np.ndarray, cmap: str = 'jet') -> np.ndarray:
  """`[H, W]` in [0, 1] -> uint8 RGB `[H, W, 3]`."""
  rgb = matplotlib.colormaps[cmap](np.clip(np.asarray(heatmap, np.float32), 0, 1))[..., :3]
  return (rgb * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5,
            cmap: str = 'jet') -> np.ndarray:
  """Blends a colour-mapped heatmap onto a uint8 image (pytorch-grad-cam's show_cam_on_image).

  Args:
    image: uint8 `[H, W, 3]`.
    heatmap: `[h, w]` in [0, 1]; resized to `[H, W]` if needed.
    alpha: heatmap weight.

  Returns:
    uint8 `[H, W, 3]`.
  """
  image = np.asarray(image)
  heatmap = np.asarray(heatmap, np.float32)
  if heatmap.shape != image.shape[:2]:
    heatmap = localize.resize_heatmap(heatmap, image.shape[:2])
  blended = alpha * colorize(heatmap, cmap) + (1 - alpha) * image.astype(np.float32)
  return np.clip(blended, 0, 255).round().astype(np.uint8)


def figure5(image: np.ndarray, heatmap: np.ndarray, path: str, title: str | None = None,
            mask: np.ndarray | None = None) -> None:
  """One row: fundus | heatmap | overlay (the paper's Figure 5), optional mask outline."""
  grid([image], {'heatmap': [heatmap]}, path, title=title,
       masks=None if mask is None else [mask], show_heatmap=True)


def grid(images: Sequence[np.ndarray], columns: Mapping[str, Sequence[np.ndarray]], path: str, *,
         row_titles: Sequence[str] | None = None, masks: Sequence[np.ndarray] | None = None,
         show_heatmap: bool = False, cell_inches: float = 2.2, title: str | None = None) -> None:
  """A figure grid: one row per image; the fundus, then one overlay column per entry.

  Args:
    images: uint8 `[H, W, 3]` per row.
    columns: column title -> per-row heatmaps `[h, w]` in [0, 1].
    path: output PNG.
    row_titles: optional label per row (left of the fundus).
    masks: optional `[H, W]` lesion masks per row, outlined in white on each overlay.
    show_heatmap: also show each bare heatmap before its overlay (the Figure 5 layout).
    cell_inches: side of one cell.
    title: optional figure title.
  """
  names = list(columns)
  headers = ['fundus'] + [h for n in names for h in ((n, 'overlay') if show_heatmap else (n,))]
  fig = Figure(figsize=(cell_inches * len(headers), cell_inches * len(images)))
  axes = fig.subplots(len(images), len(headers), squeeze=False)
  for r, image in enumerate(images):
    _draw_row(axes[r], image, [columns[n][r] for n in names],
              None if masks is None else masks[r], show_heatmap)
  for ax, header in zip(axes[0], headers, strict=True):
    ax.set_title(header, fontsize=9)
  if row_titles:
    for ax, row_title in zip(axes[:, 0], row_titles, strict=True):
      ax.set_ylabel(row_title, fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)


def _draw_row(axes, image: np.ndarray, heatmaps: Sequence[np.ndarray], mask: np.ndarray | None,
              show_heatmap: bool) -> None:
  """The fundus, then per heatmap (the bare heatmap and) its overlay with the mask outlined."""
  axes[0].imshow(image)
  cells = iter(axes[1:])
  for heat in heatmaps:
    heat = np.asarray(heat, np.float32)
    if show_heatmap:
      next(cells).imshow(heat, cmap='jet', vmin=0, vmax=1)
    ax = next(cells)
    ax.imshow(overlay(image, heat))
    if mask is not None and np.any(mask):
      ax.contour(np.asarray(mask, np.float32), levels=[0.5], colors='white', linewidths=0.6)


def save_panel(model, variables, images_uint8, path: str, *, method: str = 'gradcam',
               layer: str | None = None, targets=None, labels: Sequence[int] | None = None,
               image_size: int | None = None) -> np.ndarray:
  """Writes a Grad-CAM panel (fundus | heatmap | overlay per image) for a few images.

  Meant for the end of training (drjax.train) and for quick looks.

  Args:
    model, variables: a drjax model and its variables.
    images_uint8: `[N, H, W, 3]` uint8 images (N small, e.g. 4-8).
    path: output PNG.
    method: a key of `drjax.gradcam.METHODS`.
    layer: stage name (None: the model's default CAM layer).
    targets: as `drjax.gradcam.gradcam` (None: predicted class).
    labels: optional true grades, shown in the row titles beside the prediction.
    image_size: model input size if the images differ from it.

  Returns:
    the heatmaps, float32 `[N, H, W]` in [0, 1].
  """
  images_uint8 = np.asarray(images_uint8)
  fn = gradcam.get_method(method)
  heatmaps = np.asarray(fn(model, variables, images_uint8, layer=layer, targets=targets,
                           image_size=image_size))
  x = gradcam.prepare_images(images_uint8, image_size)
  probs = np.asarray(evaluate.predict_probs(model, variables, x))
  titles = []
  for i, p in enumerate(probs):
    title = f'pred {int(p.argmax())} ({p.max():.2f})'
    if labels is not None:
      title = f'grade {int(labels[i])}, ' + title
    titles.append(title)
  name = f'{method} @ {layer or model.default_cam_layer}'
  grid(list(images_uint8), {name: list(heatmaps)}, path, row_titles=titles, show_heatmap=True)
  return heatmaps
