"""Scores of a heatmap against a binary lesion mask, and a mask-free faithfulness score.

Mask-based (each `heatmap [H, W]` against `mask [H, W]` in {0, 1}):
  * `pointing_game`: is the heatmap's peak on (or within `tolerance` pixels of) a
    lesion? (Zhang et al. 2018, "Top-down neural attention by excitation backprop",
    15 px tolerance.)
  * `relevance_mass`: the share of the (positive) heatmap energy inside the mask,
    the energy-based pointing game of Score-CAM (Wang et al. 2020) and the
    relevance mass accuracy of Arras et al. 2022. A uniform map scores the mask's
    area fraction, which `score` reports beside it as the chance level.
  * `relevance_rank`: the fraction of the top-|mask| pixels inside the mask
    (Arras et al. 2022).
  * `pixel_auroc`, `average_precision`: the heatmap as a pixel classifier of the mask.
Mask-free:
  * `deletion_insertion`: the target score as the most relevant pixels are
    deleted (replaced by a baseline) or inserted (Petsiuk et al. 2018, RISE, Sec. 4.1).

Heatmaps whose size differs from the mask's are resized bilinearly to the mask's
size. An empty mask gives NaN (nothing to find), which the aggregation skips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage, stats

from drjax.data import images

DEFAULT_LESION_TYPES = images.LESION_TYPES


def _as_pair(heatmap, mask) -> tuple[np.ndarray, np.ndarray]:
  heatmap = np.asarray(heatmap, np.float32)
  mask = np.asarray(mask) > 0
  if heatmap.ndim != 2 or mask.ndim != 2:
    raise ValueError(f'heatmap and mask must be 2-D [H, W]; got {heatmap.shape} and {mask.shape}')
  if heatmap.shape != mask.shape:
    heatmap = resize_heatmap(heatmap, mask.shape)
  return heatmap, mask


def resize_heatmap(heatmap: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of `[h, w]` to `size` (H, W), half-pixel centres."""
  import jax  # Only when sizes differ; the scores themselves are numpy.
  return np.asarray(jax.image.resize(np.asarray(heatmap, np.float32), tuple(size), 'bilinear'))


def pointing_game(heatmap, mask, tolerance: float = 15) -> float:
  """1.0 if the heatmap's maximum lies within `tolerance` pixels of the mask, else 0.0.

  The first maximum in row-major order is used; a constant heatmap (no peak)
  is a miss. NaN for an empty mask.
  """
  heatmap, mask = _as_pair(heatmap, mask)
  if not mask.any():
    return float('nan')
  if heatmap.max() == heatmap.min():
    return 0.0
  peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
  distance = ndimage.distance_transform_edt(~mask)   # 0 on the mask
  return float(distance[peak] <= tolerance)


def relevance_mass(heatmap, mask) -> float:
  """sum(relu(h) * mask) / sum(relu(h)) in [0, 1]; 0.0 for an all-zero heatmap, NaN if no mask."""
  heatmap, mask = _as_pair(heatmap, mask)
  if not mask.any():
    return float('nan')
  energy = np.maximum(heatmap, 0).astype(np.float64)
  total = energy.sum()
  return float(energy[mask].sum() / total) if total > 0 else 0.0


def relevance_rank(heatmap, mask) -> float:
  """Fraction of the |mask| highest-ranked pixels that lie in the mask (ties in index order)."""
  heatmap, mask = _as_pair(heatmap, mask)
  k = int(mask.sum())
  if k == 0:
    return float('nan')
  top = np.argsort(-heatmap.ravel(), kind='stable')[:k]
  return float(mask.ravel()[top].mean())


def pixel_auroc(heatmap, mask) -> float:
  """Area under the ROC curve of heatmap values as a classifier of mask pixels (ties = 1/2)."""
  heatmap, mask = _as_pair(heatmap, mask)
  y = mask.ravel()
  pos, neg = int(y.sum()), int(y.size - y.sum())
  if pos == 0 or neg == 0:
    return float('nan')
  # Mann-Whitney U from average ranks.
  ranks = stats.rankdata(heatmap.ravel())
  return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(heatmap, mask) -> float:
  """Average precision (step-wise, as sklearn's) of heatmap values as a mask-pixel classifier."""
  heatmap, mask = _as_pair(heatmap, mask)
  y = mask.ravel()
  if not y.any():
    return float('nan')
  order = np.argsort(-heatmap.ravel(), kind='mergesort')
  scores, y = heatmap.ravel()[order], y[order]
  last = np.r_[np.flatnonzero(np.diff(scores)), y.size - 1]   # end of each tie group
  tps = np.cumsum(y)[last].astype(np.float64)
  precision = tps / (last + 1)
  recall = tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def score(heatmap, mask, tolerance: float = 15) -> dict[str, float]:
  """All mask-based scores of one heatmap, plus the mask's area fraction (chance mass)."""
  heatmap, mask = _as_pair(heatmap, mask)
  return dict(
      pointing=pointing_game(heatmap, mask, tolerance),
      mass=relevance_mass(heatmap, mask),
      rank=relevance_rank(heatmap, mask),
      auroc=pixel_auroc(heatmap, mask),
      ap=average_precision(heatmap, mask),
      area=float(mask.mean()),
  )


