"""The lesion-localisation study of the CAM family, and `explain` for single images.

The paper (Sec. 3.2) argues from pictures that Grad-CAM on DenseNet121's last
dense block is too coarse for DR lesions: one of the 7x7 cells is ~2% of the
image, a microaneurysm under 0.08%. `run_study` measures it instead: every CAM
method at several stages (DenseNet denseblock2/3/4 + LayerCAM fusion; ResNet
layer2/3/4; VGG block3/4/5) is scored against lesion masks per lesion type
(drjax.localize), beside the area argument computed from the masks
(`area_table`: lesion area as a fraction of the image and of one heatmap cell at
each stage). `write_report` turns the numbers into a Markdown report whose
conclusion sentences are computed from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
from scipy import ndimage

from drjax import cam_figures, gradcam, localize
from drjax import mesh as mesh_lib

LESION_TYPES = localize.DEFAULT_LESION_TYPES
DEFAULT_METHODS = ('gradcam', 'gradcam++', 'hirescam', 'xgradcam', 'layercam')
FUSION = 'fusion'
PAPER_SIZE = 224  # the paper's input size (its 7x7 denseblock4 map)
PAPER_TOLERANCE = 15  # pointing-game tolerance in pixels at PAPER_SIZE
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.tif', '.tiff', '.bmp')


@dataclasses.dataclass
class Example:
  """One fundus image at the model's input size with its lesion masks."""
  id: str
  image: np.ndarray                       # uint8 [S, S, 3]
  masks: np.ndarray | None = None          # uint8 [S, S, 5] in LESION_TYPES order
  grade: int | None = None
  # Lesion statistics measured at the source resolution (area argument).
  area_fraction: dict[str, float] | None = None            # type -> total area / image
  component_fractions: dict[str, list[float]] | None = None  # type -> each lesion / image


def lesion_stats(masks: np.ndarray) -> tuple[dict[str, float], dict[str, list[float]]]:
  """Per lesion type: total area fraction and the area fraction of each connected lesion."""
  total, parts = {}, {}
  n = masks.shape[0] * masks.shape[1]
  for k, t in enumerate(LESION_TYPES):
    m = masks[..., k] > 0
    total[t] = float(m.mean())
    labels, count = ndimage.label(m)
    sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0)
    parts[t] = [float(s) / n for s in sizes]
  return total, parts


# ----------------------------------------------------------------------------
# Data.


def synthetic_examples(num_images: int, image_size: int, seed: int = 0,
                       stats_size: int = 1024) -> list[Example]:
  """Synthetic fundus images of grades 1-4 (so that lesions exist) with their masks.

  The area statistics come from a rendering at `stats_size` px, closer to a real
  fundus photograph than the model's input size.
  """
  from drjax.data import synthetic
  from drjax.data.images import resize_mask

  out = []
  for i in range(num_images):
    grade = 1 + i % 4
    ex = synthetic.generate_example(seed + i, grade, image_size=stats_size)
    total, parts = lesion_stats(ex['masks'])
    small = synthetic.generate_example(seed + i, grade, image_size=image_size)
    # The same scene rendered at stats_size, any-pooled down: lesions smaller than an
    # input pixel still mark it (as drjax.data.images.resize_mask does for IDRiD).
    masks = np.stack([resize_mask(ex['masks'][..., k], (0, 0, stats_size, stats_size),
                                  image_size) for k in range(len(LESION_TYPES))], -1)
    out.append(Example(id=f'synthetic_{seed + i:05d}', image=small['image'], masks=masks,
                       grade=grade, area_fraction=total, component_fractions=parts))
  return out


