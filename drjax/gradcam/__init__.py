"""Grad-CAM and its family as pure JAX functions of (model, variables, images), for any Flax model.

One core (`core.activations_and_grads`) runs the model once with a zero perturbation
added to the chosen layer's output and returns that layer's activations and the
gradient of the target with respect to them, from `jax.vjp` on the perturbation
alone. Nothing is differentiated with respect to the parameters or the input, so
XLA never builds the backward pass of the trunk below the chosen layer: Grad-CAM
at DenseNet's denseblock4 costs about one forward pass (checked with XLA's cost
analysis in tests/test_gradcam.py). There are no hooks and no mutable state;
everything is jit-compatible; each image has its own target (vmapped over the logits).

A layer is named in one of three ways, the first that applies winning (`taps`):
- a drjax model's stage name (`model.stage_names`: 'denseblock4', 'layer4'), reached
  through its taps (`drjax.models.common.tap`);
- for any flax.linen Module, a '/'-joined path of submodule names as in the variables
  tree ('backbone/Block_1'): that submodule's `__call__` is intercepted with
  `nn.intercept_methods` (matched by its scope path) to add the perturbation;
- for a flax.nnx Module (passed with `variables=None`), an attribute path ('stage2',
  'blocks/1'): the module is split outside, and inside the traced function a fresh
  copy is merged, put in eval mode, and the submodule at the path is replaced by a
  function that adds the perturbation. The module passed in is never mutated.
`layer_names` lists the valid names. Layers with token outputs `[B, N, C]` (ViT, Swin)
take a `reshape` to a `[B, h, w, C]` grid, such as `vit_reshape(num_prefix_tokens=1)`.

Each CAM method (`methods`) is a few lines that turn `(acts, grads)` into a map
(`maps`), citing its paper; post-processing (ReLU, bilinear resize, per-image
min-max) is separate (`postprocess`). The formulas follow pytorch-grad-cam
(jacobgil), which tests/test_gradcam_parity.py runs beside drjax on converted
torchvision weights. Pixel attributions (`pixel`) take the same arguments.

Conventions: images are `[B, H, W, C]` as the model takes them (uint8 RGB images
are ImageNet-normalised with `drjax.models.common.normalize`, as drjax's models
take them); maps are `[B, h, w]`; targets are `None` (the predicted class), an int
array `[B]` (a class per image) or a callable `logits [K] -> scalar` applied to
each image's logits (e.g. `referable_dr_target`). The model must map each image
independently (inference mode: BatchNorm on running statistics, no dropout);
`apply_kwargs` (e.g. `{'train': False}`) are passed to `model.apply` (linen) or to
the module's call (nnx).

The computation follows its inputs' placement, as `jax.jit` does: images sharded on
the batch axis over several devices, with the variables replicated, split the batch
over them (`drjax.cam_study.compute_heatmaps` does so).

  core     targets, input checks, and the shared (activations, gradients) core
  taps     reaching a layer of any Flax model; `layer_names`, `vit_reshape`
  maps     each method's (acts, grads) -> map formula, and post-processing
  methods  the CAM methods: gradcam, gradcam_plusplus, hirescam, xgradcam, layercam,
           fusion, scorecam
  cams     Grad-CAM element-wise, Eigen-CAM, Eigen-Grad-CAM, KPCA-CAM, FEM, ShapleyCAM,
           FinerCAM, RandomCAM
  perturbation, sliding, refine   AblationCAM; SESS; RefineCAM
  pixel    gradients, smoothgrad, integrated_gradients
  guided, full_gradient   guided backprop and Guided Grad-CAM; FullGrad
"""

from collections.abc import Callable

import jax

