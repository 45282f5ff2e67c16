"""Guided backpropagation and Guided Grad-CAM: parity with pytorch-grad-cam 1.5.7 on converted
torchvision weights (drjax's tiny VGG; a tiny DenseNet, whose functional ReLU drjax guides too),
and by hand on linen and nnx models drjax has never seen, against the same model with a
hand-written guided ReLU (custom_vjp). The torchvision builders here serve the FullGrad tests
too."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_gradcam_parity as parity
from flax import linen as nn
from flax import nnx

from drjax import gradcam, weights
from drjax.gradcam import guided
from drjax.models import densenet, resnet, vgg

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.guided_backprop import (  # noqa: E402
    GuidedBackpropReLU,
    GuidedBackpropReLUModel,
)
from pytorch_grad_cam.utils.image import deprocess_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

_threads = parity._threads   # torch on 2 threads for this module, as in the parity tests
SIZE = 64
CLASSES = 10
TARGETS = jnp.array([1, 3])


def _pearson(a, b) -> float:
  return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _small_resnet():
  """torchvision's ResNet with one BasicBlock per stage, and drjax's counterpart."""
  torch.manual_seed(0)
  tmodel = parity._randomised(torchvision.models.resnet.ResNet(
      torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES))
  return tmodel, resnet.ResNet(block=resnet.BasicBlock, stage_sizes=(1, 1, 1, 1)), 'layer4'


def _tiny_vgg(batch_norm=True):
  """drjax's VGGTiny layout in torchvision's VGG (its classifier resized to 32 hidden units)."""
  torch.manual_seed(0)
  features = torchvision.models.vgg.make_layers(list(vgg.CFGS['tiny']), batch_norm=batch_norm)
  tmodel = torchvision.models.VGG(features, num_classes=CLASSES)
  nn_ = torch.nn
  tmodel.classifier = nn_.Sequential(nn_.Linear(16 * 49, 32), nn_.ReLU(), nn_.Dropout(),
                                     nn_.Linear(32, 32), nn_.ReLU(), nn_.Dropout(),
                                     nn_.Linear(32, CLASSES))
  with torch.no_grad():
    for m in tmodel.modules():
      if isinstance(m, (nn_.Conv2d, nn_.Linear)):
        m.bias.normal_(0.0, 0.1)   # torchvision initialises them to zero
  model = vgg.VGG(cfg=vgg.CFGS['tiny'], batch_norm=batch_norm, hidden=32)
  return parity._randomised(tmodel), model, 'block5'


def _converted(tmodel, model):
  variables = weights.from_torchvision(model, tmodel.state_dict(), num_classes=CLASSES)
  return model.clone(num_classes=CLASSES), variables


def _inputs(tmodel):
  x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
  xt = torch.from_numpy(x)
  with torch.no_grad():
    classes = [int(c) for c in tmodel(xt).argmax(-1)]
  return x, xt, classes


def _reference_guided(tmodel, xt, classes):
  """pytorch-grad-cam's guided gradients, one image at a time as it computes them: [B, H, W, C]."""
  gb_model = GuidedBackpropReLUModel(model=tmodel, device='cpu')
  return np.stack([gb_model(xt[i:i + 1], target_category=c) for i, c in enumerate(classes)])


