"""drjax.gradcam on models that know nothing of drjax: linen (setup, compact, nested), nnx and a
tiny ViT. Each map is checked against Grad-CAM computed by hand from the model split at the
layer: the activations from the first part, `jax.grad` of the second part w.r.t. them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from toy_model import TOY_SIZE

from drjax import gradcam
from drjax.models.common import tap

SIZE = 16
TARGETS = jnp.array([0, 3, 1])
EVAL = {'train': False}


def _images(size=SIZE):
  return jax.random.normal(jax.random.PRNGKey(1), (3, size, size, 3))


def _pool(x):
  return nn.max_pool(x, (2, 2), (2, 2))


def _by_hand(first, second, images, targets=TARGETS):
  """(acts, grads, Grad-CAM map) from the model split at the layer, per image."""
  acts = first(images)
  # In inference mode image i's logits depend on its own activations alone, so the gradient
  # of the batch's summed scores is each image's own gradient.
  grads = jax.grad(lambda a: second(a)[jnp.arange(len(targets)), targets].sum())(acts)
  return acts, grads, (grads.mean(axis=(1, 2), keepdims=True) * acts).sum(-1)


def _check_against_hand(model, variables, layer, first, second, images, **kwargs):
  acts, grads, cam = _by_hand(first, second, images)
  assert float(jnp.abs(grads).max()) > 0
  out = gradcam.activations_and_grads(model, variables, images, layer=layer, targets=TARGETS,
                                      **kwargs)
  chex.assert_trees_all_close(out['acts'][layer], acts, atol=1e-5)
  chex.assert_trees_all_close(out['grads'][layer], grads, atol=1e-5)
  raw = gradcam.gradcam(model, variables, images, layer=layer, targets=TARGETS, raw=True,
                        **kwargs)
  chex.assert_trees_all_close(raw, cam, atol=1e-5)


def _with_running_stats(variables):
  """Non-trivial BatchNorm statistics, so that eval-mode BatchNorm is part of what is tested."""
  stats = jax.tree.map(lambda s: s * 1.5 + 0.1, variables['batch_stats'])
  return {'params': variables['params'], 'batch_stats': stats}


# ----------------------------------------------------------------------------
# linen: submodules from `setup`, and nested `@compact` blocks.


class Block(nn.Module):
  """Conv, BatchNorm (running statistics unless `train`) and ReLU."""
  features: int

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(self.features, (3, 3))(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train)(x))


class SetupNet(nn.Module):
  """Submodules declared in `setup`; `features` and `classify` split `__call__` for the tests."""

  def setup(self):
    self.stem = Block(4)
    self.stage1 = Block(8)
    self.stage2 = Block(8)
    self.head = nn.Dense(5)

  def features(self, x, train=False):
    x = _pool(self.stem(x, train))
    return self.stage2(_pool(self.stage1(x, train)), train)

  def classify(self, acts):
    return self.head(acts.mean(axis=(1, 2)))

  def __call__(self, x, train=False):
    return self.classify(self.features(x, train))


class Residual(nn.Module):
  """A block with a child named 'output', as in many transformer ports."""

  def setup(self):
    self.output = nn.Conv(8, (3, 3))

  def __call__(self, x):
    return x + nn.relu(self.output(x))


class Backbone(nn.Module):
  """Three `Block`s (Block_0, Block_1, Block_2), each followed by a max-pool."""
  remat: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i, features in enumerate((4, 8, 8)):
      x = _pool(block(features, name=f'Block_{i}')(x, train))
    return Residual(name='residual')(x)


class CompactNet(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = Backbone(self.remat, name='backbone')(x, train)
    return nn.Dense(5, name='head')(x.mean(axis=(1, 2)))


@pytest.fixture(scope='module')
def setup_net():
  model, images = SetupNet(), _images()
  variables = _with_running_stats(model.init(jax.random.PRNGKey(0), images))
  return model, variables, images


@pytest.fixture(scope='module')
def compact_net():
  model, images = CompactNet(), _images()
  variables = _with_running_stats(model.init(jax.random.PRNGKey(0), images))
  return model, variables, images


def test_linen_setup_submodule_matches_grad_cam_by_hand(setup_net):
  model, variables, images = setup_net
  _check_against_hand(
      model, variables, 'stage2',
      lambda x: model.apply(variables, x, method=SetupNet.features),
      lambda a: model.apply(variables, a, method=SetupNet.classify),
      images, apply_kwargs=EVAL)


def test_grayscale_model_any_channel_count():
  # A model of one-channel images (no ImageNet normalisation): taken as they are.
  model = SetupNet()
  images = jax.random.normal(jax.random.PRNGKey(2), (3, SIZE, SIZE, 1))
  variables = _with_running_stats(model.init(jax.random.PRNGKey(0), images))
  _check_against_hand(
      model, variables, 'stage2',
      lambda x: model.apply(variables, x, method=SetupNet.features),
      lambda a: model.apply(variables, a, method=SetupNet.classify),
      images, apply_kwargs=EVAL)
  for method in (gradcam.gradients, gradcam.integrated_gradients):
    chex.assert_shape(method(model, variables, images, apply_kwargs=EVAL), (3, SIZE, SIZE))
  resized = gradcam.gradcam(model, variables, images, layer='stage2', image_size=2 * SIZE,
                            apply_kwargs=EVAL)
  chex.assert_shape(resized, (3, SIZE, SIZE))
  with pytest.raises(ValueError, match='uint8 images are ImageNet-normalised'):
    gradcam.gradcam(model, variables, np.zeros((3, SIZE, SIZE, 1), np.uint8), layer='stage2')


def _block(variables, name, features):
  """`backbone/<name>` applied on its own, with its own variables."""
  own = {c: tree['backbone'][name] for c, tree in variables.items()}
  return lambda x: Block(features).apply(own, x)


def test_linen_nested_compact_path_matches_grad_cam_by_hand(compact_net):
  model, variables, images = compact_net
  block0, block1, block2 = (_block(variables, f'Block_{i}', f) for i, f in enumerate((4, 8, 8)))

  def residual(x):
    return Residual().apply({'params': variables['params']['backbone']['residual']}, x)

  def head(x):
    return nn.Dense(5).apply({'params': variables['params']['head']}, x.mean(axis=(1, 2)))

  _check_against_hand(model, variables, 'backbone/Block_1', lambda x: block1(_pool(block0(x))),
                      lambda a: head(residual(_pool(block2(_pool(a))))), images,
                      apply_kwargs=EVAL)
  # A layer whose own child is named 'output'.
  _check_against_hand(model, variables, 'backbone/residual',
                      lambda x: residual(_pool(block2(_pool(block1(_pool(block0(x))))))), head,
                      images, apply_kwargs=EVAL)


# ----------------------------------------------------------------------------
# nnx: a CNN with BatchNorm and Dropout, and a tiny ViT with a class token.


class NnxBlock(nnx.Module):
  def __init__(self, cin, cout, rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(cout, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(nnx.relu(self.bn(self.conv(x))))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.stem = NnxBlock(3, 4, rngs)
    self.stage1 = NnxBlock(4, 8, rngs)
    self.stage2 = NnxBlock(8, 8, rngs)
    self.head = nnx.Linear(8, 5, rngs=rngs)

  def features(self, x):
    return self.stage2(_pool(self.stage1(_pool(self.stem(x)))))

  def classify(self, acts):
    return self.head(acts.mean(axis=(1, 2)))

  def __call__(self, x):
    return self.classify(self.features(x))


class EncoderBlock(nnx.Module):
  """Pre-norm self-attention and MLP, each with a residual connection."""

  def __init__(self, dim, rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class TinyViT(nnx.Module):
  """4x4 patches of a 16x16 image -> 16 tokens after a class token; two encoder blocks."""

  def __init__(self, rngs, dim=16, patch=4):
    self.embed = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), padding='VALID',
                          rngs=rngs)
    self.cls_token = nnx.Param(0.5 * jax.random.normal(rngs.params(), (1, 1, dim)))
    self.pos = nnx.Param(0.5 * jax.random.normal(rngs.params(), (1, 1 + (SIZE // patch)**2, dim)))
    self.blocks = nnx.List([EncoderBlock(dim, rngs) for _ in range(2)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, 5, rngs=rngs)

  def tokens(self, x):
    x = self.embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + self.pos[...]

  def classify(self, tokens):   # after blocks[0]
    return self.head(self.norm(self.blocks[1](tokens))[:, 0])

  def __call__(self, x):
    return self.classify(self.blocks[0](self.tokens(x)))


@pytest.fixture(scope='module')
def nnx_net():
  module = NnxNet(nnx.Rngs(0))
  for block in (module.stem, module.stage1, module.stage2):
    block.bn.mean[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(2), block.bn.mean.shape)
    block.bn.var[...] = jnp.full(block.bn.var.shape, 1.5)
  return module, _images()


@pytest.fixture(scope='module')
def vit():
  return TinyViT(nnx.Rngs(0)), _images()


def _state(module):
  """The module's variables as numpy arrays (RNG keys as their key data)."""
  def as_numpy(x):
    is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(x) if is_key else x)

  return jax.tree.map(as_numpy, nnx.state(module))


