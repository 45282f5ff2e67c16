"""One model's part of the study: heatmaps of every method at every stage, their scores
against the lesion masks, the area argument and mask-free faithfulness."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from drjax import evaluate, gradcam, localize
from drjax import faithfulness as faithfulness_lib
from drjax import mesh as mesh_lib
from drjax.cam_study import controls as controls_lib
from drjax.cam_study.examples import LESION_TYPES, Example
from drjax.models import common

DEFAULT_METHODS = ('gradcam', 'gradcam++', 'hirescam', 'xgradcam', 'layercam')
# Every layer method of drjax.gradcam, RandomCAM the chance row, and every pixel-level one.
ALL_METHODS = ('randomcam', 'gradcam', 'gradcam++', 'hirescam', 'xgradcam', 'layercam',
               'gradcam_elementwise', 'eigencam', 'eigengradcam', 'kpcacam', 'fem', 'shapleycam',
               'finercam', 'scorecam', 'ablationcam')
ALL_PIXEL_METHODS = ('gradients', 'guided_backprop', 'guided_gradcam', 'fullgrad', 'sess')
# One pass per channel (or per window and scale): computed on fewer images, without controls.
SLOW_METHODS = ('scorecam', 'ablationcam', 'sess')
# Maps of the activations alone, computed in the shared core program with the gradient ones.
ACTS_MAPS = {
    'eigencam': lambda acts, grads: gradcam.eigencam_map(acts),
    'kpcacam': lambda acts, grads: gradcam.kpca_map(acts),
    'fem': lambda acts, grads: gradcam.fem_map(acts),
}
CORE_MAPS = {**gradcam.CAM_MAPS, **ACTS_MAPS}
FUSION = 'fusion'
PAPER_SIZE = 224  # the paper's input size (its 7x7 denseblock4 map)
# The controls' fresh init: not key 0, which the training runs' and the tests' inits use, so
# that an untrained model under study is not "re-initialised" to itself.
CONTROLS_SEED = 1


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
                     batch_size: int = 8, slow_images: int | None = None
                     ) -> dict[str, np.ndarray]:
  """'method@layer' -> heatmaps `[N, S, S]` in [0, 1], one core pass for all stages.

  The gradient CAMs of all `layers` (and the activation-only ones: `CORE_MAPS`) come from one
  forward/backward pass per batch (`drjax.gradcam.activations_and_grads` with several
  layers). Every other method runs its own function per layer. `fusion` adds LayerCAM fusion
  of the layers ('fusion@' + '+'.join(layers)); `pixel_methods` adds input-level attributions
  ('gradients@input'). `SLOW_METHODS` are computed on the first `slow_images` images only
  (None: all), so their arrays can be shorter.

  Each batch is split over this process's devices, the variables copied to each device once.
  """
  mesh = mesh_lib.make_mesh(jax.local_devices())
  variables = mesh_lib.replicate(variables, mesh)
  n_slow = len(images_uint8) if slow_images is None else slow_images
  out: dict[str, list] = {}
  for i in range(0, len(images_uint8), batch_size):
    batch = images_uint8[i:i + batch_size]
    x = mesh_lib.shard_padded(batch, mesh)
    t = (targets if targets is None or callable(targets)
         else mesh_lib.shard_padded(np.asarray(targets)[i:i + batch_size], mesh))
    slow = i < n_slow
    maps = _batch_maps(model, variables, x, t, layers=tuple(layers),
                       methods=tuple(m for m in methods if slow or m not in SLOW_METHODS),
                       fusion=fusion, pixel_methods=tuple(
                           m for m in pixel_methods if slow or m not in SLOW_METHODS),
                       seed=i)
    for key, cam in maps.items():
      keep = len(batch) if key.split('@')[0] not in SLOW_METHODS else min(len(batch), n_slow - i)
      out.setdefault(key, []).append(np.asarray(cam)[:keep])  # drop the padding
  return {k: np.concatenate(v) for k, v in out.items()}


def _batch_maps(model, variables, x, targets, *, layers, methods, fusion, pixel_methods, seed):
  """`compute_heatmaps` of one (padded, sharded) batch, keys in the order of the report."""
  core = gradcam.activations_and_grads(model, variables, x, layer=layers, targets=targets)
  maps = _gradient_maps(core['acts'], core['grads'], layers=layers, size=tuple(x.shape[1:3]),
                        methods=tuple(m for m in methods if m in CORE_MAPS), fusion=fusion)
  out = {}
  for m in methods:
    for layer in layers:
      key = f'{m}@{layer}'
      if m in CORE_MAPS:
        out[key] = maps[key]
      elif m == 'randomcam':  # a fresh draw of weights per batch: chance, not a fixed pattern
        out[key] = gradcam.randomcam(model, variables, x, layer=layer, rng=seed)
      else:
        out[key] = gradcam.get_method(m)(model, variables, x, layer=layer, targets=targets)
  if fusion:
    key = f'{FUSION}@{"+".join(layers)}'
    out[key] = maps[key]
  for m in pixel_methods:
    out[f'{m}@input'] = gradcam.get_method(m)(model, variables, x, targets=targets)
  return out


@functools.partial(jax.jit, static_argnames=('methods', 'layers', 'size', 'fusion'))
def _gradient_maps(acts, grads, *, methods, layers, size, fusion):
  """Every core method's post-processed maps at every layer, and their fusion, as one
  compiled program rather than a chain of small eager ops per map."""
  maps = {f'{m}@{layer}': gradcam.postprocess(CORE_MAPS[m](acts[layer], grads[layer]), size)
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
                                   for i, e in enumerate(examples[:len(maps)])])
          for key, maps in heatmaps.items()}


def faithfulness(model, variables, examples: Sequence[Example], heatmaps: dict[str, np.ndarray],
                 num_images: int = 4, steps: int = 8) -> dict[str, dict[str, float]]:
  """Per 'method@layer', the mean over the first `num_images` images of the deletion and
  insertion AUCs and ROAD combined (drjax.faithfulness.road_combined), all of the probability
  of the predicted grade."""
  apply = jax.jit(functools.partial(evaluate.predict_probs, model, variables))
  out = {}
  for key, maps in heatmaps.items():
    n = min(num_images, len(maps))
    x = np.asarray(common.normalize(np.stack([e.image for e in examples[:n]])))
    classes = np.argmax(np.asarray(apply(x)), -1)
    dels, ins = [], []
    for i in range(n):
      res = localize.deletion_insertion(lambda b, c=classes[i]: np.asarray(apply(b))[:, c],
                                        x[i], maps[i], steps=steps, batch_size=2 * steps + 2)
      dels.append(res['deletion_auc'])
      ins.append(res['insertion_auc'])
    road = faithfulness_lib.road_combined(model, variables, x, maps[:n], targets=classes,
                                          softmax=True, apply_kwargs={'train': False})
    out[key] = dict(deletion_auc=float(np.mean(dels)), insertion_auc=float(np.mean(ins)),
                    road_combined=float(np.mean(np.asarray(road))))
  return out


def predicted_classes(model, variables, images_uint8: np.ndarray,
                      batch_size: int = 8) -> np.ndarray:
  """The model's predicted grade of each image, `[N]` int."""
  # The variables are an argument, not constants folded into the compiled program.
  apply = jax.jit(functools.partial(evaluate.predict_probs, model))
  out = []
  for i in range(0, len(images_uint8), batch_size):
    probs = apply(variables, common.normalize(images_uint8[i:i + batch_size]))
    out.append(np.argmax(np.asarray(probs), -1))
  return np.concatenate(out)


