"""Tests of the CAM study (drjax.cam_study), single-image explanations (drjax.explain) and
the Grad-CAM figures (drjax.cam_figures), on the toy model of tests/toy_model.py."""

import json

import jax
import numpy as np
import pytest
from toy_model import TOY_SIZE as SIZE

from drjax import gradcam


@pytest.fixture(scope='module')
def tiny_run(toy):
  """The toy model as a 'run' at 32 px, standing in for drjax.evaluate.load_run."""
  import ml_collections as mlc
  model, variables, _ = toy
  config = mlc.ConfigDict(dict(model='toynet', num_classes=5,
                               input=dict(image_size=SIZE, dataset='synthetic_fundus')))
  return config, model, variables


def _grid_spy(monkeypatch):
  """Records the keyword arguments of every cam_figures.grid call, then draws as usual."""
  from drjax import cam_figures
  calls, grid = [], cam_figures.grid

  def spy(images, columns, path, **kwargs):
    calls.append(dict(kwargs, images=images, columns=columns, path=path))
    return grid(images, columns, path, **kwargs)

  monkeypatch.setattr(cam_figures, 'grid', spy)
  return calls


def test_explain_writes_figure_heatmaps_and_scores(tiny_run, tmp_path, monkeypatch):
  from PIL import Image

  from drjax import explain
  from drjax.data import synthetic
  config, model, variables = tiny_run
  ex = synthetic.generate_example(7, 3, image_size=96)
  (tmp_path / 'in').mkdir()
  Image.fromarray(ex['image']).save(tmp_path / 'in' / 'eye1.png')
  np.savez(tmp_path / 'in' / 'eye1.npz', masks=ex['masks'])
  calls = _grid_spy(monkeypatch)
  report = explain.explain(model, variables, explain.list_images([str(tmp_path / 'in')]),
                           tmp_path / 'out', image_size=SIZE, masks_dir=tmp_path / 'in')
  assert (tmp_path / 'out' / 'eye1_gradcam.png').exists()
  # Figure 5 is drawn by the one figure writer, with the lesions outlined.
  (call,) = calls
  assert call['path'].endswith('eye1_gradcam.png') and call['show_heatmap']
  assert call['masks'][0].shape == (SIZE, SIZE) and call['masks'][0].any()
  heat = np.load(tmp_path / 'out' / 'heatmaps_gradcam.npz')['eye1']
  assert heat.shape == (SIZE, SIZE) and 0 <= heat.min() and heat.max() <= 1
  scores = report['images']['eye1']['scores']
  assert set(scores) == {'MA', 'HE', 'EX', 'SE', 'NV', 'any'}
  assert 'mean' in report and (tmp_path / 'out' / 'scores_gradcam.json').exists()


def test_cam_study_heatmaps_split_over_devices_equal_one_device(toy, monkeypatch):
  from drjax import cam_study
  model, variables, _ = toy
  seen = []
  core = gradcam.activations_and_grads

  def spy(model, variables, images, **kwargs):
    seen.append((len(images), len(images.sharding.device_set)))
    return core(model, variables, images, **kwargs)

  monkeypatch.setattr(gradcam, 'activations_and_grads', spy)
  assert jax.local_device_count() == 4  # tests/conftest.py
  # 7 images in batches of 6: 6 over 4 devices (padded to 8), then 1 (padded to 4).
  images = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (7, SIZE, SIZE, 3), 0, 256),
                      np.uint8)
  targets = np.array([0, 1, 2, 3, 4, 0, 1])
  got = cam_study.compute_heatmaps(model, variables, images, ('stage1', 'stage2'),
                                   ('gradcam', 'layercam', 'scorecam'), targets=targets,
                                   batch_size=6)
  assert seen == [(8, 4), (4, 4)]
  assert set(got) == {'gradcam@stage1', 'gradcam@stage2', 'layercam@stage1',
                      'layercam@stage2', 'scorecam@stage1', 'scorecam@stage2',
                      'fusion@stage1+stage2', 'gradients@input'}
  one = jax.devices()[0]
  x, v = jax.device_put(images, one), jax.device_put(variables, one)
  for key, fn in (('gradcam@stage2', gradcam.gradcam), ('layercam@stage1', gradcam.layercam),
                  ('scorecam@stage2', gradcam.scorecam)):
    want = fn(model, v, x, layer=key.split('@')[1], targets=targets)
    assert want.sharding.device_set == {one}
    np.testing.assert_allclose(got[key], want, atol=1e-5)
  want = gradcam.gradients(model, v, x, targets=targets)
  np.testing.assert_allclose(got['gradients@input'], want, atol=1e-5)


