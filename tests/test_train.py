"""Tests for the train step (drjax.train): freezing, skipped frozen backward pass, sharding,
learning, mixed precision, and the random-init policy."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from drjax import evaluate, freeze, models, train
from drjax import mesh as mesh_lib
from drjax.kernels import cpu_conv

SIZE = 32
BATCH = 8
# The paper's DenseNet choice on the tiny variant: head, norm5 and the last dense block.
PAPER_LIKE = ['classifier/.*', 'features/norm5/.*', 'features/denseblock4/.*']


@pytest.fixture(scope='module')
def tiny():
  model = models.get_model('densenet_tiny', num_classes=5)
  init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, SIZE, SIZE, 3)), train=False))
  return model, init(jax.random.key(0))


def _batch(seed=0, n=BATCH):
  rs = np.random.RandomState(seed)
  return {'image': rs.randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8),
          'label': (np.arange(n) % 5).astype(np.int32)}


def _setup(model, variables, trainable, devices=None, lr=1e-2, **kwargs):
  tx = optax.adam(lr)
  # The step donates its state: never hand it the fixture's own buffers.
  variables = jax.tree.map(jnp.copy, variables)
  labels = freeze.trainable_labels(variables['params'], trainable)
  mesh = mesh_lib.make_mesh(devices)
  state = mesh_lib.replicate(train.create_train_state(variables, tx, labels), mesh)
  step_fn = train.make_train_step(model, tx, labels, mesh=mesh, **kwargs)
  return state, step_fn, labels, mesh


def _flat(tree):
  return {freeze.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def test_frozen_params_and_their_batch_stats_are_bit_identical_after_steps(tiny):
  from drjax.data import augment

  model, variables = tiny
  # With the paper's augmentations running inside the jitted step.
  state, step_fn, labels, mesh = _setup(
      model, variables, PAPER_LIKE, augment_fn=augment.make_augment_fn(augment.default_config()))
  before = _flat({'params': state.params, 'batch_stats': state.batch_stats})
  batch = mesh_lib.shard_batch(_batch(), mesh)
  for _ in range(3):
    state, metrics = step_fn(state, batch, jax.random.key(1))
  chex.assert_tree_all_finite(metrics)
  after = _flat({'params': state.params, 'batch_stats': state.batch_stats})
  assert int(state.step) == 3
  trainable = {'params/' + k for k, v in _flat(labels).items() if v == 'trainable'}
  for path in before:
    module_trainable = any(path.startswith(p) for p in ('params/classifier',
                                                        'params/features/norm5',
                                                        'params/features/denseblock4',
                                                        'batch_stats/features/norm5',
                                                        'batch_stats/features/denseblock4'))
    if path.startswith('params/'):
      assert (path in trainable) == module_trainable, path
    if module_trainable:
      assert not np.array_equal(before[path], after[path]), f'{path} did not train'
    else:
      # Frozen weights, and the running stats of frozen BatchNorms (inference mode).
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)
  # Optimizer state exists for the trainable partition only.
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert n_opt == 2 * freeze.count(variables['params'], labels)['trainable'] + 1  # mu, nu, count


def test_frozen_bn_in_train_mode_updates_stats_but_not_params(tiny):
  model, variables = tiny
  state, step_fn, _, mesh = _setup(model, variables, PAPER_LIKE, frozen_bn_inference=False)
  before = _flat({'params': state.params, 'batch_stats': state.batch_stats})
  state, _ = step_fn(state, mesh_lib.shard_batch(_batch(), mesh), jax.random.key(1))
  after = _flat({'params': state.params, 'batch_stats': state.batch_stats})
  np.testing.assert_array_equal(before['params/features/norm0/scale'],
                                after['params/features/norm0/scale'])
  assert not np.array_equal(before['batch_stats/features/norm0/mean'],
                            after['batch_stats/features/norm0/mean'])


def _flops(model, variables, trainable):
  state, step_fn, _, mesh = _setup(model, variables, trainable, devices=jax.devices()[:1])
  compiled = step_fn.lower(state, mesh_lib.shard_batch(_batch(), mesh), jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return cost['flops']


def test_frozen_backward_pass_is_not_computed(tiny):
  model, variables = tiny
  all_flops = _flops(model, variables, ['.*'])
  paper_flops = _flops(model, variables, PAPER_LIKE)
  # Training everything costs ~forward + 2x backward; with the trunk frozen the
  # backward pass stops at denseblock4, so the step is close to a forward pass.
  assert paper_flops < 0.6 * all_flops, (paper_flops, all_flops)


def test_sharded_step_equals_single_device_step(tiny):
  model, variables = tiny
  assert jax.device_count() >= 4, 'conftest forces 4 CPU devices'
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    state, step_fn, _, mesh = _setup(model, variables, PAPER_LIKE, devices=devices)
    for i in range(2):
      state, metrics = step_fn(state, mesh_lib.shard_batch(_batch(i), mesh), jax.random.key(3))
    if len(devices) == 4:
      assert state.params['classifier']['kernel'].sharding.is_fully_replicated
    results.append(jax.device_get((state, metrics)))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mixed_precision', ['float32', 'bfloat16'])
def test_loss_decreases_on_a_tiny_problem(tiny, mixed_precision):
  _, variables = tiny
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[mixed_precision]
  model = models.get_model('densenet_tiny', num_classes=5, dtype=dtype)
  state, step_fn, _, mesh = _setup(model, variables, ['.*'], lr=3e-3,
                                   mixed_precision=mixed_precision)
  batch = mesh_lib.shard_batch(_batch(), mesh)
  losses = []
  for _ in range(20):
    state, metrics = step_fn(state, batch, jax.random.key(0))
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  # float32 master weights, whatever the compute dtype.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_random_init_trains_everything_by_default():
  config = mlc.ConfigDict({'trainable': ('classifier/.*',),
                           'weights': {'random_init_trains_all': True}})
  assert train.choose_trainable(config, pretrained=False) == ['.*']
  assert train.choose_trainable(config, pretrained=True) == ['classifier/.*']
  config.weights.random_init_trains_all = False
  assert train.choose_trainable(config, pretrained=False) == ['classifier/.*']


def _optimizer_config(**kwargs):
  c = mlc.ConfigDict({'name': 'adam', 'lr': 1e-3, 'schedule': 'constant', 'warmup_steps': 0})
  c.update(kwargs)
  return c


def test_learning_rate_schedules():
  constant = train.make_schedule(_optimizer_config(), 100)
  assert [float(constant(s)) for s in (0, 50, 99)] == pytest.approx([1e-3] * 3)
  warm = train.make_schedule(_optimizer_config(warmup_steps=10), 100)
  assert [float(warm(s)) for s in (0, 5, 10, 99)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])
  cosine = train.make_schedule(_optimizer_config(schedule='cosine', warmup_steps=10), 110)
  # Linear warm-up to the peak, then half a cosine period down to 0 at the last step.
  assert [float(cosine(s)) for s in (0, 10, 60, 110)] == pytest.approx([0, 1e-3, 5e-4, 0],
                                                                       abs=1e-9)
  # The optimizer follows the schedule: its first update is 0 during the warm-up's step 0.
  tx = train.make_optimizer(_optimizer_config(schedule='cosine', warmup_steps=10), 110)
  params = {'w': jnp.ones(3)}
  updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
  np.testing.assert_array_equal(updates['w'], 0.0)


@pytest.mark.parametrize('kwargs, match', [
    ({'schedule': 'cosin'}, "unknown optimizer.schedule 'cosin'"),
    ({'warmup_steps': 100}, 'warmup_steps=100'),
    ({'name': 'adamw'}, "unknown optimizer 'adamw'"),
])
def test_bad_optimizer_config_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    train.make_optimizer(_optimizer_config(**kwargs), 100)


def test_panel_indices_show_every_grade_highest_first():
  labels = np.array([0, 0, 2, 0, 4, 1, 2, 0])
  np.testing.assert_array_equal(train.panel_indices(labels, 4), [4, 2, 5, 0])
  np.testing.assert_array_equal(train.panel_indices(labels, 6), [4, 2, 5, 0, 6, 1])
  assert train.panel_indices(labels, 0).size == 0
  assert train.panel_indices(np.array([], int), 3).size == 0
  assert len(train.panel_indices(labels, 100)) == len(labels)


def test_evaluate_drops_the_padding_and_keeps_the_order(tiny):
  model, variables = tiny
  images = _batch(n=8)['image']
  batches = [{'image': images[:4], 'label': np.arange(4), 'valid': np.ones(4, bool)},
             {'image': np.concatenate([images[4:6], images[:2]]), 'label': np.arange(4, 8),
              'valid': np.array([True, True, False, False])}]
  labels, probs = evaluate.evaluate(model, variables, iter(batches), mesh_lib.make_mesh())
  np.testing.assert_array_equal(labels, np.arange(6))
  np.testing.assert_allclose(probs, evaluate.eval_step(variables, images[:6], model=model),
                             rtol=1e-5, atol=1e-6)


def test_build_model_takes_the_cpu_convolutions_only_when_asked():
  config = mlc.ConfigDict({'model': 'resnet_tiny', 'num_classes': 3, 'cpu_conv': False})
  assert evaluate.build_model(config).conv_general_dilated is None
  config.cpu_conv = True
  assert evaluate.build_model(config).conv_general_dilated == cpu_conv.make()
  assert evaluate.build_model(config).num_classes == 3


@pytest.mark.parametrize('path, error', [(None, 'weights.path is required'),
                                         ('missing_weights', 'do not exist')])
def test_unusable_weights_path_fails_before_the_dataset_is_built(tmp_path, monkeypatch, path,
                                                                 error):
  from ml_collections.config_flags import config_flags

  from drjax import weights
  from drjax.data import pipeline

  def build(_):
    raise AssertionError('the dataset was built before the weights were checked')

  monkeypatch.setattr(pipeline, 'get_dataset', build)
  configs = pathlib.Path(__file__).resolve().parents[1] / 'configs'
  config = config_flags._LoadConfigModule('densenet_config', str(configs / 'densenet.py')
                                          ).get_config('transfer224')
  if path is not None:
    config.weights.path = str(tmp_path / path)
  with pytest.raises((weights.WeightsError, FileNotFoundError), match=error):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists() or \
      not any((tmp_path / 'run' / 'checkpoints').iterdir())
