"""Tests for drjax.models: registry, taps, shapes at many input sizes, parity with torchvision.

Parity runs torchvision itself with random weights and random BatchNorm
statistics/affines, converts its state_dict with drjax.weights, and compares
eval-mode logits (and one named stage) on the same random images.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from drjax import host, models, weights
from drjax.models import densenet, layers, resnet, vgg

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
torch.set_num_threads(2)

TINY = ('densenet_tiny', 'resnet_tiny', 'vgg_tiny')
ATOL = 1e-4
# XLA's backend (LLVM) optimisations cost more compile time than they save on one
# call; for threefry random bits (init, dropout) ~10x more.
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}
_jit = functools.partial(jax.jit, compiler_options=_COMPILER_OPTIONS)


@pytest.fixture(autouse=True)
def _seed_torch():
  """torchvision's own initialisers draw from torch's global generator: fix it, so
  that each test sees the same weights whichever worker and order runs it."""
  torch.manual_seed(0)


def _randomize(module, seed: int = 0):
  """Random weights, and BatchNorm statistics/affines far from their defaults.

  The running statistics are those of one random batch, then perturbed, and the
  last BatchNorm of each residual branch is scaled down as in trained ResNets:
  otherwise the activations of a deep ResNet grow (to ~1e6 with arbitrary
  statistics, to ~30 even with these) and float32 rounding alone exceeds 1e-4.
  """
  gen = torch.Generator().manual_seed(seed)
  norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.Linear):
        # torchvision's VGG init (std 0.01) gives logits ~0.1; make them O(1).
        m.weight.normal_(0.0, 1.0 / np.sqrt(m.in_features), generator=gen)
        m.bias.normal_(0.0, 0.1, generator=gen)
    for m in norms:
      m.weight.uniform_(0.5, 1.5, generator=gen)
      m.bias.normal_(0.0, 0.2, generator=gen)
      m.reset_running_stats()
      m.momentum = None  # running stats = this batch's statistics
    for m in module.modules():
      if isinstance(m, torchvision.models.resnet.Bottleneck | torchvision.models.resnet.BasicBlock):
        last = m.bn3 if isinstance(m, torchvision.models.resnet.Bottleneck) else m.bn2
        last.weight.uniform_(0.1, 0.4, generator=gen)
    module.train()(torch.randn(4, 3, 64, 96, generator=gen))
    for m in norms:
      m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen)
                          * m.running_var.sqrt() * 0.2)
      m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.7, 1.4, generator=gen))
      m.momentum = 0.1
  return module.eval()


def _torch_forward(module, images_nchw, stage_module=None):
  """Logits (and the output of `stage_module`, NHWC) of a torch model in eval mode."""
  captured = {}
  handle = None
  if stage_module is not None:
    handle = stage_module.register_forward_hook(
        lambda m, i, o: captured.setdefault('acts', o.detach().clone()))
  with torch.no_grad():
    logits = module(images_nchw).numpy()
  if handle is not None:
    handle.remove()
    return logits, captured['acts'].numpy().transpose(0, 2, 3, 1)
  return logits, None


@functools.cache
def _jax_forward(model):
  """Jitted eval forward returning logits and the 'intermediates' collection."""
  def forward(variables, images):
    return model.apply(variables, images, train=False, mutable=['intermediates'])
  return _jit(forward)


def _check_parity(arch, torch_model, model, sizes, stage=None, stage_module=None, seed=0):
  variables = jax.device_put(weights.from_torchvision(arch, torch_model.state_dict(),
                                                      num_classes=model.num_classes))
  gen = torch.Generator().manual_seed(seed + 1)
  for height, width in sizes:
    images = torch.randn(2, 3, height, width, generator=gen)
    ref_logits, ref_acts = _torch_forward(torch_model, images, stage_module)
    logits, state = _jax_forward(model)(variables, images.numpy().transpose(0, 2, 3, 1))
    chex.assert_shape(logits, ref_logits.shape)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=ATOL,
                               err_msg=f'{arch} logits at {height}x{width}')
    if stage is not None:
      (acts,) = state['intermediates'][stage]
      # Deep stages (resnet101's layer4, densenet121's denseblock4 after 100+ layers,
      # values up to ~50) carry float32 rounding of ~1e-4 relative to their values
      # and ~1e-5 of the tensor's scale on its near-zero entries: the tolerance is
      # relative and scales with the tensor. A wrong layer or statistic is off by O(scale).
      scale = max(1.0, float(np.abs(ref_acts).max()))
      np.testing.assert_allclose(np.asarray(acts), ref_acts, rtol=ATOL, atol=ATOL * scale / 10,
                                 err_msg=f'{arch} {stage} at {height}x{width}')


# --------------------------------------------------------------------------
# Registry and taps.


def test_registry_names_and_unknown():
  assert set(TINY) <= set(models.MODEL_NAMES)
  for name in ('densenet121', 'densenet169', 'densenet201', 'resnet50', 'resnet101',
               'resnet152', 'vgg16', 'vgg16_bn'):
    assert name in models.MODEL_NAMES
  with pytest.raises(ValueError, match='densenet121'):
    models.get_model('densenet122')


def test_stage_names_and_cam_layers():
  assert models.get_model('densenet121').stage_names == (
      'conv0', 'pool0', 'denseblock1', 'transition1', 'denseblock2', 'transition2',
      'denseblock3', 'transition3', 'denseblock4', 'norm5')
  assert models.get_model('resnet101').stage_names == (
      'stem', 'layer1', 'layer2', 'layer3', 'layer4')
  vgg16 = models.get_model('vgg16')
  assert vgg16.stage_names[:3] == ('conv1_1', 'conv1_2', 'block1')
  assert vgg16.stage_names[-4:] == ('conv5_1', 'conv5_2', 'conv5_3', 'block5')
  assert len(vgg16.stage_names) == 13 + 5
  assert [models.get_model(n).default_cam_layer for n in ('densenet121', 'resnet101', 'vgg16')
          ] == ['denseblock4', 'layer4', 'block5']


@pytest.mark.parametrize('name', TINY)
def test_tiny_init_apply_taps(name):
  model = models.get_model(name, num_classes=5)
  x = jax.random.normal(jax.random.key(0), (2, 64, 80, 3))
  variables = _jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  assert set(variables) == {'params', 'batch_stats'}

  def forward(variables, x, perturbations):
    return model.apply({**variables, 'perturbations': perturbations}, x, train=False,
                       mutable=['intermediates'])

  _, state = _jit(lambda v, x: model.apply(v, x, train=False,
                                           mutable=['intermediates', 'perturbations']))(
                                               variables, x)
  assert set(state['intermediates']) == set(model.stage_names)  # flat, keyed by stage
  assert set(state['perturbations']) == set(model.stage_names)
  assert model.default_cam_layer in model.stage_names
  logits, inter = _jit(forward)(variables, x, state['perturbations'])
  chex.assert_shape(logits, (2, 5))
  for name_, (acts,) in inter['intermediates'].items():
    chex.assert_equal_shape([acts, state['perturbations'][name_]])

  # Gradients w.r.t. a perturbation are gradients w.r.t. that stage's activation.
  grads = _jit(jax.grad(lambda p: forward(variables, x, p)[0][:, 1].sum()))(
      state['perturbations'])
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[model.default_cam_layer]).sum()) > 0

  logits, updates = _jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                  rngs={'dropout': jax.random.key(1)}))(
                                                      variables, x)
  chex.assert_shape(logits, (2, 5))
  assert set(updates) == {'batch_stats'}


def test_vgg_dropout_uses_dropout_rng():
  model = models.get_model('vgg_tiny')
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = _jit(lambda x: model.init(jax.random.key(0), x))(x)
  apply = _jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                rngs={'dropout': rng})[0])
  a, b, c = (apply(variables, x, jax.random.key(k)) for k in (1, 1, 2))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a, c)


SIZES = ((64, 64), (65, 97), (128, 77), (224, 224), (300, 200), (512, 512), (384, 512))


@pytest.mark.parametrize('name', TINY)
def test_tiny_shapes_over_sizes(name):
  model = models.get_model(name, num_classes=3)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  for height, width in SIZES:
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']),
        variables, jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32))
    chex.assert_shape(logits, (2, 3))
    acts = state['intermediates']
    assert set(acts) == set(model.stage_names)
    final = acts[model.default_cam_layer][0].shape
    # Five stride-2 stages: 1/32 of the input, floored as torch does.
    assert final[1:3] == (_down32(height, name), _down32(width, name)), (height, width, final)


def _down32(size, name):
  if name == 'vgg_tiny':  # five 2x2 max-pools, the last after the tap
    return size // 16
  # 7x7/2 conv (pad 3), 3x3/2 max-pool (pad 1), then three stride-2 stages.
  size = (size + 6 - 7) // 2 + 1
  size = (size + 2 - 3) // 2 + 1
  for _ in range(3):
    size = (size + 2 - 3) // 2 + 1 if name == 'resnet_tiny' else size // 2
  return size


# --------------------------------------------------------------------------
# Parity over input sizes with small torchvision-built models of each class.


SWEEP = ((64, 64), (65, 97), (224, 160), (512, 384))


def test_parity_sizes_densenet_small():
  kwargs = dict(growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2)
  torch_model = _randomize(torchvision.models.DenseNet(num_classes=5, **kwargs))
  model = densenet.DenseNet(num_classes=5, **kwargs)
  _check_parity(model, torch_model, model, SWEEP, 'transition3',
                torch_model.features.transition3)


def test_parity_sizes_resnet_small():
  block = torchvision.models.resnet.BasicBlock
  torch_model = _randomize(torchvision.models.ResNet(block, [1, 1, 1, 1], num_classes=5))
  model = resnet.ResNet(block=resnet.BasicBlock, stage_sizes=(1, 1, 1, 1), num_classes=5)
  _check_parity(model, torch_model, model, SWEEP, 'layer3', torch_model.layer3)


def test_parity_sizes_vgg_small():
  cfg = vgg.CFGS['tiny']
  features = torchvision.models.vgg.make_layers(list(cfg), batch_norm=True)
  torch_model = torchvision.models.VGG(features, num_classes=5)
  torch_model.classifier[0] = torch.nn.Linear(cfg[-2] * 7 * 7, 4096)  # it assumes 512 channels
  torch_model = _randomize(torch_model)
  model = vgg.VGG(cfg=cfg, batch_norm=True, num_classes=5)
  # features[17] is the ReLU after the only conv of block 4 (conv, BN, ReLU, pool per conv).
  _check_parity(model, torch_model, model, SWEEP, 'block4', torch_model.features[17])


# --------------------------------------------------------------------------
# Parity of the full-size models: the paper's three at 224 px and a non-square
# odd size, with one named stage each; the siblings at one small size.

MAIN = {
    # arch: (stage, torch module producing that stage)
    'densenet121': ('denseblock4', lambda m: m.features.denseblock4),
    'resnet101': ('layer4', lambda m: m.layer4),
    'vgg16': ('block5', lambda m: m.features[29]),  # ReLU after conv5_3
}


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(MAIN))
def test_parity_main(arch):
  stage, stage_module = MAIN[arch]
  torch_model = _randomize(getattr(torchvision.models, arch)(num_classes=5))
  _check_parity(arch, torch_model, models.get_model(arch, num_classes=5),
                ((224, 224), (97, 131)), stage, stage_module(torch_model))


SIBLINGS = ('densenet161', 'densenet169', 'densenet201', 'resnet18', 'resnet34', 'resnet50',
            'resnet152', 'vgg11', 'vgg13', 'vgg19', 'vgg11_bn', 'vgg13_bn', 'vgg16_bn',
            'vgg19_bn')


@pytest.mark.slow
@pytest.mark.parametrize('arch', SIBLINGS)
def test_parity_siblings(arch):
  torch_model = _randomize(getattr(torchvision.models, arch)(num_classes=5))
  _check_parity(arch, torch_model, models.get_model(arch, num_classes=5), ((64, 96),))



def test_zero_init_residual_changes_only_initial_values():
  x = jnp.zeros((1, 32, 32, 3))
  model = models.get_model('resnet_tiny', num_classes=5, zero_init_residual=True)
  variables = _jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  block = variables['params']['layer1']['0']
  np.testing.assert_array_equal(block['bn2']['scale'], 0.0)  # the branch's last BatchNorm
  np.testing.assert_array_equal(block['bn1']['scale'], 1.0)
  # The parameter tree stays torchvision's, so converted weights load into it unchanged.
  default = models.get_model('resnet_tiny', num_classes=5)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      variables, jax.eval_shape(functools.partial(default.init, train=False),
                                jax.random.key(0), x))


@pytest.mark.parametrize('block', [resnet.BasicBlock(16, zero_init_residual=True),
                                   resnet.Bottleneck(4, zero_init_residual=True)])
def test_zero_init_residual_block_starts_as_identity(block):
  h = jnp.abs(jax.random.normal(jax.random.key(1), (2, 8, 8, 16)))  # post-ReLU input
  variables = block.init(jax.random.key(0), h, train=False)
  np.testing.assert_allclose(block.apply(variables, h, train=False), h, rtol=1e-6)


def test_relu_matches_nn_relu_values_and_gradient():
  x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0, jnp.nan, -jnp.inf, jnp.inf])
  np.testing.assert_array_equal(layers.relu(x), jax.nn.relu(x))  # NaN propagates
  finite = x[jnp.isfinite(x)]
  np.testing.assert_array_equal(jax.grad(lambda v: layers.relu(v).sum())(finite),
                                jax.grad(lambda v: jax.nn.relu(v).sum())(finite))  # 0 at 0
  assert layers.relu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# layers.conv_general_dilated: lax's convolution, computed as dots where faster.

CONV_CASES = {
    # name: (input height, width, channels), (kernel, stride, padding, features)
    '1x1': ((9, 11, 6), (1, 1, 0, 5)),
    '1x1_stride2_odd': ((9, 11, 6), (1, 2, 0, 5)),
    '1x1_widening': ((9, 11, 6), (1, 1, 0, 10)),
    '1x1_widening_stride2_odd': ((9, 11, 6), (1, 2, 0, 10)),
    '3x3_small_xla_grad': ((7, 7, 6), (3, 1, 1, 5)),  # 49 output pixels < 14 x 14
    '3x3_tap_grad': ((16, 15, 6), (3, 1, 1, 5)),
    '3x3_stride2_tap_grad': ((29, 31, 4), (3, 2, 1, 5)),
    '3x3_stride2_tap_sum': ((14, 13, 6), (3, 2, 1, 5)),  # 7 x 7 output pixels < 14 x 14
    '7x7_stride2_tap_grad': ((32, 30, 3), (7, 2, 3, 4)),
    '3x3_winograd': ((10, 9, 64), (3, 1, 1, 64)),  # odd width: a half-empty last tile
    '3x3_winograd_wider_out': ((7, 5, 64), (3, 1, 1, 72)),
}


def _lax_and_drjax_conv(stride, padding):
  kwargs = dict(window_strides=(stride, stride), padding=((padding, padding),) * 2,
                dimension_numbers=layers._NHWC_HWIO)
  return (functools.partial(jax.lax.conv_general_dilated, **kwargs),
          functools.partial(layers.conv_general_dilated, **kwargs))


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_conv_general_dilated_matches_lax_values_and_gradients(case):
  (height, width, channels), (k, stride, padding, features) = CONV_CASES[case]
  x = jax.random.normal(jax.random.key(0), (2, height, width, channels))
  # Scaled as He init, so outputs are O(1) at every fan-in and atol means the same.
  kernel = jax.random.normal(jax.random.key(1), (k, k, channels, features)) / np.sqrt(
      k * k * channels)
  reference, ours = _lax_and_drjax_conv(stride, padding)
  np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5)

  def loss(conv, x, kernel):  # a non-linear loss, so that dy varies per pixel
    return jnp.sum(jnp.sin(conv(x, kernel)))

  expected = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(x, kernel)
  got = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(x, kernel)
  for g, e, what in zip(got, expected, ('input', 'kernel'), strict=True):
    chex.assert_equal_shape((g, e))
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()),
                               err_msg=f'{case}: gradient w.r.t. the {what}')


@pytest.mark.parametrize('case, forward_convs, kernel_grad_dots, transposes', [
    # 1x1: forward, input-gradient (computed by the custom VJP, unused here), kernel-gradient.
    ('1x1', 0, 3, 1), ('1x1_widening', 0, 3, 1),
    ('3x3_small_xla_grad', 1, 0, 0), ('3x3_tap_grad', 1, 9, 0),
    ('7x7_stride2_tap_grad', 1, 49, 0),
    ('3x3_stride2_tap_sum', 0, 27, 9),  # 9 taps, each a 1x1 convolution as '1x1'
    # 16 tile dots, each a 1x1 convolution: 3 dots and a transposed copy apiece, as '1x1'.
    ('3x3_winograd', 0, 48, 16)])
def test_conv_general_dilated_takes_the_dot_paths(case, forward_convs, kernel_grad_dots,
                                                  transposes):
  """1x1 convolutions are dots (forward and transpose), their kernel gradient from a
  transposed copy of the input (in a conditional); larger kernels' weight gradients one
  dot per tap, except below 14x14 output pixels, where a strided one is a sum of 1x1
  convolutions, one per tap; 3x3 stride-1 convolutions with 64 or more channels each
  way are Winograd's 16 dots, forward and kernel gradient."""
  (height, width, channels), (k, stride, padding, features) = CONV_CASES[case]
  x = jnp.zeros((2, height, width, channels))
  kernel = jnp.zeros((k, k, channels, features))
  _, conv = _lax_and_drjax_conv(stride, padding)

  def count(jaxpr, name):
    return str(jaxpr).count(f' {name}[')

  forward = jax.make_jaxpr(conv)(x, kernel)
  assert count(forward, 'conv_general_dilated') == forward_convs
  kernel_grad = jax.make_jaxpr(jax.grad(lambda w: conv(x, w).sum()))(kernel)
  assert count(kernel_grad, 'dot_general') == kernel_grad_dots
  assert count(kernel_grad, 'cond') == transposes


