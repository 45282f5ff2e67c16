"""AblationCAM, SESS and RefineCAM: parity with pytorch-grad-cam 1.5.7 run beside drjax on
converted torchvision weights (the tiny DenseNet), and their JAX properties (jit, per-image
targets, chunking) on the toy model.

Maps are compared after the same post-processing: ReLU and pytorch-grad-cam's min-max for the
raw AblationCAM maps, the libraries' own outputs for SESS and RefineCAM.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_model import TOY_SIZE as SIZE

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
pytest.importorskip('pytorch_grad_cam')

import cv2  # noqa: E402  (pytorch-grad-cam's own dependency)
from pytorch_grad_cam import SESS, AblationCAM, GradCAM, RefineCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from test_gradcam_parity import _randomised, _scale, _threads  # noqa: E402, F401  (autouse)

from drjax import gradcam, models, weights  # noqa: E402
from drjax.gradcam import core, perturbation, refine  # noqa: E402
from drjax.gradcam import sliding as sess  # noqa: E402

NUM_CLASSES = 10


def _pearson(a, b):
  return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope='module')
def densenet_tiny():
  """(torch model, drjax model, variables): torchvision's DenseNet as drjax's densenet_tiny."""
  torch.manual_seed(0)
  tmodel = _randomised(torchvision.models.DenseNet(
      growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2,
      num_classes=NUM_CLASSES))
  variables = weights.from_torchvision('densenet_tiny', tmodel.state_dict(),
                                       num_classes=NUM_CLASSES)
  return tmodel, models.get_model('densenet_tiny', num_classes=NUM_CLASSES), variables


def _inputs(height, width=None, batch=2):
  """(NCHW numpy for torch, NHWC jax array for drjax) of the same random images."""
  x = np.random.default_rng(0).standard_normal((batch, 3, height, width or height))
  x = x.astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 1))


def _classes(tmodel, x):
  with torch.no_grad():
    return [int(c) for c in tmodel(torch.from_numpy(x)).argmax(-1)]


# ----------------------------------------------------------------------------
# AblationCAM.


# (torch layer, drjax layer, reference batch_size) on the tiny DenseNet at 128 px. Its conv0
# stage ends in a ReLU (torch's features.relu0): the reference zeroes each channel. Its
# denseblock4 (before norm5) has negative values: the reference sets the channel to min - 1e7,
# but with batch_size > 1 its AblationLayer takes the minimum of a batch that already holds the
# previous rows' ablations, so row i gets min - (i + 1) * 1e7 (a bug). drjax uses min - 1e7
# for every channel, which is the reference with batch_size=1.
ABLATION_CASES = {
    'conv0_zeroed': (lambda m: m.features.relu0, 'conv0', 32),
    'denseblock4_min_minus_1e7': (lambda m: m.features.denseblock4, 'denseblock4', 1),
}


@pytest.mark.parametrize('case', list(ABLATION_CASES))
def test_ablationcam_matches_pytorch_grad_cam(case, densenet_tiny):
  torch_layer, layer, ref_batch = ABLATION_CASES[case]
  tmodel, model, variables = densenet_tiny
  x, xj = _inputs(128)
  xt = torch.from_numpy(x)
  classes = _classes(tmodel, x)
  targets = [ClassifierOutputTarget(c) for c in classes]
  module = torch_layer(tmodel)
  cam = AblationCAM(model=tmodel, target_layers=[module], batch_size=ref_batch)
  cam.activations_and_grads(xt)   # the hooks capture the layer's activations
  acts = cam.activations_and_grads.activations[0].numpy()
  reference = np.maximum(cam.get_cam_image(xt, module, targets, acts, None, False), 0)
  cam.activations_and_grads.release()

  ours = perturbation.ablationcam(model, variables, xj, layer=layer, targets=classes, raw=True,
                                 batch_size=4)
  ours = np.asarray(jax.nn.relu(ours))
  assert ours.shape == reference.shape
  a, b = _scale(ours), _scale(reference)
  pearson, max_diff = _pearson(a, b), float(np.abs(a - b).max())
  print(f'\nablationcam {case}: r={pearson:.6f} max|d|={max_diff:.1e}')
  assert pearson >= 0.99, (pearson, max_diff)
  np.testing.assert_allclose(a, b, atol=1e-3)


def test_ablation_values_follow_the_reference_rule():
  acts = jnp.array([[[0.0, 2.0], [1.0, 3.0]], [[-2.0, 1.0], [0.5, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])
  np.testing.assert_array_equal(perturbation.ablation_values(acts[..., None]).ravel(),
                                np.float32([0.0, -2.0 - 1e7, 1.0 - 1e7]))


def test_ablationcam_matches_a_naive_loop_for_any_chunk_size(toy):
  model, variables, images = toy
  targets = jnp.array([0, 3, 1])
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  acts = state['intermediates']['stage1'][0]   # [B, h, w, C], after a ReLU: ablated to 0
  rows = jnp.arange(3)
  score = model.apply(variables, images)[rows, targets]
  # The tap adds the perturbation to the stage's output: -acts * onehot(k) zeroes channel k.
  perturbed = jax.jit(lambda delta: model.apply(
      {**variables, 'perturbations': {'stage1': delta}}, images)[rows, targets])
  weights = [(score - perturbed(-acts * jax.nn.one_hot(k, acts.shape[-1]))) / score
             for k in range(acts.shape[-1])]
  by_hand = (acts * jnp.stack(weights, -1)[:, None, None]).sum(-1)
  for batch_size in (3, 8):   # 3 chunks, the last one filled up; one chunk
    cam = perturbation.ablationcam(model, variables, images, layer='stage1', targets=targets,
                                   raw=True, batch_size=batch_size)
    chex.assert_trees_all_close(cam, by_hand, atol=1e-5, rtol=1e-5)


def test_ablationcam_jit_targets_and_outputs(toy):
  model, variables, images = toy
  jitted = jax.jit(lambda v, x, t: perturbation.ablationcam(model, v, x, targets=t))
  per_image = jitted(variables, images, jnp.array([0, 3, 1]))
  chex.assert_shape(per_image, (3, SIZE, SIZE))
  chex.assert_tree_all_finite(per_image)
  assert float(per_image.min()) >= 0.0 and float(per_image.max()) <= 1.0
  # Each image's map is its own: permuting the images and their targets permutes the maps.
  order = jnp.array([2, 0, 1])
  chex.assert_trees_all_close(jitted(variables, images[order], jnp.array([1, 0, 3])),
                              per_image[order], atol=1e-5)
  cls = model.apply(variables, images).argmax(-1)
  chex.assert_trees_all_close(perturbation.ablationcam(model, variables, images),
                              jitted(variables, images, cls), atol=1e-5)
  probability = perturbation.ablationcam(model, variables, images,
                                         targets=gradcam.referable_dr_target)
  chex.assert_tree_all_finite(probability)


def _loop_computations(hlo: str) -> dict[str, str]:
  """The compiled module's computations that run inside a while loop, by name."""
  comps = {}
  for block in hlo.split('\n\n'):
    match = re.match(r'\s*(?:ENTRY\s+)?%?([\w.\-]+)\s', block)
    if match:
      comps[match.group(1)] = block
  todo = [n for block in comps.values() for n in re.findall(r'body=%?([\w.\-]+)', block)]
  inside = {}
  while todo:
    name = todo.pop()
    if name in comps and name not in inside:
      inside[name] = comps[name]
      todo += re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)', comps[name])
  return inside


