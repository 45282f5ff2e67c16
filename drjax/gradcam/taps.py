"""Reaching a named layer of any Flax model: a forward pass with a zero perturbation added to
that layer's output, and the list and checks of valid layer names.

A layer is a drjax model's stage name (its `tap`s), a linen submodule path (its `__call__`
intercepted with `nn.intercept_methods`), or an nnx attribute path (the submodule swapped for
a perturbing wrapper in a fresh copy of the module).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

Array = jax.Array


def stage_names(model) -> tuple[str, ...]:
  """A drjax model's tapped stages (`model.stage_names`); () for other models."""
  return tuple(getattr(model, 'stage_names', ()))


def resolve_layers(model, layer: str | Sequence[str] | None) -> tuple[str, ...]:
  """Layer name(s) as a tuple; None -> `model.default_cam_layer`.

  The names themselves are checked against the model when the core is traced (an
  unknown one is a ValueError listing `layer_names`).
  """
  if layer is None:
    layer = getattr(model, 'default_cam_layer', None)
    if layer is None:
      raise ValueError(
          f'layer=None needs {type(model).__name__}.default_cam_layer, which it does not '
          f'have: pass layer=, a "/"-joined submodule path such as "backbone/Block_1" '
          f'(gradcam.layer_names(model, variables, images) lists them)')
  return (layer,) if isinstance(layer, str) else tuple(layer)


def _clean(variables) -> dict:
  """Drops collections that a forward pass here must own."""
  return {k: v for k, v in variables.items() if k not in ('perturbations', 'intermediates')}


def pure_model(model, variables) -> tuple[Any, Any]:
  """-> (a hashable model, its variables): an nnx Module becomes (GraphDef, State)."""
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError(f'{type(model).__name__} is an nnx Module, which holds its own '
                       f'variables: pass variables=None')
    return nnx.split(model)
  if variables is None:
    raise ValueError(f'variables=None is for nnx Modules; {type(model).__name__} needs its '
                     f'variables (e.g. {{"params": ...}})')
  return model, _clean(variables)