def test_pointwise_kernel_gradient_transposes_the_input_not_its_producers():
  """XLA:CPU must keep the conditional around the transposed copy of a 1x1
  convolution's input: without it, XLA fuses the input's producers (here an affine
  and a ReLU) into the copy, which then recomputes them reading in transposed order."""
  _, conv = _lax_and_drjax_conv(1, 0)

  def loss(kernel, x, scale):
    return jnp.sum(jnp.sin(conv(jnp.maximum(x * scale, 0.0), kernel)))

  x, scale, kernel = jnp.ones((2, 7, 7, 16)), jnp.ones((16,)), jnp.ones((1, 1, 16, 8))
  hlo = jax.jit(jax.grad(loss)).lower(kernel, x, scale).compile().as_text()
  assert hlo.count(' conditional(') == 1
  computations = hlo.split('\n\n')
  # XLA writes a 2-D transpose as `transpose(` or as a bitcast/copy to layout {0,1}.
  transposing = [c for c in computations if ' transpose(' in c or '{0,1}' in c]
  assert transposing
  assert not [c for c in transposing if ' maximum(' in c], 'the ReLU went into a transpose'


def test_conv_general_dilated_is_lax_off_cpu(monkeypatch):
  """The dot paths were measured on CPU only; other backends get lax's convolution."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  (height, width, channels), (k, stride, padding, features) = CONV_CASES['1x1']
  _, conv = _lax_and_drjax_conv(stride, padding)
  jaxpr = jax.make_jaxpr(conv)(jnp.zeros((2, height, width, channels)),
                               jnp.zeros((k, k, channels, features)))
  assert str(jaxpr).count(' conv_general_dilated[') == 1


W, WF, WB = layers.winograd_conv3x3, layers._winograd_forward, layers._winograd_forward_banded


# threads: each device's share of the cores (`host.xla_cpu_threads`).
@pytest.mark.parametrize('shape, dtype, threads, path', [
    ((2, 8, 8, 64, 64), jnp.float32, 1, W),
    ((2, 8, 8, 64, 64), jnp.float32, 2, W),
    ((2, 8, 8, 63, 64), jnp.float32, 2, None),
    ((1, 113, 112, 64, 64), jnp.float32, 2, None),  # above 112 x 112 pixels: slower
    ((2, 8, 8, 64, 64), jnp.bfloat16, 2, None),
    # DenseNet's 128 -> 32, with the direct gradients: from 28 x 28 pixels up a band of
    # rows at a time, whatever the threads and devices; at 14 x 14 on one thread XLA's
    # convolution, with more Winograd's dots (which use every thread) over the whole batch.
    ((2, 28, 28, 128, 32), jnp.float32, 1, WB),
    ((2, 56, 56, 128, 32), jnp.float32, 2, WB),
    ((2, 28, 29, 128, 32), jnp.float32, 1, WB),
    ((2, 27, 29, 128, 32), jnp.float32, 1, None),  # 783 pixels
    ((2, 14, 14, 128, 32), jnp.float32, 1, None),
    ((2, 14, 14, 128, 32), jnp.float32, 2, WF),
    ((2, 13, 14, 128, 32), jnp.float32, 2, None),
    ((2, 14, 14, 128, 31), jnp.float32, 2, None),
    ((2, 14, 14, 63, 32), jnp.float32, 2, None),
])
def test_winograd_only_where_measured_faster(monkeypatch, shape, dtype, threads, path):
  monkeypatch.setattr(host, 'xla_cpu_threads', lambda: threads)
  batch, height, width, in_channels, out_channels = shape
  x = jnp.zeros((batch, height, width, in_channels), dtype)
  kernel = jnp.zeros((3, 3, in_channels, out_channels), dtype)
  assert layers._winograd_path(x, kernel, (1, 1), ((1, 1), (1, 1))) is path
  _, conv = _lax_and_drjax_conv(1, 1)
  jaxpr = str(jax.make_jaxpr(conv)(x, kernel))
  assert (jaxpr.count(' dot_general[') == 16) == (path is not None)
  assert (jaxpr.count(' conv_general_dilated[') == 0) == (path is not None)


@pytest.mark.parametrize('threads, height, width', [(2, 14, 15), (1, 28, 29)])
def test_densenet_winograd_keeps_the_direct_convolutions_gradients(monkeypatch, threads,
                                                                   height, width):
  """DenseNet's 128 -> 32 (whole batch, banded): Winograd forward, `_conv_tap_grad`'s backward."""
  monkeypatch.setattr(host, 'xla_cpu_threads', lambda: threads)
  x = jax.random.normal(jax.random.key(0), (2, height, width, 128))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 128, 32)) / np.sqrt(9 * 128)
  reference, ours = _lax_and_drjax_conv(1, 1)
  forward = str(jax.make_jaxpr(ours)(x, kernel))
  assert forward.count(' dot_general[') == 16
  assert forward.count(' conv_general_dilated[') == 0
  np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5)

  def loss(conv, x, kernel):
    return jnp.sum(jnp.sin(conv(x, kernel)))

  grads = jax.grad(functools.partial(loss, ours), argnums=(0, 1))
  backward = str(jax.make_jaxpr(grads)(x, kernel))
  # 16 forward dots, then the input gradient as a (transposed) convolution and the kernel
  # gradient as one dot per tap, not Winograd's 16 + 16 + 16 dots. (The second convolution
  # is the primal that `jax.vjp` traces for the input gradient; XLA removes it, unused.)
  assert backward.count(' dot_general[') == 16 + 9
  assert backward.count(' conv_general_dilated[') == 2
  expected = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(x, kernel)
  for g, e in zip(grads(x, kernel), expected, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()))


@pytest.mark.parametrize('height, width', [(1, 1), (2, 3), (5, 4), (6, 6), (7, 3)])
@pytest.mark.parametrize('band_pixels', [None, 1, 30, 1000])
def test_winograd_matches_lax_at_every_tile_and_band_remainder(height, width, band_pixels):
  """The whole batch at once (None), bands of 2 rows of one image (1), of 2 rows or more
  of all three (30: 7x3 takes 2 bands of 4 rows, its last row padding), or one band (1000)."""
  x = jax.random.normal(jax.random.key(0), (3, height, width, 8))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 6))
  reference, _ = _lax_and_drjax_conv(1, 1)
  np.testing.assert_allclose(layers.winograd_conv3x3(x, kernel, band_pixels=band_pixels),
                             reference(x, kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tile_rows, wanted, num_bands', [
    (14, 2.0, 2), (14, 4.0, 7), (14, 0.3, 1), (14, 100.0, 14), (28, 8.0, 7),
    (7, 2.6, 1), (7, 2.7, 7)])  # 7 rows of tiles: 1 or 7 bands, either side of sqrt(7)
def test_band_count_is_the_divisor_nearest_the_wanted_count(tile_rows, wanted, num_bands):
  assert layers._nearest_divisor(tile_rows, wanted) == num_bands


# (batch, band_pixels): bands of rows of the whole batch; bands of 2 rows of 4 groups of 2.
@pytest.mark.parametrize('batch, band_pixels', [(4, 28 * 14), (8, 28 * 4)])
def test_banded_winograd_keeps_a_sharded_batch_sharded(batch, band_pixels):
  """A batch sharded over devices: each device runs the bands of its own images.

  A loop over (image, band) made XLA's SPMD partitioner gather the whole batch on every
  device, which then ran all of it (a device per core: 0.78x the direct convolution).
  """
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('data',))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (batch, 28, 28, 16)), sharded)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 8))
  banded = jax.jit(functools.partial(layers.winograd_conv3x3, band_pixels=band_pixels))
  hlo = banded.lower(x, kernel).compile().as_text()
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo and 'while' in hlo
  y = banded(x, kernel)
  assert y.sharding.is_equivalent_to(sharded, y.ndim)
  reference, _ = _lax_and_drjax_conv(1, 1)
  np.testing.assert_allclose(y, reference(x, kernel), rtol=1e-5, atol=1e-5)


def test_banded_winograd_takes_an_empty_batch():
  x, kernel = jnp.zeros((0, 28, 28, 8)), jnp.zeros((3, 3, 8, 4))
  assert layers.winograd_conv3x3(x, kernel, band_pixels=100).shape == (0, 28, 28, 4)
  dx = jax.grad(lambda x: layers._winograd_forward_banded(x, kernel, None).sum())(x)
  assert dx.shape == x.shape


class _WinogradNet(nn.Module):
  """One convolution of each kind: no Winograd (3 input channels; stride 2), Winograd
  (64 -> 64) and DenseNet's narrow Winograd (64 -> 32, a band at a time at 28 x 28)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = layers.conv(64, 3, padding=1, name='stem')(x)
    x = layers.conv(64, 3, padding=1, name='wide')(x)
    y = layers.conv(32, 3, padding=1, name='narrow')(x)
    y = layers.conv(8, 3, stride=2, padding=1, name='strided')(jnp.concatenate([x, y], -1))
    return y.mean((1, 2))


