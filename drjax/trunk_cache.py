"""The trunk cache: the frozen trunk's output, computed once per image and view, kept on disk.

In the paper's recipe everything below the first trainable layer is frozen, its BatchNorms on
their running statistics: that part of the forward pass is a fixed function of the image, yet
every train step recomputes it (DenseNet121 at 224 px: ~95% of the step). `find_cut` finds the
last cut point of the model (`model.cut_points`) below which nothing trains; `prepare` computes
the trunk's output there once for every training image (`views` augmented views of each, or
the plain image) and every validation image, and the train step is then fed it at that point
(`drjax.train.train_step(..., cut=...)`), computing only the part above.

On disk, in `<dir>/<model>-<key hash>/`: per split and building process a shard
`<split>-<start>-<end>.npy` [n, views, h, w, C] (float32, or bfloat16 as its uint16 bits), then its
marker `<split>-<start>-<end>.json` with the CRC32 of every view, then `COMPLETE.json` with the
key: everything the content depends on (model, the frozen weights' hash, cut, image size,
views, their seed and augmentation, dataset and split). A changed key is another directory; a
cache whose markers are missing (a killed build) or disagree with its data is rebuilt, never
read.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import ml_dtypes
import numpy as np
from flax import linen as nn
from jax.extend import core as jex_core
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from drjax import distributed, errors, freeze, models
from drjax import mesh as mesh_lib
from drjax.models import common

PyTree = Any

# config.trunk_cache.dtype -> (the features' dtype, the dtype of their bits on disk).
_DTYPES = {'bfloat16': (ml_dtypes.bfloat16, np.uint16), 'float32': (np.float32, np.float32)}
_FORMAT = 1
# config.input fields that change how examples are read or drawn, never their pixels.
_NOT_KEYED = ('manual_dir', 'class_weights', 'num_workers', 'prefetch', 'reader_processes',
              'device_prefetch', 'build_workers', 'with_masks')
# The random stream of a run's seed that draws views (drjax.train's step keys use stream 1).
_VIEW_STREAM = 2
_COMPLETE = 'COMPLETE.json'
# Rows checked per read when a whole shard is verified.
_CHECK_ROWS = 256


def default_config() -> mlc.ConfigDict:
  """The `trunk_cache` block of a training config."""
  c = mlc.ConfigDict()
  c.enabled = False  # cache the frozen trunk's output where there is one (see prepare)
  c.views = 8  # augmented views per training image; 1: the plain image (no augmentation)
  # 'float32': the step on the cache is the step on the images (to rounding); 'bfloat16'
  # halves the disk but rounds the features (tests/test_trunk_cache.py measures by how much).
  c.dtype = 'float32'
  c.dir = ''  # '' = beside the dataset, `<tfds dataset dir>/trunk_cache`
  return c


class TrunkCacheError(errors.UserError, OSError):
  """The trunk cache cannot be written where configured, or a row of it is corrupt."""


@dataclasses.dataclass(frozen=True)
class Cut:
  """Where a forward pass is cut: the fed point and the shapes on either side of it.

  Attributes:
    name: the cut point (`model.cut_points`).
    image_shape: (H, W) of the images the trunk takes.
    shape: (h, w, C) of the trunk's output at `name`.
  """
  name: str
  image_shape: tuple[int, int]
  shape: tuple[int, int, int]

  def model_inputs(self, trunk: jax.Array, dtype: Any) -> tuple[jax.Array, dict]:
    """The model's arguments that feed it `trunk` [B, h, w, C] at the cut.

    Returns:
      (placeholder images [B, H, W, 3], the variable collection holding `trunk`): the
      placeholder gives the forward pass its shapes; what is computed from it below the cut
      is dead code, which XLA drops.
    """
    images = jnp.zeros((trunk.shape[0], *self.image_shape, 3), dtype)
    return images, {common.TRUNK: {self.name: trunk.astype(dtype)}}


# ----------------------------------------------------------------------------- the cut


def find_cut(model: nn.Module, variables: PyTree, labels: PyTree, image_size: int,
             frozen_bn_inference: bool = True) -> Cut | None:
  """The last cut point below which nothing trains and no BatchNorm uses batch statistics.

  One trace of the forward pass (nothing is computed) shows which variables each cut point's
  value depends on. Below the point returned every parameter is frozen and every BatchNorm
  normalises with its running statistics, so its value is a fixed function of one image.

  Args:
    model: a drjax model (`model.cut_points`).
    variables: its `{'params', 'batch_stats'}` (arrays or `jax.ShapeDtypeStruct`s).
    labels: the params' 'trainable'/'frozen' label tree (drjax.freeze).
    image_size: side H = W of the input images.
    frozen_bn_inference: the train step's: whether frozen BatchNorms run on their running
      statistics (with False, the first BatchNorm ends the trunk).

  Returns:
    The Cut, or None when there is none (the first layer trains, e.g. every layer).
  """
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)

  def cut_points(variables, images):
    _, state = model.apply(variables, images, train=False, mutable=[common.TRUNK])
    return state[common.TRUNK]

  closed, shapes = jax.make_jaxpr(cut_points, return_shape=True)(variables, images)
  moving = _moving(variables, labels, frozen_bn_inference) + [False]  # + the images
  tainted = {v for v, m in zip(closed.jaxpr.invars, moving, strict=True) if m}
  for eqn in closed.jaxpr.eqns:
    # Conservative for calls (pjit, custom_jvp): each output depends on every input.
    if any(not isinstance(v, jex_core.Literal) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  fixed = {path[0].key for (path, _), var in zip(jax.tree_util.tree_flatten_with_path(shapes)[0],
                                                 closed.jaxpr.outvars, strict=True)
           if isinstance(var, jex_core.Literal) or var not in tainted}
  names = [name for name in model.cut_points if name in fixed]
  if not names:
    return None
  return Cut(names[-1], (image_size, image_size), tuple(shapes[names[-1]].shape[1:]))


def _moving(variables: PyTree, labels: PyTree, frozen_bn_inference: bool) -> list[bool]:
  """Per leaf of `variables` (in flatten order): whether it trains or belongs to a BatchNorm
  that normalises with the batch's statistics, which a fixed trunk may not contain."""
  label_of = {freeze.path_str(p): label
              for p, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
  frozen = freeze.frozen_module_paths(labels) if frozen_bn_inference else set()
  on_batch = {tuple(p.split('/')[:-1]) for p in freeze.param_paths(variables['batch_stats'])}
  on_batch -= frozen
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    collection, *keys = freeze.path_str(path).split('/')
    trains = collection == 'params' and label_of['/'.join(keys)] == freeze.TRAINABLE
    out.append(trains or tuple(keys[:-1]) in on_batch)
  return out


def make_trunk_fn(model: nn.Module, labels: PyTree, cut: Cut, *,
                  augment: mlc.ConfigDict | None = None, seed: int = 0,
                  dtype: str = 'float32') -> Callable:
  """The trunk's output at `cut`, computed as the train step computes it.

  Train mode with the frozen BatchNorms on their running statistics (as
  `drjax.train.train_step`), so that the step fed this output is the step on the images.

  Args:
    model: the step's model (its compute dtype).
    labels: the params' 'trainable'/'frozen' label tree.
    cut: from `find_cut`.
    augment: the augmentation config of the views (`drjax.data.augment`), or None: for a
      view >= 0 each image is first augmented with the key of (seed, its record index, view),
      so that a view does not depend on its batch.
    seed: the run's seed (for the views).
    dtype: 'bfloat16' or 'float32', of the output.

  Returns:
    `trunk_fn(variables, images uint8 [B, H, W, 3], records int32 [B], view int32)`
    -> [B, h, w, C], jitted; view < 0: the plain images. Functions made with equal arguments
    share their compiled program.
  """
  return functools.partial(
      _trunk_outputs, seed=seed, model=model, cut=cut,
      frozen_modules=frozenset(freeze.frozen_module_paths(labels)),
      augment=None if augment is None else tuple(sorted(augment.items())), dtype=dtype)


@functools.partial(jax.jit, static_argnames=('model', 'cut', 'frozen_modules', 'augment',
                                              'dtype'))
def _trunk_outputs(variables, images, records, view, *, seed, model, cut, frozen_modules,
                   augment, dtype):
  if augment is not None:
    from drjax.data import augment as augment_lib

    augment_fn = augment_lib.make_augment_fn(mlc.ConfigDict(dict(augment)))
    base = jax.random.fold_in(jax.random.key(seed), _VIEW_STREAM)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), view))(records)
    # One program for the views and the plain validation images, which skip the augmentation:
    # a second compilation of the trunk would cost more than the branch.
    images = jax.lax.cond(
        view >= 0,
        lambda: jax.vmap(lambda k, image: augment_fn(k, image[None])[0][0])(keys, images),
        lambda: images.astype(jnp.float32))
  x = models.normalize(images).astype(model.dtype)
  with nn.intercept_methods(freeze.make_frozen_bn_interceptor(frozen_modules)):
    _, state = model.apply(variables, x, train=True, mutable=['batch_stats', common.TRUNK],
                           rngs={'dropout': jax.random.key(0)})
  return state[common.TRUNK][cut.name].astype(_DTYPES[dtype][0])