from drjax.gradcam.cams import (
  FinerTarget,
  eigencam,
  eigengradcam,
  fem,
  finercam,
  gradcam_elementwise,
  kpcacam,
  randomcam,
  shapleycam,
)
from drjax.gradcam.core import (
  Targets,
  activations_and_grads,
  class_score,
  prepare_images,
  referable_dr_target,
)
from drjax.gradcam.full_gradient import fullgrad, fullgrad_layers, fullgrad_map, fullgrad_terms
from drjax.gradcam.guided import (
  deprocess_image,
  guided_backprop,
  guided_backprop_attributions,
  guided_gradcam,
  guided_gradcam_attributions,
  guided_relu,
  guided_relus,
)
from drjax.gradcam.maps import (
  CAM_MAPS,
  KPCA_KERNELS,
  eigencam_map,
  eigengradcam_map,
  fem_map,
  fuse_maps,
  gradcam_elementwise_map,
  gradcam_map,
  gradcam_plusplus_map,
  hirescam_map,
  kpca_map,
  layercam_fusion,
  layercam_map,
  normalize,
  postprocess,
  randomcam_map,
  resize,
  shapleycam_map,
  xgradcam_map,
)
from drjax.gradcam.methods import (
  FUSION_LAYERS,
  default_fusion_layers,
  fusion,
  gradcam,
  gradcam_plusplus,
  hirescam,
  layercam,
  scorecam,
  xgradcam,
)
from drjax.gradcam.perturbation import ablationcam
from drjax.gradcam.pixel import (
  gradients,
  integrated_gradients,
  integrated_gradients_attributions,
  smoothgrad,
)
from drjax.gradcam.refine import refinecam
from drjax.gradcam.sliding import sess
from drjax.gradcam.taps import (
  layer_names,
  reshape_tokens,
  resolve_layers,
  stage_names,
  vit_reshape,
)

METHODS: dict[str, Callable[..., jax.Array]] = {
    'gradcam': gradcam,
    'gradcam++': gradcam_plusplus,
    'hirescam': hirescam,
    'xgradcam': xgradcam,
    'layercam': layercam,
    'scorecam': scorecam,
    'gradcam_elementwise': gradcam_elementwise,
    'eigencam': eigencam,
    'eigengradcam': eigengradcam,
    'kpcacam': kpcacam,
    'fem': fem,
    'shapleycam': shapleycam,
    'finercam': finercam,
    'randomcam': randomcam,
    'ablationcam': ablationcam,
    'refinecam': refinecam,
    'sess': sess,
    'guided_backprop': guided_backprop,
    'guided_gradcam': guided_gradcam,
    'fullgrad': fullgrad,
    'fusion': fusion,
    'gradients': gradients,
    'smoothgrad': smoothgrad,
    'integrated_gradients': integrated_gradients,
}


__all__ = [
    'deprocess_image', 'fullgrad', 'fullgrad_layers', 'fullgrad_map', 'fullgrad_terms',
    'guided_backprop', 'guided_backprop_attributions', 'guided_gradcam',
    'guided_gradcam_attributions', 'guided_relu', 'guided_relus',
    'ablationcam', 'refinecam', 'sess',
    'FinerTarget', 'KPCA_KERNELS', 'eigencam', 'eigencam_map', 'eigengradcam',
    'eigengradcam_map', 'fem', 'fem_map', 'finercam', 'gradcam_elementwise',
    'gradcam_elementwise_map', 'kpca_map', 'kpcacam', 'randomcam', 'randomcam_map',
    'shapleycam', 'shapleycam_map',
    'CAM_MAPS', 'FUSION_LAYERS', 'METHODS', 'Targets', 'activations_and_grads', 'class_score',
    'default_fusion_layers', 'fuse_maps', 'fusion', 'get_method', 'gradcam', 'gradcam_map',
    'gradcam_plusplus', 'gradcam_plusplus_map', 'gradients', 'hirescam', 'hirescam_map',
    'integrated_gradients', 'integrated_gradients_attributions', 'layer_names', 'layercam',
    'layercam_fusion', 'layercam_map', 'normalize', 'postprocess', 'prepare_images',
    'referable_dr_target', 'reshape_tokens', 'resize', 'resolve_layers', 'scorecam',
    'smoothgrad', 'stage_names', 'vit_reshape', 'xgradcam', 'xgradcam_map',
]


def get_method(name: str) -> Callable[..., jax.Array]:
  """`METHODS[name]` with an error that lists the valid names."""
  if name not in METHODS:
    raise ValueError(f'Unknown CAM method {name!r}; valid: {", ".join(METHODS)}')
  return METHODS[name]
