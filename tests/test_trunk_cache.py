"""Tests for drjax.trunk_cache: the cut, the cached step against the step on images, the cache
on disk (killed builds, changed keys, corruption, several processes) and a run with it."""

import pathlib
import shutil
import threading

import chex
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from ml_collections.config_flags import config_flags

from drjax import errors, evaluate, freeze, models, run_files, train, trunk_cache
from drjax import mesh as mesh_lib
from drjax.data import augment, pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
BATCH = 4
# The paper's choice on the tiny variants: the last block and the head. Cuts after a
# transition, a ResNet layer, a VGG max-pool; DenseNet121's is inside a dense block.
TRAINABLE = {
    'densenet_tiny': ['classifier/.*', 'features/norm5/.*', 'features/denseblock4/.*'],
    'resnet_tiny': ['fc/.*', 'layer4/.*'],
    'vgg_tiny': ['classifier/.*', 'features/(19|20)/.*'],
}
DENSENET121_PAPER = ['classifier/.*', 'features/norm5/.*',
                     'features/denseblock4/denselayer1[4-6]/.*']


def _variables(model, seed=0):
  """Random variables, with non-trivial running statistics (the frozen BatchNorms use them).

  Drawn with numpy from the shapes alone: no initialiser to compile, and host arrays, which
  a step that donates its state cannot delete.
  """
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), SIZE))
  rs = np.random.RandomState(seed)

  def draw(path, x):
    name = path[-1].key
    if name == 'kernel':  # He et al.: unit-variance activations through the depth
      return rs.randn(*x.shape) * np.sqrt(2.0 / np.prod(x.shape[:-1]))
    if name == 'mean':
      return 0.1 * rs.randn(*x.shape)
    if name in ('var', 'scale'):
      return rs.uniform(0.5, 2.0, x.shape)
    return 0.1 * rs.randn(*x.shape)  # biases

  return jax.tree.map(np.float32, jax.tree_util.tree_map_with_path(draw, shapes))


def _batch(n=BATCH, seed=0):
  rs = np.random.RandomState(seed)
  return {'image': rs.randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8),
          'label': (np.arange(n) % 5).astype(np.int32)}


def _recording_adam():
  """Adam, with the last gradients kept in the state (the step returns no gradients)."""
  record = optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (grads, grads))
  return optax.chain(record, optax.adam(1e-2))


def _rel_errors(a, b):
  """Per leaf ||a - b|| / ||b||."""
  return jax.tree.map(lambda x, y: float(np.linalg.norm(np.asarray(x, np.float64) - y) /
                                         max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30)),
                      jax.device_get(a), jax.device_get(b))


def _compare_steps(name, trainable):
  """(cached step's state, metrics, flops), the same for the step on images, trunk flops."""
  model = models.get_model(name, num_classes=5)
  variables = _variables(model)
  labels = freeze.trainable_labels(variables['params'], trainable)
  cut = trunk_cache.find_cut(model, variables, labels, SIZE)
  tx = _recording_adam()
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  batch = _batch()
  trunk_fn = jax.jit(trunk_cache.make_trunk_fn(model, labels, cut)).lower(
      variables, batch['image'], np.zeros(BATCH, np.int32), np.int32(-1)).compile()
  trunk = trunk_fn(variables, batch['image'], np.zeros(BATCH, np.int32), np.int32(-1))
  chex.assert_shape(trunk, (BATCH, *cut.shape))
  create = jax.jit(lambda v: train.create_train_state(v, tx, labels))
  results = {}
  for key, inputs, step_cut in (('image', batch['image'], None), ('trunk', trunk, cut)):
    state = mesh_lib.replicate(create(variables), mesh)
    step_fn = train.make_train_step(model, tx, labels, mesh=mesh, cut=step_cut)
    args = (state, mesh_lib.shard_batch({key: inputs, 'label': batch['label']}, mesh),
            jax.random.key(3))
    compiled = step_fn.lower(*args).compile()
    state, metrics = compiled(*args)
    results[key] = (jax.device_get(state), jax.device_get(metrics), _flops(compiled))
  return results, _flops(trunk_fn), (model, variables, labels, cut)


