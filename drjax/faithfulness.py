"""Mask-free faithfulness of CAMs: pytorch-grad-cam 1.5.7's `metrics` as pure, batched JAX.

Each metric perturbs the images with their CAMs, runs the model on the perturbed images and
reports how the target score changes (perturbed minus original, as pytorch-grad-cam's
`PerturbationConfidenceMetric`):
  * ROAD, RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation
    Strategy for Attribution Methods", ICML): the pixels at or above a CAM percentile (most
    relevant first, MoRF) or at or below one (least relevant first, LeRF) are replaced by
    noisy linear imputation, so that the removal itself leaks no shape of the mask.
    `road_combined` = (LeRF - MoRF) / 2 averaged over percentiles: higher is more faithful.
  * `cam_mult_image_confidence_change`: score(image * cam) - score(image), and from it
    `drop_in_confidence` (max(-change, 0)) and `increase_in_confidence` (change > 0), the
    per-image terms of Average Drop and % Increase in Confidence (Chattopadhay et al. 2018,
    "Grad-CAM++", Sec. 5.1).
  * `arcc`: the harmonic mean of Coherency, 1 - Complexity (Poppi et al. 2021, "Revisiting
    the Evaluation of Class Activation Mapping for Explainability", CVPR-W) and the rescaled
    ROAD score, as pytorch-grad-cam's metrics/arcc.py computes it.

Conventions are those of `drjax.gradcam`: `model, variables` is a flax.linen Module with its
variables or an nnx Module with `variables=None`; a plain callable `images -> logits [N, K]`
with `variables=None` also works (it is a static argument: reuse one to compile once).
Images are `[B, H, W, C]` as the model takes them (uint8 RGB is ImageNet-normalised), CAMs
`[B, H, W]` at the images' size, targets None (the class the model predicts for the original
image, kept for its perturbed copies), class ids `[B]` or a callable `logits [K] -> scalar`.
Scores are raw logits (ClassifierOutputTarget) unless `softmax=True` (probabilities,
ClassifierOutputSoftmaxTarget). Every model evaluation of a call (the originals and every
perturbed copy, all percentiles) is one compiled, batched program; `arcc` adds one call of
its CAM method.

Deliberate differences from the reference: ROAD's sparse system is solved by conjugate
gradients with iterative refinement in float32 (equal to scipy's float64 direct solve up
to float32 rounding); its noise comes from a JAX key (`jax.random.key(0)` by default, so a
call is reproducible), not torch's global generator; the original images are scored once
per call, not once per percentile; percentile 'auto' (Otsu) is not offered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.scipy.sparse import linalg as sparse_linalg

from drjax.gradcam import core, taps

Array = jax.Array

# pytorch-grad-cam's defaults: ROADMostRelevantFirst(80), ROADLeastRelevantFirst(20), the
# averagers' and ROADCombined's percentiles, and ARCC's.
MORF_PERCENTILE = 80
LERF_PERCENTILE = 20
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ARCC_PERCENTILES = (20, 40, 60, 80)
ROAD_NOISE = 0.01

# ((row, column) offset, weight) of the eight neighbours in ROAD's linear imputation (Rong et
# al. 2022, Sec. 4.2; pytorch-grad-cam's `neighbors_weights`): edges 1/6, corners 1/12.
NEIGHBOUR_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                     ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def class_probability(logits: Array, cls: Array) -> Array:
  """The softmax probability of class `cls` (pytorch-grad-cam's ClassifierOutputSoftmaxTarget)."""
  return jax.nn.softmax(logits)[cls]


# ----------------------------------------------------------------------------
# Which pixels ROAD removes.


def _percentiles(percentiles, name: str) -> tuple[float, ...]:
  """Checked percentiles in (0, 100] as a tuple of floats."""
  scalar = isinstance(percentiles, str) or np.ndim(percentiles) == 0
  values = (percentiles,) if scalar else tuple(percentiles)
  for p in values:
    if isinstance(p, str):
      raise ValueError(f'{name}={p!r}: only numeric percentiles are supported (not the '
                       f"reference's Otsu threshold 'auto')")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
      raise ValueError(f'{name} must be numbers in (0, 100]; got {p!r}')
    if not 0 < p <= 100:
      raise ValueError(f'{name} must lie in (0, 100] (0 would remove every pixel); got {p}')
  return tuple(float(p) for p in values)


def _rows(percentiles: Sequence[float], n: int, most_relevant_first: bool) -> dict[str, np.ndarray]:
  """numpy's 'linear' percentile of n values, as indices and weights into the sorted values.

  The weights are computed here in float64 and rounded to float32, as `np.percentile` does
  for a Python-number percentile of float32 data, so that the thresholds (and the pixels
  that tie with them) are the reference's.
  """
  virtual = (n - 1) * (np.asarray(percentiles, np.float64) / 100)
  lo = np.floor(virtual)
  gamma = virtual - lo
  last = virtual >= n - 1
  lo = np.where(last, n - 1, lo).astype(np.int32)
  hi = np.where(last, n - 1, lo + 1).astype(np.int32)
  return dict(lo=lo, hi=hi, t=gamma.astype(np.float32), one_minus_t=(1 - gamma).astype(np.float32),
              upper=gamma >= 0.5, most_relevant_first=np.full(len(percentiles),
                                                               most_relevant_first))


def _concat_rows(*rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _removed(cams: Array, rows: dict[str, Array]) -> Array:
  """`[R, B, H, W]` True where row r (a percentile and a direction) removes a pixel."""
  b, h, w = cams.shape
  # The reference ranks 1 - cam for LeRF, rounded in float32 as here.
  values = jnp.stack([cams, 1.0 - cams]).reshape(2, b, h * w)
  ordered = jnp.sort(values, axis=-1)
  side = jnp.where(rows['most_relevant_first'], 0, 1)[:, None]   # [R, 1]
  images = jnp.arange(b)[None, :]
  a = ordered[side, images, rows['lo'][:, None]]   # [R, B]
  z = ordered[side, images, rows['hi'][:, None]]
  diff = z - a
  # numpy's _lerp, from the nearer end, so that t = 0 or 1 gives a data value exactly.
  threshold = jnp.where(rows['upper'][:, None], z - diff * rows['one_minus_t'][:, None],
                        a + diff * rows['t'][:, None])
  kept = values[side[:, 0]] < threshold[..., None]   # the reference keeps value < threshold
  return ~kept.reshape(-1, b, h, w)


_removed_jit = jax.jit(_removed)


def road_masks(cams, percentiles: float | Sequence[float] = PERCENTILES, *,
               most_relevant_first: bool = True) -> Array:
  """The pixels that ROAD removes at each percentile, as pytorch-grad-cam chooses them.

  MoRF at percentile p removes the pixels whose CAM is not below the p-th percentile of the
  image's CAM (numpy's linear interpolation), i.e. the most relevant 100 - p %; LeRF does
  the same on 1 - cam, removing the least relevant 100 - p %. Ties with the threshold are
  removed, so a CAM that is constant on more than p % of its pixels loses more than 100 - p %.

  Args:
    cams: `[B, H, W]`.
    percentiles: one percentile or a sequence of P, each in (0, 100].
    most_relevant_first: MoRF (True) or LeRF (False).

  Returns:
    bool `[P, B, H, W]`, True where a pixel is removed.
  """
  cams = jnp.asarray(cams, jnp.float32)
  if cams.ndim != 3:
    raise ValueError(f'cams must be [B, H, W]; got shape {tuple(cams.shape)}')
  percentiles = _percentiles(percentiles, 'percentiles')
  rows = _rows(percentiles, cams.shape[1] * cams.shape[2], most_relevant_first)
  return _removed_jit(cams, rows)


# ----------------------------------------------------------------------------
# Noisy linear imputation (Rong et al. 2022, Sec. 4.2).


def _neighbours(x: Array) -> list[tuple[float, Array]]:
  """(weight, x shifted so that pixel i holds its neighbour i + offset; 0 outside) per offset."""
  h, w = x.shape[:2]
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  return [(weight, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
          for (dy, dx), weight in NEIGHBOUR_WEIGHTS]


def _impute_one(image: Array, removed: Array, *, tol: float, refinements: int) -> Array:
  """One image `[H, W, C]` with its removed pixels (`[H, W]` bool) linearly imputed.

  Each removed pixel becomes the weighted mean of its in-image neighbours, removed ones
  included: the reference's sparse system, solved here by conjugate gradients on the
  symmetric positive definite operator `s_i x_i - sum_j w_ij x_j` over the removed pixels.
  """
  r = removed[..., None].astype(image.dtype)
  inside = [ok for _, ok in _neighbours(jnp.ones_like(image))]   # 1 where the neighbour exists
  total = sum(w * ok for (_, w), ok in zip(NEIGHBOUR_WEIGHTS, inside, strict=True))   # s_i

  def operator(d):
    # Identity on the kept pixels keeps the operator SPD over the whole image; the
    # right-hand side is 0 there, so the correction stays 0 there.
    return r * (total * d - sum(w * n for w, n in _neighbours(r * d))) + (1 - r) * d

  def residual(x):
    # Summed as neighbour differences, whose float32 rounding scales with the small local
    # differences rather than with the pixel values: refined from this residual the
    # solution reaches float32 rounding, where one CG solve stalls near 1e-4 on 224-px
    # images with 90 % removed.
    diffs = [w * ok * (n - x) for (w, n), ok in zip(_neighbours(x), inside, strict=True)]
    return r * sum(diffs)

  preconditioner = lambda v: v / (r * total + (1 - r))

  def refine(_, x):
    # Iterative refinement: each CG solve reduces the residual by `tol`, the next one
    # starts from the accurately recomputed residual.
    d, _ = sparse_linalg.cg(operator, residual(x), tol=tol, M=preconditioner)
    return x + r * d

  x = jax.lax.fori_loop(0, refinements + 1, refine, (1 - r) * image)
  # With every pixel removed the system is singular and its right-hand side 0: the
  # reference's solver returns zeros there, as CG from 0 does.
  return x


@functools.partial(jax.jit, static_argnames=('tol', 'refinements'))
def _impute(images, removed, noise, rng, *, tol, refinements):
  imputed = jax.vmap(functools.partial(_impute_one, tol=tol, refinements=refinements))(
      images, removed)
  draws = jax.random.normal(rng, images.shape, images.dtype)
  return imputed + noise * removed[..., None] * draws


def noisy_linear_imputation(images, removed, *, noise: float = ROAD_NOISE, rng: Array | None = None,
                            tol: float = 1e-4, refinements: int = 2) -> Array:
  """ROAD's noisy linear imputation (Rong et al. 2022, Sec. 4.2), batched.

  Every removed pixel, per channel, becomes the weighted mean of its in-image 8 neighbours
  (edges 1/6, corners 1/12; removed neighbours included, so the removed region is solved
  jointly), plus `noise * N(0, 1)`; kept pixels are unchanged. If every pixel of an image is
  removed, its removed pixels become 0 plus noise (as the reference's solver gives).

  Args:
    images: float `[B, H, W, C]`.
    removed: bool `[B, H, W]`, True where a pixel is removed (imputed).
    noise: standard deviation of the Gaussian noise added to the imputed pixels.
    rng: key of the noise; None -> `jax.random.key(0)`, so that a call is reproducible.
    tol: relative residual reduction of each conjugate-gradient solve.
    refinements: solves after the first, each on the recomputed residual (iterative
      refinement); with the defaults the result matches the reference's float64 direct
      solve to float32 rounding (~1e-7 on 224-px images with 90 % removed).

  Returns:
    float32 `[B, H, W, C]`.
  """
  images = jnp.asarray(images, jnp.float32)
  removed = jnp.asarray(removed, bool)
  if images.ndim != 4 or removed.shape != images.shape[:3]:
    raise ValueError(f'images must be [B, H, W, C] and removed [B, H, W] to match; got '
                     f'{tuple(images.shape)} and {tuple(removed.shape)}')
  rng = jax.random.key(0) if rng is None else rng
  return _impute(images, removed, jnp.float32(noise), rng, tol=tol, refinements=refinements)


# ----------------------------------------------------------------------------
# Model evaluation.


def _model_inputs(model, variables, apply_kwargs) -> tuple[Any, Any, tuple]:
  """-> (a hashable model or logits function, its variables, static apply kwargs)."""
  if isinstance(model, (nn.Module, nnx.Module)):
    model, variables = taps.pure_model(model, variables)
    return model, variables, taps.static_kwargs(apply_kwargs)
  if not callable(model):
    raise TypeError(f'model must be a flax Module or a callable images -> logits; got '
                    f'{type(model).__name__}')
  if variables is not None or apply_kwargs:
    raise ValueError('a logits function takes the images alone: pass variables=None and no '
                     'apply_kwargs (bind them into the function)')
  return model, None, ()


def _targets(targets: core.Targets, batch: int, softmax: bool):
  """-> (target_fn(logits [K], cls) -> scalar, cls int32 [B]; -1 = predicted class)."""
  target_fn, cls = core.resolve_targets(targets, batch)
  if softmax:
    if callable(targets):
      raise ValueError('softmax=True scores class probabilities; a callable target computes '
                       'its own score from the logits: pass softmax=False')
    target_fn = class_probability
  return target_fn, cls


def _inputs(images, cams) -> tuple[Array, Array]:
  """Images checked as `drjax.gradcam` takes them and CAMs `[B, H, W]` that match them."""
  images = core.prepare_images(images)
  cams = jnp.asarray(cams, jnp.float32)
  if cams.ndim == 2:
    cams = cams[None]
  if tuple(cams.shape) != tuple(images.shape[:3]):
    raise ValueError(f'cams must be [B, H, W] = {tuple(images.shape[:3])} to match images '
                     f'{tuple(images.shape)}; got {tuple(cams.shape)} (resize them with '
                     f'drjax.gradcam.resize)')
  return images, cams


def _logits(model, variables, images, apply_kwargs, batch_size):
  """The model's logits `[N, K]`, in chunks of `batch_size` images if set."""
  def apply(x):
    if isinstance(model, (nn.Module, nnx.GraphDef)):
      return taps.forward(model, variables, x, {}, apply_kwargs=apply_kwargs)[0]
    return model(x)

  n = images.shape[0]
  if batch_size is None or batch_size >= n:
    return apply(images)
  chunks = -(-n // batch_size)
  padded = jnp.pad(images, ((0, chunks * batch_size - n),) + ((0, 0),) * (images.ndim - 1))
  logits = jax.lax.map(apply, padded.reshape(chunks, batch_size, *images.shape[1:]))
  return logits.reshape(chunks * batch_size, -1)[:n]


def _scores(model, variables, originals, perturbed, cls, *, target_fn, apply_kwargs,
            batch_size):
  """Target scores of the originals `[B]` and of `perturbed` `[R, B, ...]` -> `[R, B]`, cls.

  One batched forward pass over all of them; the class of a -1 target is the one
  predicted for the original image, and it is kept for that image's perturbed copies.
  """
  copies, batch = perturbed.shape[:2]
  logits = _logits(model, variables, jnp.concatenate([originals, perturbed.reshape(
      copies * batch, *perturbed.shape[2:])]), apply_kwargs, batch_size)
  cls = jax.vmap(core.predicted)(logits[:batch], cls)
  scores = jax.vmap(target_fn)(logits, jnp.tile(cls, copies + 1)).astype(jnp.float32)
  return scores[:batch], scores[batch:].reshape(copies, batch), cls


# ----------------------------------------------------------------------------
# ROAD (Rong et al. 2022).


@functools.partial(jax.jit, static_argnames=('model', 'target_fn', 'apply_kwargs', 'batch_size',
                                             'tol', 'refinements'))
def _road(model, variables, images, cams, cls, rows, noise, rng, *, target_fn, apply_kwargs,
          batch_size, tol, refinements):
  removed = _removed(cams, rows)   # [R, B, H, W]
  copies, batch = removed.shape[:2]
  tiled = jnp.broadcast_to(images, (copies, *images.shape)).reshape(-1, *images.shape[1:])
  imputed = _impute(tiled, removed.reshape(-1, *removed.shape[2:]), noise, rng, tol=tol,
                    refinements=refinements)
  scores, perturbed, cls = _scores(model, variables, images,
                                   imputed.reshape(copies, batch, *images.shape[1:]), cls,
                                   target_fn=target_fn, apply_kwargs=apply_kwargs,
                                   batch_size=batch_size)
  return scores, perturbed - scores, cls


def road_scores(model, variables, images, cams, *,
                most_relevant_first: float | Sequence[float] = PERCENTILES,
                least_relevant_first: float | Sequence[float] = PERCENTILES,
                targets: core.Targets = None, softmax: bool = False, noise: float = ROAD_NOISE,
                rng: Array | None = None, apply_kwargs: dict[str, Any] | None = None,
                batch_size: int | None = None, tol: float = 1e-4,
                refinements: int = 2) -> dict[str, Array]:
  """ROAD score changes at several percentiles, both directions, from one compiled program.

  For each percentile, the pixels that `road_masks` marks are imputed
  (`noisy_linear_imputation`) and the target score of the imputed image is compared with
  that of the original. The (1 + P1 + P2) * B images run through the model as one batch
  (or in chunks of `batch_size`).

  Args:
    model: a flax.linen Module, an nnx Module (`variables=None`), or a callable
      `images [N, H, W, C] -> logits [N, K]` (`variables=None`).
    variables: the linen model's variables; None otherwise.
    images: `[B, H, W, C]` as the model takes them, or uint8 RGB (`gradcam.prepare_images`).
    cams: `[B, H, W]` at the images' size, larger = more relevant (e.g. in [0, 1]).
    most_relevant_first: MoRF percentiles (P1 of them, each in (0, 100]; () for none).
    least_relevant_first: LeRF percentiles (P2).
    targets: None (the class predicted for the original image), int array `[B]`, or a
      callable `logits [K] -> scalar`.
    softmax: score class probabilities instead of logits (class targets only).
    noise: standard deviation of the imputation noise (the reference's 0.01; 0 for none).
    rng: key of the noise; None -> `jax.random.key(0)`.
    apply_kwargs: hashable keyword arguments of the forward pass, e.g. `{'train': False}`.
    batch_size: images per model call inside the program; None = all at once.
    tol, refinements: of the imputation's solver (`noisy_linear_imputation`).

  Returns:
    dict(scores=`[B]` target scores of the originals,
    most_relevant_first=`[P1, B]`, least_relevant_first=`[P2, B]` score changes (imputed
    minus original, float32), classes=int32 `[B]`, the class scored for each image (the
    arg-max, unused, for a callable target)).
  """
  morf = _percentiles(most_relevant_first, 'most_relevant_first')
  lerf = _percentiles(least_relevant_first, 'least_relevant_first')
  if not morf and not lerf:
    raise ValueError('road_scores needs at least one percentile')
  model, variables, apply_kwargs = _model_inputs(model, variables, apply_kwargs)
  images, cams = _inputs(images, cams)
  target_fn, cls = _targets(targets, images.shape[0], softmax)
  n = cams.shape[1] * cams.shape[2]
  rows = _concat_rows(_rows(morf, n, True), _rows(lerf, n, False))
  rng = jax.random.key(0) if rng is None else rng
  scores, changes, cls = _road(model, variables, images, cams, cls, rows, jnp.float32(noise), rng,
                               target_fn=target_fn, apply_kwargs=apply_kwargs,
                               batch_size=batch_size, tol=tol, refinements=refinements)
  return dict(scores=scores, most_relevant_first=changes[:len(morf)],
              least_relevant_first=changes[len(morf):], classes=cls)


def road_most_relevant_first(model, variables, images, cams, *,
                             percentile: float = MORF_PERCENTILE, **kwargs) -> Array:
  """ROAD, most relevant first (pytorch-grad-cam's ROADMostRelevantFirst).

  The score change when the most relevant 100 - `percentile` % of the pixels are imputed;
  a faithful CAM makes it strongly negative. Other arguments as `road_scores`.

  Returns:
    float32 `[B]`.
  """
  return road_scores(model, variables, images, cams, most_relevant_first=percentile,
                     least_relevant_first=(), **kwargs)['most_relevant_first'][0]


def road_least_relevant_first(model, variables, images, cams, *,
                              percentile: float = LERF_PERCENTILE, **kwargs) -> Array:
  """ROAD, least relevant first (pytorch-grad-cam's ROADLeastRelevantFirst).

  The score change when the least relevant 100 - `percentile` % of the pixels are imputed;
  a faithful CAM keeps it near 0. Other arguments as `road_scores`.

  Returns:
    float32 `[B]`.
  """
  return road_scores(model, variables, images, cams, most_relevant_first=(),
                     least_relevant_first=percentile, **kwargs)['least_relevant_first'][0]


def road_most_relevant_first_average(model, variables, images, cams, *,
                                     percentiles: Sequence[float] = PERCENTILES,
                                     **kwargs) -> Array:
  """Mean over `percentiles` of `road_most_relevant_first` (ROADMostRelevantFirstAverage).

  Returns:
    float32 `[B]`.
  """
  out = road_scores(model, variables, images, cams, most_relevant_first=percentiles,
                    least_relevant_first=(), **kwargs)
  return out['most_relevant_first'].mean(0)


def road_least_relevant_first_average(model, variables, images, cams, *,
                                      percentiles: Sequence[float] = PERCENTILES,
                                      **kwargs) -> Array:
  """Mean over `percentiles` of `road_least_relevant_first` (ROADLeastRelevantFirstAverage).

  Returns:
    float32 `[B]`.
  """
  out = road_scores(model, variables, images, cams, most_relevant_first=(),
                    least_relevant_first=percentiles, **kwargs)
  return out['least_relevant_first'].mean(0)


def road_combined(model, variables, images, cams, *, percentiles: Sequence[float] = PERCENTILES,
                  **kwargs) -> Array:
  """(LeRF average - MoRF average) / 2 over `percentiles` (pytorch-grad-cam's ROADCombined).

  Higher is more faithful: removing the least relevant pixels should cost less than
  removing the most relevant ones. Other arguments as `road_scores`.

  Returns:
    float32 `[B]`.
  """
  out = road_scores(model, variables, images, cams, most_relevant_first=percentiles,
                    least_relevant_first=percentiles, **kwargs)
  return _combined(out)


def _combined(out: dict[str, Array]) -> Array:
  return (out['least_relevant_first'].mean(0) - out['most_relevant_first'].mean(0)) / 2


# ----------------------------------------------------------------------------
# Confidence change of the CAM-weighted image (Chattopadhay et al. 2018, Sec. 5.1).


@functools.partial(jax.jit, static_argnames=('model', 'target_fn', 'apply_kwargs', 'batch_size'))
def _cam_mult(model, variables, images, cams, cls, *, target_fn, apply_kwargs, batch_size):
  scores, perturbed, _ = _scores(model, variables, images, (images * cams[..., None])[None], cls,
                                 target_fn=target_fn, apply_kwargs=apply_kwargs,
                                 batch_size=batch_size)
  return perturbed[0] - scores


def cam_mult_image_confidence_change(model, variables, images, cams, *,
                                     targets: core.Targets = None, softmax: bool = False,
                                     apply_kwargs: dict[str, Any] | None = None,
                                     batch_size: int | None = None) -> Array:
  """score(image * cam) - score(image) (pytorch-grad-cam's CamMultImageConfidenceChange).

  The image (as the model takes it, e.g. ImageNet-normalised) is multiplied by its CAM
  in every channel; 2B images run through the model in one batch.

  Args:
    model, variables, images, targets, softmax, apply_kwargs, batch_size: as `road_scores`.
    cams: `[B, H, W]` at the images' size, usually in [0, 1].

  Returns:
    float32 `[B]`.
  """
  model, variables, apply_kwargs = _model_inputs(model, variables, apply_kwargs)
  images, cams = _inputs(images, cams)
  target_fn, cls = _targets(targets, images.shape[0], softmax)
  return _cam_mult(model, variables, images, cams, cls, target_fn=target_fn,
                   apply_kwargs=apply_kwargs, batch_size=batch_size)


def drop_in_confidence(model, variables, images, cams, **kwargs) -> Array:
  """max(score(image) - score(image * cam), 0) (pytorch-grad-cam's DropInConfidence).

  The per-image term of Average Drop (Chattopadhay et al. 2018, eq. 19, without the division
  by the original score); arguments as `cam_mult_image_confidence_change`.

  Returns:
    float32 `[B]`, >= 0.
  """
  return jnp.maximum(-cam_mult_image_confidence_change(model, variables, images, cams, **kwargs),
                     0.0)


def increase_in_confidence(model, variables, images, cams, **kwargs) -> Array:
  """1.0 where score(image * cam) > score(image), else 0.0 (IncreaseInConfidence).

  The per-image term of % Increase in Confidence (Chattopadhay et al. 2018, eq. 20);
  arguments as `cam_mult_image_confidence_change`.

  Returns:
    float32 `[B]` in {0, 1}.
  """
  change = cam_mult_image_confidence_change(model, variables, images, cams, **kwargs)
  return (change > 0).astype(jnp.float32)


# ----------------------------------------------------------------------------
# ARCC: Complexity, Coherency (Poppi et al. 2021) and ROAD.


def complexity(cams) -> Array:
  """Mean |cam| per image: the L1 norm over the pixel count (Poppi et al. 2021, Sec. 3).

  Args:
    cams: `[B, H, W]`, in [0, 1] for a complexity in [0, 1].

  Returns:
    float32 `[B]`; lower is a sparser, simpler map.
  """
  cams = jnp.asarray(cams, jnp.float32)
  return jnp.abs(cams).reshape(cams.shape[0], -1).mean(-1)


def coherency(cams, masked_cams) -> Array:
  """(Pearson(cams, masked_cams) + 1) / 2 per image (Poppi et al. 2021, Sec. 3).

  Args:
    cams: `[B, H, W]`, the CAMs of the images.
    masked_cams: `[B, H, W]`, the same method's CAMs of `images * cams` for the same targets.

  Returns:
    float32 `[B]` in [0, 1]; 1 when the CAM of the CAM-masked image is the CAM itself.
  """
  a = jnp.asarray(cams, jnp.float32).reshape(len(cams), -1)
  b = jnp.asarray(masked_cams, jnp.float32).reshape(len(masked_cams), -1)
  if a.shape != b.shape:
    raise ValueError(f'cams and masked_cams must have one shape; got {jnp.shape(cams)} and '
                     f'{jnp.shape(masked_cams)}')
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  n = a.shape[1] - 1
  # As the reference: sample statistics (n - 1) and 1e-8 beside the product of the deviations.
  cov = (a * b).sum(-1) / n
  std = jnp.sqrt((a * a).sum(-1) / n) * jnp.sqrt((b * b).sum(-1) / n)
  return (cov / (std + 1e-8) + 1) / 2


def arcc(model, variables, images, cams, cam_fn: Callable[[Array, Any], Array], *,
         percentiles: Sequence[float] = ARCC_PERCENTILES, targets: core.Targets = None,
         **kwargs) -> Array:
  """ARCC: the harmonic mean of Coherency, 1 - Complexity and the rescaled ROAD score.

  As pytorch-grad-cam 1.5.7's metrics/arcc.py (its docstring says geometric mean; its code,
  followed here, takes the harmonic mean):
  3 / (1 / (coherency + 1e-8) + 1 / (1 - complexity + 1e-8) + 1 / (road + 1e-8)), with
  road = clip(2 * road_combined(percentiles), 0, 1). It is ADCC (Poppi et al. 2021) with
  ROAD in place of Average Drop. Costs `road_scores`' (1 + 2P) * B model evaluations and
  one `cam_fn` call on the B CAM-masked images.

  Args:
    model, variables, images, targets: as `road_scores`.
    cams: `[B, H, W]` in [0, 1], at the images' size.
    cam_fn: `(images [B, H, W, C], targets) -> cams [B, H, W]` in [0, 1], the method that
      made `cams`, e.g. `lambda x, t: gradcam.gradcam(model, variables, x, targets=t)`. It
      gets the images as the model takes them, multiplied by their CAMs, and `targets`: the
      callable target if one was given, else the int32 `[B]` classes scored (the predicted
      ones when `targets` is None).
    percentiles: ROAD's percentiles (the reference's (20, 40, 60, 80)).
    **kwargs: `softmax`, `noise`, `rng`, `apply_kwargs`, `batch_size`, `tol`, `refinements`
      of `road_scores`.

  Returns:
    float32 `[B]` in [0, 1]; higher is better.
  """
  images, cams = _inputs(images, cams)
  out = road_scores(model, variables, images, cams, most_relevant_first=percentiles,
                    least_relevant_first=percentiles, targets=targets, **kwargs)
  masked_cams = cam_fn(images * cams[..., None], targets if callable(targets) else out['classes'])
  road = jnp.clip(_combined(out) * 2, 0, 1)
  terms = (1 / (coherency(cams, masked_cams) + 1e-8) + 1 / ((1 - complexity(cams)) + 1e-8)
           + 1 / (road + 1e-8))
  return 3 / terms
