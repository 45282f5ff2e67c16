"""Tests of the CAM study's controls (drjax.cam_study.controls and study.run_controls): the
randomisation cascade of Adebayo et al. 2018, the untrained network, and map similarity."""

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util
from toy_model import TOY_SIZE as SIZE

from drjax import gradcam, models
from drjax.cam_study import controls


@pytest.mark.parametrize('arch, layers, expected', [
    ('densenet_tiny', ('denseblock2', 'denseblock3', 'denseblock4'), [
        ('head', ['classifier']),
        ('denseblock4', ['classifier', 'features/denseblock4', 'features/norm5',
                         'features/transition3']),
        ('denseblock3', ['classifier', 'features/denseblock3', 'features/denseblock4',
                         'features/norm5', 'features/transition2', 'features/transition3'])]),
    ('resnet_tiny', ('layer2', 'layer3', 'layer4'), [
        ('head', ['fc']), ('layer4', ['fc', 'layer4']), ('layer3', ['fc', 'layer3', 'layer4'])]),
    # VGG's head is its whole classifier: no named stage follows any of its three layers.
    ('vgg_tiny', ('block3', 'block4', 'block5'), [
        ('head', ['classifier']), ('block5', ['classifier', 'features/19', 'features/20']),
        ('block4', ['classifier', 'features/15', 'features/16', 'features/19', 'features/20'])]),
])
def test_cascade_reinitialises_the_layers_above_each_stage(arch, layers, expected):
  model = models.get_model(arch)
  # Only the shapes matter: zeros, without compiling an init.
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  steps = controls.cascade(model, variables, layers, 32)
  assert [(s.name, sorted(controls.describe(variables['params'], s.leaves)))
          for s in steps] == expected
  # BatchNorm statistics go with their layers; each step contains the one before it.
  if arch == 'densenet_tiny':
    assert ('batch_stats', 'features', 'norm5', 'mean') in steps[1].leaves
  assert all(a.leaves < b.leaves for a, b in zip(steps, steps[1:], strict=False))


def test_stage_dependencies_follow_the_computation(toy):
  model, variables, _ = toy
  deps = controls.stage_dependencies(model, variables, ('stem', 'stage1', 'stage2'), SIZE)
  modules = {name: sorted({p[1] for p in leaves}) for name, leaves in deps.items()}
  assert modules == {'stem': ['conv0'], 'stage1': ['conv0', 'conv1'],
                     'stage2': ['conv0', 'conv1', 'conv2', 'norm']}


def test_reinitialise_replaces_only_the_given_leaves(toy):
  model, variables, _ = toy
  fresh = controls.fresh_variables(model, SIZE, seed=5)
  head = frozenset(k for k in controls.every_leaf(fresh) if k[1] == 'head')
  mixed = traverse_util.flatten_dict(controls.reinitialise(variables, fresh, head))
  old, new = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(fresh)
  for k, v in mixed.items():
    np.testing.assert_array_equal(v, new[k] if k in head else old[k])
  assert controls.parameter_fraction(fresh['params'], head) == pytest.approx(
      (8 * 5 + 5) / sum(np.size(v) for v in jax.tree.leaves(fresh['params'])))
  chex.assert_trees_all_equal(
      controls.reinitialise(variables, fresh, controls.every_leaf(fresh)), fresh)


def test_rank_correlation_and_ssim():
  rng = np.random.default_rng(0)
  a = rng.random((16, 16))
  assert controls.rank_correlation(a, a) == pytest.approx(1.0)
  assert controls.rank_correlation(a, np.exp(3 * a)) == pytest.approx(1.0)  # ranks only
  assert controls.rank_correlation(a, -a) == pytest.approx(-1.0)
  assert np.isnan(controls.rank_correlation(a, np.zeros_like(a)))
  assert controls.ssim(a, a) == pytest.approx(1.0)
  assert controls.ssim(a, rng.random((16, 16))) < 0.5
  sim = controls.similarity({'m@l': np.stack([a, a])}, {'m@l': np.stack([a, np.ones_like(a)])})
  assert sim['m@l']['n'] == 1 and sim['m@l']['spearman'] == pytest.approx(1.0)


