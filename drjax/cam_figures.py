"""Heatmap figures: the paper's Figure 5 (fundus | heatmap | overlay), panels and grids."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')  # Files only; no display on the training machines.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def colorize(heatmap: np.ndarray, cmap: str = 'jet') -> np.ndarray:
  """`[H, W]` in [0, 1] -> uint8 RGB `[H, W, 3]`."""
  rgb = plt.get_cmap(cmap)(np.clip(np.asarray(heatmap, np.float32), 0, 1))[..., :3]
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
    from drjax import localize
    heatmap = localize.resize_heatmap(heatmap, image.shape[:2])
  blended = alpha * colorize(heatmap, cmap) + (1 - alpha) * image.astype(np.float32)
  return np.clip(blended, 0, 255).round().astype(np.uint8)


def _mkdir_for(path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


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
    show_heatmap: with a single column, also show the bare heatmap (Figure 5 layout).
    title: optional figure title.
  """
  names = list(columns)
  ncols = 1 + len(names) + (1 if show_heatmap else 0)
  fig, axes = plt.subplots(len(images), ncols, figsize=(cell_inches * ncols,
                                                         cell_inches * len(images)),
                           squeeze=False)
  for r, image in enumerate(images):
    axes[r, 0].imshow(image)
    if r == 0:
      axes[r, 0].set_title('fundus', fontsize=9)
    if row_titles:
      axes[r, 0].set_ylabel(row_titles[r], fontsize=8)
    c = 1
    for name in names:
      heat = np.asarray(columns[name][r], np.float32)
      if show_heatmap:
        axes[r, c].imshow(heat, cmap='jet', vmin=0, vmax=1)
        if r == 0:
          axes[r, c].set_title(f'{name}', fontsize=9)
        c += 1
      axes[r, c].imshow(overlay(image, heat))
      if masks is not None and masks[r] is not None and np.any(masks[r]):
        axes[r, c].contour(np.asarray(masks[r], np.float32), levels=[0.5], colors='white',
                           linewidths=0.6)
      if r == 0:
        axes[r, c].set_title('overlay' if show_heatmap else name, fontsize=9)
      c += 1
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  _mkdir_for(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)


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
  import jax

  from drjax import gradcam

  images_uint8 = np.asarray(images_uint8)
  fn = gradcam.get_method(method)
  heatmaps = np.asarray(fn(model, variables, images_uint8, layer=layer, targets=targets,
                           image_size=image_size))
  x = gradcam.prepare_images(images_uint8, image_size)
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  probs = np.asarray(jax.nn.softmax(model.apply(variables, x, train=False), -1))
  titles = []
  for i, p in enumerate(probs):
    title = f'pred {int(p.argmax())} ({p.max():.2f})'
    if labels is not None:
      title = f'grade {int(labels[i])}, ' + title
    titles.append(title)
  name = f'{method} @ {layer or model.default_cam_layer}'
  grid(list(images_uint8), {name: list(heatmaps)}, path, row_titles=titles, show_heatmap=True)
  return heatmaps
