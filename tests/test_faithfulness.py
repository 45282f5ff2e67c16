"""Faithfulness metrics: parity with pytorch-grad-cam 1.5.7 and hand-computed values.

The reference runs beside drjax on a small CNN built twice with identical random weights: the
linen ToyNet of the Grad-CAM tests (tests/toy_model.py) and a torch copy of it. ROAD's
imputation noise cannot be drawn identically by torch and JAX, so the reference's
NoisyLinearImputer default is patched to noise=0 and drjax runs with noise=0; the noise is
tested apart (only on removed pixels, its scale, its key). Metrics agree to 1e-4 absolute.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_model import TOY_SIZE, ToyNet

torch = pytest.importorskip('torch')
pytest.importorskip('pytorch_grad_cam')

from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.metrics import road as ref_road  # noqa: E402
from pytorch_grad_cam.metrics.arcc import ARCC  # noqa: E402
from pytorch_grad_cam.metrics.cam_mult_image import (  # noqa: E402
    CamMultImageConfidenceChange,
    DropInConfidence,
    IncreaseInConfidence,
)
from pytorch_grad_cam.metrics.perturbation_confidence import (  # noqa: E402
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)

from drjax import faithfulness as fa  # noqa: E402
from drjax import gradcam  # noqa: E402

# The reference's np.float32(list of torch scalars) warns under numpy 2; not drjax's doing.
pytestmark = pytest.mark.filterwarnings('ignore:__array_wrap__:DeprecationWarning')

PERCENTILES = (20, 50, 90)   # fewer than the defaults, to keep the reference's solves cheap


@pytest.fixture(scope='module', autouse=True)
def _threads():
  before = torch.get_num_threads()
  torch.set_num_threads(2)
  yield
  torch.set_num_threads(before)


@pytest.fixture
def no_reference_noise(monkeypatch):
  """The reference's ROAD classes build NoisyLinearImputer() with its default noise: make it 0."""
  monkeypatch.setattr(ref_road.NoisyLinearImputer.__init__, '__defaults__',
                      (0.0, ref_road.neighbors_weights))


class TorchToyNet(torch.nn.Module):
  """tests/toy_model.py's ToyNet in torch (SAME 3x3 convs, 2x2 max-pools, eval-mode BN)."""

  def __init__(self, num_classes=5):
    super().__init__()
    nn = torch.nn
    self.features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    self.head = nn.Linear(8, num_classes)

  def forward(self, x):
    return self.head(self.features(x).mean(dim=(2, 3)))


def _toy_pair():
  """Random ToyNet variables (non-trivial BN statistics) and a torch twin holding them."""
  rng = np.random.default_rng(0)
  # Shapes from a trace, values from numpy: no compile of flax's initialisers.
  shapes = jax.eval_shape(ToyNet().init, jax.random.key(0),
                          jnp.zeros((1, TOY_SIZE, TOY_SIZE, 3)))

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':   # He-scaled, so that the logits stay of order 1
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)   # biases, BN means

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  p, bs = variables['params'], variables['batch_stats']
  tmodel = TorchToyNet().eval()
  with torch.no_grad():
    for i, name in ((0, 'conv0'), (3, 'conv1'), (6, 'conv2')):
      tmodel.features[i].weight.copy_(torch.from_numpy(p[name]['kernel'].transpose(3, 2, 0, 1)))
      tmodel.features[i].bias.copy_(torch.from_numpy(p[name]['bias']))
    norm = tmodel.features[7]
    norm.weight.copy_(torch.from_numpy(p['norm']['scale']))
    norm.bias.copy_(torch.from_numpy(p['norm']['bias']))
    norm.running_mean.copy_(torch.from_numpy(bs['norm']['mean']))
    norm.running_var.copy_(torch.from_numpy(bs['norm']['var']))
    tmodel.head.weight.copy_(torch.from_numpy(p['head']['kernel'].T))
    tmodel.head.bias.copy_(torch.from_numpy(p['head']['bias']))
  return variables, tmodel