def run_controls(model, variables, examples: Sequence[Example], heatmaps: dict[str, np.ndarray],
                 *, layers: Sequence[str], methods: Sequence[str], tolerance: float,
                 pixel_methods: Sequence[str] = ('gradients',),
                 seed: int = CONTROLS_SEED) -> dict:
  """The randomisation cascade and the untrained network, scored like the trained model.

  Every map explains the trained model's predicted grade, so that the parameters are the only
  thing that changes. `heatmaps` are the trained model's maps (`compute_heatmaps`).
  `SLOW_METHODS` are left out: each step would cost them as much as the whole study.

  Returns:
    dict(seed, target (what every map explains), steps=[dict(name, reinitialised (parameter
    subtrees), parameter_fraction, similarity ('method@layer' -> spearman, ssim, n), scores
    (as `score_heatmaps`))], with the untrained network last, named 'untrained').
  """
  images = np.stack([e.image for e in examples])
  size = images.shape[1]
  targets = predicted_classes(model, variables, images)
  fresh = controls_lib.fresh_variables(model, size, seed)
  steps = controls_lib.cascade(model, variables, layers, size)
  steps.append(controls_lib.Step(controls_lib.UNTRAINED, controls_lib.every_leaf(fresh)))
  out = []
  for step in steps:
    randomised = controls_lib.reinitialise(jax.device_get(variables), fresh, step.leaves)
    maps = compute_heatmaps(model, randomised, images, layers,
                            [m for m in methods if m not in SLOW_METHODS], targets=targets,
                            pixel_methods=[m for m in pixel_methods if m not in SLOW_METHODS])
    out.append(dict(
        name=step.name, reinitialised=controls_lib.describe(fresh['params'], step.leaves),
        parameter_fraction=controls_lib.parameter_fraction(fresh['params'], step.leaves),
        similarity=controls_lib.similarity(heatmaps, maps),
        scores=score_heatmaps(maps, examples, tolerance)))
  return dict(seed=seed, target='the trained model\'s predicted grade', steps=out)