def test_guided_backprop_and_guided_gradcam_match_pytorch_grad_cam():
  # drjax's tiny VGG: BatchNorm, and ReLUs in the classifier too. A ResNet is in the FullGrad
  # parity test, a DenseNet in the next one.
  tmodel, model, layer = _tiny_vgg()
  x, xt, classes = _inputs(tmodel)
  # Grad-CAM first: the guided pass puts back one ReLU module shared by every position, whose
  # hook would see every ReLU's output.
  torch_layer = tmodel.features[-2]   # block5: the last ReLU, before the pool
  with GradCAM(model=tmodel, target_layers=[torch_layer]) as cam:
    cam_mask = cam(input_tensor=xt, targets=[ClassifierOutputTarget(c) for c in classes])
  gb = _reference_guided(tmodel, xt, classes)
  cam_gb = cam_mask[..., None] * gb   # pytorch-grad-cam's cam.py: cam_mask * gb

  model, variables = _converted(tmodel, model)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  ours = np.asarray(guided.guided_backprop_attributions(model, variables, xj, targets=classes))
  chex.assert_shape(ours, (2, SIZE, SIZE, 3))
  assert _pearson(ours, gb) >= 0.99, _pearson(ours, gb)
  np.testing.assert_allclose(ours, gb, atol=1e-4 * np.abs(gb).max())   # seen: 3e-7
  ours_cam_gb = np.asarray(guided.guided_gradcam_attributions(model, variables, xj, layer=layer,
                                                              targets=classes))
  assert _pearson(ours_cam_gb, cam_gb) >= 0.99, _pearson(ours_cam_gb, cam_gb)
  np.testing.assert_allclose(ours_cam_gb, cam_gb, atol=1e-4 * np.abs(gb).max())

  # The maps: channels reduced as drjax's `gradients` (max_c |g|), min-max per image.
  for fn, ref in ((guided.guided_backprop, gb), (guided.guided_gradcam, cam_gb)):
    maps = np.asarray(fn(model, variables, xj, layer=layer, targets=classes))
    chex.assert_shape(maps, (2, SIZE, SIZE))
    expected = parity._scale(np.abs(ref).max(-1))
    assert _pearson(maps, expected) >= 0.99, (fn.__name__, _pearson(maps, expected))
  # pytorch-grad-cam's visualisation, per image.
  for i in range(2):
    for ours_i, ref_i in ((ours[i], gb[i]), (ours_cam_gb[i], cam_gb[i])):
      pixels = np.asarray(guided.deprocess_image(ours_i), np.float32)
      assert _pearson(pixels, deprocess_image(ref_i)) >= 0.99


def test_densenet_guides_its_functional_relu_too(monkeypatch):
  # torchvision's DenseNet ends with F.relu, which pytorch-grad-cam leaves ordinary (it swaps
  # nn.ReLU modules only); drjax guides every ReLU of the computation, as the method is defined.
  # The reference is therefore rerun with F.relu guided as well, and drjax matches that.
  torch.manual_seed(0)
  tmodel = parity._randomised(torchvision.models.DenseNet(
      growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2,
      num_classes=CLASSES))
  x, xt, classes = _inputs(tmodel)
  stock = _reference_guided(tmodel, xt, classes)
  monkeypatch.setattr(torch.nn.functional, 'relu',
                      lambda input, inplace=False: GuidedBackpropReLU.apply(input))
  all_guided = _reference_guided(tmodel, xt, classes)
  monkeypatch.undo()
  model = densenet.DenseNetTiny()
  model, variables = _converted(tmodel, model)
  ours = guided.guided_backprop_attributions(model, variables,
                                             jnp.asarray(x.transpose(0, 2, 3, 1)),
                                             targets=classes)
  np.testing.assert_allclose(ours, all_guided, atol=1e-3 * np.abs(all_guided).max())
  assert np.abs(stock - all_guided).max() > 0.1 * np.abs(all_guided).max()


# ----------------------------------------------------------------------------
# Models drjax has never seen, against the same model with a hand-written guided ReLU.


@jax.custom_vjp
def _guided_by_hand(x):
  return jnp.maximum(x, 0.0)


_guided_by_hand.defvjp(lambda x: (jnp.maximum(x, 0.0), x),
                       lambda x, g: (g * (x > 0) * (g > 0),))


class Block(nn.Module):
  act: object

  @nn.compact
  def __call__(self, x, train=False):
    return self.act(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(x)))


class LinenNet(nn.Module):
  """Conv/BatchNorm/ReLU blocks (one rematerialised), a LayerNorm, a ReLU written as
  max(x, 0), one inside a jit and one inside a scan, and a Dense head."""
  act: object = nn.relu
  own_relu: object = None

  @nn.compact
  def __call__(self, x, train=False):
    own_relu = self.own_relu or (lambda y: jnp.maximum(y, 0.0))
    x = Block(self.act)(x, train)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.remat(Block, static_argnums=(2,))(self.act)(x, train)
    # Its variance clamp, max(0, var), is no ReLU: a wrong guess would change the gradient.
    x = nn.LayerNorm()(x)
    x = own_relu(nn.Conv(8, (3, 3))(x))
    x = jax.jit(self.act)(nn.Conv(8, (1, 1))(x))
    _, x = jax.lax.scan(lambda c, row: (c, self.act(row - 0.1)), 0.0, x)
    return nn.Dense(5)(x.mean(axis=(1, 2)))