def test_winograd_kernels_computed_once_give_the_same_outputs_and_gradients():
  net = _WinogradNet()
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  variables = _jit(net.init)(jax.random.key(1), x)
  assert set(variables) == {'params'}  # init makes no kernels
  prepared = models.with_winograd_kernels(net, variables)
  assert set(prepared) == {'params', 'winograd'}
  assert set(prepared['winograd']) == {'wide', 'narrow'}
  for name in ('wide', 'narrow'):
    (kernels,) = jax.tree.leaves(prepared['winograd'][name], is_leaf=lambda t: isinstance(t, tuple))
    expected = layers._winograd_kernels(variables['params'][name]['kernel'])
    assert len(kernels) == 16
    for got, want in zip(kernels, expected, strict=True):
      np.testing.assert_array_equal(got, want)

  forward = _jit(net.apply)
  np.testing.assert_array_equal(forward(prepared, x), forward(variables, x))
  # The forward pass reads them: other kernels, other outputs.
  zeroed = dict(prepared, winograd=jax.tree.map(jnp.zeros_like, prepared['winograd']))
  assert not np.allclose(forward(zeroed, x), forward(variables, x))

  def loss(params, x, extra):
    return jnp.sum(jnp.sin(net.apply({'params': params, **extra}, x)))

  grads = _jit(jax.grad(loss, argnums=(0, 1)))
  chex.assert_trees_all_close(grads(variables['params'], x, {}),
                              grads(prepared['params'], x, {'winograd': prepared['winograd']}),
                              rtol=1e-6, atol=1e-7)


