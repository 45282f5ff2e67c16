"""drjax.gradcam.cams against pytorch-grad-cam 1.5.7, run beside it on a tiny torchvision DenseNet.

Random torchvision weights (randomised BatchNorm statistics) are converted with
drjax.weights.from_torchvision. Each reference method runs whole (hooks, its own targets
logic, ReLU, cv2 resize, min-max) and drjax's method post-processes with `postprocess`;
each image's maps must correlate >= 0.99.

Deliberate differences, checked by hand:
- Eigen-CAM / Eigen-Grad-CAM: the SVD's sign is LAPACK's arbitrary choice in the reference;
  drjax fixes it with Seg-Eigen-CAM's rule (negate when |min| > |max|), which is the
  reference's own `get_2d_projection_with_sign_correction`. The raw maps equal the reference
  projection up to that sign, and the full pipelines match with the reference's projection
  swapped for the sign-corrected one.
- RandomCAM: the weights come from a JAX key, not numpy's global state; the reference is run
  with numpy's draw replaced by drjax's weights.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
pytest.importorskip('pytorch_grad_cam')
pytest.importorskip('sklearn')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytorch_grad_cam  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402
from pytorch_grad_cam import (  # noqa: E402
  FEM,
  KPCA_CAM,
  EigenCAM,
  EigenGradCAM,
  FinerCAM,
  GradCAM,
  GradCAMElementWise,
  RandomCAM,
  ShapleyCAM,
)
from pytorch_grad_cam.utils import svd_on_activations  # noqa: E402
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
  ClassifierOutputSoftmaxTarget,
  ClassifierOutputTarget,
  FinerWeightedTarget,
)

# _threads is the parity tests' autouse fixture that limits torch to 2 threads.
from test_gradcam_parity import _randomised, _threads  # noqa: E402, F401

from drjax import (  # noqa: E402
  gradcam,  # noqa: E402
  models,
  weights,
)
from drjax.gradcam import cams, maps  # noqa: E402

SIZE = 128
NUM_CLASSES = 5
STAGE = 'denseblock3'   # [B, 8, 8, 11] at 128 px: enough positions for the projections
TARGETS = [1, 4]        # one class per image, neither the predicted one


@pytest.fixture(scope='module')
def nets():
  """(torch DenseNet, its torch layer, drjax model, converted variables, images NCHW, NHWC)."""
  torch.manual_seed(0)
  tmodel = _randomised(torchvision.models.DenseNet(
      growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2,
      num_classes=NUM_CLASSES))
  variables = weights.from_torchvision('densenet_tiny', tmodel.state_dict(),
                                       num_classes=NUM_CLASSES)
  model = models.get_model('densenet_tiny', num_classes=NUM_CLASSES)
  x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
  return tmodel, tmodel.features.denseblock3, model, variables, x, jnp.asarray(
      x.transpose(0, 2, 3, 1))


def _reference(cam_cls, tmodel, layer, x, targets=None, **kwargs):
  """The whole reference pipeline: `[B, H, W]` in [0, 1]."""
  with cam_cls(model=tmodel, target_layers=[layer], **kwargs) as cam:
    return cam(input_tensor=torch.from_numpy(x), targets=targets)


def _assert_matches(ours, ref, min_r=0.99, atol=1e-2):
  """Each image's maps correlate >= `min_r` and differ by at most `atol` anywhere."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
    assert a.std() > 0 and b.std() > 0, f'image {i}: a constant map tests nothing'
    r = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert r >= min_r and np.abs(a - b).max() <= atol, (i, r, np.abs(a - b).max())


def _torch_acts(tmodel, layer, x):
  """The reference's activations at `layer`, `[B, C, h, w]`."""
  with EigenCAM(model=tmodel, target_layers=[layer]) as cam:
    cam(input_tensor=torch.from_numpy(x), targets=None)
    return cam.activations_and_grads.activations[0].numpy()


# (reference class, its keyword arguments, drjax method, its keyword arguments)
GRADIENT_METHODS = {
    'gradcam_elementwise': (GradCAMElementWise, {}, cams.gradcam_elementwise, {}),
    'eigengradcam': (EigenGradCAM, {}, cams.eigengradcam, {}),
}
ACTIVATION_METHODS = {
    'eigencam': (EigenCAM, {}, cams.eigencam, {}),
    'kpcacam': (KPCA_CAM, {}, cams.kpcacam, {}),   # every kernel: the next test but one
    'fem': (FEM, dict(k=1), cams.fem, dict(k=1)),
}


@pytest.fixture
def signed_projection(monkeypatch):
  """The reference's Eigen-CAM family with the library's sign-corrected projection."""
  fixed = svd_on_activations.get_2d_projection_with_sign_correction
  monkeypatch.setattr(pytorch_grad_cam.eigen_cam, 'get_2d_projection', fixed)
  monkeypatch.setattr(pytorch_grad_cam.eigen_grad_cam, 'get_2d_projection', fixed)