def test_nnx_submodule_matches_grad_cam_by_hand_and_leaves_the_module_alone(nnx_net):
  module, images = nnx_net
  before = _state(module)
  reference = nnx.clone(module)
  reference.eval()   # what gradcam does to its own copy: running statistics, no dropout
  _check_against_hand(module, None, 'stage2', reference.features, reference.classify, images)
  chex.assert_trees_all_equal(_state(module), before)   # BatchNorm statistics, RNG counts
  assert module.stage2.bn.use_running_average is False
  assert module.stage2.drop.deterministic is False


def test_vit_tokens_with_reshape_match_grad_cam_by_hand(vit):
  module, images = vit
  reshape = gradcam.vit_reshape(num_prefix_tokens=1)

  def grid(tokens):   # drop the class token, 16 patch tokens -> 4 x 4, row-major
    return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[-1])

  tokens = module.blocks[0](module.tokens(images))
  grads = jax.grad(lambda t: module.classify(t)[jnp.arange(3), TARGETS].sum())(tokens)
  acts, grads = grid(tokens), grid(grads)
  assert float(jnp.abs(grads).max()) > 0
  cam = (grads.mean(axis=(1, 2), keepdims=True) * acts).sum(-1)
  out = gradcam.activations_and_grads(module, None, images, layer='blocks/0', targets=TARGETS,
                                      reshape=reshape)
  chex.assert_trees_all_close(out['acts']['blocks/0'], acts, atol=1e-5)
  chex.assert_trees_all_close(out['grads']['blocks/0'], grads, atol=1e-5)
  raw = gradcam.gradcam(module, None, images, layer='blocks/0', targets=TARGETS, raw=True,
                        reshape=reshape)
  chex.assert_trees_all_close(raw, cam, atol=1e-5)
  chex.assert_trees_all_close(gradcam.reshape_tokens(tokens), acts, atol=0)