@pytest.fixture(scope='module')
def toy():
  """The twin models, two images, their predicted classes and reference Grad-CAMs."""
  variables, tmodel = _toy_pair()
  x = np.random.default_rng(1).standard_normal((2, 3, TOY_SIZE, TOY_SIZE)).astype(np.float32)
  xt = torch.from_numpy(x)
  model = ToyNet()
  with torch.no_grad():
    logits = tmodel(xt).numpy()
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1)), logits,
                             atol=1e-5)
  classes = [int(c) for c in logits.argmax(-1)]
  # Reference Grad-CAMs (ReLU'd, upsampled, min-max): realistic maps, with ties at 0.
  with GradCAM(model=tmodel, target_layers=[tmodel.features[8]]) as cam:
    cams = cam(input_tensor=xt, targets=[ClassifierOutputTarget(c) for c in classes])
  return dict(tmodel=tmodel, xt=xt, x=x.transpose(0, 2, 3, 1), classes=classes,
              cams=cams.astype(np.float32), model=model, variables=variables)


def test_defaults_are_the_reference_defaults():
  def default(cls, name):
    return inspect.signature(cls.__init__).parameters[name].default

  assert fa.MORF_PERCENTILE == default(ref_road.ROADMostRelevantFirst, 'percentile')
  assert fa.LERF_PERCENTILE == default(ref_road.ROADLeastRelevantFirst, 'percentile')
  for cls in (ref_road.ROADMostRelevantFirstAverage, ref_road.ROADLeastRelevantFirstAverage,
              ref_road.ROADCombined):
    assert fa.PERCENTILES == tuple(default(cls, 'percentiles'))
  assert fa.ARCC_PERCENTILES == tuple(default(ARCC, 'road_percentiles'))
  assert fa.ROAD_NOISE == default(ref_road.NoisyLinearImputer, 'noise')
  assert fa.NEIGHBOUR_WEIGHTS == tuple(ref_road.neighbors_weights)


def _chw(image):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


# ----------------------------------------------------------------------------
# Which pixels are removed, and how they are imputed.


@pytest.mark.parametrize('most_relevant_first', [True, False])
def test_road_masks_match_reference(most_relevant_first):
  rng = np.random.default_rng(1)
  smooth = rng.random((3, 16, 16)).astype(np.float32)
  quantised = np.round(smooth * 6) / 6   # many ties, at the thresholds too
  quantised[1, :8] = 0.0                 # half the map at 0, as after a ReLU
  cams = np.concatenate([smooth, quantised.astype(np.float32)])
  percentiles = (5, 10, 12.5, 20, 30, 40, 50, 60, 70, 80, 90, 99, 100)
  ours = np.asarray(fa.road_masks(cams, percentiles, most_relevant_first=most_relevant_first))
  remover = RemoveMostRelevantFirst if most_relevant_first else RemoveLeastRelevantFirst
  for i, p in enumerate(percentiles):
    for b, cam in enumerate(cams):
      # An "imputer" that returns the mask shows which pixels the reference keeps.
      kept = remover(p, lambda image, mask: mask)(None, torch.from_numpy(cam)).numpy()
      np.testing.assert_array_equal(ours[i, b], kept == 0, err_msg=f'p={p} image {b}')
  # MoRF at 50 % of 256 distinct values removes exactly the top 128.
  assert ours[percentiles.index(50), 0].sum() == 128


def _reference_impute(image, removed):
  out = ref_road.NoisyLinearImputer(noise=0.0)(_chw(image), torch.from_numpy(
      (~removed).astype(np.float32)))
  return out.numpy().transpose(1, 2, 0)


# One shape for every imputation test: one compile of the solver.
IMPUTE_SHAPE = (5, 24, 20, 3)


def test_imputation_matches_reference():
  rng = np.random.default_rng(2)
  b, h, w, _ = IMPUTE_SHAPE
  images = rng.standard_normal(IMPUTE_SHAPE).astype(np.float32)
  removed = np.zeros((b, h, w), bool)
  removed[0] = rng.random((h, w)) < 0.3                   # scattered, borders and corners too
  removed[1] = rng.random((h, w)) < 0.95                  # nearly everything
  removed[2, 4:20, 3:18] = True                           # one block
  removed[3] = True                                       # everything: the singular system
  ours = np.asarray(fa.noisy_linear_imputation(images, removed, noise=0.0))
  for i in range(4):
    np.testing.assert_allclose(ours[i], _reference_impute(images[i], removed[i]), atol=1e-5,
                               err_msg=f'image {i}')
  np.testing.assert_array_equal(ours[3], 0.0)
  np.testing.assert_array_equal(ours[4], images[4])       # nothing removed