def score_lesions(heatmap, masks, lesion_types: Sequence[str] = DEFAULT_LESION_TYPES,
                  tolerance: float = 15, union: bool = True) -> dict[str, dict[str, float]]:
  """`score` per lesion type of `masks [H, W, K]`, and for their union ('any') if `union`."""
  masks = np.asarray(masks) > 0
  if masks.ndim != 3 or masks.shape[-1] != len(lesion_types):
    raise ValueError(f'masks must be [H, W, {len(lesion_types)}] for {tuple(lesion_types)}; '
                     f'got {masks.shape}')
  heatmap = np.asarray(heatmap, np.float32)
  if heatmap.shape != masks.shape[:2]:
    heatmap = resize_heatmap(heatmap, masks.shape[:2])
  out = {t: score(heatmap, masks[..., i], tolerance) for i, t in enumerate(lesion_types)}
  if union:
    out['any'] = score(heatmap, masks.any(-1), tolerance)
  return out


def aggregate(per_image: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
  """Means over images of `score_lesions` outputs, skipping NaN (absent lesions); adds 'n'."""
  out = {}
  for lesion in per_image[0] if per_image else ():
    metrics = {}
    for name in per_image[0][lesion]:
      values = np.array([p[lesion][name] for p in per_image], np.float64)
      values = values[~np.isnan(values)]
      metrics[name] = float(values.mean()) if values.size else float('nan')
    metrics['n'] = int(sum(p[lesion]['area'] > 0 for p in per_image))
    out[lesion] = metrics
  return out


def deletion_insertion(score_fn: Callable[[np.ndarray], np.ndarray], image, heatmap, *,
                       steps: int = 16, baseline=None, batch_size: int = 32) -> dict:
  """Deletion and insertion curves of one image (Petsiuk et al. 2018, Sec. 4.1).

  Pixels are ranked by the heatmap (ties in index order). At step k of `steps`,
  the top round(k/steps * H * W) pixels are replaced by the baseline (deletion)
  or are the only ones taken from the image, the rest from the baseline
  (insertion). A faithful map makes the deletion curve fall fast (low AUC) and the
  insertion curve rise fast (high AUC).

  Args:
    score_fn: images `[N, H, W, C]` -> target scores `[N]` (e.g. the softmax
      probability of the explained class).
    image: `[H, W, C]` float, as `score_fn` expects it.
    heatmap: `[h, w]` (resized to `[H, W]` if needed).
    steps: number of steps; the curves have steps + 1 points.
    baseline: `[H, W, C]` replacement image; default zeros (the mean image for
      ImageNet-normalised inputs). A blurred copy is another common choice.
    batch_size: images per `score_fn` call.

  Returns:
    dict(fractions [steps+1], deletion [steps+1], insertion [steps+1],
    deletion_auc, insertion_auc) with trapezoidal AUCs over the fraction in [0, 1].
  """
  image = np.asarray(image, np.float32)
  h, w = image.shape[:2]
  heatmap = np.asarray(heatmap, np.float32)
  if heatmap.shape != (h, w):
    heatmap = resize_heatmap(heatmap, (h, w))
  baseline = np.zeros_like(image) if baseline is None else np.asarray(baseline, np.float32)
  order = np.argsort(-heatmap.ravel(), kind='stable')
  fractions = np.linspace(0.0, 1.0, steps + 1)
  counts = np.round(fractions * h * w).astype(int)
  rank = np.empty(h * w, np.int64)
  rank[order] = np.arange(h * w)
  # top[k] marks the counts[k] most relevant pixels.
  top = (rank[None, :] < counts[:, None]).reshape(-1, h, w, 1)
  deleted = np.where(top, baseline[None], image[None])
  inserted = np.where(top, image[None], baseline[None])
  batch = np.concatenate([deleted, inserted])
  scores = np.concatenate([np.asarray(score_fn(batch[i:i + batch_size]), np.float64).reshape(-1)
                           for i in range(0, len(batch), batch_size)])
  deletion, insertion = scores[:steps + 1], scores[steps + 1:]
  return dict(fractions=fractions, deletion=deletion, insertion=insertion,
              deletion_auc=float(np.trapezoid(deletion, fractions)),
              insertion_auc=float(np.trapezoid(insertion, fractions)))