def idrid_examples(idrid_dir: str | os.PathLike, num_images: int, image_size: int,
                   btgraham: bool = False) -> list[Example]:
  """IDRiD segmentation-set photographs with their lesion masks (the raw upstream layout).

  Images are cropped to the field of view as in the tfds builder
  (drjax.data.builders.idrid); masks are cropped alike and downsampled so that a
  pixel is lesion if any full-resolution pixel under it is. Area statistics are
  measured on the full-resolution crop.
  """
  from drjax.data import images as dimages
  from drjax.data.builders import idrid

  root = pathlib.Path(idrid_dir) / 'A. Segmentation'
  image_dir = root / '1. Original Images' / 'a. Training Set'
  gt = idrid.mask_files(root / '2. All Segmentation Groundtruths' / 'a. Training Set')
  files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
  out = []
  for path in files[:num_images]:
    image, box, decoded = dimages.preprocess_fundus(path, image_size, btgraham=btgraham)
    small, full = [], []
    for t in LESION_TYPES:
      mpath = gt.get(path.stem, {}).get(t)
      if mpath is None:
        small.append(None)
        full.append(None)
        continue
      mask = dimages.load_mask(mpath)
      mbox = dimages.scale_box(box, decoded, mask.size)
      small.append(dimages.resize_mask(mask, mbox, image_size))
      full.append(np.asarray(mask.crop(tuple(int(round(v)) for v in mbox))) > 0)
    masks = dimages.stack_masks(small, image_size)
    total, parts = {}, {}
    for t, m in zip(LESION_TYPES, full, strict=True):
      if m is None:
        total[t], parts[t] = 0.0, []
      else:
        s_total, s_parts = lesion_stats(m[..., None].repeat(len(LESION_TYPES), -1))
        total[t], parts[t] = s_total[t], s_parts[t]
    out.append(Example(id=path.stem, image=image, masks=masks, area_fraction=total,
                       component_fractions=parts))
  return out


def load_examples(dataset: str, num_images: int, image_size: int, *, seed: int = 0,
                  idrid_dir: str | None = None, btgraham: bool = False,
                  stats_size: int = 1024) -> list[Example]:
  if dataset == 'synthetic_fundus':
    return synthetic_examples(num_images, image_size, seed, stats_size)
  if dataset == 'idrid':
    if idrid_dir is None:
      raise ValueError('--idrid_dir is required for dataset idrid')
    return idrid_examples(idrid_dir, num_images, image_size, btgraham)
  raise ValueError(f'Unknown dataset {dataset!r}; expected synthetic_fundus or idrid')


# ----------------------------------------------------------------------------
# The study.


def study_layers(model) -> tuple[str, ...]:
  """DenseNet denseblock2/3/4, ResNet layer2/3/4, VGG block3/4/5 (fine to coarse)."""
  return gradcam.default_fusion_layers(model)


