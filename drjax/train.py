"""Training of the DR grading backbones (paper sections 2.3-2.3.3).

The recipe: an ImageNet-pretrained backbone with a new 5-way head, only the last block(s)
trainable (`config.trainable`, see `drjax.freeze`), Adam, cross-entropy.
`train_and_evaluate(config, workdir)` runs it end to end and leaves in `workdir`:
`checkpoints/` (orbax), `tensorboard/`, `metrics.jsonl`, `metrics.json`, `loss_curve.png`,
`config.json`, `weights_source.txt` and `gradcam/panel.png`.

The train step is one pure jitted function (big_vision's update_fn): it differentiates only
the trainable partition of the parameters, so the frozen trunk's backward pass is never
built, and runs data-parallel over all devices through `jax.jit` on a `Mesh` (batch on
'data', state replicated). With `config.trunk_cache` the frozen trunk's forward pass is not
run either: it is fed the trunk's output cached on disk (drjax.trunk_cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from drjax import checkpoint, distributed, errors, evaluate, freeze, models, run_files
from drjax import mesh as mesh_lib

if TYPE_CHECKING:
  from drjax import trunk_cache

PyTree = Any

_COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

_OPTIMIZERS = {
    'adam': lambda lr: optax.adam(lr),
    'sgd': lambda lr: optax.sgd(lr, momentum=0.9),
}
_SCHEDULES = ('constant', 'cosine')

# Called as `_step_hook(step)` after every step's bookkeeping. A no-op; tests replace it
# (e.g. to SIGKILL the process at a chosen step).
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


# ----------------------------------------------------------------------------- optimizer


def make_schedule(config_optimizer: mlc.ConfigDict, num_steps: int) -> optax.Schedule:
  """Learning rate per step: `schedule` 'constant' (the paper) or 'cosine' decay to 0.

  Both ramp up linearly from 0 over `warmup_steps` (0: no warm-up).
  """
  c = config_optimizer
  schedule, warmup = c.get('schedule', 'constant'), c.get('warmup_steps', 0)
  if schedule not in _SCHEDULES:
    raise errors.ConfigError(f'unknown optimizer.schedule {schedule!r}; '
                             f'choose one of {_SCHEDULES}')
  if not 0 <= warmup < max(num_steps, 1):
    raise errors.ConfigError(f'optimizer.warmup_steps={warmup} must be in '
                             f'[0, num_steps={num_steps})')
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
    raise errors.ConfigError(f'unknown optimizer {config_optimizer.name!r}; '
                             f'choose one of {sorted(_OPTIMIZERS)}')
  return _OPTIMIZERS[config_optimizer.name](make_schedule(config_optimizer, num_steps))


def create_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation,
                       labels: PyTree) -> TrainState:
  """TrainState at step 0; the optimizer state covers the trainable partition only."""
  trainable, _ = freeze.partition(variables['params'], labels)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(trainable))


# ----------------------------------------------------------------------------- the step


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy; logits [B, K], integer labels [B] -> [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, labels: PyTree,
               augment_fn: Callable | None, frozen_bn_inference: bool,
               compute_dtype: Any, cut: trunk_cache.Cut | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch (bind the keyword args with functools.partial).

  Args:
    state: current TrainState (donated by the jitted wrapper).
    batch: `image` uint8 [B, H, W, 3] (with `cut`: `trunk` [B, h, w, C], the trunk's
      output cached by drjax.trunk_cache), `label` int32 [B].
    rng: the run's base key; this step's key is `fold_in(rng, state.step)`.
    model: flax module (`models.get_model`).
    tx: optimizer over the trainable partition.
    labels: label tree ('trainable'/'frozen') of the params (`drjax.freeze`).
    augment_fn: `drjax.data.augment.make_augment_fn(...)` or None.
    frozen_bn_inference: run BatchNorms of fully frozen modules with running stats.
    compute_dtype: dtype the normalised images are cast to; the model's own `dtype` (e.g.
      `get_model(..., dtype=jnp.bfloat16)`) sets its compute dtype while its parameters, the
      gradients and the optimizer stay float32.
    cut: a `drjax.trunk_cache.Cut`: `batch['trunk']` is fed to the model at that point and
      nothing below it is computed (its augmentation happened when the cache was built);
      None: the model takes the images.

  Returns:
    `(new_state, metrics)` with scalar `loss`, `accuracy`, `grad_norm`.
  """
  rng = jax.random.fold_in(rng, state.step)
  aug_rng, dropout_rng = jax.random.split(rng)
  if cut is None:
    images = batch['image']
    if augment_fn is not None:
      images, _ = augment_fn(aug_rng, images)
    x, fed = models.normalize(images).astype(compute_dtype), {}
  else:
    x, fed = cut.model_inputs(batch['trunk'], compute_dtype)
  trainable, frozen = freeze.partition(state.params, labels)
  frozen_modules = freeze.frozen_module_paths(labels) if frozen_bn_inference else set()

  def loss_fn(trainable):
    # Only `trainable` is differentiated: the frozen half is a constant, so XLA never
    # builds the backward pass below the first trainable layer.
    params = freeze.merge(trainable, frozen)
    with nn.intercept_methods(freeze.make_frozen_bn_interceptor(frozen_modules)):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats, **fed}, x, train=True,
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
      # The trainable gradients only: reading the frozen ones would bring their backward
      # pass back.
      'grad_norm': optax.tree.norm(grads),
  }
  new_state = state.replace(step=state.step + 1, params=freeze.merge(trainable, frozen),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, labels: PyTree, *,
                    augment_fn: Callable | None = None, frozen_bn_inference: bool = True,
                    mixed_precision: str = 'float32', mesh: Mesh | None = None,
                    cut: trunk_cache.Cut | None = None):
  """`train_step` with its static pieces bound, jitted once with the state donated.

  For `mixed_precision='bfloat16'` pass a model built with `dtype=jnp.bfloat16`: bf16
  activations and matmuls, float32 master weights. With a mesh, the state (and metrics)
  come out replicated and the batch is expected sharded on 'data' (`mesh.shard_batch`).
  With `cut` the step takes the trunk cache's `batch['trunk']` instead of images.
  """
  if mixed_precision not in _COMPUTE_DTYPES:
    raise errors.ConfigError(f'mixed_precision must be one of {sorted(_COMPUTE_DTYPES)}, '
                             f'got {mixed_precision!r}')
  step_fn = functools.partial(
      train_step, model=model, tx=tx, labels=labels, augment_fn=augment_fn,
      frozen_bn_inference=frozen_bn_inference,
      compute_dtype=_COMPUTE_DTYPES[mixed_precision], cut=cut)
  kwargs = {}
  if mesh is not None:
    kwargs['out_shardings'] = NamedSharding(mesh, P())
  return jax.jit(step_fn, donate_argnums=(0,), **kwargs)


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(config: mlc.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains `config.model` on `config.input`, resuming from `workdir` when it has a checkpoint.

  Args:
    config: a config of `configs/` (see `configs/densenet.py`).
    workdir: output directory (created).

  Returns:
    The final validation metrics (`drjax.metrics.classification_report` plus run
    information), also written to `workdir/metrics.json`.

  Raises:
    FloatingPointError: a non-finite training loss or gradient (the last checkpoint saved
      before it is kept).
    drjax.checkpoint.IncompatibleCheckpointError: `workdir` belongs to another model.
    drjax.run_files.WorkdirBusyError: another run is using `workdir`.
  """
  from drjax.data import pipeline

  workdir = pathlib.Path(workdir)
  with run_files.workdir_lock(workdir):
    _write_config(config, workdir)
    mesh = mesh_lib.make_mesh()
    _check_batch_sizes(config, mesh)
    if not checkpoint.has_steps(workdir / 'checkpoints'):
      _check_weights_path(config)
    # Process 0 builds the dataset on the shared disk, then the others read it.
    ds = distributed.process_zero_first(lambda: pipeline.get_dataset(config.input), 'dataset')
    manager = checkpoint.make_manager(workdir / 'checkpoints',
                                      max_to_keep=config.keep_checkpoints)
    try:
      run = _start(config, workdir, mesh, manager)
      state = _train(config, run, ds, mesh, workdir, manager)
    finally:
      manager.wait_until_finished()
      manager.close()
    return _finish(config, run, state, ds, mesh, workdir)


@dataclasses.dataclass
class _Run:
  """A run's state before its first step: fresh, or restored from the workdir."""
  state: TrainState
  labels: PyTree  # 'trainable' / 'frozen' per parameter
  meta: dict  # what every checkpoint records (drjax.checkpoint)
  start_step: int
  model: nn.Module
  tx: optax.GradientTransformation
  eval_fn: Callable  # jitted evaluate.eval_step (or the cache's), built once for every evaluation
  cache: trunk_cache.TrunkCache | None = None  # None: the model takes images


def _write_config(config: mlc.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses a workdir of another architecture, then records this run's config."""
  path = workdir / 'config.json'
  if path.exists():
    old = json.loads(path.read_text())
    for key in ('model', 'num_classes'):
      if key in old and old[key] != config[key]:
        raise checkpoint.IncompatibleCheckpointError(
            f'{workdir} holds a run of {key}={old[key]!r}, but this run has '
            f'{key}={config[key]!r}. Use a fresh --workdir for a different architecture, or '
            'delete the old one.')
  if distributed.is_main_process():
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def _check_batch_sizes(config: mlc.ConfigDict, mesh: Mesh) -> None:
  num_devices = mesh.devices.size
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise errors.ConfigError(f'config.{name}={config[name]} is not divisible by the '
                               f'{num_devices} devices it is sharded over.')


def _check_weights_path(config: mlc.ConfigDict) -> None:
  """Fails on configured weights that do not exist before the dataset build, which can be long."""
  from drjax import weights

  if config.weights.pretrained and config.weights.path:
    weights.check_path(config.model, config.weights.path)


def _init_variables(config: mlc.ConfigDict, model: nn.Module) -> PyTree:
  """Random initial variables of `model` (ResNets: zero-init residuals if configured)."""
  if config.weights.get('zero_init_residual', False):
    if not hasattr(model, 'zero_init_residual'):
      raise errors.ConfigError('config.weights.zero_init_residual=True applies to ResNets '
                               f'only, not {config.model}')
    model = model.clone(zero_init_residual=True)
  # An RngBitGenerator key: XLA:CPU compiles the initialisers faster than with threefry.
  rng = jax.random.key(config.seed, impl='rbg')
  return models.init_variables(model, rng, config.input.image_size)


def _start(config: mlc.ConfigDict, workdir: pathlib.Path, mesh: Mesh, manager) -> _Run:
  """The workdir's latest checkpoint if it has one, else the configured weights (or scratch)."""
  model = evaluate.build_model(config)
  tx = make_optimizer(config.optimizer, config.num_steps)
  init_variables = _init_variables(config, model)
  meta = {'model': config.model, 'num_classes': config.num_classes,
          'config_trainable': list(config.trainable)}
  restored = _restore(workdir, mesh, manager, tx, init_variables, meta)
  if restored is not None:
    state, meta, start_step = restored
    labels = freeze.trainable_labels(state.params, meta['trainable'])
  else:
    start_step = 0
    variables, meta = _initial_weights(config, init_variables, meta)
    labels = freeze.trainable_labels(variables['params'], meta['trainable'])
    state = mesh_lib.replicate(create_train_state(variables, tx, labels), mesh)
  if distributed.is_main_process():
    (workdir / 'weights_source.txt').write_text(meta['weights_source'] + '\n')
  meta['parameter_counts'] = freeze.count(state.params, labels)
  logging.info('Trainable patterns %s: %s parameters', meta['trainable'],
               meta['parameter_counts'])
  eval_fn = jax.jit(functools.partial(evaluate.eval_step, model=model),
                    out_shardings=NamedSharding(mesh, P()))
  return _Run(state, labels, meta, start_step, model, tx, eval_fn)


def _restore(workdir: pathlib.Path, mesh: Mesh, manager, tx: optax.GradientTransformation,
             init_variables: PyTree, meta: dict) -> tuple[TrainState, dict, int] | None:
  """(state, meta, step) of the workdir's latest readable checkpoint, or None."""
  replicated = NamedSharding(mesh, P())

  def make_abstract(meta):
    labels = freeze.trainable_labels(init_variables['params'], meta['trainable'])
    trainable, _ = freeze.partition(init_variables['params'], labels)
    abstract_train = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                      'opt_state': _abstract(jax.eval_shape(tx.init, trainable), replicated)}
    return _abstract(init_variables, replicated), abstract_train

  restored = checkpoint.restore_latest(manager, make_abstract, meta, workdir)
  if restored is None:
    return None
  step, variables, train_part, meta = restored
  logging.info('Resumed from %s at step %d.', workdir / 'checkpoints', step)
  print(f'Resuming from checkpoint step {step} in {workdir}', flush=True)
  state = TrainState(step=train_part['step'], params=variables['params'],
                     batch_stats=variables.get('batch_stats', {}),
                     opt_state=train_part['opt_state'])
  return state, meta, step


def _initial_weights(config: mlc.ConfigDict, init_variables: PyTree,
                     meta: dict) -> tuple[PyTree, dict]:
  """The configured pretrained weights, or `init_variables` with a loud warning."""
  pretrained, source = distributed.process_zero_first(
      lambda: resolve_weights(config, init_variables), 'weights')
  if pretrained is None:
    variables = init_variables
    _loud_warning(
        f'NO PRETRAINED WEIGHTS for {config.model}: {source}. Training from a random init' +
        (', so ALL layers are trainable (config.weights.random_init_trains_all; a frozen '
         'random trunk would be pointless).' if config.weights.random_init_trains_all else
         f' with the configured trainable patterns {list(config.trainable)}.') +
        ' Results are NOT comparable to the paper\'s ImageNet-pretrained recipe.')
    source = f'{source} [RANDOM INIT: no pretrained weights]'
  else:
    variables = {'params': pretrained['params'],
                 'batch_stats': pretrained.get('batch_stats', {})}
  trainable = choose_trainable(config, pretrained is not None)
  return variables, {**meta, 'trainable': trainable, 'weights_source': source,
                     'pretrained': pretrained is not None}


def _train(config: mlc.ConfigDict, run: _Run, ds, mesh: Mesh, workdir: pathlib.Path,
           manager) -> TrainState:
  """The training loop: steps, logging, evaluation and checkpoints until `num_steps`."""
  from drjax import trunk_cache
  from drjax.data import pipeline

  if config.mixed_precision not in _COMPUTE_DTYPES:
    raise errors.ConfigError(f'config.mixed_precision must be one of '
                             f'{sorted(_COMPUTE_DTYPES)}, got {config.mixed_precision!r}')
  # Mixed precision: the step's model computes in bf16; params, grads and Adam stay float32.
  compute_model = run.model.clone(dtype=_COMPUTE_DTYPES[config.mixed_precision])
  run.cache = trunk_cache.prepare(config, compute_model, _variables(run.state), run.labels, ds)
  if run.cache is not None:
    run.eval_fn = run.cache.make_eval_fn(run.model, mesh)
  step_fn = _make_step_fn(config, run, compute_model, mesh)
  train_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  # The stream is a pure function of (seed, step): a resumed run continues exactly where the
  # checkpointed one was.
  load = None if run.cache is None else run.cache.train_load()
  batches = pipeline.make_train_iterator(
      config.input, ds.train, config.batch_size, config.seed, start_step=run.start_step,
      process_index=jax.process_index(), process_count=jax.process_count(), load=load)
  key = 'image' if run.cache is None else 'trunk'
  batches = mesh_lib.prefetch_to_mesh(({key: b[key], 'label': b['label']} for b in batches),
                                      mesh, config.input.get('device_prefetch', 0))
  logger = _TrainLogger(make_schedule(config.optimizer, config.num_steps), run.start_step)
  state, postfix = run.state, {}
  with (run_files.metric_writer(workdir, run.start_step) as write,
        _progress_bar(config, run) as bar):
    for step in range(run.start_step + 1, config.num_steps + 1):
      state, step_metrics = step_fn(state, next(batches), train_rng)
      logger.add(step_metrics)
      is_last = step == config.num_steps
      is_ckpt = step % config.checkpoint_every == 0 or is_last
      if step % config.log_every == 0 or is_ckpt:
        postfix['loss'] = f'{logger.flush(step, write, workdir, manager):.3f}'
        bar.set_postfix(postfix)
      if step % config.eval_every == 0 or is_last:
        summary = evaluate.eval_summary(*_run_eval(config, run, state, ds, mesh),
                                        config.num_classes)
        write(step, summary)
        postfix['val_kappa'] = f'{summary["val_kappa"]:.3f}'
        bar.set_postfix(postfix)
      if is_ckpt:
        checkpoint.save(manager, step, _variables(state),
                        {'step': state.step, 'opt_state': state.opt_state},
                        {**run.meta, 'step': step, 'data_start_step': step})
      bar.update(1)
      if _step_hook is not None:
        _step_hook(step)
  return state


def _make_step_fn(config: mlc.ConfigDict, run: _Run, compute_model: nn.Module,
                  mesh: Mesh) -> Callable:
  """The jitted train step of `compute_model`, on images or on the run's trunk cache."""
  augment_fn = None
  if config.augment_enabled and run.cache is None:
    from drjax.data import augment
    augment_fn = augment.make_augment_fn(config.augment)
  return make_train_step(compute_model, run.tx, run.labels, augment_fn=augment_fn,
                         frozen_bn_inference=config.frozen_bn_inference,
                         mixed_precision=config.mixed_precision, mesh=mesh,
                         cut=None if run.cache is None else run.cache.cut)


def _run_eval(config: mlc.ConfigDict, run: _Run, state: TrainState, ds,
              mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
  """(labels, probabilities) of the validation split (from the trunk cache if the run has one)."""
  from drjax.data import pipeline

  cache = run.cache
  batches = pipeline.make_eval_iterator(
      config.input, ds.validation, config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      load=None if cache is None else cache.eval_load('validation'))
  return evaluate.evaluate(run.model, _variables(state), batches, mesh, run.eval_fn,
                           input_key='image' if cache is None else 'trunk')


def _variables(state: TrainState) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


class _TrainLogger:
  """Keeps the step metrics on device and fetches them only on log steps."""

  def __init__(self, lr_schedule: optax.Schedule, start_step: int):
    self.lr_schedule = lr_schedule
    self.pending: list[dict[str, jax.Array]] = []
    self.last_time, self.last_step = time.time(), start_step

  def add(self, step_metrics: dict[str, jax.Array]) -> None:
    self.pending.append(step_metrics)

  def flush(self, step: int, write: Callable, workdir: pathlib.Path, manager) -> float:
    """Writes the mean of the pending metrics and returns the loss; stops on a non-finite one."""
    host = jax.device_get(self.pending)
    self.pending = []
    for i, m in enumerate(host):
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        raise FloatingPointError(
            f'Non-finite training loss/gradient at step {step - len(host) + i + 1} '
            f'(loss={m["loss"]}, grad_norm={m["grad_norm"]}). Stopping; the last good '
            f'checkpoint in {workdir / "checkpoints"} (step {manager.latest_step()}) is kept. '
            'Lower config.optimizer.lr or try mixed_precision=float32.')
    now = time.time()
    scalars = {('train_' + k if k in ('loss', 'accuracy') else k):
               float(np.mean([m[k] for m in host])) for k in host[0]}
    scalars['steps_per_sec'] = (step - self.last_step) / max(now - self.last_time, 1e-9)
    scalars['lr'] = float(self.lr_schedule(step))
    self.last_time, self.last_step = now, step
    write(step, scalars)
    return scalars['train_loss']


@contextlib.contextmanager
def _progress_bar(config: mlc.ConfigDict, run: _Run):
  from tqdm import tqdm

  bar = tqdm(total=config.num_steps, initial=run.start_step, desc=f'train {config.model}',
             unit='step', dynamic_ncols=True,
             disable=not config.progress_bar or not distributed.is_main_process())
  try:
    yield bar
  finally:
    bar.close()


def _finish(config: mlc.ConfigDict, run: _Run, state: TrainState, ds, mesh: Mesh,
            workdir: pathlib.Path) -> dict:
  """Final validation report (the paper's 20%), metrics.json, loss curve and Grad-CAM panel."""
  from drjax import metrics, plots

  val_labels, val_probs = _run_eval(config, run, state, ds, mesh)
  report = metrics.classification_report(val_labels, val_probs)
  report.update({'split': 'validation', 'num_examples': int(len(val_labels)),
                 'model': config.model, 'step': int(config.num_steps),
                 'weights_source': run.meta['weights_source'],
                 'pretrained': run.meta['pretrained'], 'trainable': run.meta['trainable'],
                 'parameter_counts': run.meta['parameter_counts'],
                 'dataset': config.input.dataset})
  if not distributed.is_main_process():
    return report  # metrics.json and the figures are process 0's
  rows = [r for r in run_files.read_metrics_jsonl(workdir) if 'train_loss' in r]
  if rows:
    plots.loss_curve([r['step'] for r in rows], [r['train_loss'] for r in rows],
                     workdir / 'loss_curve.png', title=f'{config.model} training loss')
  if config.gradcam.num_images:
    report['gradcam'] = _gradcam_panel(config, run.model, state, ds, val_labels,
                                       workdir / 'gradcam' / 'panel.png')
  (workdir / 'metrics.json').write_text(json.dumps(report, indent=2, sort_keys=True))
  print(f'Done: validation kappa={report["kappa"]:.3f} accuracy={report["accuracy"]:.3f} '
        f'({run.meta["weights_source"]}); outputs in {workdir}', flush=True)
  return report


def _gradcam_panel(config, model, state, ds, val_labels, path: pathlib.Path) -> str:
  """Grad-CAM of the predicted grade for a few validation images, one of each grade."""
  from drjax import cam_figures
  from drjax.data import pipeline

  picks = panel_indices(val_labels, config.gradcam.num_images)
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
    cam_figures.save_panel(model, jax.device_get(_variables(state)),
                           np.stack([images[i] for i in picks]), path, labels=val_labels[picks])
  except Exception as e:  # noqa: BLE001 - a figure failure must not lose the trained run
    logging.exception('Grad-CAM panel failed')
    return f'failed: {type(e).__name__}: {e}'
  return str(path)


def panel_indices(labels: np.ndarray, n: int) -> np.ndarray:
  """Up to `n` indices of `labels` for a figure: one per grade, highest grade first, repeating.

  The first validation images of a skewed set are mostly grade 0, whose maps show no
  lesion; this picks e.g. grades 4, 3, 2, 1 for n=4 (skipping absent grades).
  """
  labels = np.asarray(labels)
  if n <= 0 or labels.size == 0:
    return np.zeros((0,), np.int64)
  by_grade = [np.flatnonzero(labels == g) for g in np.unique(labels)[::-1]]
  picks = [idx[i] for i in range(max(map(len, by_grade))) for idx in by_grade if i < len(idx)]
  return np.asarray(picks[:n], np.int64)


# ----------------------------------------------------------------------------- helpers


def choose_trainable(config: mlc.ConfigDict, pretrained: bool) -> list[str]:
  """The trainable patterns a run uses.

  `config.trainable` with pretrained weights. From a random init, freezing the trunk would
  train a head on random features, so by default (`config.weights.random_init_trains_all`)
  everything trains.
  """
  if not pretrained and config.weights.random_init_trains_all:
    return ['.*']
  return list(config.trainable)


def resolve_weights(config: mlc.ConfigDict, init_variables: PyTree) -> tuple[PyTree | None, str]:
  """Pretrained variables via `drjax.weights.resolve`, or (None, reason) for random init."""
  from drjax import weights

  if not config.weights.pretrained:
    return None, 'random init (config.weights.pretrained=False)'
  return weights.resolve(config.model, explicit_path=config.weights.path or None,
                         num_classes=config.num_classes, init_variables=init_variables)


def _loud_warning(message: str) -> None:
  banner = '!' * 78
  logging.warning('\n%s\n!! %s\n%s\n', banner, message, banner)


def _abstract(tree: PyTree, sharding) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
