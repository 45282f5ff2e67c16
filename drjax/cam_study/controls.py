"""Controls of the CAM study: the model-parameter randomisation test and an untrained network.

Adebayo et al. 2018 ("Sanity checks for saliency maps", Sec. 3.1): re-initialise a trained
model's layers from the top down (cascading) and recompute its maps; a map that does not
change does not explain what the model learned. Which parameters lie "above" a stage is read
from the model's own computation (the parameters its output at the stage does not depend on),
so the cascade needs no per-architecture table. The fresh values all come from one new init of
the same architecture, so the cascade ends at the untrained network, the second control.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.extend import core as jex_core
from scipy import ndimage, stats

from drjax import gradcam, models

Path = tuple[str, ...]  # a leaf's path in the variables, collection first
Variables = dict[str, Any]

HEAD = 'head'
UNTRAINED = 'untrained'  # every parameter re-initialised: the end of the cascade


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of the cascade: its name and the variable leaves it re-initialises.

  Attributes:
    name: 'head', or the lowest stage whose parameters it re-initialises ('denseblock4': the
      head and every layer down to denseblock4, those of transition3 included).
    leaves: paths of the re-initialised leaves (params and BatchNorm statistics).
  """
  name: str
  leaves: frozenset[Path]


def fresh_variables(model, image_size: int, seed: int = 0) -> Variables:
  """A new random init of `model` (`drjax.models.init_variables`), as numpy arrays."""
  variables = models.init_variables(model, jax.random.key(seed), image_size)
  return jax.tree.map(np.asarray, jax.device_get(variables))


def every_leaf(variables: Variables) -> frozenset[Path]:
  """The paths of all of `variables`' leaves."""
  return frozenset(traverse_util.flatten_dict(variables))


def _used_inputs(jaxpr, output: int) -> list[bool]:
  """Which of `jaxpr`'s inputs its `output`-th output depends on (backward data flow).

  A call inside it (a jitted or custom-gradient function) counts as one operation that needs
  all of its inputs: that can only over-state the dependencies, never miss one.
  """
  out = jaxpr.outvars[output]
  needed = {out} if isinstance(out, jex_core.Var) else set()
  for eqn in reversed(jaxpr.eqns):
    if any(isinstance(v, jex_core.Var) and v in needed for v in eqn.outvars):
      needed.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
  return [v in needed for v in jaxpr.invars]


def stage_dependencies(model, variables: Variables, stages: Sequence[str],
                       image_size: int) -> dict[str, frozenset[Path]]:
  """The variable leaves each named stage's activations depend on (traced, not computed)."""
  flat = traverse_util.flatten_dict(variables)
  keys = list(flat)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  def stage_acts(*leaves):
    v = traverse_util.unflatten_dict(dict(zip(keys, leaves, strict=True)))
    _, state = model.apply(v, x, train=False, mutable=['intermediates'])
    return tuple(state['intermediates'][name][0] for name in stages)

  abstract = [jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for v in flat.values()]
  jaxpr = jax.make_jaxpr(stage_acts)(*abstract).jaxpr
  return {name: frozenset(k for k, used in zip(keys, _used_inputs(jaxpr, i), strict=True)
                          if used)
          for i, name in enumerate(stages)}


def cascade(model, variables: Variables, layers: Sequence[str], image_size: int) -> list[Step]:
  """The randomisation cascade over the study's `layers` (fine to coarse), top first.

  'head' re-initialises what no named stage depends on (DenseNet's classifier, ResNet's fc,
  VGG's three classifier layers); then each layer from the coarsest up to the second finest
  re-initialises everything the next finer layer does not depend on (for DenseNet's
  denseblock2/3/4: down to denseblock4, then down to denseblock3).
  """
  stages = tuple(dict.fromkeys(gradcam.stage_names(model) + tuple(layers)))
  deps = stage_dependencies(model, variables, stages, image_size)
  every = every_leaf(variables)
  steps = [Step(HEAD, every - frozenset().union(*deps.values()))]
  for coarse, fine in zip(layers[::-1], layers[::-1][1:], strict=False):
    steps.append(Step(coarse, every - deps[fine]))
  return [s for s in steps if s.leaves]


def reinitialise(variables: Variables, fresh: Variables, leaves: frozenset[Path]) -> Variables:
  """`variables` with the `leaves` taken from `fresh` (same structure)."""
  flat, new = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(fresh)
  return traverse_util.unflatten_dict({k: new[k] if k in leaves else v for k, v in flat.items()})


def describe(params: dict, leaves: frozenset[Path]) -> list[str]:
  """The largest parameter subtrees all of whose leaves are in `leaves` ('features/norm5')."""
  out = []

  def visit(node, path):
    flat = traverse_util.flatten_dict(node) if isinstance(node, dict) else {(): node}
    inside = [('params',) + path + k in leaves for k in flat]
    if all(inside):
      out.append('/'.join(path))
    elif any(inside):
      for name, child in node.items():
        visit(child, path + (name,))

  for name, child in params.items():
    visit(child, (name,))
  return out


def parameter_fraction(params: dict, leaves: frozenset[Path]) -> float:
  """The share of the parameters (by count) among `leaves`."""
  sizes = {('params',) + k: np.size(v) for k, v in traverse_util.flatten_dict(params).items()}
  return sum(n for k, n in sizes.items() if k in leaves) / max(sum(sizes.values()), 1)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rank correlation of two maps' pixels; NaN if either map is constant."""
  a, b = np.ravel(a), np.ravel(b)
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return float('nan')
  return float(stats.spearmanr(a, b).statistic)


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
  """Mean structural similarity of two maps in [0, 1] (Wang et al. 2004, Eq. 13; Gaussian
  window of `sigma` px, K1 = 0.01, K2 = 0.03, dynamic range 1)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  c1, c2 = 0.01 ** 2, 0.03 ** 2

  def blur(x):
    return ndimage.gaussian_filter(x, sigma, mode='reflect', truncate=3.5)

  mu_a, mu_b = blur(a), blur(b)
  var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
  cov = blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) /
       ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return float(s.mean())


def similarity(trained: dict[str, np.ndarray], other: dict[str, np.ndarray]
               ) -> dict[str, dict[str, float]]:
  """Per 'method@layer' of both: mean rank correlation and SSIM between the two models' maps
  of each image, and `n`, the images whose correlation is defined (neither map constant)."""
  out = {}
  for key, maps in trained.items():
    if key not in other:
      continue
    rho = np.array([rank_correlation(m, o) for m, o in zip(maps, other[key], strict=True)])
    sim = [ssim(m, o) for m, o in zip(maps, other[key], strict=True)]
    defined = ~np.isnan(rho)
    out[key] = dict(spearman=float(rho[defined].mean()) if defined.any() else float('nan'),
                    ssim=float(np.mean(sim)), n=int(defined.sum()))
  return out