def run_study(model, variables, examples: Sequence[Example], *, arch: str = '',
              methods: Sequence[str] = DEFAULT_METHODS, layers: Sequence[str] | None = None,
              tolerance: float = 15, faithfulness_images: int = 4,
              model_info: dict | None = None, controls: bool = True,
              controls_seed: int = CONTROLS_SEED,
              pixel_methods: Sequence[str] = ('gradients',),
              slow_images: int | None = None) -> dict:
  """Heatmaps, localisation scores, area argument, faithfulness and controls of one model.

  `controls` adds `run_controls` (the randomisation cascade and the untrained network), which
  recomputes every map once per step. `SLOW_METHODS` run on the first `slow_images` images.

  Returns:
    dict(result=the JSON-able numbers `drjax.cam_study.report` writes up,
    heatmaps='method@layer' -> `[N, S, S]`).
  """
  layers = tuple(layers or study_layers(model))
  images = np.stack([e.image for e in examples])
  size = images.shape[1]
  heatmaps = compute_heatmaps(model, variables, images, layers, methods,
                              pixel_methods=pixel_methods, slow_images=slow_images)
  shapes = layer_shapes(model, variables, size, layers)
  paper_shapes = layer_shapes(model, variables, PAPER_SIZE, layers)
  result = dict(
      arch=arch or type(model).__name__, image_size=size, num_images=len(examples),
      layers=list(layers), layer_shapes={k: list(v) for k, v in shapes.items()},
      paper_layer_shapes={k: list(v) for k, v in paper_shapes.items()},
      default_layer=model.default_cam_layer, tolerance=tolerance, methods=list(methods),
      pixel_methods=list(pixel_methods),
      slow_methods={k.split('@')[0]: len(v) for k, v in heatmaps.items()
                    if k.split('@')[0] in SLOW_METHODS},
      scores=score_heatmaps(heatmaps, examples, tolerance),
      areas=area_table(examples, shapes), model_info=model_info or {},
      faithfulness=(faithfulness(model, variables, examples, heatmaps, faithfulness_images)
                    if faithfulness_images else {}))
  if controls:
    result['controls'] = run_controls(model, variables, examples, heatmaps, layers=layers,
                                      methods=methods, tolerance=tolerance,
                                      pixel_methods=pixel_methods, seed=controls_seed)
  return dict(result=result, heatmaps=heatmaps)