def _flops(compiled):
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list | tuple) else cost)['flops']


def _assert_same_step(results, trunk_flops):
  (image_state, image_metrics, image_flops) = results['image']
  (trunk_state, trunk_metrics, trunk_flops_step) = results['trunk']
  errors_ = _rel_errors({'metrics': trunk_metrics, 'grads': trunk_state.opt_state[0],
                         'params': trunk_state.params, 'batch_stats': trunk_state.batch_stats},
                        {'metrics': image_metrics, 'grads': image_state.opt_state[0],
                         'params': image_state.params, 'batch_stats': image_state.batch_stats})
  worst = max(jax.tree.leaves(errors_))
  assert worst <= 1e-5, {k: max(jax.tree.leaves(v)) for k, v in errors_.items()}
  assert np.linalg.norm(jax.tree.leaves(trunk_state.opt_state[0])[0]) > 0  # it trained
  # The step fed at the cut does not compute the trunk: it is what XLA dropped.
  assert trunk_flops_step < image_flops - 0.5 * trunk_flops, (trunk_flops_step, image_flops,
                                                              trunk_flops)


@pytest.mark.parametrize('name, trainable, expected', [
    ('densenet_tiny', TRAINABLE['densenet_tiny'], 'transition3'),
    ('densenet_tiny', ['classifier/.*', 'features/norm5/.*', 'features/denseblock[34]/.*',
                       'features/transition[23]/.*', 'features/denseblock2/denselayer2/.*'],
     'denseblock2/denselayer1'),
    ('resnet_tiny', TRAINABLE['resnet_tiny'], 'layer3'),
    ('vgg_tiny', TRAINABLE['vgg_tiny'], 'pool4'),
    ('vgg_tiny', ['classifier/.*'], 'pool5'),
    ('densenet_tiny', ['.*'], None),
    ('resnet_tiny', ['conv1/.*', 'fc/.*'], None),
])
def test_the_cut_is_the_last_point_below_every_trainable_layer(name, trainable, expected):
  model = models.get_model(name, num_classes=5)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), SIZE))
  labels = freeze.trainable_labels(variables['params'], trainable)
  cut = trunk_cache.find_cut(model, variables, labels, SIZE)
  assert (cut and cut.name) == expected
  # Frozen BatchNorms on batch statistics are not a fixed function of one image.
  assert trunk_cache.find_cut(model, variables, labels, SIZE, frozen_bn_inference=False) is None


@pytest.mark.parametrize('name', sorted(TRAINABLE))
def test_cached_step_equals_the_step_on_images(name):
  results, trunk_flops, _ = _compare_steps(name, TRAINABLE[name])
  _assert_same_step(results, trunk_flops)


def test_cached_step_equals_the_step_on_images_at_densenet121_depth():
  results, trunk_flops, (model, variables, labels, cut) = _compare_steps('densenet121',
                                                                         DENSENET121_PAPER)
  assert cut.name == 'denseblock4/denselayer13' and cut.shape == (1, 1, 928)
  _assert_same_step(results, trunk_flops)


