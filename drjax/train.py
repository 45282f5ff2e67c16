"""Training and evaluation of the DR grading backbones (paper sections 2.3-2.3.3).

The recipe: an ImageNet-pretrained backbone with a new 5-way head, only the last
block(s) trainable (`config.trainable`, see `drjax.freeze`), Adam at 1e-4,
cross-entropy. `train_and_evaluate(config, workdir)` runs it end to end and
leaves in `workdir`: `checkpoints/` (orbax), `tensorboard/`, `metrics.jsonl`,
`metrics.json`, `loss_curve.png`, `config.json`, `weights_source.txt` and
`gradcam/`. `load_run(workdir)` gives back `(config, model, variables)`.

The train step is one pure jitted function (big_vision's update_fn): it
differentiates only the trainable partition of the parameters, so the frozen
trunk's backward pass is never built, and runs data-parallel over all local
devices through `jax.jit` on a `Mesh` (batch on 'data', state replicated).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from drjax import checkpoint, distributed, freeze, models
from drjax.models import common as models_common

PyTree = Any

_COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

_OPTIMIZERS = {
    'adam': lambda lr: optax.adam(lr),
    'sgd': lambda lr: optax.sgd(lr, momentum=0.9),
}
_SCHEDULES = ('constant', 'cosine')

# Called as `_step_hook(step)` after every step's bookkeeping. A no-op; tests
# replace it (e.g. to SIGKILL the process at a chosen step).
_step_hook: Callable[[int], None] | None = None


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, number of steps taken.
    params: the model's full parameter tree (trainable and frozen).
    batch_stats: BatchNorm running statistics.
    opt_state: optimizer state of the trainable partition only.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def make_schedule(config_optimizer: mlc.ConfigDict, num_steps: int) -> optax.Schedule:
  """Learning rate per step: `schedule` 'constant' (the paper) or 'cosine' decay to 0.

  Both ramp up linearly from 0 over `warmup_steps` (0: no warm-up).
  """
  c = config_optimizer
  schedule, warmup = c.get('schedule', 'constant'), c.get('warmup_steps', 0)
  if schedule not in _SCHEDULES:
    raise ValueError(f'unknown optimizer.schedule {schedule!r}; choose one of {_SCHEDULES}')
  if not 0 <= warmup < max(num_steps, 1):
    raise ValueError(f'optimizer.warmup_steps={warmup} must be in [0, num_steps={num_steps})')
  if schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, warmup, num_steps, end_value=0.0)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup),
                                 optax.constant_schedule(c.lr)], [warmup])
  return optax.constant_schedule(c.lr)


def make_optimizer(config_optimizer: mlc.ConfigDict,
                   num_steps: int = 0) -> optax.GradientTransformation:
  """optax transformation named by `config.optimizer.name` ('adam' in the paper).

  Args:
    config_optimizer: `config.optimizer` (name, lr, and optionally schedule, warmup_steps).
    num_steps: length of the run, which a 'cosine' schedule decays over.
  """
  if config_optimizer.name not in _OPTIMIZERS:
    raise ValueError(f'unknown optimizer {config_optimizer.name!r}; '
                     f'choose one of {sorted(_OPTIMIZERS)}')
  return _OPTIMIZERS[config_optimizer.name](make_schedule(config_optimizer, num_steps))


def create_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation,
                       labels: PyTree) -> TrainState:
  """TrainState at step 0; the optimizer state covers the trainable partition only."""
  trainable, _ = freeze.partition(variables['params'], labels)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(trainable))


def make_mesh(devices=None) -> Mesh:
  """1-D mesh over all devices of all processes (process-major), axis 'data'."""
  devices = distributed.global_devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


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

  A frozen stage then sees the statistics it was trained with (its running
  averages, e.g. ImageNet's) instead of the batch's, and its `batch_stats` are
  left exactly as they are, as in PyTorch fine-tuning with those layers in eval().
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == '__call__' and isinstance(module, nn.BatchNorm)
        and tuple(module.scope.path) in frozen_modules):
      return _bn_inference(module, args[0])
    return next_fun(*args, **kwargs)
  return interceptor


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy; logits [B, K], integer labels [B] -> [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, labels: PyTree,
               augment_fn: Callable | None, frozen_bn_inference: bool,
               compute_dtype: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch (bind the keyword args with functools.partial).

  Args:
    state: current TrainState (donated by the jitted wrapper).
    batch: `image` uint8 [B, H, W, 3], `label` int32 [B].
    rng: the run's base key; this step's key is `fold_in(rng, state.step)`.
    model: flax module (`models.get_model`).
    tx: optimizer over the trainable partition.
    labels: label tree ('trainable'/'frozen') of the params (`drjax.freeze`).
    augment_fn: `drjax.data.augment.make_augment_fn(...)` or None.
    frozen_bn_inference: run BatchNorms of fully frozen modules with running stats.
    compute_dtype: dtype the normalised images are cast to; the model's own
      `dtype` (e.g. `get_model(..., dtype=jnp.bfloat16)`) sets its compute dtype
      while its parameters, the gradients and the optimizer stay float32.

  Returns:
    `(new_state, metrics)` with scalar `loss`, `accuracy`, `grad_norm`.
  """
  rng = jax.random.fold_in(rng, state.step)
  aug_rng, dropout_rng = jax.random.split(rng)
  images = batch['image']
  if augment_fn is not None:
    images, _ = augment_fn(aug_rng, images)
  x = models_common.normalize(images).astype(compute_dtype)
  trainable, frozen = freeze.partition(state.params, labels)
  frozen_modules = freeze.frozen_module_paths(labels) if frozen_bn_inference else set()

  def loss_fn(trainable):
    # Only `trainable` is differentiated: the frozen half is a constant, so XLA
    # never builds the backward pass below the first trainable layer.
    params = freeze.merge(trainable, frozen)
    with nn.intercept_methods(make_frozen_bn_interceptor(frozen_modules)):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
          mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(cross_entropy(logits, batch['label']))
    return loss, (logits, updates.get('batch_stats', state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats,
                             state.batch_stats)
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      # Norm of the trainable gradients only (reading the frozen ones would bring
      # their backward pass back).
      'grad_norm': optax.tree.norm(grads),
  }
  new_state = state.replace(step=state.step + 1, params=freeze.merge(trainable, frozen),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, labels: PyTree, *,
                    augment_fn: Callable | None = None, frozen_bn_inference: bool = True,
                    mixed_precision: str = 'float32', mesh: Mesh | None = None):
  """`train_step` with its static pieces bound, jitted once with the state donated.

  For `mixed_precision='bfloat16'` pass a model built with `dtype=jnp.bfloat16`
  (`compute_model`): bf16 activations and matmuls, float32 master weights.

  With a mesh, the state (and metrics) come out replicated and the batch is
  expected sharded on 'data' (see `shard_batch`).
  """
  if mixed_precision not in _COMPUTE_DTYPES:
    raise ValueError(f'mixed_precision must be one of {sorted(_COMPUTE_DTYPES)}, '
                     f'got {mixed_precision!r}')
  step_fn = functools.partial(
      train_step, model=model, tx=tx, labels=labels, augment_fn=augment_fn,
      frozen_bn_inference=frozen_bn_inference,
      compute_dtype=_COMPUTE_DTYPES[mixed_precision])
  kwargs = {}
  if mesh is not None:
    kwargs['out_shardings'] = NamedSharding(mesh, P())
  return jax.jit(step_fn, donate_argnums=(0,), **kwargs)