def random_variables(model, images, seed=0):
  """`model`'s variables drawn with numpy, so that no initialiser is compiled: kernels
  N(0, 1/fan_in), biases N(0, 0.1), BatchNorm scales and variances U(0.5, 1.5), means N(0, 0.1)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'kernel':
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    return value.astype(np.float32)

  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _by_hand(fn, images, targets=TARGETS):
  return jax.jit(jax.grad(lambda x: fn(x)[jnp.arange(len(targets)), targets].sum()))(images)


def test_linen_model_matches_guided_relu_by_hand():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  model = LinenNet()
  variables = random_variables(model, images)
  hand = LinenNet(act=_guided_by_hand, own_relu=_guided_by_hand)
  expected = _by_hand(lambda x: hand.apply(variables, x), images)
  plain = _by_hand(lambda x: model.apply(variables, x), images)
  ours = guided.guided_backprop_attributions(model, variables, images, targets=TARGETS)
  chex.assert_trees_all_close(ours, expected, atol=1e-6)
  assert float(jnp.abs(plain - expected).max()) > 0.1 * float(jnp.abs(expected).max())
  maps = guided.guided_backprop(model, variables, images, targets=TARGETS)
  chex.assert_trees_all_close(maps, _unit(jnp.abs(expected).max(-1)), atol=1e-5)


def _unit(m):
  lo = m.min(axis=(1, 2), keepdims=True)
  return (m - lo) / (m.max(axis=(1, 2), keepdims=True) - lo)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(6, 5, rngs=rngs)
    self.act = nnx.relu

  def __call__(self, x):
    return self.head(self.drop(self.act(self.bn(self.conv(x)))).mean(axis=(1, 2)))


def test_nnx_model_matches_guided_relu_by_hand():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  module = NnxNet(nnx.Rngs(0))
  module.bn.mean[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (6,))
  hand = nnx.clone(module)
  hand.eval()   # as drjax runs its own copy: running statistics, no dropout
  hand.act = _guided_by_hand
  expected = _by_hand(hand, images)
  ours = guided.guided_backprop_attributions(module, None, images, targets=TARGETS)
  chex.assert_trees_all_close(ours, expected, atol=1e-6)
  assert module.act is nnx.relu and module.bn.use_running_average is False
  jitted = jax.jit(lambda x: guided.guided_backprop_attributions(module, None, x,
                                                                 targets=TARGETS))
  chex.assert_trees_all_close(jitted(images), ours, atol=1e-6)
  # Guided Grad-CAM: the post-processed Grad-CAM map times the guided gradients.
  cam = gradcam.gradcam(module, None, images, layer='bn', targets=TARGETS)
  attr = guided.guided_gradcam_attributions(module, None, images, layer='bn', targets=TARGETS)
  chex.assert_trees_all_close(attr, cam[..., None] * expected, atol=1e-6)
  chex.assert_trees_all_close(guided.guided_gradcam(module, None, images, layer='bn',
                                                    targets=TARGETS),
                              _unit(jnp.abs(cam[..., None] * expected).max(-1)), atol=1e-5)


class Gelu(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(nn.gelu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2)))


def test_a_model_without_relu_warns_and_gives_plain_gradients():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  model = Gelu()
  variables = random_variables(model, images)
  with pytest.warns(RuntimeWarning, match=r'Gelu has no ReLU .* plain gradients'):
    ours = guided.guided_backprop_attributions(model, variables, images, targets=TARGETS)
  chex.assert_trees_all_close(ours, _by_hand(lambda x: model.apply(variables, x), images),
                              atol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    guided.guided_relus(jax.nn.relu)(images)   # jax.nn.relu itself is found


def test_deprocess_image_matches_pytorch_grad_cam():
  attr = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  ours = np.asarray(guided.deprocess_image(attr))
  assert ours.dtype == np.uint8
  for i in range(2):
    assert np.abs(ours[i].astype(int) - deprocess_image(attr[i]).astype(int)).max() <= 1