def test_ablationcam_runs_the_trunk_below_the_layer_once(toy):
  """XLA hoists the trunk (which no ablation changes) out of the chunk loop: inside the loop,
  nothing reads the images, so each chunk runs only the network above the layer."""
  model, variables, images = toy
  model, variables, layers, apply_kwargs = core.model_inputs(model, variables, 'stage1', None)
  images, target_fn, cls = core.core_inputs(images, None)
  hlo = perturbation._ablationcam.lower(
      model, variables, images, cls, layer='stage1', target_fn=target_fn, batch_size=3,
      apply_kwargs=apply_kwargs).compile().as_text()
  inside = _loop_computations(hlo)
  assert any('convolution(' in text for text in inside.values())   # the part above: conv2
  image_shape = 'f32[{}]'.format(','.join(map(str, images.shape)))
  assert image_shape in hlo
  assert not [name for name, text in inside.items() if image_shape in text]


def test_map_chunks_pads_with_real_items_and_keeps_order():
  xs = jnp.arange(10.0) + 1
  seen = []

  def fn(chunk):
    seen.append(chunk.shape)
    return 1.0 / chunk   # a zero-padded chunk would give inf

  out = perturbation.map_chunks(fn, xs, 4)
  np.testing.assert_allclose(out, 1.0 / xs, rtol=1e-6)
  assert seen == [(4,)]
  chex.assert_shape(perturbation.map_chunks(lambda c: c * 2, xs, 100), (10,))


# ----------------------------------------------------------------------------
# SESS.


# (options, image height, width, targets given). Few scales keep the references fast: 3 scales
# of 64 px images are 64, 82, 100 px, 9 windows per image; scales 64, 96 of 64 x 80 images with
# a stride of 24 give 14 windows, the lower half of them pre-filtered out.
SESS_CASES = {
    'mean_theta_smooth_predicted': (dict(num_scales=3, theta=0.2), 64, 64, False),
    'max_prefilter_stride_nonsquare': (dict(scales=[64, 96], step_size=24, pool='max',
                                            pre_filter_ratio=0.5, smooth=False), 64, 80, True),
}