def layer_shapes(model, variables, image_size: int, layers: Sequence[str]) -> dict[str, tuple]:
  """Spatial size (h, w) of each stage at `image_size` (shape inference only)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False,
                                                     mutable=['intermediates']), variables, x)
  return {n: tuple(state['intermediates'][n][0].shape[1:3]) for n in layers}


def area_table(examples: Sequence[Example], shapes: dict[str, tuple]) -> dict[str, dict]:
  """Per lesion type: median total area and median single-lesion area, as fractions of the
  image and of one heatmap cell at each stage (cell = 1 / (h * w) of the image)."""
  out = {}
  for t in LESION_TYPES:
    totals = [e.area_fraction[t] for e in examples if e.area_fraction and e.area_fraction[t] > 0]
    comps = [c for e in examples if e.component_fractions for c in e.component_fractions[t]]
    row = dict(images=len(totals), lesions=len(comps),
               total_fraction=float(np.median(totals)) if totals else float('nan'),
               lesion_fraction=float(np.median(comps)) if comps else float('nan'))
    for layer, (h, w) in shapes.items():
      cell = 1.0 / (h * w)
      row[f'cell_{layer}'] = cell
      row[f'lesion_per_cell_{layer}'] = row['lesion_fraction'] / cell
    out[t] = row
  return out


def compute_heatmaps(model, variables, images_uint8: np.ndarray, layers: Sequence[str],
                     methods: Sequence[str] = DEFAULT_METHODS, *, targets=None,
                     fusion: bool = True, pixel_methods: Sequence[str] = ('gradients',),
                     batch_size: int = 8) -> dict[str, np.ndarray]:
  """'method@layer' -> heatmaps `[N, S, S]` in [0, 1], one core pass for all stages.

  The gradient CAMs of all `layers` come from one forward/backward pass per batch
  (`drjax.gradcam.activations_and_grads` with several layers). Score-CAM, if asked
  for, runs separately per layer. `fusion` adds LayerCAM fusion of the layers
  ('fusion@' + '+'.join(layers)); `pixel_methods` adds input-level attributions
  ('gradients@input').

  Each batch is split over this process's devices, the variables copied to each device once.
  """
  size = tuple(images_uint8.shape[1:3])
  gradient_methods = [m for m in methods if m != 'scorecam']
  mesh = mesh_lib.make_mesh(jax.local_devices())
  variables = mesh_lib.replicate(variables, mesh)
  out: dict[str, list] = {}
  for i in range(0, len(images_uint8), batch_size):
    batch = images_uint8[i:i + batch_size]
    n = len(batch)
    x = mesh_lib.shard_padded(batch, mesh)
    t = (targets if targets is None or callable(targets)
         else mesh_lib.shard_padded(np.asarray(targets)[i:i + batch_size], mesh))
    core = gradcam.activations_and_grads(model, variables, x, layer=tuple(layers), targets=t)
    maps = _gradient_maps(core['acts'], core['grads'], methods=tuple(gradient_methods),
                          layers=tuple(layers), size=size, fusion=fusion)
    for m in methods:
      for layer in layers:
        key = f'{m}@{layer}'
        cam = (gradcam.scorecam(model, variables, x, layer=layer, targets=t)
               if m == 'scorecam' else maps[key])
        out.setdefault(key, []).append(np.asarray(cam)[:n])
    if fusion:
      key = f'{FUSION}@{"+".join(layers)}'
      out.setdefault(key, []).append(np.asarray(maps[key])[:n])
    for m in pixel_methods:
      out.setdefault(f'{m}@input', []).append(
          np.asarray(gradcam.get_method(m)(model, variables, x, targets=t))[:n])
  return {k: np.concatenate(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=('methods', 'layers', 'size', 'fusion'))
def _gradient_maps(acts, grads, *, methods, layers, size, fusion):
  """Every gradient method's post-processed maps at every layer, and their fusion: one program,
  rather than some 15 small eager ops (and first-use compiles) per map."""
  maps = {f'{m}@{layer}': gradcam.postprocess(gradcam.CAM_MAPS[m](acts[layer], grads[layer]),
                                              size)
          for m in methods for layer in layers}
  if fusion:
    fused = gradcam.layercam_fusion(acts, grads, size)
    maps[f'{FUSION}@{"+".join(layers)}'] = gradcam.normalize(fused)
  return maps


def score_heatmaps(heatmaps: dict[str, np.ndarray], examples: Sequence[Example],
                   tolerance: float) -> dict[str, dict[str, dict[str, float]]]:
  """'method@layer' -> lesion type -> mean scores (drjax.localize.aggregate)."""
  return {key: localize.aggregate([localize.score_lesions(maps[i], e.masks, LESION_TYPES,
                                                          tolerance)
                                   for i, e in enumerate(examples)])
          for key, maps in heatmaps.items()}


def faithfulness(model, variables, examples: Sequence[Example], heatmaps: dict[str, np.ndarray],
                 num_images: int = 4, steps: int = 8) -> dict[str, dict[str, float]]:
  """Mean deletion/insertion AUCs (probability of the predicted grade) per 'method@layer'."""
  from drjax.models import common

  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  apply = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x, train=False), -1))
  out = {}
  for key, maps in heatmaps.items():
    dels, ins = [], []
    for i, e in enumerate(examples[:num_images]):
      x = np.asarray(common.normalize(e.image[None]))[0]
      cls = int(np.argmax(apply(x[None])[0]))
      res = localize.deletion_insertion(lambda b, c=cls: np.asarray(apply(b))[:, c], x, maps[i],
                                        steps=steps, batch_size=2 * steps + 2)
      dels.append(res['deletion_auc'])
      ins.append(res['insertion_auc'])
    out[key] = dict(deletion_auc=float(np.mean(dels)), insertion_auc=float(np.mean(ins)))
  return out


def run_study(model, variables, examples: Sequence[Example], *, arch: str = '',
              methods: Sequence[str] = DEFAULT_METHODS, layers: Sequence[str] | None = None,
              tolerance: float = 15, faithfulness_images: int = 4,
              model_info: dict | None = None) -> dict:
  """Heatmaps, localisation scores, area argument and faithfulness of one model."""
  layers = tuple(layers or study_layers(model))
  images = np.stack([e.image for e in examples])
  size = images.shape[1]
  heatmaps = compute_heatmaps(model, variables, images, layers, methods)
  scores = score_heatmaps(heatmaps, examples, tolerance)
  shapes = layer_shapes(model, variables, size, layers)
  paper_shapes = layer_shapes(model, variables, PAPER_SIZE, layers)
  result = dict(
      arch=arch or type(model).__name__, image_size=size, num_images=len(examples),
      layers=list(layers), layer_shapes={k: list(v) for k, v in shapes.items()},
      paper_layer_shapes={k: list(v) for k, v in paper_shapes.items()},
      default_layer=model.default_cam_layer, tolerance=tolerance, methods=list(methods),
      scores=scores, areas=area_table(examples, shapes), model_info=model_info or {},
      faithfulness=(faithfulness(model, variables, examples, heatmaps, faithfulness_images)
                    if faithfulness_images else {}))
  return dict(result=result, heatmaps=heatmaps)


# ----------------------------------------------------------------------------
# The report.


def _fmt(v, digits=3):
  if v is None or (isinstance(v, float) and np.isnan(v)):
    return 'n/a'
  if isinstance(v, float) and abs(v) < 1e-3 and v != 0:
    return f'{v:.2e}'
  return f'{v:.{digits}f}' if isinstance(v, float) else str(v)


def _present_types(result) -> list[str]:
  any_key = next(iter(result['scores']))
  return [t for t in (*LESION_TYPES, 'any') if result['scores'][any_key][t]['n'] > 0]


def metric_table(result: dict, metric: str) -> str:
  types = _present_types(result)
  lines = ['| method @ layer | ' + ' | '.join(types) + ' |',
           '|---|' + '---|' * len(types)]
  for key, per in result['scores'].items():
    lines.append(f'| {key} | ' + ' | '.join(_fmt(per[t][metric]) for t in types) + ' |')
  return '\n'.join(lines)


def mass_lift_table(result: dict) -> str:
  """Relevance mass divided by the lesion area (1.0 = a uniform heatmap)."""
  types = _present_types(result)
  lines = ['| method @ layer | ' + ' | '.join(types) + ' |', '|---|' + '---|' * len(types)]
  for key, per in result['scores'].items():
    lines.append(f'| {key} | ' + ' | '.join(
        _fmt(per[t]['mass'] / per[t]['area'], 2) if per[t]['area'] > 0 else 'n/a'
        for t in types) + ' |')
  return '\n'.join(lines)


def area_markdown(result: dict) -> str:
  layers = result['layers']
  shapes = result['layer_shapes']
  head = ['lesion', 'images', 'lesions', 'total area / image', 'one lesion / image (median)']
  head += [f'one lesion / {layer} cell ({shapes[layer][0]}x{shapes[layer][1]})'
           for layer in layers]
  lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---|' * (len(head) - 1)]
  for t, row in result['areas'].items():
    if not row['images']:
      continue
    lines.append('| ' + ' | '.join(
        [t, str(row['images']), str(row['lesions']), _pct(row['total_fraction']),
         _pct(row['lesion_fraction'])] +
        [_pct(row[f'lesion_per_cell_{layer}']) for layer in layers]) + ' |')
  def cells(shapes):
    return ', '.join(f'{layer} {shapes[layer][0]}x{shapes[layer][1]}: '
                     f'{_pct(1 / (shapes[layer][0] * shapes[layer][1]))}' for layer in layers)
  text = f'\n\nOne heatmap cell as a fraction of the image: {cells(shapes)}.'
  paper = result.get('paper_layer_shapes')
  if paper and result['image_size'] != PAPER_SIZE:
    text += (f' At the paper\'s {PAPER_SIZE} px (the lesion fractions above are measured at '
             f'full resolution, whatever the input size): {cells(paper)}.')
  return '\n'.join(lines) + text


def _pct(v):
  return 'n/a' if v is None or np.isnan(v) else f'{100 * v:.3g}%'


def conclusions(result: dict) -> list[str]:
  """Sentences derived from the numbers (nothing here is assumed)."""
  out = []
  scores, layers = result['scores'], result['layers']
  default = f'gradcam@{result["default_layer"]}'
  types = [t for t in _present_types(result) if t != 'any']
  if default in scores:
    for t in types:
      s = scores[default][t]
      lift = s['mass'] / s['area'] if s['area'] > 0 else float('nan')
      out.append(f'{t} ({s["n"]} images): the paper\'s setting ({default}) scores pixel AUROC '
                 f'{_fmt(s["auroc"])}, relevance mass {_fmt(s["mass"])} vs {_fmt(s["area"])} for '
                 f'a uniform map (x{_fmt(lift, 2)}), pointing game {_fmt(s["pointing"], 2)}: '
                 f'{_verdict(s["auroc"], lift)}.')
      best = max(scores, key=lambda k: -1 if np.isnan(scores[k][t]['auroc'])
                 else scores[k][t]['auroc'])
      out.append(f'{t}: the best pixel AUROC is {best} ({_fmt(scores[best][t]["auroc"])}).')
    means = {layer: np.nanmean([scores[f'gradcam@{layer}'][t]['auroc'] for t in types])
             for layer in layers if f'gradcam@{layer}' in scores}
    if means:
      out.append('Grad-CAM pixel AUROC averaged over lesion types: ' + ', '.join(
          f'{layer} {_fmt(float(v))}' for layer, v in means.items()) +
          f'; best: {max(means, key=means.get)}.')
    fine, coarse = f'gradcam@{layers[0]}', f'gradcam@{layers[-1]}'
    if fine in scores and coarse in scores and fine != coarse:
      better = [t for t in types if scores[fine][t]['auroc'] > scores[coarse][t]['auroc']]
      out.append(f'Grad-CAM at the finer {layers[0]} beats {layers[-1]} in pixel AUROC for '
                 f'{len(better)} of {len(types)} lesion types ({", ".join(better) or "none"}).')
  areas = result['areas']
  coarse_layer = result['default_layer']
  for t in types:
    row = areas.get(t)
    if row and row['lesions'] and f'lesion_per_cell_{coarse_layer}' in row:
      out.append(f'Area: a median {t} lesion covers {_pct(row["lesion_fraction"])} of the image, '
                 f'{_pct(row[f"lesion_per_cell_{coarse_layer}"])} of one {coarse_layer} cell.')
  return out


def _verdict(auroc: float, lift: float) -> str:
  if np.isnan(auroc):
    return 'no data'
  if auroc < 0.45:
    return 'below chance (the map avoids these lesions)'
  if auroc <= 0.55 or lift <= 1.2:
    return 'at chance level'
  if auroc >= 0.65 and lift >= 1.5:
    return 'clearly above chance'
  return 'weakly above chance'


def write_report(result: dict, heatmaps: dict[str, np.ndarray], examples: Sequence[Example],
                 out_dir: str | os.PathLike, title: str = 'CAM lesion-localisation study',
                 grid_images: int = 4) -> pathlib.Path:
  """Writes report.md, results.json and figure_grid.png into `out_dir`."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / 'results.json', 'w') as f:
    json.dump(result, f, indent=1, default=float)
  n = min(grid_images, len(examples))
  keys = [k for k in heatmaps if not k.startswith(('hirescam@', 'xgradcam@', 'gradcam++@'))]
  cam_figures.grid([e.image for e in examples[:n]],
                   {k.split('@')[0] if k.startswith(FUSION) else k: heatmaps[k][:n]
                    for k in keys},
                   str(out_dir / 'figure_grid.png'),
                   row_titles=[e.id for e in examples[:n]],
                   masks=[e.masks.any(-1) if e.masks is not None else None
                          for e in examples[:n]])
  info = result.get('model_info') or {}
  lines = [f'# {title}', '',
           f'Model: {result["arch"]} ({info.get("workdir", "")}), input '
           f'{result["image_size"]} px, {result["num_images"]} images, dataset '
           f'{info.get("dataset", "?")}. Stages: '
           + ', '.join(f'{k} {v[0]}x{v[1]}' for k, v in result['layer_shapes'].items()) + '.']
  if info.get('metrics'):
    lines += ['', f'Classifier on its own validation split: {info["metrics"]}.']
  if info.get('note'):
    lines += ['', f'**Note:** {info["note"]}']
  lines += ['', '## Conclusion (computed from the tables below)', '']
  lines += [f'- {s}' for s in conclusions(result)]
  lines += ['', '## The area argument', '', area_markdown(result), '',
            '## Pixel AUROC of the heatmap as a classifier of lesion pixels (0.5 = chance)', '',
            metric_table(result, 'auroc'), '',
            '## Average precision (chance = lesion area fraction)', '',
            metric_table(result, 'ap'), '',
            '## Relevance mass inside the mask / lesion area (1.0 = uniform heatmap)', '',
            mass_lift_table(result), '',
            f'## Pointing game (tolerance {result["tolerance"]} px)', '',
            metric_table(result, 'pointing'), '']
  if result.get('faithfulness'):
    lines += ['## Faithfulness without masks (deletion: lower is better; insertion: higher)',
              '', '| method @ layer | deletion AUC | insertion AUC |', '|---|---|---|']
    lines += [f'| {k} | {_fmt(v["deletion_auc"])} | {_fmt(v["insertion_auc"])} |'
              for k, v in result['faithfulness'].items()]
    lines.append('')
  lines += ['## Figure', '', '![heatmaps](figure_grid.png)', '',
            'Rows: images (white: lesion outlines); columns: method @ layer overlays.', '']
  path = out_dir / 'report.md'
  path.write_text('\n'.join(lines))
  return path