def test_winograd_kernels_replace_earlier_ones_and_skip_models_without_them():
  net = _WinogradNet()
  x = jnp.zeros((1, 28, 28, 3))
  variables = _jit(net.init)(jax.random.key(1), x)
  stale = dict(models.with_winograd_kernels(net, variables), winograd={'old': jnp.zeros(1)})
  assert set(models.with_winograd_kernels(net, stale)['winograd']) == {'wide', 'narrow'}
  tiny = models.get_model('resnet_tiny')  # no 3x3 convolution has 64 input channels
  tiny_vars = _jit(functools.partial(tiny.init, train=False))(jax.random.key(0), x)
  assert set(models.with_winograd_kernels(tiny, tiny_vars)) == {'params', 'batch_stats'}


@pytest.mark.parametrize('shape, stride, dtype, takes_tap_sum', [
    ((2, 14, 13, 6), 2, jnp.float32, True),  # 7 x 7 output pixels
    ((2, 28, 28, 6), 2, jnp.float32, False),  # 14 x 14 output pixels: XLA's was as fast
    ((2, 7, 7, 6), 1, jnp.float32, False),  # stride 1: XLA's was faster
    ((2, 14, 13, 6), 2, jnp.bfloat16, False),  # nine partial sums rounded to bfloat16
])
def test_tap_sum_only_where_measured_faster(shape, stride, dtype, takes_tap_sum):
  _, conv = _lax_and_drjax_conv(stride, 1)
  jaxpr = jax.make_jaxpr(conv)(jnp.zeros(shape, dtype), jnp.zeros((3, 3, shape[3], 5), dtype))
  assert (str(jaxpr).count(' conv_general_dilated[') == 0) == takes_tap_sum