def eval_step(variables: PyTree, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Class probabilities [B, K] for uint8 images [B, H, W, 3] (inference-mode BN)."""
  logits = model.apply(variables, models_common.normalize(images), train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded on 'data' along axis 0."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def evaluate(model: nn.Module, variables: PyTree, batches: Iterator[Mapping[str, np.ndarray]],
             mesh: Mesh, eval_fn: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs the model over an eval iterator (padded batches with `valid`).

  Returns:
    `(labels [N] int, probs [N, K] float32)` over the valid examples.
  """
  eval_fn = eval_fn or jax.jit(functools.partial(eval_step, model=model))
  # The weights are fixed over an evaluation: their Winograd kernels are computed once
  # (ResNet101 at 64 px, batch 16, two cores: 143 -> 129 ms a batch).
  variables = models.with_winograd_kernels(model, replicate(variables, mesh))
  all_labels, all_probs = [], []
  for batch in batches:
    batch = dict(batch)
    valid = np.asarray(batch.pop('valid', np.ones(len(batch['label']), bool)))
    probs = eval_fn(variables, shard_batch({'image': batch['image']}, mesh)['image'])
    probs = np.asarray(jax.device_get(probs))
    # probs cover the global batch; labels/valid are this process's rows of it.
    valid = distributed.gather_rows(valid)
    all_probs.append(probs[valid])
    all_labels.append(distributed.gather_rows(batch['label'])[valid])
  if not all_probs:
    raise ValueError('the evaluation split is empty')
  return np.concatenate(all_labels).astype(np.int64), np.concatenate(all_probs)


def eval_summary(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float]:
  """Loss, accuracy and quadratic weighted kappa of validation predictions."""
  from drjax import metrics as drjax_metrics

  loss = -np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)))
  preds = probs.argmax(-1)
  return {
      'val_loss': float(loss),
      'val_accuracy': float(np.mean(preds == labels)),
      'val_kappa': float(drjax_metrics.quadratic_weighted_kappa(labels, preds,
                                                                num_classes=num_classes)),
  }


