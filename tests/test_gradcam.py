"""Tests of drjax.gradcam on a toy linen model that follows the models' tap contract
(`toy`, tests/conftest.py)."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_model import TOY_SIZE as SIZE
from toy_model import ToyNet

from drjax import gradcam


def _logits(model, variables, images):
  return model.apply(variables, images, train=False)


def test_init_has_no_perturbations_and_taps_are_flat(toy):
  model, variables, images = toy
  assert set(variables) == {'params', 'batch_stats'}
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  assert set(state['intermediates']) == set(ToyNet.stage_names)


def test_core_matches_a_direct_grad(toy):
  model, variables, images = toy
  out = gradcam.activations_and_grads(model, variables, images, layer='stage1', targets=[0, 1, 2])
  acts, grads = out['acts']['stage1'], out['grads']['stage1']
  chex.assert_shape(acts, (3, SIZE // 2, SIZE // 2, 8))
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  chex.assert_trees_all_close(acts, state['intermediates']['stage1'][0], atol=1e-6)
  # The same gradient from flax's perturbation API on the whole batch (sum trick).
  _, perts = model.apply(variables, images, train=False, mutable=['perturbations'])

  def loss(p):
    logits = model.apply({**variables, **p}, images, train=False)
    return logits[jnp.arange(3), jnp.array([0, 1, 2])].sum()

  expected = jax.grad(loss)(perts)['perturbations']['stage1']
  chex.assert_trees_all_close(grads, expected, atol=1e-5)
  chex.assert_trees_all_close(out['logits'], _logits(model, variables, images), atol=1e-5)


def test_core_equals_a_vmapped_per_image_grad(toy):
  """Grad-CAM as the paper defines it per image, `jax.grad` w.r.t. one image's stage
  activations, vmapped over the batch: the core's batched vjp gives the same values."""
  model, variables, images = toy
  layer = 'stage1'
  out = gradcam.activations_and_grads(model, variables, images, layer=layer)
  _, perts = model.apply(variables, images[:1], train=False, mutable=['perturbations'])

  def per_image(image):
    def score(p):
      logits, state = model.apply({**variables, 'perturbations': {**perts['perturbations'],
                                                                   layer: p}},
                                  image[None], train=False, mutable=['intermediates'])
      return logits[0].max(), state['intermediates'][layer][0][0]

    return jax.grad(score, has_aux=True)(perts['perturbations'][layer])

  grads, acts = jax.vmap(per_image)(images)
  chex.assert_trees_all_close(out['acts'][layer], acts, atol=1e-6)
  chex.assert_trees_all_close(out['grads'][layer], grads[:, 0], atol=1e-6)
  assert float(jnp.abs(grads).max()) > 0


def test_gradcam_equals_cam_for_a_gap_linear_head(toy):
  # With global average pooling and a linear head, d y_c / d A_k(i,j) = W_kc / (h w)
  # everywhere, so Grad-CAM and HiResCAM reduce to CAM (Zhou et al. 2016) / (h w).
  model, variables, images = toy
  kernel = variables['params']['head']['kernel']   # [C, K]
  out = gradcam.activations_and_grads(model, variables, images, targets=[4, 4, 4])
  acts = out['acts']['stage2']
  cam = jnp.einsum('bhwc,c->bhw', acts, kernel[:, 4]) / (acts.shape[1] * acts.shape[2])
  for fn in (gradcam.gradcam, gradcam.hirescam):
    raw = fn(model, variables, images, targets=jnp.array([4, 4, 4]), raw=True)
    chex.assert_trees_all_close(raw, cam, atol=1e-6)