@pytest.mark.parametrize('case', list(SESS_CASES))
def test_sess_matches_pytorch_grad_cam(case, densenet_tiny):
  options, height, width, given = SESS_CASES[case]
  tmodel, model, variables = densenet_tiny
  x, xj = _inputs(height, width)
  classes = _classes(tmodel, x)
  with SESS(model=tmodel, target_layers=[tmodel.features.denseblock3], base_method=GradCAM,
            **options) as method:
    reference = method(torch.from_numpy(x),
                       [ClassifierOutputTarget(c) for c in classes] if given else None)
  ours = np.asarray(sess.sess(model, variables, xj, layer='denseblock3',
                              targets=classes if given else None, **options))
  assert ours.shape == reference.shape
  pearson, max_diff = _pearson(ours, reference), float(np.abs(ours - reference).max())
  print(f'\nsess {case}: r={pearson:.6f} max|d|={max_diff:.1e}')
  assert pearson >= 0.99, (pearson, max_diff)


def test_sess_pastes_and_blurs_as_cv2():
  """The paste (cv2.resize, INTER_LINEAR) and the blur (cv2.GaussianBlur) as matrices."""
  canvas = np.random.default_rng(0).random((100, 125)).astype(np.float32)
  for size in ((64, 80), (100, 125), (41, 200)):
    ours = sess.resize_matrix(100, size[0]) @ canvas @ sess.resize_matrix(125, size[1]).T
    np.testing.assert_allclose(ours, cv2.resize(canvas, size[::-1]), atol=1e-5)
  for shape in ((64, 80), (7, 5)):
    image = canvas[:shape[0], :shape[1]]
    ours = sess.blur_matrix(shape[0]) @ image @ sess.blur_matrix(shape[1]).T
    np.testing.assert_allclose(ours, cv2.GaussianBlur(image, (11, 11), 5.0, 0), atol=1e-5)


def test_sess_windows_as_the_reference():
  from pytorch_grad_cam.sess import window_starts
  for length, step, window in ((64, 64, 64), (82, 64, 64), (131, 32, 32), (100, 24, 64)):
    assert sess.window_starts(length, step, window) == window_starts(length, step, window)
  assert sess.default_scales(224) == tuple(range(224, 929, 64))
  assert sess.scaled_size(64, 80, 82) == (82, 102)


def test_sess_jit_targets_chunks_and_base_methods(toy):
  model, variables, images = toy
  kwargs = dict(layer='stage1', scales=(SIZE, SIZE + 8))
  jitted = jax.jit(lambda v, x, t: sess.sess(model, v, x, targets=t, batch_size=4, **kwargs))
  cam = jitted(variables, images, jnp.array([0, 3, 1]))
  chex.assert_shape(cam, (3, SIZE, SIZE))
  assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
  # Each image's map is its own: permuting the images and their targets permutes the maps.
  order = jnp.array([2, 0, 1])
  chex.assert_trees_all_close(jitted(variables, images[order], jnp.array([1, 0, 3])),
                              cam[order], atol=1e-5)
  # Chunking is a memory bound only.
  chex.assert_trees_all_close(
      cam, sess.sess(model, variables, images, targets=[0, 3, 1], batch_size=64, **kwargs),
      atol=1e-5)
  other = sess.sess(model, variables, images, targets=gradcam.referable_dr_target, raw=True,
                    base_method=gradcam.layercam, use_softmax_scores=False, **kwargs)
  chex.assert_shape(other, (3, SIZE, SIZE))
  chex.assert_tree_all_finite(other)
  with pytest.raises(ValueError, match='at least the window'):
    sess.sess(model, variables, images, scales=(SIZE - 1,))


# ----------------------------------------------------------------------------
# RefineCAM.


def test_refinecam_matches_pytorch_grad_cam(densenet_tiny):
  tmodel, model, variables = densenet_tiny
  x, xj = _inputs(64)
  classes = _classes(tmodel, x)
  method = RefineCAM(model=tmodel, target_layers=[tmodel.features.denseblock2,
                                                  tmodel.features.denseblock3])
  reference = method(torch.from_numpy(x), [ClassifierOutputTarget(c) for c in classes])
  for base in method.base_cam_per_layer:
    base.activations_and_grads.release()
  ours = np.asarray(refine.refinecam(model, variables, xj, layer=('denseblock2', 'denseblock3'),
                                     targets=classes))
  pearson, max_diff = _pearson(ours, reference), float(np.abs(ours - reference).max())
  print(f'\nrefinecam: r={pearson:.6f} max|d|={max_diff:.1e}')
  assert pearson >= 0.99, (pearson, max_diff)


def test_refinecam_is_the_normalised_product_of_base_maps(toy):
  model, variables, images = toy
  layers = ('stage1', 'stage2')
  product = (gradcam.gradcam_plusplus(model, variables, images, layer=layers[0])
             * gradcam.gradcam_plusplus(model, variables, images, layer=layers[1]))
  chex.assert_trees_all_close(refine.refinecam(model, variables, images, layer=layers),
                              gradcam.normalize(product), atol=1e-6)
  jitted = jax.jit(lambda v, x: refine.refinecam(model, v, x, base_method=gradcam.gradcam,
                                                 targets=jnp.array([0, 3, 1])))
  chex.assert_shape(jitted(variables, images), (3, SIZE, SIZE))   # default: all three stages