# ----------------------------------------------------------------------------
# Masks of single images (drjax.explain).


def load_masks_for(stem: str, masks_dir: pathlib.Path, box, decoded, image_size: int):
  """Masks of one image from `masks_dir`: `<stem>.npz` ('masks' [H, W, 5] aligned with the
  original image, or already [S, S, 5]) or IDRiD-style `<stem>_MA.tif` ... files."""
  from drjax.data import images as dimages
  from drjax.data.builders import idrid

  npz = masks_dir / f'{stem}.npz'
  if npz.exists():
    masks = np.load(npz)['masks']
    if masks.shape[:2] == (image_size, image_size):
      return (masks > 0).astype(np.uint8)
    w, h = masks.shape[1], masks.shape[0]
    mbox = dimages.scale_box(box, decoded, (w, h))
    return np.stack([dimages.resize_mask(masks[..., k], mbox, image_size)
                     for k in range(masks.shape[-1])], -1)
  files = idrid.mask_files(masks_dir).get(stem)
  if not files:
    return None
  out = []
  for t in LESION_TYPES:
    if t not in files:
      out.append(None)
      continue
    mask = dimages.load_mask(files[t])
    out.append(dimages.resize_mask(mask, dimages.scale_box(box, decoded, mask.size), image_size))
  return dimages.stack_masks(out, image_size)


