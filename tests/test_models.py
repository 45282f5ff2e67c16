"""Tests for drjax.models: registry, taps, shapes at many input sizes, parity with torchvision.

Parity runs torchvision itself with random weights and random BatchNorm
statistics/affines, converts its state_dict with drjax.weights, and compares
eval-mode logits (and one named stage) on the same random images.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drjax import models, weights
from drjax.kernels import cpu_conv
from drjax.models import densenet, resnet, vgg

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
torch.set_num_threads(2)

TINY = ('densenet_tiny', 'resnet_tiny', 'vgg_tiny')
# Parity holds with lax's convolutions and with the opt-in CPU ones.
CONVS = pytest.mark.parametrize('conv', [None, cpu_conv.CpuConv(threads=2)],
                                ids=['lax', 'cpu_conv'])
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


@CONVS
def test_parity_sizes_densenet_small(conv):
  kwargs = dict(growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2)
  torch_model = _randomize(torchvision.models.DenseNet(num_classes=5, **kwargs))
  model = densenet.DenseNet(num_classes=5, conv_general_dilated=conv, **kwargs)
  _check_parity(model, torch_model, model, SWEEP, 'transition3',
                torch_model.features.transition3)


@CONVS
def test_parity_sizes_resnet_small(conv):
  block = torchvision.models.resnet.BasicBlock
  torch_model = _randomize(torchvision.models.ResNet(block, [1, 1, 1, 1], num_classes=5))
  model = resnet.ResNet(block=resnet.BasicBlock, stage_sizes=(1, 1, 1, 1), num_classes=5,
                        conv_general_dilated=conv)
  _check_parity(model, torch_model, model, SWEEP, 'layer3', torch_model.layer3)


@CONVS
def test_parity_sizes_vgg_small(conv):
  cfg = vgg.CFGS['tiny']
  features = torchvision.models.vgg.make_layers(list(cfg), batch_norm=True)
  torch_model = torchvision.models.VGG(features, num_classes=5)
  torch_model.classifier[0] = torch.nn.Linear(cfg[-2] * 7 * 7, 4096)  # it assumes 512 channels
  torch_model = _randomize(torch_model)
  model = vgg.VGG(cfg=cfg, batch_norm=True, num_classes=5, conv_general_dilated=conv)
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
@CONVS
@pytest.mark.parametrize('arch', sorted(MAIN))
def test_parity_main(arch, conv):
  stage, stage_module = MAIN[arch]
  torch_model = _randomize(getattr(torchvision.models, arch)(num_classes=5))
  _check_parity(arch, torch_model,
                models.get_model(arch, num_classes=5, conv_general_dilated=conv),
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


@pytest.mark.slow
@CONVS
@pytest.mark.parametrize('arch', ['resnet18', 'vgg11'])
def test_parameter_gradients_match_torchvision(arch, conv):
  """The backward pass too: every parameter's gradient of a loss, against torch autograd.

  At 64x96 px, with the CPU backend, this runs all its paths but one: 1x1 dots (ResNet's
  downsample, stride 2), Winograd 3x3 convolutions (64 channels and more, stride 1),
  tap-dot weight gradients (ResNet's 7x7 stride-2 stem, VGG's 3-channel first convolution)
  and tap sums below 14x14 output pixels (ResNet's stride-2 3x3s); test_cpu_conv.py holds
  the rest to lax's. Gradients are converted to drjax's layout by the weight converter,
  which is linear (transposes and permutations), so it maps gradients as it maps weights.
  """
  torch_model = _randomize(getattr(torchvision.models, arch)(num_classes=5))
  model = models.get_model(arch, num_classes=5, conv_general_dilated=conv)
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