def test_outputs_shape_range_and_postprocess(toy):
  model, variables, images = toy
  for name in ('gradcam', 'gradcam++', 'hirescam', 'xgradcam', 'layercam', 'fusion', 'gradients'):
    maps = gradcam.METHODS[name](model, variables, images)
    chex.assert_shape(maps, (3, SIZE, SIZE))
    assert maps.dtype == jnp.float32
    chex.assert_tree_all_finite(maps)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
  raw = gradcam.gradcam(model, variables, images, raw=True)
  chex.assert_shape(raw, (3, SIZE // 4, SIZE // 4))
  expected = gradcam.postprocess(raw, (SIZE, SIZE))
  chex.assert_trees_all_close(gradcam.gradcam(model, variables, images), expected, atol=1e-6)
  # Each method is its formula applied to the shared core's output, raw and post-processed.
  out = gradcam.activations_and_grads(model, variables, images)
  for name, map_fn in gradcam.CAM_MAPS.items():
    cam = map_fn(out['acts']['stage2'], out['grads']['stage2'])
    method = gradcam.METHODS[name]
    chex.assert_trees_all_close(method(model, variables, images, raw=True), cam, atol=1e-6)
    chex.assert_trees_all_close(method(model, variables, images),
                                gradcam.postprocess(cam, (SIZE, SIZE)), atol=1e-6)
  # Per-image min-max: each non-constant map spans exactly [0, 1].
  np.testing.assert_allclose(np.asarray(expected).max(axis=(1, 2)), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(expected).min(axis=(1, 2)), 0.0, atol=1e-6)


def test_methods_at_one_layer_share_one_core_program(toy):
  # The core (the model's forward and the head's vjp) compiles once per layer and input
  # shape; each method adds only its small map program.
  model, variables, images = toy
  images = jax.image.resize(images[:2], (2, 36, 36, 3), 'bilinear')  # compiled by no other test
  before = gradcam.core.acts_and_grads._cache_size()
  for name in gradcam.CAM_MAPS:
    gradcam.METHODS[name](model, variables, images)
    gradcam.METHODS[name](model, variables, images, raw=True)
  assert gradcam.core.acts_and_grads._cache_size() == before + 1


def test_method_formulas_on_hand_computed_arrays():
  acts = jnp.array([[[1.0, 0.0], [3.0, 2.0]]])[..., None].repeat(2, -1)   # [1, 2, 2, 2]
  acts = acts.at[..., 1].set(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
  grads = jnp.stack([jnp.full((2, 2), 0.5), jnp.array([[-1.0, 2.0], [0.0, 1.0]])], -1)[None]
  # Grad-CAM: weights (0.5, 0.5) -> 0.5 * (A0 + A1).
  np.testing.assert_allclose(gradcam.gradcam_map(acts, grads)[0],
                             [[0.5, 0.5], [2.0, 1.0]], atol=1e-6)
  # HiResCAM: sum_c g * A.
  np.testing.assert_allclose(gradcam.hirescam_map(acts, grads)[0],
                             [[0.5, 2.0], [1.5, 1.0]], atol=1e-6)
  # LayerCAM: sum_c relu(g) * A.
  np.testing.assert_allclose(gradcam.layercam_map(acts, grads)[0],
                             [[0.5, 2.0], [1.5, 1.0]], atol=1e-6)
  # XGrad-CAM: w0 = sum(0.5 A0) / sum(A0) = 0.5; w1 = (2*1 + 0*1) / 2 = 1.
  np.testing.assert_allclose(gradcam.xgradcam_map(acts, grads)[0],
                             [[0.5, 1.0], [2.5, 1.0]], atol=1e-5)


def test_targets_per_image_predicted_and_callable(toy):
  model, variables, images = toy
  logits = _logits(model, variables, images)
  predicted = jnp.argmax(logits, -1)
  by_default = gradcam.gradcam(model, variables, images, raw=True)
  chex.assert_trees_all_close(by_default,
                              gradcam.gradcam(model, variables, images, raw=True,
                                              targets=predicted), atol=1e-6)
  mixed = gradcam.gradcam(model, variables, images, raw=True, targets=jnp.array([0, 3, 1]))
  for i, c in enumerate([0, 3, 1]):
    single = gradcam.gradcam(model, variables, images[i:i + 1], raw=True, targets=[c])
    chex.assert_trees_all_close(mixed[i], single[0], atol=1e-6)
  out = gradcam.activations_and_grads(model, variables, images,
                                      targets=gradcam.referable_dr_target)
  np.testing.assert_allclose(out['scores'], jax.nn.softmax(logits)[:, 2:].sum(-1), atol=1e-6)
  # A custom target is the sum of its parts: its gradient is linear in the target.
  two = gradcam.activations_and_grads(model, variables, images,
                                      targets=lambda z: z[2] + z[3])['grads']['stage2']
  parts = [gradcam.activations_and_grads(model, variables, images, targets=[c] * 3)
           ['grads']['stage2'] for c in (2, 3)]
  chex.assert_trees_all_close(two, parts[0] + parts[1], atol=1e-6)
  with pytest.raises(ValueError, match='targets'):
    gradcam.gradcam(model, variables, images, targets=[0, 1])


def test_jit_compatible(toy):
  model, variables, images = toy
  jitted = jax.jit(lambda v, x: gradcam.gradcam(model, v, x, targets=jnp.array([1, 2, 3])))
  chex.assert_trees_all_close(jitted(variables, images),
                              gradcam.gradcam(model, variables, images,
                                              targets=jnp.array([1, 2, 3])), atol=1e-6)


def test_unknown_layer_lists_valid_names(toy):
  model, variables, images = toy
  with pytest.raises(ValueError, match=r'stem, stage1, stage2'):
    gradcam.gradcam(model, variables, images, layer='denseblock4')
  with pytest.raises(ValueError, match='Unknown CAM method'):
    gradcam.get_method('gradcam3')


def test_image_size_and_layout(toy):
  model, variables, images = toy
  big = jax.image.resize(images, (3, 40, 40, 3), 'bilinear')
  maps = gradcam.gradcam(model, variables, big, image_size=SIZE)
  chex.assert_shape(maps, (3, 40, 40))
  raw = gradcam.gradcam(model, variables, big, image_size=SIZE, raw=True)
  chex.assert_shape(raw, (3, SIZE // 4, SIZE // 4))
  core = gradcam.activations_and_grads(model, variables, big, image_size=SIZE)
  chex.assert_shape(core['acts']['stage2'], (3, SIZE // 4, SIZE // 4, None))
  chex.assert_shape(gradcam.fusion(model, variables, big, image_size=SIZE), (3, 40, 40))
  chex.assert_trees_all_close(
      gradcam.fusion(model, variables, big, image_size=SIZE, raw=True),
      gradcam.layercam_fusion(*(gradcam.activations_and_grads(
          model, variables, big, layer=gradcam.default_fusion_layers(model),
          image_size=SIZE)[k] for k in ('acts', 'grads')), (40, 40)), atol=1e-6)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\] \(channels last\)'):
    gradcam.gradcam(model, variables, jnp.moveaxis(images, -1, 1))
  # uint8 images are normalised on the way in.
  u8 = jnp.full((1, SIZE, SIZE, 3), 128, jnp.uint8)
  from drjax.models.common import normalize
  chex.assert_trees_all_close(gradcam.gradcam(model, variables, u8),
                              gradcam.gradcam(model, variables, normalize(u8)), atol=1e-6)


def test_all_zero_gradients_give_zero_maps_with_a_warning(toy):
  model, variables, images = toy
  params = dict(variables['params'])
  params['head'] = {'kernel': jnp.zeros_like(params['head']['kernel']),
                    'bias': params['head']['bias']}
  dead = {'params': params, 'batch_stats': variables['batch_stats']}
  for fn in (gradcam.gradcam, gradcam.gradcam_plusplus, gradcam.xgradcam, gradcam.fusion):
    with pytest.warns(RuntimeWarning, match='all zero'):
      maps = fn(model, dead, images)
      jax.effects_barrier()
    assert not np.isnan(np.asarray(maps)).any()
    np.testing.assert_array_equal(np.asarray(maps), 0.0)
  # Under the caller's own jit the warning comes from a host callback instead.
  for under_jit in (lambda: jax.jit(lambda v, x: gradcam.gradcam(model, v, x))(dead, images),
                   lambda: jax.jit(lambda v: gradcam.gradcam(model, v, images))(dead),
                   lambda: jax.jit(lambda x: gradcam.gradcam(model, dead, x))(images)):
    with pytest.warns(RuntimeWarning, match='all zero'):
      maps = under_jit()
      jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(maps), 0.0)
  maps = gradcam.gradients(model, dead, images)
  assert not np.isnan(np.asarray(maps)).any()
  np.testing.assert_array_equal(np.asarray(maps), 0.0)
  # And no warning when the gradients are fine.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    gradcam.gradcam(model, variables, images)
    jax.effects_barrier()


def test_normalize_constant_and_tiny_maps():
  maps = jnp.stack([jnp.zeros((4, 4)), jnp.full((4, 4), 3.0), jnp.eye(4) * 1e-30])
  out = gradcam.normalize(maps)
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_allclose(out[2], np.eye(4), atol=1e-6)


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops']


def test_gradcam_costs_about_one_forward_pass(toy):
  # Differentiating only w.r.t. the perturbation of the chosen layer means no
  # backward pass through the trunk below it: at the last stage Grad-CAM costs
  # about a forward pass, while an input gradient costs about three.
  model, variables, images = toy
  cls = jnp.full((3,), -1, jnp.int32)
  forward = _flops(lambda v, x: model.apply(v, x, train=False), variables, images)

  def core(layer):
    return _flops(lambda v, x: gradcam.core.acts_and_grads(
        model, v, x, cls, layers=(layer,), target_fn=gradcam.class_score)[1],
        variables, images)

  last, first = core('stage2'), core('stem')
  input_grad = _flops(lambda v, x: gradcam.pixel._input_grads(
      model, v, x, cls, target_fn=gradcam.class_score)[0], variables, images)
  assert last < 1.25 * forward, (last, forward)
  assert first > 1.5 * forward, (first, forward)
  assert input_grad > 2.0 * forward, (input_grad, forward)


def test_scorecam_matches_a_naive_loop(toy):
  model, variables, images = toy
  x = images[:1]
  cam = gradcam.scorecam(model, variables, x, targets=[2], raw=True, batch_size=3)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  acts = np.asarray(state['intermediates']['stage2'][0][0])   # [h, w, C]
  scores = []
  for k in range(acts.shape[-1]):
    m = np.asarray(jax.image.resize(jnp.asarray(acts[..., k]), (SIZE, SIZE), 'bilinear'))
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    scores.append(float(_logits(model, variables, x * m[None, :, :, None])[0, 2]))
  weights = np.asarray(jax.nn.softmax(jnp.array(scores)))
  np.testing.assert_allclose(cam[0], (acts * weights).sum(-1), rtol=1e-4, atol=1e-5)
  maps = gradcam.scorecam(model, variables, images)
  chex.assert_shape(maps, (3, SIZE, SIZE))
  chex.assert_tree_all_finite(maps)


def test_fusion_uses_one_pass_over_the_chosen_layers(toy):
  model, variables, images = toy
  fused = gradcam.fusion(model, variables, images, layer=('stem', 'stage1', 'stage2'), raw=True)
  chex.assert_shape(fused, (3, SIZE, SIZE))
  assert float(fused.max()) <= 1.0   # tanh-scaled before the max
  parts = []
  for layer in ('stem', 'stage1', 'stage2'):
    m = gradcam.layercam(model, variables, images, layer=layer, raw=True)
    m = gradcam.resize(jax.nn.relu(m), (SIZE, SIZE))
    parts.append(jnp.tanh(2.0 * m / m.max(axis=(1, 2), keepdims=True)))
  chex.assert_trees_all_close(fused, functools.reduce(jnp.maximum, parts), atol=1e-5)
  chex.assert_trees_all_close(gradcam.fusion(model, variables, images,
                                             layer=('stem', 'stage1', 'stage2')),
                              gradcam.normalize(fused), atol=1e-6)


def test_pixel_attributions(toy):
  model, variables, images = toy
  x = images[:2]
  direct = jax.grad(lambda z: _logits(model, variables, z)[:, 1].sum())(x)
  vanilla = gradcam.gradients(model, variables, x, targets=[1, 1], raw=True)
  chex.assert_trees_all_close(vanilla, jnp.abs(direct).max(-1), atol=1e-6)
  smooth0 = gradcam.smoothgrad(model, variables, x, targets=[1, 1], raw=True, noise=0.0,
                               num_samples=2)
  chex.assert_trees_all_close(smooth0, vanilla, atol=1e-6)
  smooth = gradcam.smoothgrad(model, variables, x, num_samples=4)
  chex.assert_shape(smooth, (2, SIZE, SIZE))
  # Completeness (Sundararajan et al. 2017, Prop. 1): attributions sum to f(x) - f(0).
  attr = gradcam.integrated_gradients_attributions(model, variables, x, targets=[1, 1],
                                                   steps=64)
  gap = _logits(model, variables, x)[:, 1] - _logits(model, variables, jnp.zeros_like(x))[:, 1]
  np.testing.assert_allclose(attr.sum(axis=(1, 2, 3)), gap, rtol=0.05, atol=0.02)
  ig = gradcam.integrated_gradients(model, variables, x, steps=8)
  chex.assert_shape(ig, (2, SIZE, SIZE))


def test_methods_dict_has_one_signature(toy):
  model, variables, images = toy
  assert set(gradcam.METHODS) >= {'gradcam', 'gradcam++', 'hirescam', 'xgradcam', 'layercam',
                                  'scorecam', 'fusion', 'gradients', 'smoothgrad',
                                  'integrated_gradients'}
  for name in ('gradcam++', 'xgradcam', 'layercam'):
    raw = gradcam.METHODS[name](model, variables, images, layer='stage1', targets=[0, 1, 2],
                                raw=True)
    chex.assert_shape(raw, (3, SIZE // 2, SIZE // 2))