def static_kwargs(apply_kwargs: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  """`apply_kwargs` as sorted items: static (hashed) arguments of the compiled programs."""
  items = tuple(sorted((apply_kwargs or {}).items()))
  try:
    hash(items)
  except TypeError as e:
    raise TypeError(f'apply_kwargs must hold hashable flags such as train=False (they are '
                    f'compiled in); got {apply_kwargs!r}') from e
  return items


# The collection, and the name in it, where intercepted submodules leave their outputs: sown
# rather than kept in a Python dict, so that flax carries them out of lifted transforms
# (nn.remat), and apart from the model's own 'intermediates'. `sow` reserves the name in the
# submodule's scope, so it must not be one that a child could have.
_SOWN, _SOWN_KEY = 'gradcam_outputs', '__call__'


def forward(model, variables, images, deltas: dict[str, Array | None], *, apply_kwargs):
  """Runs the model with `deltas[name]` added to layer `name`'s output (None: only captured).

  Returns:
    (logits `[B, K]`, {name: that layer's output, perturbation included}); a name that
    the forward pass never reached is absent.
  """
  if isinstance(model, nnx.GraphDef):
    return _nnx_forward(model, variables, images, deltas, dict(apply_kwargs))
  return _linen_forward(model, variables, images, deltas, dict(apply_kwargs))


def _linen_forward(model, variables, images, deltas, kwargs):
  # drjax stage names win over submodule paths (ResNet's 'layer4' is both, the same tensor).
  taps = {n: d for n, d in deltas.items() if n in stage_names(model)}
  paths = {tuple(n.split('/')): d for n, d in deltas.items() if n not in taps}
  variables = {**variables, 'perturbations': {n: d for n, d in taps.items() if d is not None}}
  mutable = [_SOWN] + (['intermediates'] if taps else [])
  with nn.intercept_methods(functools.partial(_perturb_call, paths)):
    logits, state = model.apply(variables, images, mutable=mutable, **kwargs)
  acts = {n: state['intermediates'][n][0] for n in taps}
  for path in paths:
    sown = functools.reduce(lambda tree, k: tree.get(k, {}), path, state.get(_SOWN, {}))
    if _SOWN_KEY in sown:
      acts['/'.join(path)] = _single_call('/'.join(path), sown[_SOWN_KEY])
  return logits, acts


def _perturb_call(paths, next_fun, args, kwargs, context):
  """A linen method interceptor: adds the delta to the chosen submodules' `__call__` output."""
  out = next_fun(*args, **kwargs)
  path = tuple(context.module.path) if context.method_name == '__call__' else None
  if path in paths:
    out = out if paths[path] is None else out + paths[path]
    context.module.sow(_SOWN, _SOWN_KEY, out)
  return out


def _single_call(name: str, outputs: tuple):
  if len(outputs) > 1:
    raise ValueError(f'Layer {name!r} is called {len(outputs)} times in one forward pass; '
                     f'Grad-CAM needs a single output: choose a submodule that runs once')
  return outputs[0]


def _nnx_forward(graphdef, state, images, deltas, kwargs):
  module = nnx.merge(graphdef, state)
  # A fresh copy, so that this changes nothing outside: BatchNorm on running statistics and
  # no dropout make each image's map its own.
  module.eval()
  captured = {}
  for name, delta in deltas.items():
    *parents, last = name.split('/')
    parent = functools.reduce(_child, parents, module)
    child = _child(parent, last)
    if isinstance(child, nnx.Module):   # unknown paths are reported by the caller
      _set_child(parent, last, functools.partial(_call_perturbed, child, name, delta, captured))
  logits = module(images, **kwargs)
  return logits, {n: _single_call(n, tuple(outs)) for n, outs in captured.items()}


def _call_perturbed(child, name, delta, captured, *args, **kwargs):
  out = child(*args, **kwargs)
  out = out if delta is None else out + delta
  captured.setdefault(name, []).append(out)
  return out


def _child(node, key: str):
  """`node`'s attribute `key`, or item `int(key)` of an nnx.List; None if there is none."""
  if isinstance(node, (nnx.List, list)):
    return node[int(key)] if key.isdigit() and int(key) < len(node) else None
  return getattr(node, key, None)


def _set_child(node, key: str, value) -> None:
  if isinstance(node, (nnx.List, list)):
    node[int(key)] = value
  else:
    setattr(node, key, value)


def layer_names(model, variables, images, *, apply_kwargs: dict[str, Any] | None = None
                ) -> tuple[str, ...]:
  """Every name that `layer` accepts: the stage names, then the submodule paths.

  Args:
    model: a flax.linen Module (with its `variables`) or an nnx Module (`variables=None`).
    variables: the linen model's variables; None for an nnx Module.
    images: `[B, H, W, C]` (only the shape is used: a linen model's submodules are
      found by tracing one forward pass, without computing it).
    apply_kwargs: keyword arguments of the forward pass, e.g. `{'train': False}`.

  Returns:
    drjax stage names (`model.stage_names`), then '/'-joined submodule paths, in call
    order for linen and in `nnx.iter_modules` order for nnx.
  """
  names = stage_names(model)
  model, variables = pure_model(model, variables)
  return names + _submodule_paths(model, variables, images, static_kwargs(apply_kwargs))


def _submodule_paths(model, variables, images, apply_kwargs) -> tuple[str, ...]:
  if isinstance(model, nnx.GraphDef):
    modules = nnx.iter_modules(nnx.merge(model, variables))
    return tuple('/'.join(map(str, path)) for path, _ in modules if path)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path:
      seen.setdefault('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, **dict(apply_kwargs)), variables,
                   jax.ShapeDtypeStruct(images.shape, images.dtype))
  return tuple(seen)


def layer_shapes(model, variables, images, layers, apply_kwargs, reshape) -> dict[str, Any]:
  """Each layer's output shape, from a trace of one forward pass, checked for the CAMs."""
  shapes = jax.eval_shape(
      lambda v, x: forward(model, v, x, dict.fromkeys(layers), apply_kwargs=apply_kwargs)[1],
      variables, images)
  for name in layers:
    if name not in shapes:
      _raise_unreached(name, model, variables, images, apply_kwargs)
    _check_grid(name, shapes[name], reshape)
  return shapes


def _raise_unreached(name, model, variables, images, apply_kwargs):
  """The error for a layer whose output the forward pass did not give: why, and what is valid."""
  model_name = type(nnx.merge(model, variables) if isinstance(model, nnx.GraphDef)
                    else model).__name__
  valid = _submodule_paths(model, variables, images, apply_kwargs)
  if name in valid:
    raise ValueError(f'Layer {name!r} of {model_name} is a submodule whose output cannot be '
                     f'reached: it is not called in the forward pass, or it runs inside a '
                     f'transform that does not carry it out (nn.scan, nn.vmap); choose a '
                     f'layer outside it')
  stages = (f'stage names (model.stage_names): {", ".join(stage_names(model))}; '
            if stage_names(model) else '')
  raise ValueError(f'Unknown layer {name!r} for {model_name}: neither a stage name nor a '
                   f'submodule called in its forward pass; valid layers: {stages}'
                   f'submodule paths: {", ".join(valid)}')


def _check_grid(name: str, out, reshape) -> None:
  """Raises unless the layer's output, reshaped if asked, is one `[B, h, w, C]` array."""
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(f'Layer {name!r} returns {jax.tree.map(lambda s: s.shape, out)}, not one '
                     f'array; choose a submodule that returns its activations alone')
  grid = out if reshape is None else jax.eval_shape(reshape, out)
  if getattr(grid, 'ndim', 0) == 4 and grid.shape[0] == out.shape[0]:
    return
  if reshape is None:
    raise ValueError(f'Layer {name!r} outputs shape {tuple(out.shape)}; the CAM methods need '
                     f'[B, h, w, C]: pass reshape=, e.g. reshape=gradcam.vit_reshape('
                     f'num_prefix_tokens=1) for ViT tokens [B, 1 + h*w, C]')
  raise ValueError(f'reshape turned layer {name!r} output {tuple(out.shape)} into '
                   f'{getattr(grid, "shape", grid)}; it must return [B, h, w, C]')


def reshape_tokens(tokens: Array, num_prefix_tokens: int = 1) -> Array:
  """Transformer tokens `[B, P + h*w, C]` -> a square grid `[B, h, w, C]`, prefix dropped.

  As pytorch-grad-cam's `reshape_transform` for ViT (P = 1, the class token) and Swin
  (P = 0); the patch tokens are taken in row-major order.
  """
  if tokens.ndim != 3:
    raise ValueError(f'reshape_tokens expects tokens [B, N, C]; got shape {tokens.shape}')
  batch, n, channels = tokens.shape
  side = math.isqrt(n - num_prefix_tokens)
  if side * side != n - num_prefix_tokens:
    raise ValueError(f'{n} tokens less {num_prefix_tokens} prefix token(s) do not form a '
                     f'square grid; pass your own reshape for this layer')
  return tokens[:, num_prefix_tokens:].reshape(batch, side, side, channels)


@dataclasses.dataclass(frozen=True)
class _TokenGrid:
  """`reshape_tokens` with a fixed prefix; hashable by value, so that it compiles once."""
  num_prefix_tokens: int

  def __call__(self, tokens: Array) -> Array:
    return reshape_tokens(tokens, self.num_prefix_tokens)


def vit_reshape(num_prefix_tokens: int = 1) -> Callable[[Array], Array]:
  """A `reshape` for ViT-style layers: `[B, P + h*w, C]` -> `[B, h, w, C]` (`reshape_tokens`).

  Args:
    num_prefix_tokens: tokens before the patches (1: the class token; 0 for Swin).
  """
  return _TokenGrid(num_prefix_tokens)


def grid(tree: dict[str, Array], reshape) -> dict[str, Array]:
  return tree if reshape is None else {n: reshape(x) for n, x in tree.items()}
