"""Heatmaps of single fundus images from files, the paper's Figure 5 (scripts/explain.py)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from drjax import cam_figures, errors, evaluate, gradcam, localize
from drjax.cam_study import examples
from drjax.data import images as dimages

IMAGE_EXTENSIONS = examples.IMAGE_EXTENSIONS


def list_images(paths: Iterable[str]) -> list[pathlib.Path]:
  """The image files named in `paths`, and those directly inside the folders named there."""
  paths = list(paths)
  out = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
    elif p.is_file():
      out.append(p)
    else:
      raise errors.UserError(f'no image or folder at {p}')
  if not out:
    raise errors.UserError(f'no images found in {paths}')
  return out


def explain(model, variables, image_paths: Sequence[pathlib.Path], out_dir, *,
            image_size: int, method: str = 'gradcam', layer: str | None = None,
            masks_dir=None, targets=None, tolerance: float = 15,
            btgraham: bool = False) -> dict:
  """Figure 5 per image (fundus | heatmap | overlay), heatmaps_<method>.npz, scores_<method>.json.

  Returns:
    what scores_<method>.json holds: `method`, `layer`, `image_size`, `tolerance`, and under
    `images` per image stem its predicted grade, probabilities and (with masks)
    `drjax.localize.score_lesions`; with masks also their `mean`.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fn = gradcam.get_method(method)
  layer_name = layer or model.default_cam_layer
  heatmaps, summary, per_image = {}, {}, []
  for path in image_paths:
    image, box, decoded = dimages.preprocess_fundus(path, image_size, btgraham=btgraham)
    heat = np.asarray(fn(model, variables, image[None], layer=layer, targets=targets))[0]
    x = gradcam.prepare_images(image[None])
    probs = np.asarray(evaluate.predict_probs(model, variables, x))[0]
    masks = (examples.load_masks_for(path.stem, masks_dir, box, decoded, image_size)
             if masks_dir else None)
    cam_figures.figure5(image, heat, str(out_dir / f'{path.stem}_{method}.png'),
                        title=(f'{path.stem}: grade {int(probs.argmax())} (p={probs.max():.2f}), '
                               f'{method} @ {layer_name}'),
                        mask=None if masks is None else masks.any(-1))
    heatmaps[path.stem] = heat
    summary[path.stem] = dict(predicted_grade=int(probs.argmax()), probs=probs.round(4).tolist())
    if masks is not None:
      summary[path.stem]['scores'] = localize.score_lesions(heat, masks, examples.LESION_TYPES,
                                                            tolerance)
      per_image.append(summary[path.stem]['scores'])
  np.savez_compressed(out_dir / f'heatmaps_{method}.npz', **heatmaps)
  report = dict(method=method, layer=layer_name, image_size=image_size, tolerance=tolerance,
                images=summary)
  if per_image:
    report['mean'] = localize.aggregate(per_image)
  with open(out_dir / f'scores_{method}.json', 'w') as f:
    json.dump(report, f, indent=1, default=float)
  return report