@pytest.mark.parametrize('name', list(GRADIENT_METHODS) + list(ACTIVATION_METHODS))
def test_methods_match_pytorch_grad_cam(nets, name, signed_projection):
  tmodel, tlayer, model, variables, x, xj = nets
  ref_cls, ref_kwargs, fn, kwargs = {**GRADIENT_METHODS, **ACTIVATION_METHODS}[name]
  # Per-image classes; the activation-only methods ignore them, as the reference does.
  reference = _reference(ref_cls, tmodel, tlayer, x,
                         [ClassifierOutputTarget(c) for c in TARGETS], **ref_kwargs)
  ours = fn(model, variables, xj, layer=STAGE, targets=TARGETS, **kwargs)
  _assert_matches(ours, reference)


def test_eigencam_is_the_reference_projection_with_a_fixed_sign(nets):
  tmodel, tlayer, model, variables, x, xj = nets
  acts = _torch_acts(tmodel, tlayer, x)
  raw = np.asarray(cams.eigencam(model, variables, xj, layer=STAGE, raw=True))
  lapack = svd_on_activations.get_2d_projection(acts)
  for ours, ref in zip(raw, lapack, strict=True):
    sign = -1.0 if abs(ref.min()) > abs(ref.max()) else 1.0   # Seg-Eigen-CAM's eq. 13
    np.testing.assert_allclose(ours, sign * ref, atol=2e-3 * np.abs(ref).max())
    assert abs(ours.min()) <= abs(ours.max())


def test_projection_maps_match_reference_functions():
  rng = np.random.default_rng(1)
  acts = rng.standard_normal((2, 12, 6, 7)).astype(np.float32)   # NCHW, as the reference
  acts[0, 3, 2, 2] = np.nan   # NaN -> 0, as the reference

  @jax.jit   # one compiled program: eager eigh and SVD compile op by op, slowly
  def projections(a):
    return maps.eigencam_map(a), {k: maps.kpca_map(a, k) for k in maps.KPCA_KERNELS}

  eigen, kpca = projections(jnp.asarray(acts.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(
      eigen, svd_on_activations.get_2d_projection_with_sign_correction(acts), atol=1e-4)
  # Every kernel on scikit-learn's dense eigensolver (42 positions).
  for kernel, ours in kpca.items():
    ref = svd_on_activations.get_2d_projection_kernel(acts, kernel)
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max(), err_msg=kernel)
  # Linear-kernel PCA is PCA: the same map as Eigen-CAM up to sign.
  np.testing.assert_allclose(jnp.abs(kpca['linear']), jnp.abs(eigen), atol=1e-4)
  # The default kernel on scikit-learn's ARPACK path (> 200 positions).
  big = rng.standard_normal((1, 6, 16, 16)).astype(np.float32)
  ref = svd_on_activations.get_2d_projection_kernel(big, 'sigmoid')
  np.testing.assert_allclose(jax.jit(maps.kpca_map)(jnp.asarray(big.transpose(0, 2, 3, 1))), ref,
                             atol=2e-4 * np.abs(ref).max())


def test_formulas_on_hand_computed_arrays():
  acts = jnp.stack([jnp.array([[1.0, 0.0], [3.0, 2.0]]), jnp.array([[0.0, 1.0], [1.0, 0.0]])],
                   -1)[None]   # [1, 2, 2, 2]
  grads = jnp.stack([jnp.full((2, 2), 0.5), jnp.array([[-1.0, 2.0], [-3.0, 1.0]])], -1)[None]
  # g * A per channel: [[0.5, 0], [1.5, 1]] and [[0, 2], [-3, 0]]; the -3 is clipped.
  np.testing.assert_allclose(maps.gradcam_elementwise_map(acts, grads),
                             [[[0.5, 2.0], [1.5, 1.0]]], atol=1e-6)
  np.testing.assert_allclose(maps.randomcam_map(acts, jnp.array([[2.0, -1.0]])),
                             [[[2.0, -1.0], [5.0, 4.0]]], atol=1e-6)
  # k = 0: a channel's weight is its share of locations above its mean (1/2 and 1/2).
  np.testing.assert_allclose(maps.fem_map(acts, k=0.0), [[[0.5, 0.5], [2.0, 1.0]]], atol=1e-6)
  # FEM's default k = 2 is above every location of a 4-location channel: all zero.
  np.testing.assert_allclose(maps.fem_map(acts), 0.0)
  # ShapleyCAM: Grad-CAM of g - hvp / 2.
  hvp = jnp.ones_like(grads)
  np.testing.assert_allclose(maps.shapleycam_map(acts, grads, hvp),
                             maps.gradcam_map(acts, grads - 0.5), atol=1e-6)


def _softmax_target(cls):
  def target(logits):
    return jax.nn.softmax(logits)[cls]
  return target


def test_shapleycam_matches_pytorch_grad_cam(nets):
  tmodel, tlayer, model, variables, x, xj = nets
  # Through the softmax the Hessian term is not zero; the same class for both images, as a
  # callable target is one function of the logits.
  torch_targets = [ClassifierOutputSoftmaxTarget(1)] * 2
  reference = _reference(ShapleyCAM, tmodel, tlayer, x, torch_targets)
  _assert_matches(cams.shapleycam(model, variables, xj, layer=STAGE, targets=_softmax_target(1)),
                  reference)
  # The second-order term matters here: the reference's own Grad-CAM is further from it.
  assert np.abs(reference - _reference(GradCAM, tmodel, tlayer, x, torch_targets)).max() > 0.05
  # Per-image classes on raw logits: the head (BatchNorm, ReLU, pooling, Linear) is
  # piecewise linear, so H A = 0 and ShapleyCAM is Grad-CAM.
  np.testing.assert_allclose(
      cams.shapleycam(model, variables, xj, layer=STAGE, targets=TARGETS, raw=True),
      gradcam.gradcam(model, variables, xj, layer=STAGE, targets=TARGETS, raw=True), atol=1e-6)


def test_finercam_matches_pytorch_grad_cam(nets):
  tmodel, tlayer, model, variables, x, xj = nets
  # Predicted classes: the reference's own choice of the compared classes.
  reference = _reference(FinerCAM, tmodel, tlayer, x)
  _assert_matches(cams.finercam(model, variables, xj, layer=STAGE), reference)
  # Per-image classes (the reference takes one `target_idx` for all): its targets built as
  # its forward builds them, for each image's class.
  with torch.no_grad():
    logits = tmodel(torch.from_numpy(x)).numpy()
  targets = []
  for z, c in zip(logits, TARGETS, strict=True):
    order = np.argsort(np.abs(z - z[c]))
    assert order[0] == c
    targets.append(FinerWeightedTarget(c, [int(order[i]) for i in (1, 2, 3)], 1.0))
  reference = _reference(GradCAM, tmodel, tlayer, x, targets)
  _assert_matches(cams.finercam(model, variables, xj, layer=STAGE, targets=TARGETS),
                     reference)


def test_randomcam_matches_pytorch_grad_cam_and_is_reproducible(nets, monkeypatch):
  tmodel, tlayer, model, variables, x, xj = nets
  ours = cams.randomcam(model, variables, xj, layer=STAGE, rng=3)
  channels = _torch_acts(tmodel, tlayer, x).shape[1]
  expected = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (2, channels),
                                           jnp.float32, -1.0, 1.0))
  monkeypatch.setattr(np.random, 'uniform', lambda low, high, size: expected)
  _assert_matches(ours, _reference(RandomCAM, tmodel, tlayer, x, None))

  again = cams.randomcam(model, variables, xj, layer=STAGE, rng=jax.random.PRNGKey(3))
  np.testing.assert_array_equal(ours, again)
  other = cams.randomcam(model, variables, xj, layer=STAGE, rng=4)
  assert float(jnp.abs(other - ours).max()) > 0.1