# ----------------------------------------------------------------------------
# Every method, pixel attributions, jit, names and errors.


def _cases(setup_net, compact_net, nnx_net, vit):
  """(model, variables, images, layer, keyword arguments) for each kind of model."""
  return [
      (*setup_net, 'stage2', dict(apply_kwargs=EVAL)),
      (*compact_net, 'backbone/Block_1', dict(apply_kwargs=EVAL)),
      (nnx_net[0], None, nnx_net[1], 'stage2', {}),
      (vit[0], None, vit[1], 'blocks/0', dict(reshape=gradcam.vit_reshape(1))),
  ]


def test_every_method_runs_on_every_kind_of_model(setup_net, compact_net, nnx_net, vit):
  for model, variables, images, layer, kwargs in _cases(setup_net, compact_net, nnx_net, vit):
    for name, method in gradcam.METHODS.items():
      if name == 'fullgrad' and variables is None:
        continue  # FullGrad takes linen models (Conv/Dense/BatchNorm); nnx is a clear error
      extra = {'num_samples': 2} if name == 'smoothgrad' else {'steps': 2} if (
          name == 'integrated_gradients') else {}
      maps = method(model, variables, images, layer=layer, **kwargs, **extra)
      chex.assert_shape(maps, (3, SIZE, SIZE))
      chex.assert_tree_all_finite(maps)
      assert 0.0 <= float(maps.min()) and float(maps.max()) <= 1.0, (type(model), name)


def test_a_rematerialised_block_is_a_layer_too(compact_net):
  # nn.remat runs the block's __call__ again inside its own trace; the outer call is the layer.
  model, variables, images = compact_net
  expected = gradcam.gradcam(model, variables, images, layer='backbone/Block_1', raw=True,
                             apply_kwargs=EVAL)
  remat = CompactNet(remat=True)
  chex.assert_trees_all_close(gradcam.gradcam(remat, variables, images, layer='backbone/Block_1',
                                              raw=True, apply_kwargs=EVAL), expected, atol=1e-6)


