"""Which parameters train: label trees from parameter paths, the trainable/frozen split, and
the frozen modules' BatchNorms on their running statistics.

A parameter's path is its '/'-joined key path in the params tree, e.g.
'features/denseblock4/denselayer16/conv2/kernel' (names follow torchvision, so
the paper's "last three dense layers" is `features/denseblock4/denselayer1[4-6]/.*`).
Rules are `(regex, label)` pairs matched with `re.fullmatch`, first match wins
(big_vision `optax.py`, scenic's freeze regexes). The train step differentiates
only the trainable partition, so the frozen backward pass is never built (see
`drjax.train`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import linen as nn

from drjax import errors

TRAINABLE = 'trainable'
FROZEN = 'frozen'

PyTree = Any


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a jax key path (`DictKey`s, `GetAttrKey`s, indices)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def param_paths(params: PyTree) -> list[str]:
  """Every leaf's path string, in tree-flatten order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def make_labels(params: PyTree, rules: Sequence[tuple[str, str]],
                check_unused: Iterable[str] = ()) -> PyTree:
  """Label tree (same structure as `params`) from `(regex, label)` rules.

  Args:
    params: parameter tree (arrays or `ShapeDtypeStruct`s).
    rules: `(regex, label)`; each path takes the label of the first regex that
      fully matches it.
    check_unused: regexes that must match at least one path: a typo in a
      trainable pattern would otherwise silently freeze everything it meant.

  Returns:
    A tree of label strings.

  Raises:
    ValueError: a path that matches no rule (listing them), or a pattern of
      `check_unused` that matches no path.
  """
  compiled = [(re.compile(r), label) for r, label in rules]
  used = set()
  unmatched = []

  def label_of(path, _):
    name = path_str(path)
    for i, (regex, label) in enumerate(compiled):
      if regex.fullmatch(name):
        used.add(rules[i][0])
        return label
    unmatched.append(name)
    return None

  labels = jax.tree_util.tree_map_with_path(label_of, params)
  if unmatched:
    raise errors.ConfigError(
        f'{len(unmatched)} parameter(s) match none of the patterns '
        f'{[r for r, _ in rules]}: {unmatched[:20]}')
  unused = [p for p in check_unused if p not in used]
  if unused:
    examples = param_paths(params)
    raise errors.ConfigError(
        f'pattern(s) {unused} match no parameter. Paths look like: '
        f'{examples[:3]} ... {examples[-3:]}')
  return labels


def trainable_labels(params: PyTree, trainable: Sequence[str]) -> PyTree:
  """Label tree: paths matching any of `trainable` -> 'trainable', the rest 'frozen'.

  Every pattern in `trainable` must match some parameter (a mistyped pattern is
  an error, not a silently frozen layer).
  """
  if isinstance(trainable, str):
    raise TypeError(f'trainable must be a sequence of regexes, got the string {trainable!r}')
  rules = [(p, TRAINABLE) for p in trainable] + [('.*', FROZEN)]
  return make_labels(params, rules, check_unused=trainable)


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
  """Nested dict -> {key tuple: leaf}."""
  out = {}

  def rec(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(prefix + (k,), v)
    else:
      out[prefix] = node

  rec((), tree)
  return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for keys, leaf in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def partition(params: PyTree, labels: PyTree) -> tuple[dict, dict]:
  """Splits a nested-dict params tree into (trainable, frozen) nested dicts.

  Each half holds only its own leaves (no `None` placeholders), so optimizer
  state built from the trainable half exists only for trainable parameters and
  `jax.grad` of a function of the trainable half never sees the frozen ones.
  """
  flat_p, flat_l = _flat(params), _flat(labels)
  if flat_p.keys() != flat_l.keys():
    raise ValueError('params and labels have different structures')
  trainable = {k: v for k, v in flat_p.items() if flat_l[k] == TRAINABLE}
  frozen = {k: v for k, v in flat_p.items() if flat_l[k] != TRAINABLE}
  return _unflat(trainable), _unflat(frozen)


def merge(*trees: Mapping[str, Any]) -> dict:
  """Inverse of `partition`: deep-merges nested dicts with disjoint leaves."""
  flat = {}
  for tree in trees:
    for k, v in _flat(tree).items():
      if k in flat:
        raise ValueError(f'leaf {"/".join(k)} present in more than one tree')
      flat[k] = v
  return _unflat(flat)


def frozen_module_paths(labels: PyTree) -> set[tuple[str, ...]]:
  """Module paths (key tuples without the leaf name) all of whose params are frozen.

  Used to run the BatchNorm layers of frozen stages in inference mode.
  """
  status: dict[tuple[str, ...], bool] = {}
  for keys, label in _flat(labels).items():
    module = keys[:-1]
    status[module] = status.get(module, True) and label != TRAINABLE
  return {m for m, frozen in status.items() if frozen}


def count(params: PyTree, labels: PyTree) -> dict[str, int]:
  """Number of scalars per label, e.g. {'trainable': 2_100_000, 'frozen': 5_000_000}."""
  out: dict[str, int] = {}
  flat_p = _flat(params)
  for keys, label in _flat(labels).items():
    out[label] = out.get(label, 0) + int(getattr(flat_p[keys], 'size', 0))
  return out


def _bn_inference(module: nn.BatchNorm, x: jax.Array) -> jax.Array:
  """BatchNorm with its running statistics, whatever mode the model asked for."""
  mean = module.get_variable('batch_stats', 'mean')
  var = module.get_variable('batch_stats', 'var')
  y = (x - mean.astype(x.dtype)) * jax.lax.rsqrt(var + module.epsilon).astype(x.dtype)
  if module.use_scale:
    y = y * module.get_variable('params', 'scale').astype(x.dtype)
  if module.use_bias:
    y = y + module.get_variable('params', 'bias').astype(x.dtype)
  return y


def make_frozen_bn_interceptor(frozen_modules: set[tuple[str, ...]]):
  """flax method interceptor running the BatchNorms at `frozen_modules` in inference mode.

  A frozen stage then sees the statistics it was trained with (its running averages, e.g.
  ImageNet's) instead of the batch's, and its `batch_stats` are left exactly as they are, as
  in PyTorch fine-tuning with those layers in eval().
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == '__call__' and isinstance(module, nn.BatchNorm)
        and tuple(module.scope.path) in frozen_modules):
      return _bn_inference(module, args[0])
    return next_fun(*args, **kwargs)
  return interceptor
