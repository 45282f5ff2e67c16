"""Tests of the grain pipeline: oversampling, determinism, resume, sharding, padded evaluation."""

import dataclasses
import io
import itertools

import numpy as np
import pytest

from drjax.data import pipeline

EYEPACS_COUNTS = (25810, 2443, 5292, 873, 708)


def _config(**overrides):
  c = pipeline.default_config()
  c.num_workers = 2
  c.update(overrides)
  return c


def _fake_source(labels, size=4, with_masks=False) -> pipeline.Source:
  """In-memory records whose pixel (0, 0) encodes the example index (for bookkeeping)."""
  records = []
  for i, label in enumerate(labels):
    image = np.zeros((size, size, 3), np.uint8)
    image[0, 0, :2] = (i % 256, i // 256)
    rec = {'image': image, 'label': int(label), 'id': f'ex{i}'.encode()}
    if with_masks:
      rec['masks'] = np.full((size, size, 5), i % 2, np.uint8)
    records.append(rec)
  n = len(labels)
  ids = np.asarray([f'ex{i}' for i in range(n)])
  return pipeline.Source(records, np.arange(n), np.asarray(labels, np.int64), ids, ids,
                         with_masks)


def _index(batch) -> np.ndarray:
  return batch['image'][:, 0, 0, 0].astype(int) + 256 * batch['image'][:, 0, 0, 1].astype(int)


def _take(it, n):
  return list(itertools.islice(it, n))


def test_oversampling_follows_the_paper_weights():
  labels = np.repeat(np.arange(5), np.asarray(EYEPACS_COUNTS) // 10)
  source = _fake_source(labels)
  it = pipeline.make_train_iterator(_config(), source, batch_size=64, seed=0)
  drawn = np.concatenate([b['label'] for b in _take(it, 50)])
  w_d = np.asarray(pipeline.PAPER_CLASS_WEIGHTS) * np.bincount(labels)
  expected = w_d / w_d.sum()  # ~0.2 each: the paper's weights balance EyePACS
  observed = np.bincount(drawn, minlength=5) / len(drawn)
  np.testing.assert_allclose(observed, expected, atol=0.025)  # ~3.5 sigma at 3200 draws
  assert drawn.dtype == np.int32


def test_no_class_weights_visits_each_example_once_per_epoch():
  source = _fake_source(np.arange(10) % 5)
  it = pipeline.make_train_iterator(_config(class_weights=None), source, batch_size=5, seed=1)
  batches = [_index(b) for b in _take(it, 4)]
  assert sorted(np.concatenate(batches[:2])) == list(range(10))
  assert sorted(np.concatenate(batches[2:])) == list(range(10))
  assert not np.array_equal(np.concatenate(batches[:2]), np.concatenate(batches[2:]))


def test_deterministic_and_resumable():
  source = _fake_source(np.arange(37) % 5)
  cfg = _config()
  first = [_index(b) for b in _take(pipeline.make_train_iterator(cfg, source, 8, seed=3), 6)]
  again = [_index(b) for b in _take(pipeline.make_train_iterator(cfg, source, 8, seed=3), 6)]
  resumed = [_index(b) for b in _take(
      pipeline.make_train_iterator(cfg, source, 8, seed=3, start_step=4), 2)]
  other = [_index(b) for b in _take(pipeline.make_train_iterator(cfg, source, 8, seed=4), 6)]
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first[4:], resumed)
  assert not np.array_equal(first, other)


def test_processes_read_disjoint_rows_of_the_global_batch():
  source = _fake_source(np.arange(23) % 5, with_masks=True)
  cfg = _config(with_masks=True)
  whole = _take(pipeline.make_train_iterator(cfg, source, 8, seed=0), 3)
  parts = [_take(pipeline.make_train_iterator(cfg, source, 8, seed=0, process_index=p,
                                              process_count=2), 3) for p in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(
        _index(whole[step]), np.concatenate([_index(parts[p][step]) for p in range(2)]))
    assert parts[0][step]['masks'].shape == (4, 4, 4, 5)
    assert parts[0][step]['masks'].dtype == np.uint8
  with pytest.raises(ValueError, match='divide'):
    pipeline.make_train_iterator(cfg, source, 7, seed=0, process_count=2)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_sees_every_example_exactly_once_with_padding(process_count):
  source = _fake_source(np.arange(10) % 5)
  seen, num_batches = [], []
  for p in range(process_count):
    batches = list(pipeline.make_eval_iterator(_config(), source, 4, process_index=p,
                                               process_count=process_count))
    num_batches.append(len(batches))
    for b in batches:
      assert b['valid'].dtype == bool and b['image'].shape[0] == 4 // process_count
      seen.extend(_index(b)[b['valid']])
      assert (b['image'][~b['valid']] == 0).all()
  assert sorted(seen) == list(range(10))
  assert num_batches == [3] * process_count  # ceil(10 / 4) everywhere: hosts stay in step


def test_class_weights_reject_ungraded_labels():
  with pytest.raises(ValueError, match='ungraded'):
    pipeline.sampling_probabilities(np.asarray([0, -1, 2]), pipeline.PAPER_CLASS_WEIGHTS)
  assert pipeline.sampling_probabilities(np.asarray([0, -1]), None) is None


@pytest.mark.parametrize('weights', [None, (), (None,)])
def test_class_weights_none_from_a_flag_means_uniform(weights):
  # `--config.input.class_weights=None` on the tuple field arrives as (None,).
  assert pipeline.sampling_probabilities(np.asarray([0, 1, 2]), weights) is None
  probs = pipeline.sampling_probabilities(np.asarray([0, 1, 1]), (1.0, 3.0))
  np.testing.assert_allclose(probs, [1 / 7, 3 / 7, 3 / 7])


def test_default_config_is_lockable_and_overridable():
  c = pipeline.default_config()
  c.lock()
  c.class_weights = None
  c.dataset = 'eyepacs'
  with pytest.raises(AttributeError):
    c.imagesize = 3
  assert c.val_fraction == 0.2 and not c.with_masks


def test_get_dataset_builds_synthetic_on_first_use(tmp_path):
  cfg = _config(data_dir=str(tmp_path), num_images=10, image_size=32, with_masks=True,
                build_workers=1)
  ds = pipeline.get_dataset(cfg)
  assert len(ds.train) + len(ds.validation) == 10 and ds.test is None
  assert set(ds.train.ids).isdisjoint(ds.validation.ids)
  assert ds.class_counts.sum() == len(ds.train) and ds.num_classes == 5
  batch = next(pipeline.make_train_iterator(cfg, ds.train, 4, seed=0))
  assert batch['image'].shape == (4, 32, 32, 3) and batch['masks'].shape == (4, 32, 32, 5)
  light = ds.train.get(0, with_masks=False)  # masks left encoded when not asked for
  np.testing.assert_array_equal(light['image'], ds.train[0]['image'])
  assert isinstance(light['masks'], bytes)
  again = pipeline.get_dataset(cfg)  # already built: reused, same split
  np.testing.assert_array_equal(again.validation.indices, ds.validation.indices)


@pytest.fixture(scope='module')
def idrid_config(idrid_dir, tmp_path_factory):
  return _config(dataset='idrid', manual_dir=str(idrid_dir), image_size=32, limit=30,
                 data_dir=str(tmp_path_factory.mktemp('tfds')), build_workers=1)


def test_get_dataset_idrid_real(idrid_config):
  ds = pipeline.get_dataset(idrid_config)
  assert len(ds.train) + len(ds.validation) == 30
  assert 4 <= len(ds.validation) <= 8
  labels = [b for batch in pipeline.make_eval_iterator(idrid_config, ds.validation, 4)
         for b in batch['label'][batch['valid']]]
  assert sorted(labels) == sorted(ds.validation.labels.tolist())
  batch = next(pipeline.make_train_iterator(idrid_config, ds.train, 4, seed=0))
  assert batch['image'].shape == (4, 32, 32, 3)


def test_with_masks_needs_a_dataset_with_masks(idrid_config):
  cfg = idrid_config.copy_and_resolve_references()
  cfg.with_masks = True
  with pytest.raises(ValueError, match='no lesion masks'):
    pipeline.get_dataset(cfg)


# --- reading stored images at another size, lean records, processes, device prefetch ------


@pytest.fixture(scope='module')
def jpeg_config(tmp_path_factory):
  """An eyepacs-built set of 12 JPEGs stored at 64 px (benchmarks/common.py's stand-in)."""
  from benchmarks import common

  fields = common.eyepacs_standin(str(tmp_path_factory.mktemp('standin')), 12, stored_size=64,
                                  unique_images=3, build_workers=1)
  return _config(val_fraction=0.0, class_weights=None, image_size=64, **fields)


def test_stored_images_are_read_at_the_training_size(jpeg_config):
  from PIL import Image

  from drjax.data import images

  stored = pipeline.get_dataset(jpeg_config.copy_and_resolve_references()).train
  assert stored.records is not None
  for size in (32, 48):  # 64 -> 32: JPEG decoded at half scale; -> 48: decoded whole, resized
    cfg = jpeg_config.copy_and_resolve_references()
    cfg.image_size = size
    ds = pipeline.get_dataset(cfg)
    assert ds.builder.info.config_name == 'size64'  # the stored set, not one built at `size`
    batch = next(pipeline.make_eval_iterator(cfg, ds.train, 4))
    assert batch['image'].shape == (4, size, size, 3) and batch['image'].dtype == np.uint8
    np.testing.assert_array_equal(batch['label'], ds.train.labels[:4])
    for row, image in enumerate(batch['image']):
      full = stored[row]['image']  # tfds's own decoding at the stored size
      np.testing.assert_array_equal(images.decode_square(stored.encoded(row)[0]), full)
      reference = np.asarray(Image.fromarray(full).resize((size, size), Image.BILINEAR))
      # Same picture: reduced-scale decoding moves pixels by a few grey levels only.
      assert np.abs(image.astype(int) - reference).mean() < 3
      if size == 32:  # decoded at half scale, not decoded whole and then shrunk
        half = Image.open(io.BytesIO(stored.encoded(row)[0]))
        half.draft('RGB', (32, 32))
        np.testing.assert_array_equal(image, np.asarray(half))


def test_encoded_read_gives_the_pixels_and_labels_of_tfds(jpeg_config):
  ds = pipeline.get_dataset(jpeg_config.copy_and_resolve_references())
  lean = next(pipeline.make_eval_iterator(jpeg_config, ds.train, 12))
  slow = next(pipeline.make_eval_iterator(
      jpeg_config, dataclasses.replace(ds.train, records=None), 12))
  assert lean['image'].shape == (12, 64, 64, 3)
  for key in ('image', 'label', 'valid'):
    np.testing.assert_array_equal(lean[key], slow[key])


def test_masks_are_resized_with_the_images(tmp_path):
  cfg = _config(data_dir=str(tmp_path), num_images=6, image_size=16, stored_size=32,
                with_masks=True, build_workers=1, val_fraction=0.0, class_weights=None)
  ds = pipeline.get_dataset(cfg)
  batch = next(pipeline.make_eval_iterator(cfg, ds.train, 6))
  assert batch['image'].shape == (6, 16, 16, 3) and batch['masks'].shape == (6, 16, 16, 5)
  stored = np.stack([ds.train[i]['masks'] for i in range(6)])
  # 32 -> 16: a pixel is lesion if any of the 2x2 stored pixels under it is.
  pooled = stored.reshape(6, 16, 2, 16, 2, 5).max(axis=(2, 4))
  np.testing.assert_array_equal(batch['masks'], pooled)
  assert pooled.any()


def test_reader_processes_yield_the_same_stream():
  source = _fake_source(np.arange(29) % 5)
  cfg = _config(num_workers=1)
  alone = [_index(b) for b in _take(pipeline.make_train_iterator(cfg, source, 4, seed=2), 7)]
  cfg.reader_processes = 2
  it = pipeline.make_train_iterator(cfg, source, 4, seed=2, start_step=3)
  try:
    together = [_index(b) for b in _take(it, 4)]
  finally:
    it.close()
  np.testing.assert_array_equal(together, alone[3:])


@pytest.mark.parametrize('ahead', [0, 2])
def test_prefetch_to_mesh_yields_the_same_batches_in_order(ahead):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from drjax import mesh as mesh_lib

  mesh = mesh_lib.make_mesh(jax.devices()[:4])
  batches = [{'image': np.full((8, 2, 2, 3), k, np.uint8), 'label': np.arange(8) + k}
             for k in range(5)]
  read = []

  def stream():
    for b in batches:
      read.append(1)
      yield b

  out = mesh_lib.prefetch_to_mesh(stream(), mesh, ahead=ahead)
  first = next(out)
  assert len(read) == 1 + ahead  # the next `ahead` batches are already on their way
  got = [first, *out]
  assert len(got) == len(batches)
  for b, g in zip(batches, got, strict=True):
    for key in ('image', 'label'):
      assert g[key].sharding == NamedSharding(mesh, P('data'))
      np.testing.assert_array_equal(np.asarray(g[key]), b[key])
