"""FullGrad: parity with pytorch-grad-cam 1.5.7 on converted torchvision weights (a 1-1-1-1 ResNet,
whose biases are BatchNorm's, and drjax's tiny VGG, with conv biases and BatchNorm), the
full-gradient decomposition (Srinivas & Fleuret 2019, eq. 2), a linen model drjax has never
seen against gradients and post-processing done by hand, and the errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_gradcam_guided as guided_tests
import test_gradcam_parity as parity
from flax import linen as nn
from flax import nnx

from drjax.gradcam import full_gradient as fullgrad

torch = pytest.importorskip('torch')
from pytorch_grad_cam import FullGrad  # noqa: E402
from pytorch_grad_cam.utils.image import (  # noqa: E402
    scale_accross_batch_and_channels,
    scale_cam_image,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

_threads = parity._threads   # torch on 2 threads for this module, as in the parity tests
TARGETS = jnp.array([1, 3])


def _check_completeness(terms, atol=1e-5):
  """grad_x f . x + sum_b grad_b f . b == f for a piecewise-linear model (the paper's eq. 2)."""
  total = terms['input'].sum(axis=(1, 2, 3))
  for t in terms['biases'].values():
    total = total + t.reshape(t.shape[0], -1).sum(-1)
  chex.assert_trees_all_close(total, terms['scores'], atol=atol, rtol=1e-4)


@pytest.mark.parametrize('arch', ['resnet', 'vgg'])
def test_fullgrad_matches_pytorch_grad_cam(arch):
  build = guided_tests._small_resnet if arch == 'resnet' else guided_tests._tiny_vgg
  tmodel, model, _ = build()
  x, xt, classes = guided_tests._inputs(tmodel)
  with FullGrad(model=tmodel, target_layers=[]) as cam:
    reference = cam(input_tensor=xt, targets=[ClassifierOutputTarget(c) for c in classes])

  model, variables = guided_tests._converted(tmodel, model)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  ours = np.asarray(fullgrad.fullgrad(model, variables, xj, targets=classes))
  chex.assert_shape(ours, reference.shape)
  pearson = guided_tests._pearson(ours, reference)
  assert pearson >= 0.99, pearson
  np.testing.assert_allclose(ours, reference, atol=1e-4)   # seen: 1e-6
  # The same biases as the reference: torch's Conv2d (with a bias) and BatchNorm2d layers.
  torch_layers = [m for m in tmodel.modules() if isinstance(m, torch.nn.BatchNorm2d) or (
      isinstance(m, torch.nn.Conv2d) and m.bias is not None)]
  assert len(fullgrad.fullgrad_layers(model, variables, xj)) == len(torch_layers)
  _check_completeness(fullgrad.fullgrad_terms(model, variables, xj, targets=classes))


# ----------------------------------------------------------------------------
# A linen model drjax has never seen, by hand.


class HandNet(nn.Module):
  """Conv (bias), BatchNorm, ReLU, max-pool, Conv (bias), an unbiased 1x1 Conv, a Dense on the
  feature map (a 1x1 convolution) and a Dense head on the pooled features."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.Conv(6, (1, 1), use_bias=False)(x)
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(5)(x.mean(axis=(1, 2)))


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _hand_forward(variables, x, deltas):
  """HandNet written out, with `deltas[layer]` added to each biased layer's output; -> (logits,
  each layer's bias)."""
  p, stats = variables['params'], variables['batch_stats']['BatchNorm_0']
  mul = p['BatchNorm_0']['scale'] / jnp.sqrt(stats['var'] + 1e-5)   # flax's default epsilon
  biases = {'Conv_0': p['Conv_0']['bias'], 'Conv_1': p['Conv_1']['bias'],
            'BatchNorm_0': p['BatchNorm_0']['bias'] - stats['mean'] * mul,
            'Dense_0': p['Dense_0']['bias'], 'Dense_1': p['Dense_1']['bias']}
  x = _conv(x, p['Conv_0']['kernel']) + biases['Conv_0'] + deltas['Conv_0']
  x = jax.nn.relu(x * mul + biases['BatchNorm_0'] + deltas['BatchNorm_0'])
  x = nn.max_pool(x, (2, 2), (2, 2))
  x = jax.nn.relu(_conv(x, p['Conv_1']['kernel']) + biases['Conv_1'] + deltas['Conv_1'])
  x = _conv(x, p['Conv_2']['kernel'])
  x = jax.nn.relu(x @ p['Dense_0']['kernel'] + biases['Dense_0'] + deltas['Dense_0'])
  logits = x.mean(axis=(1, 2)) @ p['Dense_1']['kernel'] + biases['Dense_1'] + deltas['Dense_1']
  return logits, biases


@pytest.fixture(scope='module')
def hand_net():
  model, images = HandNet(), jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  return model, guided_tests.random_variables(model, images), images


def test_linen_model_matches_fullgrad_by_hand(hand_net):
  model, variables, images = hand_net
  shapes = {'Conv_0': (2, 16, 16, 4), 'BatchNorm_0': (2, 16, 16, 4), 'Conv_1': (2, 8, 8, 6),
            'Dense_0': (2, 8, 8, 6), 'Dense_1': (2, 5)}
  zeros = {n: jnp.zeros(s) for n, s in shapes.items()}

  def score(x, deltas):
    return _hand_forward(variables, x, deltas)[0][jnp.arange(2), TARGETS].sum()

  grad_x, grad_out = jax.jit(jax.grad(score, argnums=(0, 1)))(images, zeros)
  biases = _hand_forward(variables, images, zeros)[1]
  # pytorch-grad-cam's FullGrad post-processing on these (NCHW), with its own functions. The
  # reference leaves out Dense layers; drjax counts one on a feature map (a 1x1 convolution)
  # and, like the reference for its head, leaves out the spatially constant [B, K] one.
  size = (16, 16)
  parts = [scale_accross_batch_and_channels(
      np.abs(np.asarray(grad_x * images)).transpose(0, 3, 1, 2), size)]
  for name in ('Conv_0', 'BatchNorm_0', 'Conv_1', 'Dense_0'):
    term = np.abs(np.asarray(grad_out[name] * biases[name])).transpose(0, 3, 1, 2)
    parts.append(scale_accross_batch_and_channels(term, size).sum(1, keepdims=True))
  expected = scale_cam_image(np.concatenate(parts, axis=1).sum(1))

  ours = fullgrad.fullgrad(model, variables, images, targets=TARGETS)
  chex.assert_trees_all_close(ours, expected, atol=1e-4)
  terms = fullgrad.fullgrad_terms(model, variables, images, targets=TARGETS)
  chex.assert_trees_all_close(terms['input'], grad_x * images, atol=1e-6)
  chex.assert_trees_all_close(terms['biases'], {n: grad_out[n] * biases[n] for n in shapes},
                              atol=1e-6)
  _check_completeness(terms)
  assert fullgrad.fullgrad_layers(model, variables, images) == (
      'BatchNorm_0', 'Conv_0', 'Conv_1', 'Dense_0')
  jitted = jax.jit(lambda v, x: fullgrad.fullgrad(model, v, x, targets=TARGETS))
  chex.assert_trees_all_close(jitted(variables, images), ours, atol=1e-6)


class WithNorm(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.norm()(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(5)(x.mean(axis=(1, 2)))


class Conv1D(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(nn.relu(nn.Conv(4, (3,))(x.reshape(x.shape[0], -1, 3))).mean(1))


def test_models_fullgrad_cannot_handle_raise_clear_errors(hand_net):
  model, variables, images = hand_net
  # A normalisation whose statistics come from the input has no fixed bias.
  for norm, name in ((nn.LayerNorm, 'LayerNorm'), (lambda: nn.GroupNorm(2), 'GroupNorm')):
    other = WithNorm(norm)
    shapes = jax.eval_shape(other.init, jax.random.PRNGKey(0), images)
    with pytest.raises(ValueError, match=rf"cannot use layer '{name}_0' \({name}\): it has a "
                                         r'bias.*eq\. 2'):
      fullgrad.fullgrad_layers(other, shapes, images)
  other = WithNorm(nn.LayerNorm)
  with pytest.raises(ValueError, match=r"cannot use layer 'LayerNorm_0'"):
    fullgrad.fullgrad(other, guided_tests.random_variables(other, images), images)
  with pytest.raises(ValueError, match=r"BatchNorm 'BatchNorm_0' normalises with batch "
                                       r'statistics.*train'):
    fullgrad.fullgrad(model, variables, images, apply_kwargs={'train': True})
  other = Conv1D()
  with pytest.raises(ValueError, match=r"layer 'Conv_0' outputs shape \(2, 256, 4\)"):
    fullgrad.fullgrad_layers(other, jax.eval_shape(other.init, jax.random.PRNGKey(0), images),
                             images)
  with pytest.raises(ValueError, match='FullGrad supports flax.linen models; Linear is an nnx'):
    fullgrad.fullgrad(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), None, images)