def test_imputation_by_hand():
  x = np.random.default_rng(3).standard_normal(IMPUTE_SHAPE[1:]).astype(np.float32)
  edge, corner = 1 / 6, 1 / 12

  def neighbour_sum(r, c, skip=()):
    """The weighted sum of (r, c)'s in-image neighbours in channel 0, except `skip`."""
    total = 0.0
    for dr in (-1, 0, 1):
      for dc in (-1, 0, 1):
        if (dr, dc) != (0, 0) and (r + dr, c + dc) not in skip:
          total += (corner if dr and dc else edge) * float(x[r + dr, c + dc, 0])
    return total

  removed = np.zeros(IMPUTE_SHAPE[:3], bool)
  removed[0, 2, 2] = True                    # one interior pixel: the mean of its 8 neighbours
  removed[1, 0, 0] = True                    # a corner: 3 neighbours, weights / (5 / 12)
  removed[2, 2, 2] = removed[2, 2, 3] = True  # two coupled pixels
  out = np.asarray(fa.noisy_linear_imputation(np.broadcast_to(x, IMPUTE_SHAPE), removed,
                                              noise=0.0))
  assert out[0, 2, 2, 0] == pytest.approx(neighbour_sum(2, 2), abs=1e-6)
  corner_value = (edge * x[0, 1, 0] + edge * x[1, 0, 0] + corner * x[1, 1, 0]) / (5 / 12)
  assert out[1, 0, 0, 0] == pytest.approx(corner_value, abs=1e-6)
  # u = a + u' / 6 and u' = a' + u / 6, with a, a' the kept neighbours' weighted sums.
  a, a2 = neighbour_sum(2, 2, skip={(2, 3)}), neighbour_sum(2, 3, skip={(2, 2)})
  u = (a + a2 / 6) / (1 - 1 / 36)
  assert out[2, 2, 2, 0] == pytest.approx(u, abs=1e-6)
  assert out[2, 2, 3, 0] == pytest.approx(a2 + u / 6, abs=1e-6)
  # Kept pixels are untouched.
  np.testing.assert_array_equal(out[2][~removed[2]], x[~removed[2]])


def test_imputation_noise():
  rng = np.random.default_rng(4)
  images = rng.standard_normal(IMPUTE_SHAPE).astype(np.float32)
  removed = rng.random(IMPUTE_SHAPE[:3]) < 0.5
  clean = np.asarray(fa.noisy_linear_imputation(images, removed, noise=0.0))
  key = jax.random.key(7)
  noisy = np.asarray(fa.noisy_linear_imputation(images, removed, noise=0.3, rng=key))
  delta = noisy - clean
  np.testing.assert_array_equal(delta[~removed], 0.0)
  assert abs(delta[removed].std() - 0.3) < 0.02 and abs(delta[removed].mean()) < 0.02
  np.testing.assert_array_equal(
      noisy, fa.noisy_linear_imputation(images, removed, noise=0.3, rng=key))
  other = fa.noisy_linear_imputation(images, removed, noise=0.3, rng=jax.random.key(8))
  assert not np.allclose(noisy, other)


# ----------------------------------------------------------------------------
# Parity of the metrics on a real network.


def _targets(classes, softmax=False):
  cls = ClassifierOutputSoftmaxTarget if softmax else ClassifierOutputTarget
  return [cls(c) for c in classes]


def test_road_matches_reference(toy, no_reference_noise):
  t = toy
  cams, targets = t['cams'], _targets(t['classes'])
  args = (t['model'], t['variables'], t['x'], cams)
  kwargs = dict(targets=t['classes'], noise=0.0)

  def ref(metric):
    return metric(t['xt'], cams, targets, t['tmodel'])

  expected = {
      'morf': ref(ref_road.ROADMostRelevantFirst()),
      'lerf': ref(ref_road.ROADLeastRelevantFirst(percentile=30)),
      'morf_avg': ref(ref_road.ROADMostRelevantFirstAverage(PERCENTILES)),
      'lerf_avg': ref(ref_road.ROADLeastRelevantFirstAverage(PERCENTILES)),
      'combined': ref(ref_road.ROADCombined(PERCENTILES)),
  }
  ours = {
      'morf': fa.road_most_relevant_first(*args, **kwargs),
      'lerf': fa.road_least_relevant_first(*args, percentile=30, **kwargs),
      'morf_avg': fa.road_most_relevant_first_average(*args, percentiles=PERCENTILES, **kwargs),
      'lerf_avg': fa.road_least_relevant_first_average(*args, percentiles=PERCENTILES, **kwargs),
      'combined': fa.road_combined(*args, percentiles=PERCENTILES, **kwargs),
  }
  for name, value in ours.items():
    chex.assert_shape(value, (2,))
    np.testing.assert_allclose(value, expected[name], atol=1e-4, err_msg=name)
  # Not trivially 0; and targets=None (the predicted classes) is the same target here.
  assert np.abs(expected['morf_avg']).min() > 1e-2
  np.testing.assert_allclose(
      fa.road_combined(*args, percentiles=PERCENTILES, noise=0.0), ours['combined'], atol=1e-6)


