"""The CAM methods, one plain function each with the same signature: Grad-CAM and its
gradient family on the shared core, LayerCAM's multi-layer fusion, and Score-CAM."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from drjax.gradcam import core, maps, taps

# Stages fused by `fusion` (LayerCAM-style), keyed by the model's default CAM layer.
FUSION_LAYERS = {
    'denseblock4': ('denseblock2', 'denseblock3', 'denseblock4'),
    'layer4': ('layer2', 'layer3', 'layer4'),
    'block5': ('block3', 'block4', 'block5'),
}


def _gradient_cam(map_fn, model, variables, images, layer, targets, raw, image_size,
                  apply_kwargs, reshape):
  size = tuple(images.shape[-3:-1])
  model, variables, layers, apply_kwargs = core.model_inputs(model, variables, layer, apply_kwargs)
  (name,) = layers
  images, target_fn, cls = core.core_inputs(images, targets, image_size)
  # The core program is shared by every method at this layer (one compile), the map and its
  # post-processing are one small program, and the warning reads its flag last, so that
  # nothing waits for the core before the map is dispatched.
  acts, grads, _, _, is_zero = core.acts_and_grads(model, variables, images, cls, layers=layers,
                                                   target_fn=target_fn, apply_kwargs=apply_kwargs,
                                                   reshape=reshape)
  cam = _map_program(map_fn, acts[name], grads[name], size=None if raw else size)
  core.warn_zero_grads(is_zero)
  return cam


@functools.partial(jax.jit, static_argnames=('map_fn', 'size'))
def _map_program(map_fn, acts, grads, *, size):
  """A method's map and, unless `size` is None (raw), its post-processing, jitted."""
  cam = map_fn(acts, grads)
  return cam if size is None else maps.postprocess(cam, size)


def gradcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
            apply_kwargs=None, reshape=None):
  """Grad-CAM heatmaps (Selvaraju et al. 2017).

  Args:
    model: a flax.linen Module (a drjax model or any other), or an nnx Module.
    variables: the linen model's variables (`{'params', 'batch_stats'}`); None for nnx.
    images: `[B, H, W, C]` as the model takes them, or uint8 RGB (`prepare_images`).
    layer: a drjax stage name or a '/'-joined submodule path ('backbone/Block_1');
      None -> `model.default_cam_layer` (DenseNet: 'denseblock4', the paper's choice).
      Unknown names raise a ValueError listing the valid ones (`layer_names`).
    targets: None = predicted class; int array `[B]` = class per image; callable
      `logits [K] -> scalar` = custom target (e.g. `referable_dr_target`).
    raw: return the unprocessed map at layer resolution `[B, h, w]` (no ReLU).
    image_size: if set and different from the images', resize the images to it
      before the forward pass (heatmaps still come back at the input resolution).
    apply_kwargs: hashable keyword arguments of the forward pass, e.g.
      `{'train': False}` (passed to `model.apply`, or to the nnx module's call).
    reshape: maps the layer's output to `[B, h, w, C]`, e.g. `vit_reshape(1)` for ViT
      tokens `[B, 1 + h*w, C]`; needed for any output that is not 4-D.

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (or the raw `[B, h, w]` map).
  """
  return _gradient_cam(maps.gradcam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def gradcam_plusplus(model, variables, images, *, layer=None, targets=None, raw=False,
                     image_size=None, apply_kwargs=None, reshape=None):
  """Grad-CAM++ (Chattopadhay et al. 2018); arguments as `gradcam`."""
  return _gradient_cam(maps.gradcam_plusplus_map, model, variables, images, layer, targets, raw,
                       image_size, apply_kwargs, reshape)


def hirescam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None):
  """HiResCAM (Draelos & Carin 2020); arguments as `gradcam`."""
  return _gradient_cam(maps.hirescam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def xgradcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None):
  """XGrad-CAM (Fu et al. 2020); arguments as `gradcam`."""
  return _gradient_cam(maps.xgradcam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def layercam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None):
  """LayerCAM (Jiang et al. 2021); arguments as `gradcam`."""
  return _gradient_cam(maps.layercam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def default_fusion_layers(model) -> tuple[str, ...]:
  """`FUSION_LAYERS[model.default_cam_layer]`, keeping the stages the model has."""
  (default,) = taps.resolve_layers(model, None)
  names = taps.stage_names(model)
  return tuple(n for n in FUSION_LAYERS.get(default, ()) if n in names) or (default,)


def fusion(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
           apply_kwargs=None, reshape=None, gamma: float = 2.0):
  """Multi-layer LayerCAM fusion (Jiang et al. 2021, Sec. III-C, eq. 7).

  LayerCAM maps of several layers, all from one forward/backward pass, are
  ReLU'd, resized to the input, scaled with tanh(gamma * M / max M) (so that the
  weak shallow-layer maps count) and fused by element-wise maximum.

  Args:
    layer: a sequence of layer names; None -> `FUSION_LAYERS[model.default_cam_layer]`.
    gamma: the tanh scaling factor (the paper's 2).
    Others as `gradcam` (`reshape` applies to every layer); `raw=True` returns the fused
    map before min-max, at the input resolution.
  """
  size = images.shape[-3:-1]
  if layer is None:
    layer = default_fusion_layers(model)
  out = core.activations_and_grads(model, variables, images, layer=layer, targets=targets,
                                   image_size=image_size, apply_kwargs=apply_kwargs,
                                   reshape=reshape)
  fused = maps.layercam_fusion(out['acts'], out['grads'], size, gamma)
  return fused if raw else maps.normalize(fused)


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'target_fn', 'batch_size',
                                             'apply_kwargs', 'reshape'))