def _model_info(workdir: pathlib.Path, config, dataset: str) -> dict:
  info = dict(workdir=str(workdir), dataset=dataset, trained_on=config.input.dataset)
  metrics_path = workdir / 'metrics.json'
  if metrics_path.exists():
    m = json.loads(metrics_path.read_text())
    keys = ('accuracy', 'kappa')
    summary = {k: round(float(m[k]), 3) for k in keys if isinstance(m.get(k), (int, float))}
    ref = m.get('referable') or {}
    if isinstance(ref, dict) and isinstance(ref.get('auc'), (int, float)):
      summary['referable_auc'] = round(float(ref['auc']), 3)
    info['metrics'] = summary
    if summary.get('accuracy', 1.0) < 0.5 or summary.get('referable_auc', 1.0) < 0.7:
      info['note'] = ('this classifier is weak (see its metrics), so these maps explain a '
                      'model that has not learned the grades; they test the pipeline, '
                      'not the paper\'s trained DenseNet121.')
  else:
    info['note'] = 'no metrics.json in the run: classifier quality unknown.'
  return info


def run_workdirs(workdirs: Sequence[str], out_dir, *, dataset: str = 'synthetic_fundus',
                 idrid_dir: str | None = None, num_images: int = 16,
                 methods: Sequence[str] = DEFAULT_METHODS, image_size: int | None = None,
                 tolerance: float | None = None, faithfulness_images: int = 4,
                 seed: int = 1000, stats_size: int = 1024) -> pathlib.Path:
  """The study for each run in `workdirs`; one report.md with a section per run.

  `tolerance` is the pointing game's, in pixels of the study's input; None scales
  15 px at the paper's 224 px to it (about 4 px at 64 px), so that a hit means
  the same fraction of the fundus at any size.
  """
  from drjax import evaluate

  out_dir = pathlib.Path(out_dir)
  sections = []
  for workdir in workdirs:
    config, model, variables = evaluate.load_run(workdir)
    size = image_size or config.input.image_size
    examples = load_examples(dataset, num_images, size, seed=seed, idrid_dir=idrid_dir,
                             btgraham=bool(config.input.get('btgraham', False)),
                             stats_size=stats_size)
    examples = [e for e in examples if e.masks is not None and e.masks.any()]
    info = _model_info(pathlib.Path(workdir), config, dataset)
    tol = PAPER_TOLERANCE * size / PAPER_SIZE if tolerance is None else tolerance
    study = run_study(model, variables, examples, arch=config.model, methods=methods,
                      tolerance=round(tol, 1), faithfulness_images=faithfulness_images,
                      model_info=info)
    sub = out_dir / config.model
    path = write_report(study['result'], study['heatmaps'], examples, sub,
                        title=f'{config.model} on {dataset}')
    text = path.read_text().replace('](figure_grid.png)', f']({config.model}/figure_grid.png)')
    sections.append(text.replace('# ', '## ', 1).replace('\n## ', '\n### '))
  report = out_dir / 'report.md'
  header = ['# CAM lesion-localisation study', '',
            'Does Grad-CAM on the last dense block localise DR lesions (paper, Sec. 3.2)? '
            'Each heatmap is scored against lesion masks (drjax.localize): pixel AUROC and '
            'average precision of the heatmap as a lesion-pixel classifier, relevance mass '
            'inside the lesions relative to a uniform map, and the pointing game. '
            'Generated by scripts/cam_study.py.', '']
  report.write_text('\n'.join(header) + '\n' + '\n\n'.join(sections))
  return report