@pytest.mark.parametrize('softmax', [False, True])
def test_confidence_metrics_match_reference(toy, softmax):
  t = toy
  targets = _targets(t['classes'], softmax)
  args = (t['model'], t['variables'], t['x'], t['cams'])
  kwargs = dict(targets=t['classes'], softmax=softmax)
  for ref_cls, fn in [(CamMultImageConfidenceChange, fa.cam_mult_image_confidence_change),
                      (DropInConfidence, fa.drop_in_confidence),
                      (IncreaseInConfidence, fa.increase_in_confidence)]:
    expected = ref_cls()(t['xt'], t['cams'], targets, t['tmodel'])
    ours = fn(*args, **kwargs)
    chex.assert_shape(ours, (2,))
    np.testing.assert_allclose(ours, expected, atol=1e-4, err_msg=ref_cls.__name__)


def test_arcc_matches_reference(toy, no_reference_noise):
  t = toy
  targets = _targets(t['classes'])
  with GradCAM(model=t['tmodel'], target_layers=[t['tmodel'].features[8]]) as base:
    expected = ARCC(base_method=base, road_percentiles=list(PERCENTILES))(
        t['xt'], t['cams'], targets, t['tmodel'])
  model, variables = t['model'], t['variables']

  def cam_fn(images, targets):
    return gradcam.gradcam(model, variables, images, layer='stage2', targets=targets)

  ours = fa.arcc(model, variables, t['x'], t['cams'], cam_fn, percentiles=PERCENTILES,
                 targets=t['classes'], noise=0.0)
  chex.assert_shape(ours, (2,))
  assert np.all((expected > 0.05) & (expected < 0.95)), expected   # no term saturates
  np.testing.assert_allclose(ours, expected, atol=1e-4)


# ----------------------------------------------------------------------------
# Hand-computed values on fake models whose scores are known.


def _sum_logits(images):
  """Two classes: the sum of the image, and minus it."""
  total = images.sum(axis=(1, 2, 3))
  return jnp.stack([total, -total], -1)


def test_confidence_metrics_by_hand():
  rng = np.random.default_rng(5)
  images = rng.random((3, 6, 6, 2)).astype(np.float32)
  cams = rng.random((3, 6, 6)).astype(np.float32)
  total = images.sum(axis=(1, 2, 3))
  weighted = (images * cams[..., None]).sum(axis=(1, 2, 3))
  targets = np.array([0, 1, 0])
  sign = np.where(targets == 0, 1.0, -1.0)
  change = sign * (weighted - total)   # < 0 for class 0, > 0 for class 1
  args = (_sum_logits, None, images, cams)
  np.testing.assert_allclose(fa.cam_mult_image_confidence_change(*args, targets=targets),
                             change, rtol=1e-5)
  np.testing.assert_allclose(fa.drop_in_confidence(*args, targets=targets),
                             np.maximum(-change, 0), rtol=1e-5)
  np.testing.assert_array_equal(fa.increase_in_confidence(*args, targets=targets), [0, 1, 0])
  # Probabilities: softmax([s, -s])[0] = sigmoid(2 s).
  sigmoid = lambda s: 1 / (1 + np.exp(-2 * s))
  np.testing.assert_allclose(
      fa.cam_mult_image_confidence_change(*args, targets=0, softmax=True),
      sigmoid(weighted) - sigmoid(total), rtol=1e-4, atol=1e-6)
  # A callable target; and the chunked forward pass gives the same.
  np.testing.assert_allclose(
      fa.cam_mult_image_confidence_change(*args, targets=lambda logits: 2 * logits[0],
                                          batch_size=4), 2 * (weighted - total), rtol=1e-5)