def test_pixel_gradients_of_generic_models(compact_net, nnx_net):
  model, variables, images = compact_net
  direct = jax.grad(lambda x: model.apply(variables, x)[jnp.arange(3), TARGETS].sum())(images)
  ours = gradcam.gradients(model, variables, images, targets=TARGETS, raw=True,
                           apply_kwargs=EVAL)
  chex.assert_trees_all_close(ours, jnp.abs(direct).max(-1), atol=1e-6)
  module, images = nnx_net
  reference = nnx.clone(module)
  reference.eval()
  direct = jax.grad(lambda x: reference(x)[jnp.arange(3), TARGETS].sum())(images)
  ours = gradcam.gradients(module, None, images, targets=TARGETS, raw=True)
  chex.assert_trees_all_close(ours, jnp.abs(direct).max(-1), atol=1e-6)


def test_jit_compatible(compact_net, nnx_net):
  model, variables, images = compact_net
  layer = 'backbone/Block_1'
  eager = gradcam.gradcam(model, variables, images, layer=layer, targets=TARGETS,
                          apply_kwargs=EVAL)
  jitted = jax.jit(lambda v, x: gradcam.gradcam(model, v, x, layer=layer, targets=TARGETS,
                                                apply_kwargs=EVAL))
  chex.assert_trees_all_close(jitted(variables, images), eager, atol=1e-6)
  module, images = nnx_net
  eager = gradcam.gradcam(module, None, images, layer='stage2', targets=TARGETS)
  jitted = jax.jit(lambda x: gradcam.gradcam(module, None, x, layer='stage2', targets=TARGETS))
  chex.assert_trees_all_close(jitted(images), eager, atol=1e-6)
  nnx_jitted = nnx.jit(lambda m, x: gradcam.gradcam(m, None, x, layer='stage2', targets=TARGETS))
  chex.assert_trees_all_close(nnx_jitted(module, images), eager, atol=1e-6)


def test_layer_names(setup_net, compact_net, nnx_net, toy):
  model, variables, images = compact_net
  names = gradcam.layer_names(model, variables, images, apply_kwargs=EVAL)
  assert names[:4] == ('backbone', 'backbone/Block_0', 'backbone/Block_0/Conv_0',
                       'backbone/Block_0/BatchNorm_0')
  assert 'backbone/Block_1' in names and 'head' in names
  model, variables, images = setup_net
  assert {'stem', 'stage1', 'stage2', 'head'} <= set(gradcam.layer_names(model, variables,
                                                                         images))
  assert {'stem', 'stage2', 'stage2/bn', 'head'} <= set(gradcam.layer_names(nnx_net[0], None,
                                                                            nnx_net[1]))
  toy_model, toy_variables, toy_images = toy
  assert gradcam.layer_names(toy_model, toy_variables, toy_images) == (
      'stem', 'stage1', 'stage2', 'conv0', 'conv1', 'conv2', 'norm', 'head')


def test_submodule_paths_of_a_drjax_model(toy):
  # A drjax model's submodules are layers too: 'norm' is stage2 before its ReLU.
  model, variables, images = toy
  acts = gradcam.activations_and_grads(model, variables, images, layer=('norm', 'stage2'))['acts']
  chex.assert_trees_all_close(jax.nn.relu(acts['norm']), acts['stage2'], atol=1e-6)
  chex.assert_shape(gradcam.gradcam(model, variables, images, layer='conv1'),
                    (3, TOY_SIZE, TOY_SIZE))


class Clash(nn.Module):
  """A drjax stage and a submodule both named 'block', with different outputs."""
  stage_names = ('block',)
  default_cam_layer = 'block'

  @nn.compact
  def __call__(self, x, train=False):
    y = tap(self, 'block', 2.0 * nn.relu(nn.Conv(4, (3, 3), name='block')(x)))
    return nn.Dense(5, name='head')(y.mean(axis=(1, 2)))


def test_stage_names_win_over_submodule_paths():
  model, images = Clash(), _images()
  variables = model.init(jax.random.PRNGKey(0), images)
  conv = nn.Conv(4, (3, 3)).apply({'params': variables['params']['block']}, images)
  acts = gradcam.activations_and_grads(model, variables, images, layer='block')['acts']
  chex.assert_trees_all_close(acts['block'], 2.0 * jax.nn.relu(conv), atol=1e-6)