def test_methods_jit(nets):
  # The forward-only path with a traced key, and the second-order core (the others run on
  # `gradcam`'s core, whose jit is tested with it).
  _, _, model, variables, _, xj = nets
  target = _softmax_target(1)

  def run(v, x, rng):
    return dict(
        randomcam=cams.randomcam(model, v, x, layer=STAGE, rng=rng),
        shapleycam=cams.shapleycam(model, v, x, layer=STAGE, targets=target),
    )

  jitted = jax.jit(run)(variables, xj, jax.random.PRNGKey(5))
  eager = run(variables, xj, jax.random.PRNGKey(5))
  for name, cam in eager.items():
    assert cam.shape == (2, SIZE, SIZE), name
    np.testing.assert_allclose(jitted[name], cam, atol=1e-4, err_msg=name)


def test_bad_inputs_raise_clear_errors(nets):
  _, _, model, variables, _, xj = nets
  with pytest.raises(ValueError, match='not a callable'):
    cams.finercam(model, variables, xj, layer=STAGE, targets=_softmax_target(1))
  with pytest.raises(ValueError, match='all >= the 5 classes'):
    cams.finercam(model, variables, xj, layer=STAGE, comparison_categories=(5, 6))
  with pytest.raises(ValueError, match='Unknown KPCA kernel'):
    cams.kpcacam(model, variables, xj, layer=STAGE, kernel='laplace')
  with pytest.raises(ValueError, match='targets must be'):
    cams.eigencam(model, variables, xj, layer=STAGE, targets=[1, 2, 3])


@pytest.mark.parametrize('map_fn, primitive', [(maps.kpca_map, 'eigh'),
                                               (maps.eigencam_map, 'svd')])
def test_decompositions_run_one_matrix_at_a_time(map_fn, primitive):
  """jaxlib's batched eigh/SVD deadlocked XLA:CPU with two CPU devices: never batch them."""
  acts = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 8))
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == primitive:
        found.append(eqn.invars[0].aval.shape)
      for sub in jex_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(map_fn)(acts).jaxpr)
  assert found and all(len(shape) == 2 for shape in found), found
  np.testing.assert_allclose(map_fn(acts)[1, 2], map_fn(acts[1, 2]), rtol=1e-5, atol=1e-6)
