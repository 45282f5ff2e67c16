"""Tests of the CAM study (drjax.cam_study), single-image explanations (drjax.explain) and
the Grad-CAM figures (drjax.cam_figures), on the toy model of tests/conftest.py."""

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


def test_explain_writes_figure_heatmaps_and_scores(tiny_run, tmp_path):
  from PIL import Image

  from drjax import explain
  from drjax.data import synthetic
  config, model, variables = tiny_run
  ex = synthetic.generate_example(7, 3, image_size=96)
  (tmp_path / 'in').mkdir()
  Image.fromarray(ex['image']).save(tmp_path / 'in' / 'eye1.png')
  np.savez(tmp_path / 'in' / 'eye1.npz', masks=ex['masks'])
  report = explain.explain(model, variables, explain.list_images([str(tmp_path / 'in')]),
                           tmp_path / 'out', image_size=SIZE, masks_dir=tmp_path / 'in')
  assert (tmp_path / 'out' / 'eye1_gradcam.png').exists()
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


def test_save_panel(tiny_run, tmp_path):
  from drjax import cam_figures
  config, model, variables = tiny_run
  images = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8)
  heat = cam_figures.save_panel(model, variables, images, str(tmp_path / 'panel.png'),
                                labels=[0, 3])
  assert heat.shape == (2, SIZE, SIZE)
  assert (tmp_path / 'panel.png').stat().st_size > 0
