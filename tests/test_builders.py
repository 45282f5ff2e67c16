"""Tests of the tfds builders: real IDRiD layout, fake Kaggle layouts, bad input, no TensorFlow."""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from drjax.data import builders, images, synthetic
from drjax.data.builders import base, eyepacs

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fundus(w=96, h=64, colour=(200, 100, 50), seed=0) -> np.ndarray:
  """A fake fundus photograph: a textured bright disc on black, cut at top and bottom."""
  yy, xx = np.mgrid[:h, :w]
  inside = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 <= (0.45 * w) ** 2
  noise = np.random.default_rng(seed).integers(0, 40, (h, w, 1))
  return np.where(inside[..., None], np.asarray(colour) + noise, 0).clip(0, 255).astype(
      np.uint8)


def _save(path: pathlib.Path, image, fmt=None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(image, bytes):
    path.write_bytes(image)
  else:
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, format=fmt)


def _write_csv(path: pathlib.Path, header, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def _aptos(root: pathlib.Path, labels: dict, files: dict) -> pathlib.Path:
  """APTOS layout: train.csv (id_code,diagnosis) + train_images/<id>.png."""
  _write_csv(root / 'train.csv', ['id_code', 'diagnosis'], list(labels.items()))
  for name, image in files.items():
    _save(root / 'train_images' / f'{name}.png', image, 'PNG')
  return root


def _build(tmp_path, name, manual_dir=None, **options):
  return builders.prepare(name, data_dir=str(tmp_path / 'tfds'),
                          manual_dir=str(manual_dir) if manual_dir else None, num_workers=1,
                          **options)


def _records(builder, split='train') -> dict:
  ds = builder.as_data_source(split)
  return {r['id'].decode(): r for r in (ds[i] for i in range(len(ds)))}


def _report(builder, split='train') -> dict:
  return json.loads((builder.data_path / f'build_report_{split}.json').read_text())


def _skip_reasons(builder) -> dict:
  return {s['id']: s['reason'] for s in _report(builder)['skipped']}


GOOD = {'a': _fundus(seed=1), 'b': _fundus(seed=2)}


# --- synthetic_fundus ---------------------------------------------------------------------


@pytest.fixture(scope='module')
def synthetic_builder(tmp_path_factory):
  return builders.prepare('synthetic_fundus', data_dir=str(tmp_path_factory.mktemp('tfds')),
                          num_workers=1, num_images=5, image_size=32, num_test_images=2)


def test_synthetic_builds_and_reads_without_tensorflow(synthetic_builder):
  records = _records(synthetic_builder)
  assert len(records) == 5 and len(_records(synthetic_builder, 'test')) == 2
  expected = list(synthetic.generate(5, image_size=32, seed=0))
  for ex in expected:  # the train split is exactly synthetic.generate's stream
    r = records[ex['id']]
    np.testing.assert_array_equal(r['image'], ex['image'])
    np.testing.assert_array_equal(r['masks'], ex['masks'])
    assert r['label'] == ex['grade'] and r['eye'].decode() == ex['eye']
  assert set(_records(synthetic_builder, 'test')).isdisjoint(records)
  # Also readable by name, as tfds.data_source, once drjax.data.builders is imported.
  by_name = tfds.data_source(f'synthetic_fundus/{synthetic_builder.builder_config.name}',
                             split='train', data_dir=synthetic_builder.data_dir_root)
  assert len(by_name) == 5 and by_name[0]['image'].shape == (32, 32, 3)
  assert 'tensorflow' not in sys.modules
  files = os.listdir(synthetic_builder.data_path)
  assert any('array_record' in f for f in files), files


def test_synthetic_parallel_build_matches_in_process(synthetic_builder, tmp_path):
  parallel = builders.prepare('synthetic_fundus', data_dir=str(tmp_path), num_workers=2,
                              num_images=5, image_size=32, num_test_images=2)
  a, b = _records(synthetic_builder), _records(parallel)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k]['image'], b[k]['image'])