def test_cam_study_report(tiny_run, tmp_path, monkeypatch):
  from drjax import cam_study, evaluate
  monkeypatch.setattr(evaluate, 'load_run', lambda workdir: tiny_run)
  path = cam_study.run_workdirs([str(tmp_path / 'run')], tmp_path / 'study', num_images=3,
                                methods=('gradcam', 'layercam'), faithfulness_images=1,
                                stats_size=96)
  text = path.read_text()
  for needle in ('gradcam@stage2', 'fusion@stage2', 'gradients@input', 'The area argument',
                 'Conclusion', 'deletion AUC'):
    assert needle in text, needle
  assert (tmp_path / 'study' / 'toynet' / 'figure_grid.png').exists()
  result = json.loads((tmp_path / 'study' / 'toynet' / 'results.json').read_text())
  assert result['layer_shapes']['stage2'] == [SIZE // 4, SIZE // 4]
  assert result['areas']['MA']['cell_stage2'] == pytest.approx(1 / (SIZE // 4) ** 2)
  # The paper's grid at 224 px, beside the study's own, and a pointing-game tolerance
  # scaled from 15 px at 224 px to the input size.
  assert result['paper_layer_shapes']['stage2'] == [224 // 4, 224 // 4]
  assert f'stage2 {224 // 4}x{224 // 4}' in text
  assert result['tolerance'] == pytest.approx(round(15 * SIZE / 224, 1))
  # The controls, on by default: one study layer, so the head, then the untrained network.
  assert [s['name'] for s in result['controls']['steps']] == ['head', 'untrained']
  assert set(result['controls']['steps'][0]['similarity']) == set(result['scores'])
  for needle in ('Controls: randomised layers', 'head: rho', 'untrained: AUROC',
                 f'Setting: toynet at {SIZE} px, where the stage2 map is {SIZE // 4}x{SIZE // 4}',
                 'Grad-CAM@stage2, any lesion: pixel AUROC'):
    assert needle in text, needle


def test_cam_study_controls_can_be_switched_off(tiny_run, tmp_path, monkeypatch):
  from drjax import cam_study, evaluate
  monkeypatch.setattr(evaluate, 'load_run', lambda workdir: tiny_run)
  path = cam_study.run_workdirs([str(tmp_path / 'run')], tmp_path / 'study', num_images=2,
                                methods=('gradcam',), faithfulness_images=0, stats_size=96,
                                controls=False)
  result = json.loads((tmp_path / 'study' / 'toynet' / 'results.json').read_text())
  assert 'controls' not in result
  assert 'Controls:' not in path.read_text().split('Generated by')[1]


def test_cam_study_script_on_a_smoke_run(tmp_path):
  """scripts/train.py on the smoke config, then scripts/cam_study.py with and without controls."""
  import os
  import pathlib
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(repo), DRJAX_NO_DOWNLOAD='1')

  def run(script, *args):
    result = subprocess.run([sys.executable, str(repo / 'scripts' / script), *args],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

  run('train.py', '--config', str(repo / 'configs' / 'densenet.py:smoke'),
      '--workdir', str(tmp_path / 'run'), f'--config.input.data_dir={tmp_path / "tfds"}')
  study = ('cam_study.py', '--workdir', str(tmp_path / 'run'), '--num_images=2',
           '--methods=gradcam', '--faithfulness_images=0')
  run(*study, '--out', str(tmp_path / 'study'))
  text = (tmp_path / 'study' / 'report.md').read_text()
  assert 'Setting: densenet_tiny at 32 px, where the denseblock4 map is 1x1' in text
  assert "the classifier's validation kappa is" in text
  assert 'after re-initialising the head down to denseblock4' in text
  assert 'to denseblock3: rho' in text and 'untrained: AUROC' in text
  run(*study, '--controls=false', '--out', str(tmp_path / 'plain'))
  assert 'rho' not in (tmp_path / 'plain' / 'report.md').read_text()


def test_save_panel(tiny_run, tmp_path, monkeypatch):
  from drjax import cam_figures
  config, model, variables = tiny_run
  images = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8)
  calls = _grid_spy(monkeypatch)
  heat = cam_figures.save_panel(model, variables, images, str(tmp_path / 'panel.png'),
                                labels=[0, 3])
  assert heat.shape == (2, SIZE, SIZE) and 0 <= heat.min() and heat.max() <= 1
  np.testing.assert_allclose(heat, gradcam.gradcam(model, variables, images), atol=1e-5)
  assert (tmp_path / 'panel.png').stat().st_size > 0
  (call,) = calls
  assert list(call['columns']) == ['gradcam @ stage2'] and call['show_heatmap']
  assert [t.split(',')[0] for t in call['row_titles']] == ['grade 0', 'grade 3']


@pytest.mark.parametrize('show_heatmap, columns', [(False, 3), (True, 5)])
def test_grid_layout(tmp_path, show_heatmap, columns):
  """One row per image; the fundus, then per heatmap (its bare map and) its overlay."""
  from PIL import Image

  from drjax import cam_figures
  rng = np.random.default_rng(0)
  images = list(rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8))
  heat = {'a': list(rng.random((2, 4, 4))), 'b': list(rng.random((2, 16, 16)))}
  masks = [np.eye(16, dtype=bool), None]
  cam_figures.grid(images, heat, str(tmp_path / 'sub' / 'g.png'), masks=masks,
                   row_titles=['r0', 'r1'], show_heatmap=show_heatmap, cell_inches=1.0)
  # 1 inch per cell at 100 dpi.
  assert Image.open(tmp_path / 'sub' / 'g.png').size == (100 * columns, 200)


def test_overlay_resizes_the_heatmap_and_blends_half_and_half():
  from drjax import cam_figures
  image = np.full((8, 8, 3), 100, np.uint8)
  out = cam_figures.overlay(image, np.zeros((2, 2)))
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  want = np.round(0.5 * cam_figures.colorize(np.zeros((1, 1)))[0, 0] + 50)
  np.testing.assert_array_equal(out[3, 5], want)


def test_load_masks_for_reads_npz_and_idrid_tifs(tmp_path):
  """Masks aligned with an 80x60 photograph whose square crop box is x in [10, 70)."""
  from PIL import Image

  from drjax import cam_study
  box, decoded, size = (10.0, 0.0, 70.0, 60.0), (80, 60), 6   # one output pixel = 10x10
  full = np.zeros((60, 80, 5), np.uint8)
  full[5, 15, 0] = 1      # MA -> output (0, 0)
  full[55, 65, 1] = 1     # HE -> output (5, 5)
  full[30, 5, 2] = 1      # EX left of the crop box: dropped
  np.savez(tmp_path / 'a.npz', masks=full)
  got = cam_study.load_masks_for('a', tmp_path, box, decoded, size)
  want = np.zeros((size, size, 5), np.uint8)
  want[0, 0, 0] = want[5, 5, 1] = 1
  np.testing.assert_array_equal(got, want)
  # Masks already at the model's input size are taken as they are.
  np.savez(tmp_path / 'c.npz', masks=want * 255)
  np.testing.assert_array_equal(cam_study.load_masks_for('c', tmp_path, box, decoded, size), want)
  # IDRiD-style files anywhere below the folder, here at twice the photograph's resolution;
  # the optic disc (OD) is no lesion type.
  (tmp_path / 'gt' / 'ma').mkdir(parents=True)
  for name, (r, c) in (('ma/b_MA', (10, 30)), ('b_EX', (100, 120))):
    tif = np.zeros((120, 160), np.uint8)
    tif[r, c] = 255
    Image.fromarray(tif).save(tmp_path / 'gt' / f'{name}.tif')
  Image.fromarray(np.full((120, 160), 255, np.uint8)).save(tmp_path / 'gt' / 'b_OD.tif')
  got = cam_study.load_masks_for('b', tmp_path / 'gt', box, decoded, size)
  want = np.zeros((size, size, 5), np.uint8)
  want[0, 0, 0] = want[5, 5, 2] = 1
  np.testing.assert_array_equal(got, want)
  assert cam_study.load_masks_for('nothing', tmp_path / 'gt', box, decoded, size) is None


def test_lesion_stats_and_area_table():
  from drjax import cam_study
  masks = np.zeros((10, 10, 5), np.uint8)
  masks[0, 0, 0] = 1                 # MA: lesions of 1 and 2 pixels
  masks[5, 5:7, 0] = 1
  masks[2:4, 2:4, 1] = 1             # HE: one lesion of 4 pixels
  total, parts = cam_study.lesion_stats(masks)
  assert total == pytest.approx(dict(MA=0.03, HE=0.04, EX=0, SE=0, NV=0))
  assert sorted(parts['MA']) == pytest.approx([0.01, 0.02]) and parts['HE'] == [0.04]
  assert parts['EX'] == []
  with_lesions = cam_study.Example('a', None, area_fraction=total, component_fractions=parts)
  empty, _ = cam_study.lesion_stats(np.zeros_like(masks))
  without = cam_study.Example('b', None, area_fraction=empty,
                              component_fractions={t: [] for t in cam_study.LESION_TYPES})
  table = cam_study.area_table([with_lesions, without], {'s': (2, 2)})
  assert table['MA']['images'] == 1 and table['MA']['lesions'] == 2
  assert table['MA']['total_fraction'] == pytest.approx(0.03)
  assert table['MA']['lesion_fraction'] == pytest.approx(0.015)
  assert table['MA']['cell_s'] == 0.25
  assert table['MA']['lesion_per_cell_s'] == pytest.approx(0.06)
  assert table['EX']['images'] == 0 and np.isnan(table['EX']['lesion_fraction'])


def _scores(auroc, mass, area, n=2):
  return dict(auroc=auroc, mass=mass, area=area, n=n, pointing=1.0, ap=0.5, rank=0.5)


def test_conclusions_are_computed_from_the_numbers():
  from drjax import cam_study
  absent = _scores(float('nan'), float('nan'), 0.0, n=0)
  per_layer = {'a': dict(MA=_scores(0.8, 0.3, 0.1), HE=_scores(0.4, 0.05, 0.1)),
               'b': dict(MA=_scores(0.7, 0.2, 0.1), HE=_scores(0.5, 0.1, 0.1))}
  scores = {f'gradcam@{layer}': {t: per.get(t, absent) for t in cam_study.LESION_TYPES}
            | dict(any=_scores(0.6, 0.2, 0.2)) for layer, per in per_layer.items()}
  areas = dict(MA=dict(images=2, lesions=3, lesion_fraction=0.001, lesion_per_cell_b=0.049))
  result = dict(layers=['a', 'b'], default_layer='b', scores=scores, areas=areas)
  text = '\n'.join(cam_study.conclusions(result))
  assert "MA (2 images): the paper's setting (gradcam@b) scores pixel AUROC 0.700" in text
  assert '(x2.00), pointing game 1.00: clearly above chance.' in text
  assert 'HE (2 images)' in text and '(x1.00), pointing game 1.00: at chance level.' in text
  assert 'MA: the best pixel AUROC is gradcam@a (0.800).' in text
  assert 'HE: the best pixel AUROC is gradcam@b (0.500).' in text
  assert 'averaged over lesion types: a 0.600, b 0.600' in text
  assert 'finer a beats b in pixel AUROC for 1 of 2 lesion types (MA).' in text
  assert 'a median MA lesion covers 0.1% of the image, 4.9% of one b cell.' in text
  assert 'EX' not in text and 'NV' not in text


def test_cam_study_runs_every_method_with_slow_ones_on_fewer_images(tiny_run, tmp_path,
                                                                     monkeypatch):
  from drjax import cam_study, evaluate
  monkeypatch.setattr(evaluate, 'load_run', lambda workdir: tiny_run)
  methods = [m for m in cam_study.ALL_METHODS if m in gradcam.METHODS]
  pixel = [m for m in cam_study.ALL_PIXEL_METHODS if m in gradcam.METHODS]
  path = cam_study.run_workdirs([str(tmp_path / 'run')], tmp_path / 'study', num_images=2,
                                methods=methods, pixel_methods=pixel, slow_images=1,
                                faithfulness_images=1, stats_size=96)
  result = json.loads((tmp_path / 'study' / 'toynet' / 'results.json').read_text())
  keys = {f'{m}@stage2' for m in methods} | {f'{m}@input' for m in pixel}
  assert keys <= set(result['scores'])
  controlled = set(result['controls']['steps'][0]['similarity'])
  for key in keys:
    slow = key.split('@')[0] in cam_study.SLOW_METHODS
    assert result['scores'][key]['any']['n'] == (1 if slow else 2), key
    assert (key in controlled) != slow, key
    assert np.isfinite(result['faithfulness'][key]['road_combined']), key
  text = path.read_text()
  assert 'ROAD combined' in text and 'passing the controls' in text
  if any(m in cam_study.SLOW_METHODS for m in methods + pixel):
    assert 'Computed on fewer images' in text


def test_the_study_names_maps_that_beat_gradcam_and_pass_the_controls():
  from drjax.cam_study import controls as controls_lib
  from drjax.cam_study import report

  def scores(auroc):
    return dict(any=_scores(auroc, 0.2, 0.2))

  def similarity(rho):
    return dict(spearman=rho, ssim=0.5, n=2)

  result = dict(default_layer='b', scores={
      'gradcam@b': scores(0.55), 'good@b': scores(0.7), 'static@b': scores(0.8),
      'copied@b': scores(0.65), 'worse@b': scores(0.5), 'slow@b': scores(0.9)})
  trained = {k: v for k, v in result['scores'].items() if k != 'slow@b'}
  head = dict(name=controls_lib.HEAD, similarity=dict(
      {k: similarity(0.1) for k in trained}, **{'static@b': similarity(0.9)}))
  untrained = dict(name=controls_lib.UNTRAINED, similarity={k: similarity(0.0) for k in trained},
                   scores=dict({k: scores(0.5) for k in trained}, **{'copied@b': scores(0.7)}))
  result['controls'] = dict(steps=[head, untrained])
  assert report.passes_controls(result, 'good@b')
  assert not report.passes_controls(result, 'static@b')  # unchanged by the head
  assert not report.passes_controls(result, 'copied@b')  # an untrained net does better
  assert report.passes_controls(result, 'slow@b') is None
  text = ' '.join(report._better_than_default_sentences(result))
  assert 'passing the controls' in text and ': good@b (0.700);' in text
  assert '2 other maps score higher but fail the controls' in text
  assert 'slow@b score higher without having been through them' in text