def test_predicted_class_is_kept_for_the_perturbed_image():
  images = np.ones((1, 4, 4, 1), np.float32)   # sum 16: class 0 predicted
  flip = -np.ones((1, 4, 4), np.float32)       # image * cam sums to -16: class 1 would win
  change = fa.cam_mult_image_confidence_change(_sum_logits, None, images, flip)
  np.testing.assert_allclose(change, [-32.0])  # class 0 stays the target


def _pixel_logits(images):
  """One class: pixel (1, 1) plus pixel (0, 0) of channel 0."""
  return (images[:, 1, 1, 0] + images[:, 0, 0, 0])[:, None]


def test_road_and_arcc_by_hand():
  image = np.zeros((1, 4, 4, 1), np.float32)
  image[0, 1, 1, 0] = 0.3
  cam = np.linspace(0.1, 0.6, 16, dtype=np.float32).reshape(1, 4, 4)
  cam[0, 1, 1], cam[0, 0, 0] = 1.0, 0.0   # most relevant (1, 1), least relevant (0, 0)
  args = (_pixel_logits, None, image, cam)
  kwargs = dict(targets=0, noise=0.0)
  # MoRF at 100 removes (1, 1) alone: its neighbours are all 0.
  morf = fa.road_most_relevant_first(*args, percentile=100, **kwargs)
  np.testing.assert_allclose(morf, [-0.3], atol=1e-6)
  # LeRF at 100 removes (0, 0) alone: (1/12 * 0.3) / (5/12) from its three neighbours.
  lerf = fa.road_least_relevant_first(*args, percentile=100, **kwargs)
  np.testing.assert_allclose(lerf, [0.06], atol=1e-6)
  combined = fa.road_combined(*args, percentiles=(100,), **kwargs)
  np.testing.assert_allclose(combined, [(0.06 + 0.3) / 2], atol=1e-6)
  np.testing.assert_allclose(
      fa.road_most_relevant_first_average(*args, percentiles=(100, 100), **kwargs), morf)
  # ARCC with a CAM method that returns the CAM itself: coherency 1.
  mean = float(cam.mean())
  np.testing.assert_allclose(fa.complexity(cam), [mean], rtol=1e-6)
  np.testing.assert_allclose(fa.coherency(cam, cam), [1.0], atol=1e-6)
  np.testing.assert_allclose(fa.coherency(cam, -cam), [0.0], atol=1e-6)
  expected = 3 / (1 / (1 + 1e-8) + 1 / (1 - mean + 1e-8) + 1 / (0.36 + 1e-8))
  got = fa.arcc(*args, lambda images, targets: cam, percentiles=(100,), **kwargs)
  np.testing.assert_allclose(got, [expected], rtol=1e-5)


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_input_is_a_clear_error():
  images = np.zeros((2, 8, 8, 1), np.float32)
  cams = np.zeros((2, 8, 8), np.float32)
  args = (_pixel_logits, None, images)
  with pytest.raises(ValueError, match='cams must be'):
    fa.cam_mult_image_confidence_change(*args, cams[:, :4])
  with pytest.raises(ValueError, match='cams must be'):
    fa.road_combined(*args, cams[:1])
  for bad in (0, -5, 100.5):
    with pytest.raises(ValueError, match=r'\(0, 100\]'):
      fa.road_most_relevant_first(*args, cams, percentile=bad)
  with pytest.raises(ValueError, match=r'\(0, 100\]'):
    fa.road_combined(*args, cams, percentiles=(10, 120))
  with pytest.raises(ValueError, match='auto'):
    fa.road_least_relevant_first(*args, cams, percentile='auto')
  with pytest.raises(ValueError, match='at least one percentile'):
    fa.road_combined(*args, cams, percentiles=())
  with pytest.raises(ValueError, match='softmax'):
    fa.drop_in_confidence(*args, cams, targets=lambda logits: logits[0], softmax=True)
  with pytest.raises(ValueError, match='variables=None'):
    fa.drop_in_confidence(_pixel_logits, {'params': {}}, images, cams)
  with pytest.raises(ValueError, match='removed'):
    fa.noisy_linear_imputation(images, cams[:, :4] > 0)