def eval_step(variables: PyTree, trunk: jax.Array, *, model: nn.Module, cut: Cut) -> jax.Array:
  """Class probabilities [B, K] from the trunk's output [B, h, w, C], BatchNorms on running
  statistics: `drjax.evaluate.eval_step` from the cache."""
  x, fed = cut.model_inputs(trunk, model.dtype)
  logits = model.apply({'params': variables['params'], 'batch_stats': variables['batch_stats'],
                        **fed}, x, train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------- the run's cache


@dataclasses.dataclass
class TrunkCache:
  """A complete, checked trunk cache, read through the grain pipeline (`drjax.data.pipeline`).

  Attributes:
    cut: where the model is fed.
    directory: where the cache lies.
    views: views per training image.
    seed: the seed the views were drawn from.
    built: whether this run built it (else it was found complete and intact).
    nbytes: its size on disk.
  """
  cut: Cut
  directory: pathlib.Path
  views: int
  seed: int
  built: bool
  nbytes: int
  readers: dict[str, _Reader]
  labels: dict[str, np.ndarray]

  def train_load(self) -> _TrainLoad:
    """`load` of `pipeline.make_train_iterator`: a training row in the view drawn for it."""
    return _TrainLoad(self.readers['train'], self.labels['train'], self.views, self.seed)

  def eval_load(self, split: str) -> _EvalLoad:
    """`load` of `pipeline.make_eval_iterator` over `split` ('validation')."""
    return _EvalLoad(self.readers[split], self.labels[split])

  def make_eval_fn(self, model: nn.Module, mesh: jax.sharding.Mesh) -> Callable:
    """Jitted `eval_step` at this cut, its output replicated over `mesh`."""
    return jax.jit(functools.partial(eval_step, model=model, cut=self.cut),
                   out_shardings=NamedSharding(mesh, P()))


def prepare(config: mlc.ConfigDict, model: nn.Module, variables: PyTree, labels: PyTree,
            ds) -> TrunkCache | None:
  """The run's trunk cache, reused when complete and intact, else built; None if off.

  Off unless `config.trunk_cache.enabled`. Where no point below the first trainable layer is a
  fixed function of the image (every layer trains, as from a random init), the run says so in
  one line and trains on images. Each process builds its share of every split's rows and every
  process reads any row: like the data, the directory must be on a filesystem they share.

  Args:
    config: the run's config (trunk_cache, model, input, augment, seed, mixed_precision).
    model: the step's model, in its compute dtype (the cache holds what the step computes).
    variables: the run's `{'params', 'batch_stats'}`; the frozen ones are hashed into the key.
    labels: the params' 'trainable'/'frozen' label tree.
    ds: the run's `pipeline.DatasetSplits` (train and validation are cached).

  Raises:
    TrunkCacheError: the directory cannot be written or lacks the space.
  """
  settings = config.get('trunk_cache')
  if settings is None or not settings.enabled:
    return None
  if settings.dtype not in _DTYPES or settings.views < 1:
    raise errors.ConfigError(f'config.trunk_cache needs dtype in {sorted(_DTYPES)} and views '
                             f'>= 1, got {settings.dtype!r} and {settings.views}')
  cut = find_cut(model, variables, labels, config.input.image_size, config.frozen_bn_inference)
  if cut is None:
    everything = all(label == freeze.TRAINABLE for label in jax.tree.leaves(labels))
    _say('trunk cache: off, ' + ('every layer trains' if everything else
                                 'nothing below the first trainable layer is a fixed function '
                                 'of the image') + '; training on the images')
    return None
  views = settings.views if config.augment_enabled else 1
  sources = {split: source for split, source in (('train', ds.train),
                                                 ('validation', ds.validation))
             if source is not None}
  key = _key(config, cut, variables, labels, ds, sources, views)
  directory = _root(settings, ds) / f'{config.model}-{_sha256(_json(key))[:16]}'
  start = time.time()
  builder = _Builder(config, model, labels, cut, variables, views, key, directory)
  shards, built = _ensure(directory, key, sources, builder)
  dtype = _DTYPES[settings.dtype][0]
  readers = {split: _Reader(directory, split, ranges, dtype) for split, ranges in shards.items()}
  nbytes = sum(r.nbytes for r in readers.values())
  rows = ' + '.join(f'{views if split == "train" else 1} x {len(source)} {split}'
                    for split, source in sources.items())
  how = f'built in {time.time() - start:.0f} s' if built else 'complete and intact'
  _say(f'trunk cache: {config.model} cut at {cut.name} {list(cut.shape)}, {rows} rows '
       f'({settings.dtype}), {nbytes / 2**30:.2f} GiB in {directory}, {how}' +
       ('; views=1 caches the plain images, so there is no augmentation'
        if views == 1 and config.augment_enabled else ''))
  return TrunkCache(cut, directory, views, config.seed, built, nbytes, readers,
                    {split: source.labels for split, source in sources.items()})


def _say(message: str) -> None:
  logging.info('%s', message)
  if distributed.is_main_process():
    print(message, flush=True)


def _root(settings: mlc.ConfigDict, ds) -> pathlib.Path:
  if settings.dir:
    return pathlib.Path(settings.dir).expanduser()
  if ds.builder is None:
    raise errors.ConfigError('config.trunk_cache.dir is required for a dataset without a tfds '
                             'builder')
  return pathlib.Path(str(ds.builder.data_dir)) / 'trunk_cache'


# ----------------------------------------------------------------------------- the key


def _key(config: mlc.ConfigDict, cut: Cut, variables: PyTree, labels: PyTree, ds,
         sources: Mapping[str, Any], views: int) -> dict:
  """Everything the cache's content depends on, as JSON-able values."""
  builder = ds.builder
  return {
      'format': _FORMAT, 'model': config.model, 'cut': cut.name,
      'image_shape': list(cut.image_shape), 'shape': list(cut.shape),
      'compute_dtype': config.mixed_precision, 'dtype': config.trunk_cache.dtype,
      'frozen_variables_sha256': _fixed_variables_sha256(variables, labels,
                                                         config.frozen_bn_inference),
      'views': views,
      'view_seed': config.seed if views > 1 else None,
      'augment': config.augment.to_dict() if views > 1 else None,
      'input': {k: v for k, v in config.input.items() if k not in _NOT_KEYED},
      'dataset': ds.name if builder is None else {'name': builder.info.full_name,
                                                  'data_dir': str(builder.data_dir)},
      'splits': {split: {'examples': len(source),
                         'records_sha256': _sha256(np.asarray(source.indices, np.int64)),
                         'ids_sha256': _sha256('\n'.join(map(str, source.ids)).encode())}
                 for split, source in sources.items()},
  }


def _fixed_variables_sha256(variables: PyTree, labels: PyTree, frozen_bn_inference: bool) -> str:
  """sha256 of the variables that never change in the run: the trunk's weights and statistics."""
  h = hashlib.sha256()
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for (path, leaf), moving in zip(leaves, _moving(variables, labels, frozen_bn_inference),
                                  strict=True):
    if not moving:
      a = _local(leaf)
      h.update(f'{freeze.path_str(path)} {a.dtype} {a.shape}\n'.encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _local(x) -> np.ndarray:
  """A replicated (possibly multi-process) array's value on this host."""
  return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def _sha256(data: bytes | np.ndarray) -> str:
  return hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


def _json(value: Any) -> bytes:
  return json.dumps(value, sort_keys=True).encode()


# ----------------------------------------------------------------------------- on disk


def _ranges(n: int, count: int) -> list[list[int]]:
  """[start, end) of each of `count` processes' contiguous shares of n rows."""
  return [[p * n // count, (p + 1) * n // count] for p in range(count)]


def _ensure(directory: pathlib.Path, key: dict, sources: Mapping[str, Any],
            builder: _Builder) -> tuple[dict[str, list[list[int]]], bool]:
  """The shards of the complete cache in `directory`, built first where needed.

  Process 0 checks a complete cache (every CRC); each process then builds its share of any
  shard missing or damaged, and process 0 writes `COMPLETE.json` last.

  Returns:
    ({split: [[start, end], ...]}, whether anything had to be built).
  """
  complete = directory / _COMPLETE
  if distributed.is_main_process() and complete.exists():
    problem = _check_complete(directory, key)
    if problem:
      _say(f'trunk cache in {directory} is damaged ({problem}); rebuilding it')
      complete.unlink()
  distributed.barrier('trunk_cache/checked')
  built = not complete.exists()
  if built:
    process, count = jax.process_index(), jax.process_count()
    for split, source in sources.items():
      builder.build(split, source, *_ranges(len(source), count)[process])
  distributed.barrier('trunk_cache/built')
  if built and distributed.is_main_process() and not complete.exists():
    shards = {split: _ranges(len(source), jax.process_count())
              for split, source in sources.items()}
    problem = _check_shards(directory, key, shards, full=False)
    if problem:
      raise TrunkCacheError(f'trunk cache in {directory} is incomplete after its build '
                            f'({problem}): its directory must be shared by every process')
    _write_json(complete, {'key': key, 'shards': shards})
    # Shards of an earlier build by another number of processes are no part of this one.
    listed = {f'{split}-{start}-{end}' for split, ranges in shards.items()
              for start, end in ranges}
    for path in [*directory.glob('*-*-*.npy'), *directory.glob('*-*-*.json')]:
      if path.stem not in listed:
        path.unlink(missing_ok=True)
  distributed.barrier('trunk_cache/complete')
  return json.loads(complete.read_text())['shards'], built


def _check_complete(directory: pathlib.Path, key: dict) -> str | None:
  """What is wrong with the complete cache in `directory` (None: nothing, every CRC checked)."""
  try:
    record = json.loads((directory / _COMPLETE).read_text())
  except (OSError, ValueError):
    return f'{_COMPLETE} is unreadable'
  if record.get('key') != key:
    return f'{_COMPLETE} holds another key'
  return _check_shards(directory, key, record.get('shards', {}), full=True)


def _check_shards(directory: pathlib.Path, key: dict, shards: Mapping[str, list],
                  full: bool) -> str | None:
  for split, ranges in shards.items():
    for start, end in ranges:
      problem = _check_shard(directory / f'{split}-{start}-{end}', _expected(key, split, start,
                                                                              end), full)
      if problem:
        return problem
  return None


def _expected(key: dict, split: str, start: int, end: int) -> dict:
  """What a shard's marker must say besides its size and CRCs."""
  return {'key_sha256': _sha256(_json(key)), 'split': split, 'start': start, 'end': end,
          'views': key['views'] if split == 'train' else 1, 'shape': key['shape'],
          'dtype': key['dtype']}


def _check_shard(stem: pathlib.Path, expected: dict, full: bool) -> str | None:
  """What is wrong with shard `stem` (.npy and .json), or None; `full` checks every CRC."""
  marker, data = stem.with_suffix('.json'), stem.with_suffix('.npy')
  try:
    record = json.loads(marker.read_text())
  except (OSError, ValueError):
    return f'{marker.name} is missing or unreadable'
  if {k: record.get(k) for k in expected} != expected:
    return f'{marker.name} describes another shard'
  if not data.is_file() or data.stat().st_size != record.get('bytes'):
    return f'{data.name} is missing or has the wrong size'
  if not full:
    return None
  crcs = np.asarray(record['crc32'], np.uint32)
  try:
    array = np.load(data, mmap_mode='r')
  except (OSError, ValueError):
    return f'{data.name} is unreadable'
  if array.shape[:2] != crcs.shape:
    return f'{data.name} has shape {array.shape}'
  for start in range(0, len(array), _CHECK_ROWS):
    rows = np.asarray(array[start:start + _CHECK_ROWS])
    for (r, v), crc in np.ndenumerate(crcs[start:start + len(rows)]):
      if zlib.crc32(rows[r, v]) != crc:
        return f'{data.name} row {start + r} view {v} fails its CRC32'
  return None


def _write_json(path: pathlib.Path, value: Any) -> None:
  """Writes `path` whole or not at all (a temporary file renamed over it)."""
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'wb') as f:
    f.write(_json(value))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """An flock on `path`: two runs never write one shard; the kernel drops it if one dies."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _Builder:
  """Computes and writes shards: the trunk on this process's devices, a batch at a time."""

  def __init__(self, config: mlc.ConfigDict, model: nn.Module, labels: PyTree, cut: Cut,
               variables: PyTree, views: int, key: dict, directory: pathlib.Path):
    self.config, self.model, self.labels, self.cut = config, model, labels, cut
    self.variables, self.views, self.key, self.directory = variables, views, key, directory
    self._ready = None

  def _setup(self) -> tuple[Callable, PyTree, jax.sharding.Mesh]:
    """(trunk_fn, its variables, the local mesh), made once, only when a shard is built."""
    if self._ready is None:
      trunk_fn = make_trunk_fn(self.model, self.labels, self.cut,
                               augment=self.config.augment if self.views > 1 else None,
                               seed=self.config.seed, dtype=self.config.trunk_cache.dtype)
      mesh = mesh_lib.make_mesh(jax.local_devices())
      variables = {'params': self.variables['params'],
                   'batch_stats': self.variables.get('batch_stats', {})}
      self._ready = (trunk_fn, mesh_lib.replicate(jax.tree.map(_local, variables), mesh), mesh)
    return self._ready

  def build(self, split: str, source, start: int, end: int) -> None:
    """Writes shard [start, end) of `split`, unless an intact one is there."""
    stem = self.directory / f'{split}-{start}-{end}'
    expected = _expected(self.key, split, start, end)
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      with _file_lock(stem.with_suffix('.lock')):
        if _check_shard(stem, expected, full=True) is None:
          return  # built by an earlier (killed) build, or by another run meanwhile
        need = (end - start) * expected['views'] * np.prod(self.cut.shape) * np.dtype(
            _DTYPES[expected['dtype']][1]).itemsize
        free = shutil.disk_usage(self.directory).free
        if need > free:
          raise TrunkCacheError(f'the trunk cache needs {need / 2**30:.1f} GiB in '
                                f'{self.directory}, which has {free / 2**30:.1f} GiB free: set '
                                'config.trunk_cache.dir elsewhere, or enabled=False')
        self._write(stem, expected, source.subset(np.arange(start, end)))
    except OSError as e:
      if isinstance(e, TrunkCacheError):
        raise
      raise TrunkCacheError(f'cannot write the trunk cache in {self.directory} ({e}): set '
                            'config.trunk_cache.dir to a writable folder, or enabled=False'
                            ) from None

  def _write(self, stem: pathlib.Path, expected: dict, source) -> None:
    """The shard's data (renamed into place once whole), then its marker."""
    from drjax.data import pipeline

    trunk_fn, variables, mesh = self._setup()
    views = expected['views']
    store = _DTYPES[expected['dtype']][1]
    tmp = stem.with_name(stem.name + '.npy.tmp')
    data = np.lib.format.open_memmap(tmp, mode='w+', dtype=store,
                                     shape=(len(source), views, *self.cut.shape))
    crcs = np.zeros((len(source), views), np.uint32)
    row = 0
    for batch in pipeline.make_eval_iterator(self.config.input, source,
                                             self.config.eval_batch_size):
      n = int(np.sum(batch['valid']))  # padding rows come last
      records = np.zeros(len(batch['valid']), np.int32)
      records[:n] = source.indices[row:row + n]
      images = mesh_lib.shard_padded(np.asarray(batch['image']), mesh)
      records = mesh_lib.shard_padded(records, mesh)
      for view in range(views):
        view_arg = np.int32(view if views > 1 else -1)
        out = np.asarray(jax.device_get(trunk_fn(variables, images, records, view_arg)))
        out = out[:n].view(store)
        data[row:row + n, view] = out
        crcs[row:row + n, view] = [zlib.crc32(x) for x in out]
      row += n
    data.flush()
    del data
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, stem.with_suffix('.npy'))
    _write_json(stem.with_suffix('.json'), {**expected, 'bytes': stem.with_suffix('.npy').stat(
    ).st_size, 'crc32': crcs.tolist()})


# ----------------------------------------------------------------------------- reading


class _Reader:
  """One split's rows: `read(i, view)` -> [h, w, C], checked against its CRC32."""

  def __init__(self, directory: pathlib.Path, split: str, ranges: list[list[int]], dtype):
    self.paths = [directory / f'{split}-{start}-{end}.npy' for start, end in ranges]
    self.starts = [start for start, _ in ranges]
    self.crcs = [np.asarray(json.loads(p.with_suffix('.json').read_text())['crc32'], np.uint32)
                 for p in self.paths]
    self.nbytes = sum(p.stat().st_size for p in self.paths)
    self.dtype = dtype
    self._arrays = {}

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_arrays': {}}  # memory maps are reopened by each process

  def read(self, i: int, view: int) -> np.ndarray:
    shard = bisect.bisect_right(self.starts, i) - 1
    if shard not in self._arrays:
      self._arrays[shard] = np.load(self.paths[shard], mmap_mode='r')
    r = i - self.starts[shard]
    out = np.array(self._arrays[shard][r, view])
    if zlib.crc32(out) != self.crcs[shard][r, view]:
      raise TrunkCacheError(f'{self.paths[shard]} row {r} view {view} is corrupt (CRC32): '
                            'rerun, which checks the cache and rebuilds what is damaged')
    return out.view(self.dtype)


class _TrainLoad:
  """(example i, stream position k) -> its cached trunk output, in the view drawn for k."""

  def __init__(self, reader: _Reader, labels: np.ndarray, views: int, seed: int):
    self.reader, self.labels, self.views, self.seed = reader, labels, views, seed

  @functools.lru_cache(maxsize=4)  # noqa: B019 -- the instance lives as long as its iterator
  def _views(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, _VIEW_STREAM, epoch]))
    return rng.integers(self.views, size=len(self.labels))

  def __call__(self, position: tuple[int, int]) -> dict[str, np.ndarray]:
    i, k = position
    n = len(self.labels)
    view = int(self._views(k // n)[k % n]) if self.views > 1 else 0
    return {'trunk': self.reader.read(i, view), 'label': np.asarray(self.labels[i], np.int32)}


class _EvalLoad:
  """Example i -> its cached trunk output (the plain image's)."""

  def __init__(self, reader: _Reader, labels: np.ndarray):
    self.reader, self.labels = reader, labels

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    return {'trunk': self.reader.read(i, 0), 'label': np.asarray(self.labels[i], np.int32)}