def _scorecam(model, variables, images, cls, *, layer, target_fn, batch_size, apply_kwargs=(),
              reshape=None):
  taps.layer_shapes(model, variables, images, (layer,), apply_kwargs, reshape)
  forward = functools.partial(taps.forward, model, variables, apply_kwargs=apply_kwargs)
  logits, acts = forward(images, {layer: None})
  acts = taps.grid(acts, reshape)[layer]
  cls = jax.vmap(core.predicted)(logits, cls)
  size = images.shape[1:3]

  def one(image, a, c):
    # Each channel, upsampled and min-max normalised, masks the input (Wang et al.
    # 2020, eq. 3; the baseline is 0 = the ImageNet-mean image).
    masks = jnp.moveaxis(maps.resize(jnp.moveaxis(a, -1, 0), size), 0, -1)   # [H, W, C]
    lo = masks.min(axis=(0, 1))
    masks = (masks - lo) / (masks.max(axis=(0, 1)) - lo + 1e-8)
    channels = a.shape[-1]
    padded = -(-channels // batch_size) * batch_size
    masks = jnp.pad(masks, ((0, 0), (0, 0), (0, padded - channels)))
    masks = jnp.moveaxis(masks, -1, 0).reshape(padded // batch_size, batch_size, *size, 1)

    def chunk(m):
      out = forward(image[None] * m, {})[0]
      return jax.vmap(target_fn, in_axes=(0, None))(out, c)

    scores = jax.lax.map(chunk, masks).reshape(-1)[:channels]
    weights = jax.nn.softmax(scores)   # as pytorch-grad-cam: softmax over channels
    return (weights * a).sum(-1)

  return jax.lax.map(lambda args: one(*args), (images, acts, cls))


def scorecam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None, batch_size: int = 32):
  """Score-CAM (Wang et al. 2020): gradient-free, one forward pass per channel.

  The channel weights are the softmax over channels of the target score of the
  input masked by each upsampled, min-max normalised activation channel. The
  masked inputs run in batches of `batch_size` (C / batch_size passes per image).
  Arguments as `gradcam`.
  """
  size = images.shape[-3:-1]
  model, variables, (name,), apply_kwargs = core.model_inputs(model, variables, layer, apply_kwargs)
  images_in, target_fn, cls = core.core_inputs(images, targets, image_size)
  cam = _scorecam(model, variables, images_in, cls, layer=name, target_fn=target_fn,
                  batch_size=batch_size, apply_kwargs=apply_kwargs, reshape=reshape)
  return cam if raw else maps.postprocess(cam, size)