_PREPARE_AFTER_READY = r'''
import sys
from drjax.data import builders
print('ready', flush=True)
b = builders.prepare('synthetic_fundus', data_dir=sys.argv[1], num_workers=1, num_images=3,
                     image_size=32, num_test_images=1)
print(b.is_prepared())
'''


def test_concurrent_prepare_waits_for_the_build_in_progress(tmp_path):
  """A second process preparing the same config while another builds it waits for the
  build, then uses it: no second build, no FileExistsError from tfds' final rename."""
  options = dict(num_workers=1, num_images=3, image_size=32, num_test_images=1)
  builder = builders.make_builder('synthetic_fundus', str(tmp_path), **options)
  with builders.build_lock(builder):  # this process is "building"
    proc = subprocess.Popen([sys.executable, '-c', _PREPARE_AFTER_READY, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    try:
      proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
      pass
    assert proc.poll() is None, proc.stderr.read()  # blocked on the lock
    config_dir = pathlib.Path(builder.data_path).parent
    assert not list(config_dir.glob('incomplete.*'))  # and not building alongside
    builder.download_and_prepare(file_format='array_record')
    info = pathlib.Path(builder.data_path) / 'dataset_info.json'
    built_at = info.stat().st_mtime_ns
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert out.split() == ['True']
  assert info.stat().st_mtime_ns == built_at  # used, not rebuilt
  assert len(_records(builders.make_builder('synthetic_fundus', str(tmp_path), **options))) == 3


# Feature specs as first built: a change would make every dataset already on disk unreadable.
_TEXT = ('Text', (), 'object')
_STORED = {
    ('synthetic_fundus', ()): ('n2000_size224_seed0', ('image', 'label'), {
        'image': ('Image', (224, 224, 3), 'uint8'), 'label': ('ClassLabel', (), 'int64'),
        'masks': ('Tensor', (224, 224, 5), 'uint8'), 'id': _TEXT, 'patient_id': _TEXT,
        'eye': _TEXT}),
    ('eyepacs', ()): ('size512', ('image', 'label'), {
        'image': ('Image', (512, 512, 3), 'uint8'), 'label': ('ClassLabel', (), 'int64'),
        'id': _TEXT, 'patient_id': _TEXT, 'eye': _TEXT}),
    ('aptos2019', (('btgraham', True),)): ('size512_btgraham', ('image', 'label'), {
        'image': ('Image', (512, 512, 3), 'uint8'), 'label': ('ClassLabel', (), 'int64'),
        'id': _TEXT, 'patient_id': _TEXT}),
    ('idrid', (('task', 'grading'),)): ('grading_size512', None, {
        'image': ('Image', (512, 512, 3), 'uint8'), 'id': _TEXT, 'patient_id': _TEXT,
        'label': ('ClassLabel', (), 'int64'), 'dme_risk': ('Scalar', (), 'int64')}),
    ('idrid', (('task', 'segmentation'), ('image_size', 64))): ('segmentation_size64', None, {
        'image': ('Image', (64, 64, 3), 'uint8'), 'id': _TEXT, 'patient_id': _TEXT,
        'label': ('Scalar', (), 'int64'), 'masks': ('Tensor', (64, 64, 5), 'uint8'),
        'optic_disc': ('Tensor', (64, 64), 'uint8')}),
}


@pytest.mark.parametrize('name,options', sorted(_STORED))
def test_builders_keep_their_stored_feature_specs(name, options, tmp_path):
  config_name, supervised_keys, features = _STORED[name, options]
  b = builders.make_builder(name, str(tmp_path), num_workers=3, **dict(options))
  assert isinstance(b, base.FundusBuilder) and b._num_workers == 3
  assert (b.name, b.builder_config.name, str(b.version)) == (name, config_name, '1.0.0')
  assert b.info.supervised_keys == supervised_keys
  assert {k: (type(f).__name__, f.shape, np.dtype(f.np_dtype).name)
          for k, f in b.info.features.items()} == features
  assert b.info.description == sys.modules[type(b).__module__].__doc__.strip()
  assert pathlib.Path(type(b).code_path) == pathlib.Path(sys.modules[type(b).__module__].__file__)


def test_the_base_builder_is_not_a_dataset():
  imported = tfds.core.registered.list_imported_builders()
  assert set(builders.BUILDERS) <= set(imported) and 'fundus_builder' not in imported
  with pytest.raises(TypeError, match='abstract'):
    base.FundusBuilder(data_dir='unused')


# --- real IDRiD layout ----------------------------------------------------------------------


def test_idrid_grading_real_layout(idrid_dir, tmp_path):
  b = _build(tmp_path, 'idrid', idrid_dir, task='grading', image_size=32, limit=12)
  csv_path = next((idrid_dir / 'B. Disease Grading' / '2. Groundtruths').glob('*Training*.csv'))
  with open(csv_path, newline='') as f:
    rows = {r['Image name']: r for r in csv.DictReader(f)}
  records = _records(b)
  assert len(records) == 12
  for id_, r in records.items():
    assert r['image'].shape == (32, 32, 3) and r['image'].dtype == np.uint8
    assert r['label'] == int(rows[id_]['Retinopathy grade'])
    # The header really is 'Risk of macular edema ' with a trailing space.
    assert r['dme_risk'] == int(rows[id_]['Risk of macular edema '])
  assert _report(b)['num_skipped'] == 0


def test_idrid_segmentation_real_layout_missing_masks_are_empty(idrid_dir, tmp_path):
  b = _build(tmp_path, 'idrid', idrid_dir, task='segmentation', image_size=64, limit=2)
  records = _records(b)
  assert sorted(records) == ['IDRiD_01', 'IDRiD_02']
  se_dir = (idrid_dir / 'A. Segmentation' / '2. All Segmentation Groundtruths' /
            'a. Training Set' / '4. Soft Exudates')
  for id_, r in records.items():
    assert r['label'] == -1
    assert r['masks'].shape == (64, 64, 5) and set(np.unique(r['masks'])) <= {0, 1}
    per_type = r['masks'].sum(axis=(0, 1))
    assert per_type[0] > 0 and per_type[2] > 0  # MA and EX files exist and are non-empty
    assert not (se_dir / f'{id_}_SE.tif').exists() and per_type[3] == 0  # no SE file
    assert per_type[4] == 0  # IDRiD has no NV masks
    assert r['optic_disc'].sum() > 0


def test_idrid_mask_is_aligned_with_crop(tmp_path):
  """A lesion square in a fake IDRiD layout lands where the image crop puts it."""
  root = tmp_path / 'idrid'
  img = _fundus(w=200, h=120)
  img[50:60, 120:130] = (255, 255, 0)
  _save(root / 'A. Segmentation' / '1. Original Images' / 'a. Training Set' / 'IDRiD_01.jpg',
        img, 'JPEG')
  mask = np.zeros((120, 200), np.uint8)
  mask[50:60, 120:130] = 1
  pal = Image.fromarray(mask, 'P')
  pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  _save(root / 'A. Segmentation' / '2. All Segmentation Groundtruths' / 'a. Training Set' /
        '3. Hard Exudates' / 'IDRiD_01_EX.tif', pal, 'TIFF')
  r = _records(_build(tmp_path, 'idrid', root, task='segmentation', image_size=50))['IDRiD_01']
  ys, xs = np.nonzero(r['masks'][..., 2])
  assert r['masks'][..., [0, 1, 3, 4]].sum() == 0
  lesion_pixels = r['image'][ys, xs].astype(int)
  assert (lesion_pixels[:, 2] < 100).mean() > 0.5  # yellow: blue channel low inside the mask
  assert 2 <= len(ys) <= 30


# --- Kaggle layouts --------------------------------------------------------------------------


def test_eyepacs_layout_with_test_split_and_btgraham(tmp_path):
  root = tmp_path / 'eyepacs'
  _write_csv(root / 'trainLabels.csv', ['image', 'level'],
             [('10_left', 0), ('10_right', 2), ('13_left', 4)])
  _write_csv(root / 'retinopathy_solution.csv', ['image', 'level', 'Usage'],
             [('1_left', 1, 'Public'), ('1_right', 3, 'Private')])
  for name in ('10_left', '10_right', '13_left'):
    _save(root / 'train' / f'{name}.jpeg', _fundus(seed=len(name)), 'JPEG')
  for name in ('1_left', '1_right'):
    _save(root / 'test' / f'{name}.jpeg', _fundus(), 'JPEG')
  b = _build(tmp_path, 'eyepacs', root, image_size=32, btgraham=True)
  train, test = _records(b), _records(b, 'test')
  assert {k: (int(r['label']), r['patient_id'].decode(), r['eye'].decode())
          for k, r in train.items()} == {'10_left': (0, '10', 'left'),
                                          '10_right': (2, '10', 'right'),
                                          '13_left': (4, '13', 'left')}
  assert sorted(test) == ['1_left', '1_right']
  assert abs(int(train['10_left']['image'][0, 0, 0]) - 128) <= 3  # Ben Graham's grey border
  assert eyepacs.patient_id('10_left') == '10' and eyepacs.patient_id('weird') == 'weird'


# --- bad input: the build goes on, skips, reports ------------------------------------------


def test_corrupt_image_is_skipped(tmp_path):
  root = _aptos(tmp_path / 'aptos', {'a': 0, 'b': 1, 'c': 2},
                {**GOOD, 'c': b'\x89PNG\r\n\x1a\n' + os.urandom(200)})
  b = _build(tmp_path, 'aptos2019', root, image_size=32)
  assert sorted(_records(b)) == ['a', 'b']
  assert _skip_reasons(b)['c'].startswith('cannot decode image')


def test_truncated_image_is_skipped(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(_fundus(w=300, h=200)).save(buf, format='JPEG')
  root = _aptos(tmp_path / 'aptos', {'a': 0, 'b': 1}, GOOD)
  (root / 'train_images' / 'b.png').unlink()
  _save(root / 'train_images' / 'b.jpeg', buf.getvalue()[:len(buf.getvalue()) // 2])
  b = _build(tmp_path, 'aptos2019', root, image_size=32)
  assert sorted(_records(b)) == ['a']
  assert 'truncated' in _skip_reasons(b)['b']


def _mode_images() -> dict[str, Image.Image]:
  rgb = _fundus()
  gray = rgb.max(axis=-1)
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
  return {
      'gray16': Image.fromarray(gray.astype(np.uint16) * 257),  # I;16
      'cmyk': Image.fromarray(rgb).convert('CMYK'),
      'palette': Image.fromarray(rgb).convert('P'),
      'gray': Image.fromarray(gray),
      'rgba': Image.fromarray(rgba),
      'la': Image.fromarray(gray).convert('LA'),
  }


@pytest.mark.parametrize('name', sorted(_mode_images()))
def test_unusual_modes_decode_to_rgb(name):
  im = _mode_images()[name]
  buf = io.BytesIO()
  im.save(buf, format='JPEG' if name == 'cmyk' else 'PNG')
  out = images.decode(buf.getvalue())
  assert out.shape == (64, 96, 3) and out.dtype == np.uint8
  assert out[32, 48].max() > 120 and out[0, 0].max() < 10  # bright disc, black corner


def test_unusual_modes_are_kept_by_the_build(tmp_path):
  root = tmp_path / 'aptos'
  modes = _mode_images()
  _write_csv(root / 'train.csv', ['id_code', 'diagnosis'], [(k, 1) for k in modes])
  for k, im in modes.items():
    _save(root / 'train_images' / f'{k}.{"jpg" if k == "cmyk" else "png"}', im)
  b = _build(tmp_path, 'aptos2019', root, image_size=32)
  assert sorted(_records(b)) == sorted(modes)


def test_image_without_field_of_view_is_skipped(tmp_path):
  root = _aptos(tmp_path / 'aptos', {'a': 0, 'b': 1, 'dark': 2},
                {**GOOD, 'dark': np.zeros((64, 96, 3), np.uint8)})
  b = _build(tmp_path, 'aptos2019', root, image_size=32)
  assert sorted(_records(b)) == ['a', 'b']
  assert _skip_reasons(b)['dark'].startswith('no visible field of view')


def test_label_row_without_file_is_skipped(tmp_path):
  root = _aptos(tmp_path / 'aptos', {'a': 0, 'b': 1, 'gone': 2}, GOOD)
  b = _build(tmp_path, 'aptos2019', root, image_size=32)
  assert sorted(_records(b)) == ['a', 'b']
  assert _skip_reasons(b) == {'gone': 'label row without image file'}


def test_file_without_label_is_skipped(tmp_path):
  root = _aptos(tmp_path / 'aptos', {'a': 0, 'b': 1}, {**GOOD, 'stray': _fundus()})
  b = _build(tmp_path, 'aptos2019', root, image_size=32)
  assert sorted(_records(b)) == ['a', 'b']
  assert _skip_reasons(b) == {'stray': 'image file without label'}


def test_grade_outside_range_is_skipped(tmp_path):
  bad = {'five': 5, 'neg': -1, 'text': 'x', 'half': 2.5}
  root = _aptos(tmp_path / 'aptos', {'a': 0, 'b': 4, **bad},
                {**GOOD, **{k: _fundus() for k in bad}})
  b = _build(tmp_path, 'aptos2019', root, image_size=32)
  assert sorted(_records(b)) == ['a', 'b']
  reasons = _skip_reasons(b)
  assert sorted(reasons) == sorted(bad)
  assert all(r.startswith('grade outside 0-4') for r in reasons.values())
  assert _report(b)['skipped_by_reason'] == {'grade outside 0-4': 4}


def test_nothing_usable_is_a_clear_error(tmp_path):
  root = _aptos(tmp_path / 'aptos', {'c': 0, 'd': 9},
                {'c': b'not an image', 'd': _fundus()})
  with pytest.raises(builders.NoUsableDataError, match='No usable examples') as e:
    _build(tmp_path, 'aptos2019', root, image_size=32)
  assert 'cannot decode image' in str(e.value) and 'grade outside 0-4' in str(e.value)
  assert not builders.make_builder('aptos2019', str(tmp_path / 'tfds'),
                                   image_size=32).is_prepared()


def _prepare_data(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / 'scripts' / 'prepare_data.py'), *args],
                        capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(REPO)},
                        timeout=300)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error: ')]


def test_prepare_data_script(tmp_path):
  ok = _prepare_data('--dataset=synthetic_fundus', '--num_images=3', '--image_size=32',
                     '--num_workers=1', f'--data_dir={tmp_path}')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "{'train': 3}" in ok.stdout
  root = _aptos(tmp_path / 'aptos', {'c': 0}, {'c': b'garbage'})
  bad = _prepare_data('--dataset=aptos2019', f'--manual_dir={root}', '--image_size=32',
                      '--num_workers=1', f'--data_dir={tmp_path}')
  assert bad.returncode == 1
  assert [line.split('error: ')[1] for line in _error_lines(bad.stderr)] == [
      'No usable examples in aptos2019 train.']
  # The skip summary follows the error, once.
  assert bad.stderr.count('cannot decode image') == 1
  assert 'Traceback' not in bad.stderr


def test_prepare_data_script_reports_user_errors_in_one_line(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  for manual_dir in (empty, tmp_path / 'missing'):
    out = _prepare_data('--dataset=idrid', f'--manual_dir={manual_dir}',
                        f'--data_dir={tmp_path / "tfds"}')
    assert out.returncode == 1
    assert _error_lines(out.stderr) == [
        f'error: idrid: manual_dir {manual_dir} does not exist or is empty.']
    assert out.stderr.count('does not exist or is empty') == 1
    assert 'Download IDRiD from' in out.stderr and 'Traceback' not in out.stderr
  unknown = _prepare_data('--dataset=idrid', '--no_such_option=1')
  assert unknown.returncode == 1
  assert "Unknown command line flag 'no_such_option'" in unknown.stderr
  assert 'Traceback' not in unknown.stderr