def test_conv_general_dilated_keeps_bfloat16():
  x = jnp.ones((1, 16, 16, 4), jnp.bfloat16)
  kernel = jnp.full((3, 3, 4, 2), 0.5, jnp.bfloat16)
  _, conv = _lax_and_drjax_conv(1, 1)
  y, pullback = jax.vjp(conv, x, kernel)
  dx, dkernel = pullback(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16,) * 3
  # Interior taps see all 16 x 16 pixels of x = 1 and dy = 1: 256, exact in bfloat16.
  assert float(dkernel[1, 1, 0, 0]) == 256.0


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet18', 'vgg11'])
def test_parameter_gradients_match_torchvision(arch):
  """The backward pass too: every parameter's gradient of a loss, against torch autograd.

  At 64x96 px this runs conv_general_dilated's paths but one: 1x1 dots (ResNet's
  downsample, stride 2), Winograd 3x3 convolutions (64 channels and more, stride 1),
  tap-dot weight gradients (ResNet's 7x7 stride-2 stem, VGG's 3-channel first
  convolution) and tap sums below 14x14 output pixels (ResNet's stride-2 3x3s). XLA's
  own convolution (stride 1, under 64 channels, below 14x14 output pixels: DenseNet's
  7x7 layers) is held to lax's by the tests above.
  Gradients are converted to drjax's layout by the weight converter, which is
  linear (transposes and permutations), so it maps gradients as it maps weights.
  """
  torch_model = _randomize(getattr(torchvision.models, arch)(num_classes=5))
  model = models.get_model(arch, num_classes=5)
  variables = weights.from_torchvision(arch, torch_model.state_dict(), num_classes=5)
  gen = torch.Generator().manual_seed(3)
  images = torch.randn(2, 3, 64, 96, generator=gen)
  labels = torch.tensor([1, 4])
  torch_model.zero_grad()
  torch.nn.functional.cross_entropy(torch_model(images), labels, reduction='sum').backward()
  torch_grads = {k: (p.grad if p.grad is not None else p) for k, p in
                 {**dict(torch_model.named_buffers()),
                  **dict(torch_model.named_parameters())}.items()}
  expected = weights.from_torchvision(arch, torch_grads, num_classes=5)['params']

  def loss(params):
    logits = model.apply({**variables, 'params': params}, images.numpy().transpose(0, 2, 3, 1),
                         train=False)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None],
                                axis=1).sum()

  got = _jit(jax.grad(loss))(variables['params'])
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    e = np.asarray(flat_expected[path])
    scale = max(float(np.abs(e).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-3, atol=1e-4 * scale,
                               err_msg=f'{arch} gradient of {jax.tree_util.keystr(path)}')


def _largest_loop_fusion(fn, *args) -> int:
  """Instruction count of the largest non-library fusion in fn's compiled CPU HLO."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  sizes, current = {}, None
  for line in text.splitlines():
    if line.startswith('%') and line.rstrip().endswith('{'):
      current = line.split()[0].lstrip('%')
      sizes[current] = 0
    elif line.startswith('}'):
      current = None
    elif current:
      sizes[current] += 1
  called = [m.group(1) for m in re.finditer(r'kind=kLoop, calls=%([\w.\-]+)', text)]
  return max(sizes[c] for c in called)


def test_residual_stream_is_not_recomputed_in_every_block():
  """The property layers.relu exists for: fusions stay the size of one block.

  With max(x, 0) XLA:CPU duplicates every earlier block's BatchNorm + add + ReLU
  into each later block's fusion (the largest fusion grows with depth).
  """
  depth, c = 12, 8
  kernels = jax.random.normal(jax.random.key(0), (depth, 1, 1, c, c)) * 0.1
  scales = jnp.linspace(0.5, 1.5, depth * c).reshape(depth, c)

  def stream(x, kernels, scales):
    for i in range(depth):
      y = jax.lax.conv_general_dilated(x, kernels[i], (1, 1), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      x = layers.relu(y * scales[i] + 0.1 + x)
    return x

  x = jnp.ones((2, 6, 6, c))
  assert _largest_loop_fusion(stream, x, kernels, scales) < 3 * 8  # about one block's ops