def test_bfloat16_features_round_the_step():
  """bfloat16 storage (not the default) moves the loss and the head's gradients by ~1%.

  The trainable dense layer of this random tiny network, whose BatchNorms normalise 16 values
  of a 1x1 map, amplifies the rounding: its gradients move by up to ~15% in a step.
  """
  model = models.get_model('densenet_tiny', num_classes=5)
  variables = _variables(model)
  labels = freeze.trainable_labels(variables['params'], TRAINABLE['densenet_tiny'])
  cut = trunk_cache.find_cut(model, variables, labels, SIZE)
  tx = _recording_adam()
  step_fn = train.make_train_step(model, tx, labels, cut=cut)
  batch = _batch(16)
  create = jax.jit(lambda v: train.create_train_state(v, tx, labels))
  out = {}
  for dtype in ('float32', 'bfloat16'):
    trunk = trunk_cache.make_trunk_fn(model, labels, cut, dtype=dtype)(
        variables, batch['image'], np.zeros(16, np.int32), np.int32(-1))
    assert str(trunk.dtype) == dtype
    state, metrics = step_fn(create(variables), {'trunk': trunk, 'label': batch['label']},
                             jax.random.key(0))
    out[dtype] = jax.device_get((metrics['loss'], state.opt_state[0]))
  assert 0 < abs(out['bfloat16'][0] - out['float32'][0]) <= 5e-3 * abs(out['float32'][0])
  errors_ = _rel_errors(out['bfloat16'][1], out['float32'][1])
  assert max(jax.tree.leaves((errors_['classifier'], errors_['features']['norm5']))) < 5e-2


# ----------------------------------------------------------------------------- on disk


def _memory_dataset(num_train=10, num_val=3):
  """A DatasetSplits of random in-memory images (no tfds builder)."""
  def source(n, seed):
    batch = _batch(n, seed)
    records = [{'image': image, 'label': label}
               for image, label in zip(batch['image'], batch['label'], strict=True)]
    return pipeline.Source(records, np.arange(n), batch['label'].astype(np.int64),
                           np.asarray([f'{seed}-{i}' for i in range(n)]),
                           np.asarray([f'{seed}-{i}' for i in range(n)]), False)
  train_source = source(num_train, 1)
  return pipeline.DatasetSplits('memory', train_source, source(num_val, 2), None, 5,
                                np.bincount(train_source.labels, minlength=5), None)


def _config(cache_dir, views=2, seed=0):
  c = mlc.ConfigDict()
  c.model = 'densenet_tiny'
  c.input = pipeline.default_config()
  c.input.update(image_size=SIZE, num_workers=1, prefetch=1)
  c.augment = augment.default_config()
  c.augment_enabled = True
  c.seed = seed
  c.mixed_precision = 'float32'
  c.frozen_bn_inference = True
  c.eval_batch_size = 4
  c.trunk_cache = trunk_cache.default_config()
  c.trunk_cache.update(enabled=True, views=views, dir=str(cache_dir))
  return c


@pytest.fixture(scope='module')
def tiny_run():
  model = models.get_model('densenet_tiny', num_classes=5)
  variables = _variables(model)
  labels = freeze.trainable_labels(variables['params'], TRAINABLE['densenet_tiny'])
  return model, variables, labels, _memory_dataset()


def _prepare(tiny_run, config, variables=None):
  model, default_variables, labels, ds = tiny_run
  return trunk_cache.prepare(config, model, variables or default_variables, labels, ds)


def _contents(cache):
  """Every cached row of every split, read back through the readers."""
  return {split: np.stack([reader.read(i, v) for i in range(len(cache.labels[split]))
                           for v in range(cache.views if split == 'train' else 1)])
          for split, reader in cache.readers.items()}


def test_views_are_augmented_reproducibly_and_validation_is_plain(tmp_path, tiny_run):
  cache = _prepare(tiny_run, _config(tmp_path / 'a', views=3))
  assert cache.built and (cache.directory / 'COMPLETE.json').exists()
  train_rows = _contents(cache)['train'].reshape(10, 3, *cache.cut.shape)
  assert not np.array_equal(train_rows[:, 0], train_rows[:, 1])  # different views
  model, variables, labels, ds = tiny_run
  plain = trunk_cache.make_trunk_fn(model, labels, cache.cut)(
      variables, np.stack([r['image'] for r in ds.validation.data_source]), np.zeros(3, np.int32),
      np.int32(-1))
  np.testing.assert_allclose(_contents(cache)['validation'], plain, rtol=1e-5, atol=1e-6)
  # The train iterator serves (seed, step)'s examples in their drawn views, resumably.
  load = cache.train_load()
  batches = pipeline.make_train_iterator(_config(tmp_path).input, ds.train, 4, 0, load=load)
  first = [next(batches) for _ in range(3)]
  resumed = pipeline.make_train_iterator(_config(tmp_path).input, ds.train, 4, 0, start_step=2,
                                         load=load)
  chex.assert_trees_all_equal(next(resumed), first[2])
  assert first[0]['trunk'].shape == (4, *cache.cut.shape)