class MetricWriter:
  """metrics.jsonl (one JSON object per log step) + TensorBoard scalars."""

  def __init__(self, workdir: pathlib.Path, start_step: int):
    self.path = workdir / 'metrics.jsonl'
    # A resumed run replays the steps after its checkpoint: drop their old lines.
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)['step'] <= start_step]
      self.path.write_text(''.join(line + '\n' for line in kept))
    self.tb = None
    try:
      import tensorboardX
      # purge_step makes TensorBoard drop the killed run's events after the checkpoint.
      self.tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'),
                                           purge_step=start_step or None)
    except ImportError:
      logging.warning('tensorboardX is not installed: no TensorBoard events '
                      '(pip install tensorboardX).')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    with self.path.open('a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


class _NoWriter:
  """MetricWriter of the processes other than 0."""

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def close(self) -> None:
    pass


def read_metrics_jsonl(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loud_warning(message: str) -> None:
  banner = '!' * 78
  text = f'\n{banner}\n!! {message}\n{banner}\n'
  logging.warning(text)


def resolve_weights(config: mlc.ConfigDict, init_variables: PyTree) -> tuple[PyTree | None, str]:
  """Pretrained variables via `drjax.weights.resolve`, or (None, reason) for random init."""
  if not config.weights.pretrained:
    return None, 'random init (config.weights.pretrained=False)'
  try:
    from drjax import weights
  except ImportError as e:
    return None, f'random init (drjax.weights unavailable: {e})'
  variables, source = weights.resolve(config.model, explicit_path=config.weights.path or None,
                                      num_classes=config.num_classes,
                                      init_variables=init_variables)
  return variables, source


def choose_trainable(config: mlc.ConfigDict, pretrained: bool) -> list[str]:
  """The trainable patterns a run uses.

  `config.trainable` with pretrained weights. From a random init, freezing the
  trunk would train a head on random features, so by default
  (`config.weights.random_init_trains_all`) everything trains.
  """
  if not pretrained and config.weights.random_init_trains_all:
    return ['.*']
  return list(config.trainable)


def _abstract(tree: PyTree, sharding) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _check_workdir_config(workdir: pathlib.Path, config: mlc.ConfigDict) -> None:
  path = workdir / 'config.json'
  if not path.exists():
    return
  old = json.loads(path.read_text())
  for key in ('model', 'num_classes'):
    if key in old and old[key] != config[key]:
      raise checkpoint.IncompatibleCheckpointError(
          f'{workdir} holds a run of {key}={old[key]!r}, but this run has {key}={config[key]!r}. '
          'Use a fresh --workdir for a different architecture, or delete the old one.')


def panel_indices(labels: np.ndarray, n: int) -> np.ndarray:
  """Up to `n` indices of `labels` for a figure: one per grade, highest grade first, repeating.

  The first validation images of a skewed set are mostly grade 0, whose maps show
  no lesion; this picks e.g. grades 4, 3, 2, 1 for n=4 (skipping absent grades).
  """
  labels = np.asarray(labels)
  if n <= 0 or labels.size == 0:
    return np.zeros((0,), np.int64)
  by_grade = [np.flatnonzero(labels == g) for g in np.unique(labels)[::-1]]
  picks = [idx[i] for i in range(max(map(len, by_grade))) for idx in by_grade if i < len(idx)]
  return np.asarray(picks[:n], np.int64)


def _write_gradcam_panel(model, variables, labels, probs, images, path: pathlib.Path) -> str:
  """Grad-CAM of the predicted class for a few validation images, as one PNG."""
  try:
    import drjax.gradcam
  except ImportError as e:
    return f'skipped: drjax.gradcam not importable ({e})'
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  x = models_common.normalize(images)
  heatmaps = np.asarray(drjax.gradcam.gradcam(model, variables, x))
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 5), squeeze=False)
  for i in range(n):
    axes[0, i].imshow(images[i])
    axes[0, i].set_title(f'grade {labels[i]} / pred {probs[i].argmax()}', fontsize=8)
    axes[1, i].imshow(images[i])
    axes[1, i].imshow(heatmaps[i], cmap='jet', alpha=0.45, vmin=0, vmax=1)
    for ax in axes[:, i]:
      ax.axis('off')
  fig.suptitle('Grad-CAM of the predicted grade (validation images)', fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return str(path)


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir's lock."""


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """Holds an exclusive lock on `workdir/.lock` for one run (process 0 only).

  Two runs writing one workdir would interleave checkpoints and metrics and
  overwrite each other's results. The lock is an flock, so the kernel drops it
  when its holder dies, even by SIGKILL: a killed run never blocks its resume.
  """
  if not distributed.is_main_process():
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / '.lock'
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      raise WorkdirBusyError(
          f'{workdir} is in use by another drjax run ({holder}). Wait for it to finish, '
          'stop it, or pass another --workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)


def train_and_evaluate(config: mlc.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains `config.model` on `config.input`, resuming from `workdir` when it has a checkpoint.

  Args:
    config: a config of `configs/` (see `configs/densenet.py`).
    workdir: output directory (created).

  Returns:
    The final validation metrics (`drjax.metrics.classification_report` plus
    run information), also written to `workdir/metrics.json`.

  Raises:
    FloatingPointError: a non-finite training loss or gradient (the last
      checkpoint saved before it is kept).
    drjax.checkpoint.IncompatibleCheckpointError: `workdir` belongs to another model.
    WorkdirBusyError: another run is using `workdir`.
  """
  workdir = pathlib.Path(workdir)
  with workdir_lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: mlc.ConfigDict, workdir: pathlib.Path) -> dict:
  """train_and_evaluate's body, run while holding the workdir lock."""
  from drjax import metrics as drjax_metrics
  from drjax import models, plots
  from drjax.data import pipeline

  workdir.mkdir(parents=True, exist_ok=True)
  _check_workdir_config(workdir, config)
  if distributed.is_main_process():
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))

  mesh = make_mesh()
  num_devices = mesh.devices.size
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise ValueError(f'config.{name}={config[name]} is not divisible by the {num_devices} '
                       'local devices it is sharded over.')
  replicated = NamedSharding(mesh, P())

  # Process 0 builds/indexes the dataset on the shared disk, then the others read it.
  ds = distributed.process_zero_first(lambda: pipeline.get_dataset(config.input), 'dataset')
  model = models.get_model(config.model, num_classes=config.num_classes)
  train_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  # RngBitGenerator-based key for the initializers: XLA on CPU compiles the init of a
  # 121-layer net about twice as fast as with threefry (~30 s vs ~55 s of CPU).
  init_rng = jax.random.key(config.seed, impl='rbg')
  size = config.input.image_size
  init_model = model
  if config.weights.get('zero_init_residual', False):
    if not hasattr(model, 'zero_init_residual'):
      raise ValueError(f'config.weights.zero_init_residual=True applies to ResNets only, '
                       f'not {config.model}')
    init_model = model.clone(zero_init_residual=True)
  init_variables = jax.jit(functools.partial(init_model.init, train=False))(
      init_rng, jnp.zeros((1, size, size, 3), jnp.float32))
  init_variables = {k: v for k, v in init_variables.items() if k in ('params', 'batch_stats')}
  tx = make_optimizer(config.optimizer, config.num_steps)
  lr_schedule = make_schedule(config.optimizer, config.num_steps)

  def make_abstract(meta):
    labels = freeze.trainable_labels(init_variables['params'], meta['trainable'])
    trainable, _ = freeze.partition(init_variables['params'], labels)
    abstract_train = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                      'opt_state': _abstract(jax.eval_shape(tx.init, trainable), replicated)}
    return _abstract(init_variables, replicated), abstract_train

  expected_meta = {'model': config.model, 'num_classes': config.num_classes,
                   'config_trainable': list(config.trainable)}
  manager = checkpoint.make_manager(workdir / 'checkpoints', max_to_keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest(manager, make_abstract, expected_meta, workdir)
  if restored is not None:
    start_step, variables, train_part, meta = restored
    weights_source, trainable_patterns = meta['weights_source'], meta['trainable']
    is_pretrained = meta['pretrained']
    labels = freeze.trainable_labels(variables['params'], trainable_patterns)
    state = TrainState(step=train_part['step'], params=variables['params'],
                       batch_stats=variables.get('batch_stats', {}),
                       opt_state=train_part['opt_state'])
    logging.info('Resumed from %s at step %d.', manager.directory, start_step)
    print(f'Resuming from checkpoint step {start_step} in {workdir}', flush=True)
  else:
    start_step = 0
    pretrained, weights_source = distributed.process_zero_first(
        lambda: resolve_weights(config, init_variables), 'weights')
    is_pretrained = pretrained is not None
    if not is_pretrained:
      variables = init_variables
      _loud_warning(
          f'NO PRETRAINED WEIGHTS for {config.model}: {weights_source}. Training from a random '
          'init' + (', so ALL layers are trainable (config.weights.random_init_trains_all; '
                    'a frozen random trunk would be pointless).'
                    if config.weights.random_init_trains_all else
                    f' with the configured trainable patterns {list(config.trainable)}.') +
          ' Results are NOT comparable to the paper\'s ImageNet-pretrained recipe.')
      weights_source = f'{weights_source} [RANDOM INIT: no pretrained weights]'
    else:
      variables = {k: pretrained[k] for k in ('params', 'batch_stats') if k in pretrained}
    trainable_patterns = choose_trainable(config, is_pretrained)
    labels = freeze.trainable_labels(variables['params'], trainable_patterns)
    state = replicate(create_train_state(variables, tx, labels), mesh)
  if distributed.is_main_process():
    (workdir / 'weights_source.txt').write_text(weights_source + '\n')
  counts = freeze.count(state.params, labels)
  logging.info('Trainable patterns %s: %s parameters', trainable_patterns, counts)
  meta = {**expected_meta, 'trainable': list(trainable_patterns), 'weights_source': weights_source,
          'pretrained': is_pretrained, 'parameter_counts': counts}

  augment_fn = None
  if config.augment_enabled:
    from drjax.data import augment
    augment_fn = augment.make_augment_fn(config.augment)
  if config.mixed_precision not in _COMPUTE_DTYPES:
    raise ValueError(f'config.mixed_precision must be one of {sorted(_COMPUTE_DTYPES)}, '
                     f'got {config.mixed_precision!r}')
  # Mixed precision: the step's model computes in bf16; params, grads and Adam stay float32.
  compute_model = models.get_model(config.model, num_classes=config.num_classes,
                                   dtype=_COMPUTE_DTYPES[config.mixed_precision])
  step_fn = make_train_step(compute_model, tx, labels, augment_fn=augment_fn,
                            frozen_bn_inference=config.frozen_bn_inference,
                            mixed_precision=config.mixed_precision, mesh=mesh)
  eval_fn = jax.jit(functools.partial(eval_step, model=model), out_shardings=replicated)

  def run_eval(variables):
    return evaluate(model, variables, pipeline.make_eval_iterator(
        config.input, ds.validation, config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count()), mesh, eval_fn)

  # The pipeline's stream is a pure function of (seed, step): a resumed run
  # continues exactly where the checkpointed one was.
  train_iter = pipeline.make_train_iterator(
      config.input, ds.train, config.batch_size, config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  # Only process 0 writes; the others compute the same (replicated) scalars.
  writer = MetricWriter(workdir, start_step) if distributed.is_main_process() else _NoWriter()
  pending: list[dict[str, jax.Array]] = []
  last_log_time, last_log_step = time.time(), start_step

  def flush(step):
    nonlocal pending, last_log_time, last_log_step
    if not pending:
      return
    host = jax.device_get(pending)
    pending = []
    for i, m in enumerate(host):
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        bad = step - len(host) + i + 1
        raise FloatingPointError(
            f'Non-finite training loss/gradient at step {bad} (loss={m["loss"]}, '
            f'grad_norm={m["grad_norm"]}). Stopping; the last good checkpoint in '
            f'{workdir / "checkpoints"} (step {manager.latest_step()}) is kept. '
            'Lower config.optimizer.lr or try mixed_precision=float32.')
    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    now = time.time()
    scalars['steps_per_sec'] = (step - last_log_step) / max(now - last_log_time, 1e-9)
    last_log_time, last_log_step = now, step
    scalars = {f'train_{k}' if k in ('loss', 'accuracy') else k: v for k, v in scalars.items()}
    scalars['lr'] = float(lr_schedule(step))
    writer.write(step, scalars)
    return scalars

  from tqdm import tqdm
  postfix: dict[str, str] = {}
  bar = tqdm(total=config.num_steps, initial=start_step, desc=f'train {config.model}',
             unit='step', dynamic_ncols=True,
             disable=not config.progress_bar or not distributed.is_main_process())
  try:
    for step in range(start_step + 1, config.num_steps + 1):
      batch = next(train_iter)
      batch = shard_batch({'image': batch['image'], 'label': batch['label']}, mesh)
      state, step_metrics = step_fn(state, batch, train_rng)
      pending.append(step_metrics)
      is_last = step == config.num_steps
      is_ckpt = step % config.checkpoint_every == 0 or is_last
      if step % config.log_every == 0 or is_ckpt:
        scalars = flush(step)
        if scalars:
          postfix['loss'] = f'{scalars["train_loss"]:.3f}'
          bar.set_postfix(postfix)
      if step % config.eval_every == 0 or is_last:
        summary = eval_summary(*run_eval({'params': state.params,
                                          'batch_stats': state.batch_stats}),
                               config.num_classes)
        writer.write(step, summary)
        postfix['val_kappa'] = f'{summary["val_kappa"]:.3f}'
        bar.set_postfix(postfix)
      if is_ckpt:
        checkpoint.save(manager, step,
                        {'params': state.params, 'batch_stats': state.batch_stats},
                        {'step': state.step, 'opt_state': state.opt_state},
                        {**meta, 'step': step, 'data_start_step': step})
      bar.update(1)
      if _step_hook is not None:
        _step_hook(step)
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()

  # Final evaluation on the validation split (the paper's 20%).
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  val_labels, val_probs = run_eval(variables)
  report = drjax_metrics.classification_report(val_labels, val_probs)
  report.update({'split': 'validation', 'num_examples': int(len(val_labels)),
                 'model': config.model, 'step': int(config.num_steps),
                 'weights_source': weights_source, 'pretrained': is_pretrained,
                 'trainable': list(trainable_patterns), 'parameter_counts': counts,
                 'dataset': config.input.dataset})
  if not distributed.is_main_process():
    return report  # metrics.json, figures and Grad-CAM are process 0's
  (workdir / 'metrics.json').write_text(json.dumps(report, indent=2, sort_keys=True))

  rows = [r for r in read_metrics_jsonl(workdir) if 'train_loss' in r]
  if rows:
    plots.loss_curve([r['step'] for r in rows], [r['train_loss'] for r in rows],
                     workdir / 'loss_curve.png', title=f'{config.model} training loss')

  picks = panel_indices(val_labels, config.gradcam.num_images)
  if picks.size:
    # The eval iterator yields the validation split in the order of val_labels.
    images, offset = {}, 0
    for batch in pipeline.make_eval_iterator(config.input, ds.validation, config.eval_batch_size):
      rows = np.asarray(batch['image'])[np.asarray(batch['valid'])]
      for i in picks[(picks >= offset) & (picks < offset + len(rows))]:
        images[i] = rows[i - offset]
      offset += len(rows)
      if len(images) == picks.size:
        break
    try:
      note = _write_gradcam_panel(model, jax.device_get(variables), val_labels[picks],
                                  val_probs[picks], np.stack([images[i] for i in picks]),
                                  workdir / 'gradcam' / 'panel.png')
    except Exception as e:  # noqa: BLE001 - a CAM failure must not lose the trained run
      note = f'failed: {type(e).__name__}: {e}'
      logging.exception('Grad-CAM panel failed')
    logging.info('Grad-CAM panel: %s', note)
    report['gradcam'] = note
    (workdir / 'metrics.json').write_text(json.dumps(report, indent=2, sort_keys=True))
  print(f'Done: validation kappa={report["kappa"]:.3f} accuracy={report["accuracy"]:.3f} '
        f'({weights_source}); outputs in {workdir}', flush=True)
  return report


def load_config(workdir: str | pathlib.Path) -> mlc.ConfigDict:
  """The run's config.json as a locked ConfigDict."""
  config = mlc.ConfigDict(json.loads((pathlib.Path(workdir) / 'config.json').read_text()))
  config.lock()
  return config


def load_run(workdir: str | pathlib.Path, step: int | None = None
             ) -> tuple[mlc.ConfigDict, nn.Module, PyTree]:
  """(config, model, variables) of a run's latest (or given) checkpoint, on one device."""
  from drjax import models

  config = load_config(workdir)
  model = models.get_model(config.model, num_classes=config.num_classes)
  size = config.input.image_size
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, size, size, 3), jnp.float32))
  shapes = {k: v for k, v in shapes.items() if k in ('params', 'batch_stats')}
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  _, variables, _ = checkpoint.load_variables(pathlib.Path(workdir) / 'checkpoints',
                                              _abstract(shapes, sharding), step=step)
  return config, model, variables