class Twice(nn.Module):
  def setup(self):
    self.shared = nn.Conv(3, (3, 3))
    self.head = nn.Dense(5)

  def __call__(self, x):
    return self.head(self.shared(self.shared(x)).mean(axis=(1, 2)))


class ScanNet(nn.Module):
  """Two conv layers as one nn.scan, whose body's outputs stay inside the scan."""

  @nn.compact
  def __call__(self, x):
    body = nn.scan(ScanBody, variable_axes={'params': 0}, split_rngs={'params': True}, length=2)
    x, _ = body(name='layers')(x, None)
    return nn.Dense(5, name='head')(x.mean(axis=(1, 2)))


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Conv(3, (3, 3))(x)), None


def test_clear_errors(compact_net, nnx_net, vit):
  model, variables, images = compact_net
  with pytest.raises(ValueError, match=r"Unknown layer 'backbone/Block_9' for CompactNet.*"
                                       r'submodule paths: backbone, backbone/Block_0, '):
    gradcam.gradcam(model, variables, images, layer='backbone/Block_9')
  with pytest.raises(ValueError, match=r'default_cam_layer.*pass layer='):
    gradcam.gradcam(model, variables, images)
  with pytest.raises(ValueError, match=r"Layer 'head' outputs shape \(3, 5\); the CAM methods "
                                       r'need \[B, h, w, C\]: pass reshape='):
    gradcam.gradcam(model, variables, images, layer='head')
  with pytest.raises(ValueError, match=r'variables=None is for nnx'):
    gradcam.gradcam(model, None, images, layer='head')
  module, images = nnx_net
  with pytest.raises(ValueError, match=r"Unknown layer 'stage3' for NnxNet.*stage2"):
    gradcam.gradcam(module, None, images, layer='stage3')
  with pytest.raises(ValueError, match=r'nnx Module.*pass variables=None'):
    gradcam.gradcam(module, {'params': {}}, images, layer='stage2')
  module, images = vit
  with pytest.raises(ValueError, match=r"Layer 'blocks/0' outputs shape \(3, 17, 16\).*"
                                       r'reshape=gradcam.vit_reshape'):
    gradcam.gradcam(module, None, images, layer='blocks/0')
  with pytest.raises(ValueError, match='17 tokens less 0 prefix token.*square grid'):
    gradcam.gradcam(module, None, images, layer='blocks/0', reshape=gradcam.vit_reshape(0))
  model, images = Twice(), _images()
  variables = model.init(jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match=r"'shared' is called 2 times"):
    gradcam.gradcam(model, variables, images, layer='shared')
  with pytest.raises(TypeError, match='apply_kwargs must hold hashable'):
    gradcam.gradcam(model, variables, images, layer='head', apply_kwargs={'mask': [1]})
  model = ScanNet()
  variables = model.init(jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match=r"'layers/Conv_0' of ScanNet is a submodule whose output "
                                       r'cannot be reached.*nn.scan'):
    gradcam.gradcam(model, variables, images, layer='layers/Conv_0')


# ----------------------------------------------------------------------------
# Cost: no backward pass below the layer, on the generic paths too.


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops']


def test_generic_gradcam_costs_about_one_forward_pass(compact_net, nnx_net):
  model, variables, images = compact_net
  forward = _flops(lambda v, x: model.apply(v, x), variables, images)

  def cam(layer):
    return _flops(lambda v, x: gradcam.gradcam(model, v, x, layer=layer, raw=True,
                                               apply_kwargs=EVAL), variables, images)

  last, first = cam('backbone/Block_2'), cam('backbone/Block_0')
  input_grad = _flops(lambda v, x: gradcam.gradients(model, v, x, raw=True), variables, images)
  assert last < 1.25 * forward, (last, forward)
  assert first > 1.5 * forward, (first, forward)
  assert input_grad > 2.0 * forward, (input_grad, forward)
  module, images = nnx_net
  reference = nnx.clone(module)
  reference.eval()
  forward = _flops(reference, images)
  last = _flops(lambda x: gradcam.gradcam(module, None, x, layer='stage2', raw=True), images)
  assert last < 1.25 * forward, (last, forward)