def test_killed_build_then_rerun_gives_the_same_cache(tmp_path, tiny_run, monkeypatch):
  reference = _contents(_prepare(tiny_run, _config(tmp_path / 'reference')))
  real_iterator = pipeline.make_eval_iterator

  def killed_after_one_batch(*args, **kwargs):
    batches = real_iterator(*args, **kwargs)
    yield next(batches)
    raise KeyboardInterrupt('killed')

  monkeypatch.setattr(pipeline, 'make_eval_iterator', killed_after_one_batch)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tiny_run, _config(tmp_path / 'killed'))
  (directory,) = (tmp_path / 'killed').iterdir()
  assert not (directory / 'COMPLETE.json').exists() and not list(directory.glob('*.json'))
  monkeypatch.undo()
  cache = _prepare(tiny_run, _config(tmp_path / 'killed'))
  assert cache.built
  chex.assert_trees_all_equal(_contents(cache), reference)
  # Killed after the shards, before COMPLETE.json: the intact shards are kept.
  (cache.directory / 'COMPLETE.json').unlink()
  before = {p: p.stat().st_mtime_ns for p in cache.directory.glob('*.npy')}
  cache = _prepare(tiny_run, _config(tmp_path / 'killed'))
  assert {p: p.stat().st_mtime_ns for p in cache.directory.glob('*.npy')} == before
  chex.assert_trees_all_equal(_contents(cache), reference)


def test_a_changed_key_builds_another_cache(tmp_path, tiny_run, capsys):
  first = _prepare(tiny_run, _config(tmp_path))
  again = _prepare(tiny_run, _config(tmp_path))
  assert again.directory == first.directory and not again.built
  assert 'complete and intact' in capsys.readouterr().out
  _, variables, labels, _ = tiny_run
  trainable, frozen = freeze.partition(variables['params'], labels)
  nudged = jax.tree.map(lambda x: x * 1.001, frozen)
  changes = {'seed': _prepare(tiny_run, _config(tmp_path, seed=1)),
             'views': _prepare(tiny_run, _config(tmp_path, views=3)),
             'frozen weights': _prepare(tiny_run, _config(tmp_path), {
                 'params': freeze.merge(trainable, nudged),
                 'batch_stats': variables['batch_stats']})}
  for what, cache in changes.items():
    assert cache.built and cache.directory != first.directory, what
  assert len({c.directory for c in changes.values()}) == 3
  # What trains is no part of the trunk: the same cache.
  trained = jax.tree.map(lambda x: x + 1.0, trainable)
  same = _prepare(tiny_run, _config(tmp_path), {'params': freeze.merge(trained, frozen),
                                                'batch_stats': variables['batch_stats']})
  assert same.directory == first.directory and not same.built


def test_a_corrupt_cache_file_is_detected_and_rebuilt(tmp_path, tiny_run, capsys):
  cache = _prepare(tiny_run, _config(tmp_path))
  reference = _contents(cache)
  (shard,) = cache.directory.glob('train-*.npy')
  data = bytearray(shard.read_bytes())
  data[-5] ^= 0xFF
  shard.write_bytes(bytes(data))
  # A reader of the damaged file refuses the row; a new run rebuilds it.
  with pytest.raises(trunk_cache.TrunkCacheError, match='corrupt'):
    _contents(cache)
  rebuilt = _prepare(tiny_run, _config(tmp_path))
  assert 'is damaged' in capsys.readouterr().out and rebuilt.built
  chex.assert_trees_all_equal(_contents(rebuilt), reference)