def evaluate_run(workdir: str | pathlib.Path, split: str = 'validation',
                 config_input: mlc.ConfigDict | None = None, batch_size: int | None = None,
                 step: int | None = None) -> dict:
  """classification_report of a saved run on `split` of its dataset (or of `config_input`'s).

  Args:
    workdir: a run of `train_and_evaluate`.
    split: 'validation' (the run's held-out 20%), 'test' (the dataset's own
      test split, if any) or 'train'.
    config_input: another `input` block (e.g. IDRiD) to evaluate on; default the run's.
    batch_size: default the run's eval_batch_size (rounded up to the device count).
    step: checkpoint step; default the latest.
  """
  from drjax import metrics as drjax_metrics
  from drjax.data import pipeline

  config, model, variables = load_run(workdir, step=step)
  config_input = config.input if config_input is None else config_input
  ds = pipeline.get_dataset(config_input)
  source = {'validation': ds.validation, 'test': ds.test, 'train': ds.train}[split]
  if source is None:
    raise ValueError(f'{config_input.dataset} has no {split!r} split')
  mesh = make_mesh()
  n = mesh.devices.size
  batch_size = batch_size or config.eval_batch_size
  batch_size = -(-batch_size // n) * n
  labels, probs = evaluate(model, variables,
                           pipeline.make_eval_iterator(config_input, source, batch_size), mesh)
  report = drjax_metrics.classification_report(labels, probs)
  report.update({'split': split, 'dataset': config_input.dataset, 'model': config.model,
                 'workdir': str(workdir)})
  return report
