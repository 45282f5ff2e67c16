"""torchvision state_dicts -> drjax variables: conversion, saving, loading, and where to find them.

Conversion (`from_torchvision`) is a strict rename plus layout changes: conv
kernels OIHW -> HWIO, Linear weights transposed, BatchNorm running statistics
into 'batch_stats', and VGG's first classifier Linear permuted so that it reads
features flattened in NHWC order. Every tensor is used or explicitly skipped
(the classification head when its size differs from `num_classes`); anything
else is an error listing the missing, unexpected and mis-shaped keys.

Converted variables are stored as one msgpack file (flax.serialization) that
also records the architecture: `<dir>/variables.msgpack`, written atomically
(temporary file + rename) so that a crash never leaves a half-written file.

`resolve(arch)` finds ImageNet weights for training, in this order:
  1. an explicit path (a converted directory or msgpack file, or a torchvision
     `.pth`/`.safetensors` file, converted on the fly);
  2. drjax's cache, `$DRJAX_CACHE/<arch>/` (default `~/.cache/drjax/<arch>/`);
  3. torchvision's file in the torch hub cache
     (`$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch/hub/checkpoints/`),
     converted once into drjax's cache;
  4. a download from torchvision's URL into the torch hub cache, checking the
     sha256 prefix in the file name as torch.hub does, only when the download
     host is reachable and `$DRJAX_NO_DOWNLOAD` is unset, `0` or `false`;
  5. otherwise None, with a loud warning: the backbone is randomly initialised.

torch is optional: it is imported only to read `.pth` files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import socket
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import serialization, traverse_util

from drjax import errors, models, runtime

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# torchvision's ImageNet weights (IMAGENET1K_V1: the weights the paper's PyTorch
# 1.7 used; torchvision's DEFAULT for resnet50/101/152 is now IMAGENET1K_V2).
TORCHVISION_URLS: dict[str, str] = {
    'densenet121': 'https://download.pytorch.org/models/densenet121-a639ec97.pth',
    'densenet161': 'https://download.pytorch.org/models/densenet161-8d451a50.pth',
    'densenet169': 'https://download.pytorch.org/models/densenet169-b2777c0a.pth',
    'densenet201': 'https://download.pytorch.org/models/densenet201-c1103571.pth',
    'resnet18': 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'resnet34': 'https://download.pytorch.org/models/resnet34-b627a593.pth',
    'resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'resnet152': 'https://download.pytorch.org/models/resnet152-394f9c45.pth',
    'vgg11': 'https://download.pytorch.org/models/vgg11-8a719046.pth',
    'vgg13': 'https://download.pytorch.org/models/vgg13-19584684.pth',
    'vgg16': 'https://download.pytorch.org/models/vgg16-397923af.pth',
    'vgg19': 'https://download.pytorch.org/models/vgg19-dcbb9e9d.pth',
    'vgg11_bn': 'https://download.pytorch.org/models/vgg11_bn-6002323d.pth',
    'vgg13_bn': 'https://download.pytorch.org/models/vgg13_bn-abd245e5.pth',
    'vgg16_bn': 'https://download.pytorch.org/models/vgg16_bn-6c64b313.pth',
    'vgg19_bn': 'https://download.pytorch.org/models/vgg19_bn-c79401a0.pth',
}
# File names in the hub cache, torchvision's current one first. The ResNet
# files of torchvision < 0.10 hold the same V1 weights under older names.
TORCHVISION_FILENAMES: dict[str, tuple[str, ...]] = {
    arch: (os.path.basename(urllib.parse.urlparse(url).path),)
    for arch, url in TORCHVISION_URLS.items()
}
TORCHVISION_FILENAMES.update({
    'resnet18': ('resnet18-f37072fd.pth', 'resnet18-5c106cde.pth'),
    'resnet34': ('resnet34-b627a593.pth', 'resnet34-333f7ec4.pth'),
    'resnet50': ('resnet50-0676ba61.pth', 'resnet50-19c8e357.pth'),
    'resnet101': ('resnet101-63fe2227.pth', 'resnet101-5d3b4d8f.pth'),
    'resnet152': ('resnet152-394f9c45.pth', 'resnet152-b121ed2d.pth'),
})

VARIABLES_FILE = 'variables.msgpack'
# `config.weights.path` of a config that only makes sense with given weights (a fine-tune
# of an exported run, configs/densenet.py:transfer224): `resolve` refuses it with an error
# that says what to pass, where an empty path would look up ImageNet weights or start from
# a random init.
REQUIRED_PATH = '<required>'
_FORMAT = 'drjax.weights/1'
# torch.hub's convention: the file name holds a prefix of the file's sha256.
_HASH_REGEX = re.compile(r'-([a-f0-9]*)\.')
# torchvision's remapping of the old DenseNet names ('norm.1' -> 'norm1').
_OLD_DENSENET_KEY = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$')
_DOWNLOAD_HOST = ('download.pytorch.org', 443)

Variables = dict[str, Any]
DownloadFn = Callable[[str, pathlib.Path], None]


class WeightsError(errors.UserError, ValueError):
  """A checkpoint that cannot be converted or loaded (the message says why)."""


class MissingWeightsError(errors.UserError, FileNotFoundError):
  """Weights that were asked for by path and are not there."""


# ----------------------------------------------------------------------------
# Conversion.


def _template(model: nn.Module) -> Variables:
  """Shapes of the variables of `model` ({'params', 'batch_stats'} of ShapeDtypeStructs)."""
  return jax.eval_shape(lambda rng: models.init_variables(model, rng), jax.random.key(0))


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  """torchvision state_dict key of a flax leaf: the module path, then torch's leaf name."""
  leaf = {
      ('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
      ('params', 'scale'): 'weight',
      ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var',
  }[(collection, path[-1])]
  return '.'.join(path[:-1] + (leaf,))


def _to_numpy(value: Any) -> np.ndarray:
  """numpy array from a numpy array or torch tensor (torch is never imported here)."""
  if hasattr(value, 'detach'):  # a torch.Tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16; a no-op for float32
    value = value.numpy()  # shares memory with the tensor
  return np.asarray(value)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Old DenseNet names as torchvision remaps them, DataParallel's 'module.' stripped."""
  keys = list(state_dict)
  strip = bool(keys) and all(k.startswith('module.') for k in keys)
  out = {}
  for key, value in state_dict.items():
    key = key[len('module.'):] if strip else key
    match = _OLD_DENSENET_KEY.match(key)
    out[match.group(1) + match.group(2) if match else key] = value
  return out


def _describe(keys: list[str], limit: int = 12) -> str:
  shown = ', '.join(keys[:limit])
  return f'{shown}, ... ({len(keys)} in all)' if len(keys) > limit else shown


def checkpoint_num_classes(arch: str, state_dict: Mapping[str, Any]) -> int | None:
  """Size of the head in a torchvision `state_dict` of `arch` (None if it has none)."""
  weight = state_dict.get('.'.join(models.get_model(arch).head_path) + '.weight')
  return None if weight is None else int(_to_numpy(weight).shape[0])


def from_torchvision(arch: str | nn.Module, state_dict: Mapping[str, Any],
                     num_classes: int = 5) -> Variables:
  """Converts a torchvision state_dict of `arch` into drjax variables.

  Args:
    arch: one of drjax.models.MODEL_NAMES, or an unbound drjax model (for other
      configurations of the same classes; its num_classes is replaced).
    state_dict: torchvision parameter names -> numpy arrays or torch tensors.
    num_classes: size of the head wanted. When the checkpoint's head has another
      size (ImageNet's 1000 classes), the head is skipped, logged, and absent
      from the result; `resolve` (or the caller) initialises it.

  Returns:
    {'params': ..., 'batch_stats': ...}: nested dicts of float32 numpy arrays,
    laid out as `models.get_model(arch, num_classes).init` returns them.

  Raises:
    WeightsError: if any key is missing, unexpected or of the wrong shape.
  """
  if not isinstance(state_dict, Mapping):
    raise WeightsError(f'Expected a state_dict (a mapping of names to tensors), got '
                       f'{type(state_dict).__name__}.')
  state = {k: v for k, v in _normalise_keys(state_dict).items()
           if not k.endswith('num_batches_tracked')}
  if isinstance(arch, nn.Module):
    model, arch = arch.clone(num_classes=num_classes), type(arch).__name__
  else:
    model = models.get_model(arch, num_classes=num_classes)
  head_key = '.'.join(model.head_path)
  template = _template(model)

  skipped = []
  head_weight = state.get(head_key + '.weight')
  checkpoint_classes = None if head_weight is None else _to_numpy(head_weight).shape[0]
  if checkpoint_classes is not None and checkpoint_classes != num_classes:
    skipped = [k for k in (head_key + '.weight', head_key + '.bias') if k in state]

  flat = {}
  missing, mismatched, used = [], [], set(skipped)
  for (collection, *path), shape in traverse_util.flatten_dict(template).items():
    path = tuple(path)
    key = _torch_key(collection, path)
    if key in skipped:
      continue
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = _to_numpy(state[key]).astype(np.float32, copy=False)
    value = _convert_leaf(model, path, value, shape.shape)
    if value.shape != shape.shape:
      mismatched.append(f'{key}: checkpoint {tuple(_to_numpy(state[key]).shape)}, '
                        f'{arch} expects {_torch_shape(model, path, shape.shape)}')
      continue
    flat[(collection,) + path] = value
  unexpected = sorted(set(state) - used)

  if missing or unexpected or mismatched:
    lines = [f'The checkpoint does not match {arch} (wrong architecture, or a truncated '
             f'or modified state_dict):']
    family = _guess_family(state)
    if family and not type(model).__name__.lower().startswith(family.lower()):
      lines[0] += f' it looks like a {family} checkpoint.'
    if missing:
      lines.append(f'  missing keys: {_describe(sorted(missing))}')
    if unexpected:
      lines.append(f'  unexpected keys: {_describe(unexpected)}')
    if mismatched:
      lines.append(f'  shape mismatches: {_describe(mismatched, 6)}')
    raise WeightsError('\n'.join(lines))
  if skipped:
    logger.info('%s: skipped the checkpoint head %s (%d classes, %d wanted); initialise it '
                'freshly.', arch, head_key, checkpoint_classes, num_classes)
  variables = traverse_util.unflatten_dict(flat)
  variables.setdefault('batch_stats', {})
  return variables


def _guess_family(state: Mapping[str, Any]) -> str | None:
  """'DenseNet', 'ResNet' or 'VGG' from a state_dict's key names, for error messages."""
  keys = ' '.join(state)
  if 'denseblock' in keys:
    return 'DenseNet'
  if 'layer1.0.' in keys:
    return 'ResNet'
  if 'features.0.weight' in keys and 'classifier.6.weight' in keys:
    return 'VGG'
  return None


def _convert_leaf(model, path: tuple[str, ...], value: np.ndarray,
                  shape: tuple[int, ...]) -> np.ndarray:
  """torch layout -> flax layout for one tensor (shape checked by the caller)."""
  if path[-1] != 'kernel':
    return value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if value.ndim != 2:
    return value
  if path == ('classifier', '0', 'kernel') and hasattr(model, 'pool_size'):
    # VGG: torch flattens [C, 7, 7] features, drjax [7, 7, C].
    pool = model.pool_size
    out, fan_in = value.shape
    if fan_in % (pool * pool) == 0:
      value = value.reshape(out, fan_in // (pool * pool), pool, pool).transpose(0, 2, 3, 1)
      value = value.reshape(out, fan_in)
  return _transpose(value)


def _transpose(matrix: np.ndarray, block: int = 256) -> np.ndarray:
  """Contiguous matrix.T, copied in blocks, which stay in cache where numpy's copy does not."""
  out = np.empty(matrix.shape[::-1], matrix.dtype)
  for i in range(0, matrix.shape[0], block):
    out[:, i:i + block] = matrix[i:i + block].T
  return out


def _torch_shape(model, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape that would convert to the flax `shape` (for error messages)."""
  if path[-1] != 'kernel':
    return tuple(shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return (shape[1], shape[0])


# ----------------------------------------------------------------------------
# Reading torchvision files.


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a torchvision `.pth` (needs torch) or `.safetensors` file into numpy arrays.

  Raises:
    MissingWeightsError: (a FileNotFoundError) if `path` does not exist.
    WeightsError: if the file is truncated, corrupt, or not a state_dict.
    ImportError: for a `.pth` file when torch is not installed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingWeightsError(f'No checkpoint file at {path}')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file
    try:
      return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises several types for bad files.
      raise WeightsError(f'{path} is not a readable .safetensors file (truncated or '
                         f'corrupt?): {e}') from e
  try:
    import torch  # optional: only .pth files need it
  except ImportError as e:
    raise ImportError(f'Reading {path} needs torch (a .pth file is a torch pickle). Install '
                      'torch, or convert the checkpoint to .safetensors, which drjax reads '
                      'without torch.') from e
  try:
    obj = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
    raise WeightsError(f'{path} is not a readable torch checkpoint (truncated or corrupt, '
                       f'or not a checkpoint at all): {type(e).__name__}: {e}') from e
  if isinstance(obj, Mapping):
    for key in ('state_dict', 'model'):  # training checkpoints that wrap the state_dict
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj or not all(
      isinstance(k, str) and hasattr(v, 'shape') for k, v in obj.items()):
    raise WeightsError(f'{path} does not hold a state_dict (a mapping of names to tensors); '
                       f'it holds a {type(obj).__name__}.')
  return {k: _to_numpy(v) for k, v in obj.items()}


# ----------------------------------------------------------------------------
# Saving and loading converted variables.


def _variables_file(path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  return path if path.suffix == '.msgpack' else path / VARIABLES_FILE


def save(variables: Variables, directory: PathLike, arch: str | None = None) -> pathlib.Path:
  """Writes `variables` to `<directory>/variables.msgpack` atomically.

  Args:
    variables: {'params': ..., 'batch_stats': ...}.
    directory: created if needed.
    arch: recorded so that `load` can refuse another architecture's file.

  Returns:
    The path of the written file.
  """
  target = _variables_file(directory)
  target.parent.mkdir(parents=True, exist_ok=True)
  payload = {
      'format': _FORMAT,
      'arch': arch or '',
      'variables': jax.tree.map(np.asarray, dict(variables)),
  }
  data = serialization.msgpack_serialize(payload)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f'.{target.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return target


def load(arch: str, directory: PathLike) -> Variables:
  """Reads variables written by `save` (or scripts/convert_weights.py) and checks them.

  Args:
    arch: the architecture the variables must belong to.
    directory: the directory given to `save`, or the msgpack file itself.

  Returns:
    {'params': ..., 'batch_stats': ...} of numpy arrays. The head is absent if it
    was converted without one.

  Raises:
    MissingWeightsError: (a FileNotFoundError) if there is no variables file.
    WeightsError: if the file is corrupt or holds another architecture's variables.
  """
  path = _variables_file(directory)
  if not path.is_file():
    raise MissingWeightsError(f'No converted weights at {path}')
  try:
    payload = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several types for bad data.
    raise WeightsError(f'{path} is not a readable drjax weights file (truncated or '
                       f'corrupt?): {type(e).__name__}: {e}') from e
  if not isinstance(payload, dict) or payload.get('format') != _FORMAT:
    raise WeightsError(f'{path} is not a drjax weights file (no {_FORMAT!r} header).')
  if payload['arch'] and payload['arch'] != arch:
    raise WeightsError(f'{path} holds {payload["arch"]} weights, not {arch}.')
  variables = dict(payload['variables'])
  variables.setdefault('batch_stats', {})
  _check_structure(arch, variables, str(path))
  return variables


def _head_classes(arch: str, variables: Variables) -> int | None:
  node = variables.get('params', {})
  for name in models.get_model(arch).head_path:
    if not isinstance(node, Mapping) or name not in node:
      return None
    node = node[name]
  return int(np.shape(node['bias'])[0]) if 'bias' in node else None


def _check_structure(arch: str, variables: Variables, what: str) -> None:
  """Raises WeightsError unless `variables` fit `arch` (the head may be absent)."""
  num_classes = _head_classes(arch, variables)
  template = traverse_util.flatten_dict(
      _template(models.get_model(arch, num_classes=num_classes or 1000)), sep='/')
  flat = traverse_util.flatten_dict(variables, sep='/')
  head = '/'.join(('params',) + models.get_model(arch).head_path) + '/'
  missing = [k for k in template if k not in flat and not (num_classes is None
                                                           and k.startswith(head))]
  unexpected = [k for k in flat if k not in template]
  mismatched = [f'{k}: {tuple(np.shape(flat[k]))} vs {template[k].shape}'
                for k in template if k in flat and tuple(np.shape(flat[k])) != template[k].shape]
  if missing or unexpected or mismatched:
    raise WeightsError(f'{what} does not fit {arch}: missing {_describe(missing)}; '
                       f'unexpected {_describe(unexpected)}; shape mismatches '
                       f'{_describe(mismatched, 6)}')


# ----------------------------------------------------------------------------
# Finding weights for training.


def cache_dir() -> pathlib.Path:
  """drjax's cache of converted weights: $DRJAX_CACHE, else ~/.cache/drjax."""
  return runtime.cache_root()


def torch_hub_checkpoint_dir() -> pathlib.Path:
  """torch.hub's checkpoint directory, found as torch does, without importing torch."""
  torch_home = os.environ.get('TORCH_HOME') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache'), 'torch')
  return pathlib.Path(torch_home).expanduser() / 'hub' / 'checkpoints'


def _network_reachable(timeout: float = 2.0) -> bool:
  try:
    with socket.create_connection(_DOWNLOAD_HOST, timeout=timeout):
      return True
  except OSError:
    return False


def download(url: str, dst: pathlib.Path, timeout: float = 30.0) -> None:
  """Downloads `url` to `dst` atomically, checking the sha256 prefix in its name like torch.hub.

  Raises:
    WeightsError: if the file's hash does not match its name.
  """
  match = _HASH_REGEX.search(os.path.basename(dst))
  dst.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f'.{dst.name}.', suffix='.partial')
  sha256 = hashlib.sha256()
  try:
    with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=timeout) as response:
      while chunk := response.read(1 << 20):
        f.write(chunk)
        sha256.update(chunk)
    if match and not sha256.hexdigest().startswith(match.group(1)):
      raise WeightsError(f'Downloaded {url} has sha256 {sha256.hexdigest()}, expected a '
                         f'hash starting with {match.group(1)}.')
    os.replace(tmp, dst)
  finally:
    pathlib.Path(tmp).unlink(missing_ok=True)


def _download_disabled() -> bool:
  return os.environ.get('DRJAX_NO_DOWNLOAD', '').lower() not in ('', '0', 'false')


def _with_head(arch: str, variables: Variables, num_classes: int,
               init_variables: Variables | None, rng: jax.Array | None) -> Variables:
  """`variables` with a `num_classes` head: kept if it fits, else taken from a fresh init."""
  if _head_classes(arch, variables) == num_classes:
    return variables
  model = models.get_model(arch, num_classes=num_classes)
  head_path = model.head_path
  if init_variables is None:
    rng = jax.random.key(0, impl='rbg') if rng is None else rng
    init_variables = models.init_variables(model, rng)
  fresh = traverse_util.flatten_dict(init_variables['params'])
  fresh = {k[len(head_path):]: v for k, v in fresh.items() if k[:len(head_path)] == head_path}
  params = traverse_util.flatten_dict(variables['params'])
  params = {k: v for k, v in params.items() if k[:len(head_path)] != head_path}
  params.update({head_path + k: np.asarray(v) for k, v in fresh.items()})
  return {**variables, 'params': traverse_util.unflatten_dict(params)}


def _load_any(arch: str, path: pathlib.Path) -> Variables:
  """A converted directory / msgpack file, or a torchvision .pth/.safetensors file."""
  if path.is_dir() or path.suffix == '.msgpack':
    return load(arch, path)
  return from_torchvision(arch, read_state_dict(path), num_classes=1000)


def check_path(arch: str, explicit_path: PathLike) -> pathlib.Path:
  """`explicit_path` as a path that exists; raises for `REQUIRED_PATH` and missing paths."""
  if os.fspath(explicit_path) == REQUIRED_PATH:
    raise WeightsError(
        f'config.weights.path is required by this config, which fine-tunes given weights: '
        f'pass --config.weights.path=DIR, a weights directory of {arch} '
        '(scripts/export_weights.py --workdir RUN --output DIR writes one from a finished run, '
        'scripts/convert_weights.py from a torchvision checkpoint).')
  path = pathlib.Path(explicit_path).expanduser()
  if not path.exists():
    raise MissingWeightsError(f'Configured weights {path} do not exist.')
  return path


def resolve(arch: str, explicit_path: PathLike | None = None, num_classes: int = 5, *,
            init_variables: Variables | None = None, rng: jax.Array | None = None,
            download_fn: DownloadFn | None = download) -> tuple[Variables | None, str]:
  """Finds ImageNet weights for `arch` (lookup order in the module docstring).

  Args:
    arch: one of drjax.models.MODEL_NAMES.
    explicit_path: a converted directory/msgpack file or a torchvision .pth /
      .safetensors file. If given it must exist: no fallback.
    num_classes: head size; a checkpoint head of another size is replaced.
    init_variables: variables of `get_model(arch, num_classes).init`, whose head
      is used when the checkpoint's does not fit (else a fresh init from `rng`).
    rng: key for that fresh init (default key 0).
    download_fn: `fn(url, dst_path)`; None disables downloading, as does the
      environment variable DRJAX_NO_DOWNLOAD=1 (set it in tests).

  Returns:
    (variables, source): source says where they came from ('explicit:<path>',
    'drjax_cache:<path>', 'torch_hub:<path>', 'download:<url>'), or
    (None, 'random_init: ...') when nothing was found.
  """
  finish = lambda v: _with_head(arch, v, num_classes, init_variables, rng)
  if explicit_path is not None:
    path = check_path(arch, explicit_path)
    return finish(_load_any(arch, path)), f'explicit:{path}'

  cached = cache_dir() / arch
  if (cached / VARIABLES_FILE).is_file():
    return finish(load(arch, cached)), f'drjax_cache:{cached / VARIABLES_FILE}'

  filenames = TORCHVISION_FILENAMES.get(arch, ())
  hub = torch_hub_checkpoint_dir()
  for filename in filenames:
    if (hub / filename).is_file():
      variables = from_torchvision(arch, read_state_dict(hub / filename), num_classes=1000)
      save(variables, cached, arch=arch)
      logger.info('Converted %s into %s.', hub / filename, cached)
      return finish(variables), f'torch_hub:{hub / filename}'

  url = TORCHVISION_URLS.get(arch)
  if (url and download_fn is not None and not _download_disabled()
      and _network_reachable()):
    dst = hub / filenames[0]
    logger.info('Downloading %s to %s.', url, dst)
    try:
      download_fn(url, dst)
      variables = from_torchvision(arch, read_state_dict(dst), num_classes=1000)
    except (OSError, WeightsError, ImportError) as e:
      logger.warning('Could not download or convert %s: %s', url, e)
    else:
      save(variables, cached, arch=arch)
      return finish(variables), f'download:{url}'

  reason = (f'no ImageNet weights for {arch}: none configured, none in {cached}, no '
            f'{" or ".join(filenames) or "torchvision file"} in {hub}, and no download')
  logger.warning('!' * 78 + '\n!!! %s.\n!!! The backbone is RANDOMLY INITIALISED.\n' + '!' * 78,
                 reason)
  return None, f'random_init: {reason}'


# ----------------------------------------------------------------------------
# A finished run as a weights directory.


def without_head(arch: str, variables: Variables) -> Variables:
  """`variables` without the classification head, so that `resolve` gives them a fresh one."""
  head_path = models.get_model(arch).head_path
  params = traverse_util.flatten_dict(variables['params'])
  params = {k: v for k, v in params.items() if k[:len(head_path)] != head_path}
  return {**variables, 'params': traverse_util.unflatten_dict(params)}


def export_run(workdir: PathLike, output: PathLike, *, keep_head: bool = False,
               step: int | None = None) -> pathlib.Path:
  """Writes a training run's variables as a weights directory that `config.weights.path` loads.

  Args:
    workdir: a run of `drjax.train.train_and_evaluate`.
    output: the weights directory (created).
    keep_head: keep the run's classification head. By default it is dropped, so that a
      fine-tune from `output` starts with a new, freshly initialised head on the pretrained
      trunk, as the paper's ImageNet recipe does.
    step: checkpoint step; default the latest.

  Returns:
    The path of the written variables file.
  """
  from drjax import evaluate  # evaluate reads checkpoints (orbax), which `load` does not need

  config, _, variables = evaluate.load_run(workdir, step=step)
  variables = jax.tree.map(np.asarray, jax.device_get(
      {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}))
  if not keep_head:
    variables = without_head(config.model, variables)
  _check_structure(config.model, variables, f'the variables of {workdir}')
  return save(variables, output, arch=config.model)