def test_each_process_builds_its_own_rows(tmp_path, tiny_run, monkeypatch):
  """Two processes, simulated by two threads with their own `jax.process_index()`."""
  reference = _contents(_prepare(tiny_run, _config(tmp_path / 'one')))
  local, barrier = threading.local(), threading.Barrier(2)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: local.index)
  monkeypatch.setattr(trunk_cache.distributed, 'barrier', lambda name: barrier.wait(120))
  caches, failures = {}, []

  def process(index):
    local.index = index
    try:
      caches[index] = _prepare(tiny_run, _config(tmp_path / 'two'))
    except Exception as e:  # noqa: BLE001 - reported by the test below
      failures.append(e)
      barrier.abort()

  threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  monkeypatch.undo()
  assert not failures, failures
  assert sorted(p.name for p in caches[0].directory.glob('*.npy')) == [
      'train-0-5.npy', 'train-5-10.npy', 'validation-0-1.npy', 'validation-1-3.npy']
  for cache in caches.values():
    chex.assert_trees_all_equal(_contents(cache), reference)


def test_unusable_settings_are_user_errors_or_a_one_line_fallback(tmp_path, tiny_run, capsys):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(trunk_cache.TrunkCacheError, match='cannot write the trunk cache') as e:
    _prepare(tiny_run, _config(blocker / 'cache'))
  assert isinstance(e.value, errors.UserError)
  model, variables, _, ds = tiny_run
  everything = freeze.trainable_labels(variables['params'], ['.*'])
  assert trunk_cache.prepare(_config(tmp_path), model, variables, everything, ds) is None
  out = capsys.readouterr().out.strip().splitlines()
  assert out == ['trunk cache: off, every layer trains; training on the images']
  config = _config(tmp_path)
  config.trunk_cache.enabled = False
  assert trunk_cache.prepare(config, model, variables, everything, ds) is None


# ----------------------------------------------------------------------------- a run


def _smoke_config(data_dir, cache_dir):
  module = config_flags._LoadConfigModule('densenet_config', str(REPO / 'configs' / 'densenet.py'))
  config = module.get_config('smoke')
  with config.unlocked():
    config.trunk_cache = trunk_cache.default_config()
  config.trunk_cache.update(enabled=True, views=2, dir=str(cache_dir))
  config.input.data_dir = str(data_dir)
  config.weights.random_init_trains_all = False  # the smoke model's frozen trunk, random
  config.gradcam.num_images = 0
  return config


def test_train_and_evaluate_on_the_cache_resumes_exactly(tmp_path, capsys):
  config = _smoke_config(tmp_path / 'tfds', tmp_path / 'cache')
  whole = tmp_path / 'whole'
  train.train_and_evaluate(config, whole)
  assert 'trunk cache: densenet_tiny cut at transition3' in capsys.readouterr().out
  # Resumed from the step-3 checkpoint of the same run, on the cache it built.
  resumed = tmp_path / 'resumed'
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  (resumed / 'metrics.json').unlink()
  train.train_and_evaluate(config, resumed)
  out = capsys.readouterr().out
  assert 'Resuming from checkpoint step 3' in out and 'complete and intact' in out
  assert (resumed / 'metrics.json').read_text() == (whole / 'metrics.json').read_text()
  rows = [[{k: v for k, v in r.items() if k != 'steps_per_sec'}
           for r in run_files.read_metrics_jsonl(run)] for run in (whole, resumed)]
  assert rows[0] == rows[1]
  chex.assert_trees_all_equal(*(evaluate.load_run(run)[2] for run in (whole, resumed)))
