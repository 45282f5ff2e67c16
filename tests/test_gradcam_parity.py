"""Parity with pytorch-grad-cam on torchvision models with identical weights.

Full-size models at their drjax stage names; a tiny DenseNet at submodule paths, through the
path that works for any linen model (`nn.intercept_methods`).

Random torchvision weights (and randomised BatchNorm statistics) are converted with
drjax.weights.from_torchvision. pytorch-grad-cam runs once per architecture (hooks,
one forward and backward); each method's own `get_cam_image` then turns the captured
activations and gradients into its layer-resolution map, followed by the library's
ReLU. drjax runs its public method functions with `raw=True` (one compiled core per
architecture, reused across methods). Both are min-max normalised the same way and
compared: Pearson >= 0.999 or max |diff| <= 1e-4.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
pytest.importorskip('pytorch_grad_cam')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from drjax import gradcam, models, weights  # noqa: E402

SIZE = 224
METHODS = {
    'gradcam': (GradCAM, gradcam.gradcam),
    'gradcam++': (GradCAMPlusPlus, gradcam.gradcam_plusplus),
    'hirescam': (HiResCAM, gradcam.hirescam),
    'xgradcam': (XGradCAM, gradcam.xgradcam),
    'layercam': (LayerCAM, gradcam.layercam),
}
# arch -> (torch target layer, drjax stage name)
ARCHS = {
    'densenet121': (lambda m: m.features.denseblock4, 'denseblock4'),
    'resnet101': (lambda m: m.layer4, 'layer4'),
    'vgg16': (lambda m: m.features[29], 'block5'),   # ReLU after conv5_3, before the max-pool
}
RESULTS = {}


def _scale(cam):
  """pytorch-grad-cam's scale_cam_image without the resize: (x - min) / (max + 1e-7)."""
  cam = cam - cam.min(axis=(1, 2), keepdims=True)
  return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def _torch_model(arch):
  torch.manual_seed(0)
  return _randomised(getattr(torchvision.models, arch)(weights=None))


def _randomised(model):
  """`model` in eval mode, with non-trivial BatchNorm and ReLUs that are not in place."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.ReLU):
        m.inplace = False   # so the forward hook sees the ReLU output itself
      if isinstance(m, torch.nn.BatchNorm2d):   # non-trivial eval-mode statistics
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
  return model.eval()


@pytest.fixture(scope='module', autouse=True)
def _threads():
  before = torch.get_num_threads()
  torch.set_num_threads(2)
  yield
  torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize('arch', list(ARCHS))
def test_cam_methods_match_pytorch_grad_cam(arch):
  torch_layer, stage = ARCHS[arch]
  tmodel = _torch_model(arch)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
  xt = torch.from_numpy(x)

  # Reference: one forward + backward through pytorch-grad-cam's hooks.
  with torch.no_grad():
    cls = int(tmodel(xt).argmax())
  targets = [ClassifierOutputTarget(cls)]
  layer = torch_layer(tmodel)
  with GradCAM(model=tmodel, target_layers=[layer]) as cam:
    cam(input_tensor=xt, targets=targets)
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy()
    torch_logits = cam.outputs.detach().numpy()
  reference = {}
  for name, (cam_cls, _) in METHODS.items():
    method = cam_cls(model=tmodel, target_layers=[layer])
    reference[name] = np.maximum(method.get_cam_image(xt, layer, targets, acts, grads, False), 0)
    method.activations_and_grads.release()

  # drjax on the converted weights.
  variables = weights.from_torchvision(arch, tmodel.state_dict(), num_classes=1000)
  model = models.get_model(arch, num_classes=1000)
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  core = gradcam.activations_and_grads(model, variables, xj, layer=stage, targets=[cls])
  np.testing.assert_allclose(core['logits'], torch_logits, rtol=1e-3, atol=2e-3)
  ref_acts = acts.transpose(0, 2, 3, 1)
  ref_grads = grads.transpose(0, 2, 3, 1)
  acts_err = float(np.abs(core['acts'][stage] - ref_acts).max() / np.abs(ref_acts).max())
  grads_err = float(np.abs(core['grads'][stage] - ref_grads).max() / np.abs(ref_grads).max())
  assert acts_err < 1e-3 and grads_err < 1e-3, (acts_err, grads_err)

  stats = {}
  for name, (_, fn) in METHODS.items():
    ours = np.asarray(jax.nn.relu(fn(model, variables, xj, layer=stage, targets=[cls],
                                     raw=True)))
    assert ours.shape == reference[name].shape, (ours.shape, reference[name].shape)
    a, b = _scale(ours), _scale(reference[name])
    pearson = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    max_diff = float(np.abs(a - b).max())
    stats[name] = dict(pearson=pearson, max_abs_diff=max_diff)
    assert pearson >= 0.999 or max_diff <= 1e-4, (arch, name, pearson, max_diff)
  RESULTS[arch] = dict(stats, acts_rel_err=acts_err, grads_rel_err=grads_err,
                       layer_shape=list(reference['gradcam'].shape[1:]))
  print(f'\n{arch} @ {stage} {reference["gradcam"].shape[1:]}: acts rel err {acts_err:.1e}, '
        f'grads rel err {grads_err:.1e}; ' + '; '.join(
            f'{k} r={v["pearson"]:.6f} max|d|={v["max_abs_diff"]:.1e}' for k, v in stats.items()))


# drjax submodule path of densenet_tiny -> the same torchvision module.
TINY_LAYERS = {
    'features/denseblock4': lambda m: m.features.denseblock4,
    'features/denseblock3/denselayer1': lambda m: m.features.denseblock3.denselayer1,
}


@pytest.mark.parametrize('layer', list(TINY_LAYERS))
def test_submodule_paths_match_pytorch_grad_cam(layer):
  torch.manual_seed(0)
  tmodel = _randomised(torchvision.models.DenseNet(
      growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2,
      num_classes=1000))
  x = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
  xt = torch.from_numpy(x)
  with torch.no_grad():
    classes = [int(c) for c in tmodel(xt).argmax(-1)]
  targets = [ClassifierOutputTarget(c) for c in classes]
  torch_layer = TINY_LAYERS[layer](tmodel)
  with GradCAM(model=tmodel, target_layers=[torch_layer]) as cam:
    cam(input_tensor=xt, targets=targets)
    acts = cam.activations_and_grads.activations[0].numpy().transpose(0, 2, 3, 1)
    grads = cam.activations_and_grads.gradients[0].numpy().transpose(0, 2, 3, 1)

  variables = weights.from_torchvision('densenet_tiny', tmodel.state_dict(), num_classes=1000)
  model = models.get_model('densenet_tiny', num_classes=1000)
  assert layer not in model.stage_names   # the generic path, not a tap
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  core = gradcam.activations_and_grads(model, variables, xj, layer=layer, targets=classes)
  np.testing.assert_allclose(core['acts'][layer], acts, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(core['grads'][layer], grads,
                             atol=1e-4 * float(np.abs(grads).max()))
  for name, (cam_cls, fn) in METHODS.items():
    method = cam_cls(model=tmodel, target_layers=[torch_layer])
    reference = np.maximum(method.get_cam_image(xt, torch_layer, targets,
                                                acts.transpose(0, 3, 1, 2),
                                                grads.transpose(0, 3, 1, 2), False), 0)
    method.activations_and_grads.release()
    ours = np.asarray(jax.nn.relu(fn(model, variables, xj, layer=layer, targets=classes,
                                     raw=True)))
    np.testing.assert_allclose(_scale(ours), _scale(reference), atol=1e-4, err_msg=name)