def test_run_controls_scores_the_untrained_network_like_the_trained_one(toy):
  from drjax import cam_study
  model, variables, _ = toy
  examples = cam_study.synthetic_examples(3, SIZE, seed=3, stats_size=96)
  images = np.stack([e.image for e in examples])
  layers, methods = ('stage1', 'stage2'), ('gradcam', 'layercam')
  trained = cam_study.compute_heatmaps(model, variables, images, layers, methods)
  out = cam_study.run_controls(model, variables, examples, trained, layers=layers,
                               methods=methods, tolerance=2.0, seed=4)
  assert [s['name'] for s in out['steps']] == ['head', 'stage2', 'untrained']
  assert out['steps'][0]['reinitialised'] == ['head']
  assert out['steps'][1]['reinitialised'] == ['conv2', 'head', 'norm']
  # The untrained network's maps are those of a fresh init, for the trained model's grades.
  fresh = controls.fresh_variables(model, SIZE, seed=4)
  targets = cam_study.predicted_classes(model, variables, images)
  want = gradcam.gradcam(model, fresh, images, layer='stage2', targets=targets)
  scores = cam_study.score_heatmaps({'gradcam@stage2': np.asarray(want)}, examples, 2.0)
  got = out['steps'][-1]['scores']['gradcam@stage2']
  for t in ('any', 'MA'):
    assert got[t]['auroc'] == pytest.approx(scores['gradcam@stage2'][t]['auroc'], abs=1e-4)
  # Re-initialising the head changes Grad-CAM's channel weights, so its maps.
  head = out['steps'][0]['similarity']
  assert head['gradcam@stage2']['spearman'] < 0.999
  assert set(head) == set(trained) and all(-1 <= v['ssim'] <= 1 for v in head.values())


def _scores(auroc, n=2):
  return dict(auroc=auroc, mass=0.2, area=0.1, n=n, pointing=1.0, ap=0.5, rank=0.5)


def _per_type(auroc):
  return {t: _scores(auroc) for t in ('MA', 'HE', 'EX', 'SE', 'NV', 'any')}


def _step(name, rho, auroc, reinitialised, keys=('gradcam@b', 'layercam@b')):
  """One control step of `run_controls`'s result, with the given numbers per key."""
  return dict(name=name, reinitialised=reinitialised, parameter_fraction=0.25,
              similarity={k: dict(spearman=r, ssim=0.5, n=2)
                          for k, r in zip(keys, rho, strict=True)},
              scores={k: _per_type(a) for k, a in zip(keys, auroc, strict=True)})


def test_control_conclusions_and_table_use_the_numbers():
  from drjax import cam_study
  step = _step
  result = dict(
      arch='densenet121', image_size=224, layers=['a', 'b'], default_layer='b',
      layer_shapes={'a': [14, 14], 'b': [7, 7]}, areas={},
      model_info=dict(metrics=dict(accuracy=0.9, kappa=0.871)),
      scores={'gradcam@b': _per_type(0.7), 'layercam@b': _per_type(0.6)},
      controls=dict(seed=1, steps=[
          step('head', (0.3, 0.8), (0.55, 0.58), ['classifier']),
          step('b', (0.1, float('nan')), (0.52, 0.5), ['classifier', 'features/b']),
          step('untrained', (0.05, 0.02), (0.5, 0.65), [])]))
  text = '\n'.join(cam_study.conclusions(result))
  assert ('Setting: densenet121 at 224 px, where the b map is 7x7 (one cell = 2.04% of the '
          "image); the classifier's validation kappa is 0.871.") in text
  assert ('Grad-CAM@b, any lesion: pixel AUROC 0.700 for the trained model, 0.550 after '
          're-initialising the head (rank correlation 0.30 with the trained maps), 0.520 after '
          're-initialising the head down to b (rank correlation 0.10 with the trained maps), '
          '0.500 for an untrained network (rank correlation 0.05 with the trained maps).') in text
  assert 'at least 0.5 with the trained ones' in text and 'layercam@b (0.80).' in text
  assert ("better than the untrained network's (pixel AUROC, any lesion) for 1 of 2 "
          'method@layer: gradcam@b.') in text
  table = cam_study.controls_markdown(result)
  assert '| gradcam@b | 0.700 | 0.30 | 0.550 | 0.10 | 0.520 | 0.05 | 0.500 |' in table
  assert '| layercam@b | 0.600 | 0.80 | 0.580 | n/a | 0.500 | 0.02 | 0.650 |' in table
  assert 'to b: classifier, features/b (25% of the parameters)' in table
