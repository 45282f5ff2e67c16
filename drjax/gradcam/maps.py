"""Each CAM method's map from a layer's `(acts, grads)`, citing its paper, and the
post-processing (ReLU, bilinear resize, per-image min-max) kept apart from the methods."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------
# Per-method maps: (acts [..., h, w, C], grads [..., h, w, C]) -> [..., h, w].


def gradcam_map(acts: Array, grads: Array) -> Array:
  """Grad-CAM (Selvaraju et al. 2017, eqs. 1-2): channel weights = spatial mean of grads."""
  weights = grads.mean(axis=(-3, -2), keepdims=True)
  return (weights * acts).sum(-1)


def gradcam_plusplus_map(acts: Array, grads: Array) -> Array:
  """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with exp(score) gradients).

  alpha = g^2 / (2 g^2 + sum_ij(A) g^3), zero where g == 0; weights =
  sum_ij alpha * relu(g). eps as in pytorch-grad-cam.
  """
  g2 = grads**2
  g3 = g2 * grads
  sum_acts = acts.sum(axis=(-3, -2), keepdims=True)
  alpha = g2 / (2 * g2 + sum_acts * g3 + 1e-6)
  alpha = jnp.where(grads != 0, alpha, 0.0)
  weights = (alpha * jax.nn.relu(grads)).sum(axis=(-3, -2), keepdims=True)
  return (weights * acts).sum(-1)


def hirescam_map(acts: Array, grads: Array) -> Array:
  """HiResCAM (Draelos & Carin 2020, eq. 4): element-wise grads * acts, summed over channels."""
  return (grads * acts).sum(-1)


def xgradcam_map(acts: Array, grads: Array) -> Array:
  """XGrad-CAM (Fu et al. 2020, eq. 13): weights = sum_ij(A * g) / sum_ij(A)."""
  sum_acts = acts.sum(axis=(-3, -2), keepdims=True)
  weights = (grads * acts / (sum_acts + 1e-7)).sum(axis=(-3, -2), keepdims=True)
  return (weights * acts).sum(-1)


def layercam_map(acts: Array, grads: Array) -> Array:
  """LayerCAM (Jiang et al. 2021, eqs. 5-6): per-location weights relu(g), times A."""
  return (jax.nn.relu(grads) * acts).sum(-1)


# ----------------------------------------------------------------------------
# pytorch-grad-cam 1.5.7's further maps (`drjax.gradcam.cams` applies them): some take the
# activations alone, ShapleyCAM a third array, RandomCAM its channel weights.


def gradcam_elementwise_map(acts: Array, grads: Array) -> Array:
  """Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise): sum_c relu(g * A)."""
  return jax.nn.relu(grads * acts).sum(-1)


def eigencam_map(acts: Array) -> Array:
  """Eigen-CAM (Muhammad & Yeasin 2020): the projection on the first principal component.

  As pytorch-grad-cam's `get_2d_projection`: the `h*w` positions are samples of `C`
  features, NaNs set to 0, centred per channel, and projected on the first right
  singular vector. The SVD's sign is arbitrary (LAPACK's there, cuSOLVER's on a GPU), so
  it is fixed as in Seg-Eigen-CAM (Chung & Ying 2025, eq. 13; pytorch-grad-cam's
  `get_2d_projection_with_sign_correction`): the map is negated when |min| > |max|.

  Args:
    acts: `[..., h, w, C]`.

  Returns:
    `[..., h, w]`.
  """
  flat = _centred_positions(acts)
  _, _, vt = _per_matrix(lambda m: jnp.linalg.svd(m, full_matrices=False), flat)
  proj = jnp.einsum('...nc,...c->...n', flat, vt[..., 0, :], precision=jax.lax.Precision.HIGHEST)
  flip = jnp.abs(proj.min(-1, keepdims=True)) > jnp.abs(proj.max(-1, keepdims=True))
  return jnp.where(flip, -proj, proj).reshape(acts.shape[:-1])


def eigengradcam_map(acts: Array, grads: Array) -> Array:
  """Eigen-Grad-CAM (pytorch-grad-cam's EigenGradCAM): `eigencam_map` of g * A."""
  return eigencam_map(grads * acts)


KPCA_KERNELS = ('linear', 'poly', 'rbf', 'sigmoid', 'cosine')


def kpca_map(acts: Array, kernel: str = 'sigmoid', gamma: float | None = None,
             coef0: float = 1.0, degree: int = 3) -> Array:
  """KPCA-CAM (Karmani et al. 2024): the projection on the first kernel principal component.

  As pytorch-grad-cam's `get_2d_projection_kernel`, i.e. scikit-learn's
  `KernelPCA(n_components=1, kernel=kernel, gamma=gamma).fit_transform` of the centred
  `[h*w, C]` positions: the centred kernel's top eigenvector (largest eigenvalue, its
  largest-magnitude entry made positive as sklearn's `svd_flip` does) times sqrt(eigenvalue).

  Args:
    acts: `[..., h, w, C]`.
    kernel: one of `KPCA_KERNELS`, with sklearn's definitions; 'sigmoid' as KPCA_CAM.
    gamma: the kernel's scale; None -> 1 / C, as sklearn.
    coef0, degree: sklearn's other kernel parameters, at its defaults.

  Returns:
    `[..., h, w]`; all zero where the top eigenvalue is not positive (sklearn raises).
  """
  flat = _centred_positions(acts)
  gamma = 1.0 / acts.shape[-1] if gamma is None else gamma
  dot = jnp.einsum('...nc,...mc->...nm', flat, flat, precision=jax.lax.Precision.HIGHEST)
  if kernel == 'linear':
    gram = dot
  elif kernel == 'poly':
    gram = (gamma * dot + coef0)**degree
  elif kernel == 'rbf':
    sq = jnp.diagonal(dot, axis1=-2, axis2=-1)
    gram = jnp.exp(-gamma * jnp.maximum(sq[..., :, None] - 2 * dot + sq[..., None, :], 0.0))
  elif kernel == 'sigmoid':
    gram = jnp.tanh(gamma * dot + coef0)
  elif kernel == 'cosine':
    norm = jnp.sqrt(jnp.diagonal(dot, axis1=-2, axis2=-1))
    norm = jnp.where(norm > 0, norm, 1.0)
    gram = dot / (norm[..., :, None] * norm[..., None, :])
  else:
    raise ValueError(f'Unknown KPCA kernel {kernel!r}; valid: {", ".join(KPCA_KERNELS)}')
  # Centring in feature space (sklearn's KernelCenterer).
  gram = (gram - gram.mean(-1, keepdims=True) - gram.mean(-2, keepdims=True)
          + gram.mean((-2, -1), keepdims=True))
  eigvals, eigvecs = _per_matrix(jnp.linalg.eigh, gram)
  vec = eigvecs[..., :, -1]
  peak = jnp.take_along_axis(vec, jnp.abs(vec).argmax(-1, keepdims=True), -1)
  vec = jnp.where(peak < 0, -vec, vec)
  proj = vec * jnp.sqrt(jnp.maximum(eigvals[..., -1:], 0.0))
  return proj.reshape(acts.shape[:-1])


def _per_matrix(decompose, x: Array):
  """`decompose` of each matrix `[..., n, m]` in turn (`lax.map`), never as one batched call.

  jaxlib's batched LAPACK calls spread their matrices over XLA:CPU's thread pool and wait on
  them from inside it, which deadlocks when jax has several CPU devices (JAX_NUM_CPU_DEVICES)
  and every pool thread is such a waiter.
  """
  flat = x.reshape(-1, *x.shape[-2:])
  out = jax.lax.map(decompose, flat)
  return jax.tree.map(lambda y: y.reshape(*x.shape[:-2], *y.shape[1:]), out)


def _centred_positions(x: Array) -> Array:
  """`[..., h, w, C]` -> `[..., h*w, C]`, NaN -> 0, minus each channel's mean over positions."""
  flat = x.reshape(*x.shape[:-3], -1, x.shape[-1])
  flat = jnp.where(jnp.isnan(flat), 0.0, flat)
  return flat - flat.mean(-2, keepdims=True)


def fem_map(acts: Array, k: float = 2.0) -> Array:
  """FEM (Fuad et al. 2020): channel weights = the share of locations above mean + k std.

  Each channel's positions above its k-sigma threshold (population std over h, w) form a
  binary mask; its mean is the channel's weight on A.
  """
  mean = acts.mean(axis=(-3, -2), keepdims=True)
  std = acts.std(axis=(-3, -2), keepdims=True)
  weights = (acts > mean + k * std).mean(axis=(-3, -2), keepdims=True)
  return (weights * acts).sum(-1)


def shapleycam_map(acts: Array, grads: Array, hvp: Array) -> Array:
  """ShapleyCAM (Cai 2025): Grad-CAM with channel weights mean_ij(g - H A / 2).

  `hvp` is the Hessian of the target w.r.t. the layer's output times A, `[..., h, w, C]`.
  """
  return gradcam_map(acts, grads - 0.5 * hvp)


def randomcam_map(acts: Array, weights: Array) -> Array:
  """RandomCAM (pytorch-grad-cam's chance baseline): given channel weights `[..., C]`."""
  return (weights[..., None, None, :] * acts).sum(-1)


# ----------------------------------------------------------------------------
# Post-processing, separate from the methods.


def resize(maps: Array, size: Sequence[int]) -> Array:
  """Bilinear (half-pixel centres, like cv2.resize) `[B, h, w]` -> `[B, H, W]`."""
  size = tuple(size)
  if tuple(maps.shape[-2:]) == size:
    return maps
  return jax.image.resize(maps, (*maps.shape[:-2], *size), 'bilinear')


def normalize(maps: Array) -> Array:
  """Per-image min-max to [0, 1]; a constant map (e.g. all zero) becomes all zero, never NaN."""
  lo = maps.min(axis=(-2, -1), keepdims=True)
  span = maps.max(axis=(-2, -1), keepdims=True) - lo
  ok = span > 0
  return jnp.where(ok, (maps - lo) / jnp.where(ok, span, 1.0), 0.0).astype(jnp.float32)


def postprocess(maps: Array, size: Sequence[int] | None = None, *, relu: bool = True) -> Array:
  """ReLU, bilinear resize to `size` (H, W) and per-image min-max: `[B, h, w]` -> `[B, H, W]`."""
  if relu:
    maps = jax.nn.relu(maps)
  if size is not None:
    maps = resize(maps, size)
  return normalize(maps)


# ----------------------------------------------------------------------------
# Multi-layer fusion (LayerCAM, Sec. III-C).


def layercam_fusion(acts: dict[str, Array], grads: dict[str, Array], size: Sequence[int],
                    gamma: float = 2.0) -> Array:
  """`fuse_maps` of the LayerCAM maps of every layer in `acts` (and `grads`) -> `[B, H, W]`."""
  return fuse_maps([layercam_map(acts[n], grads[n]) for n in acts], size, gamma)


def fuse_maps(maps: Sequence[Array], size: Sequence[int], gamma: float = 2.0) -> Array:
  """LayerCAM's fusion of raw maps `[B, h_i, w_i]` -> `[B, H, W]` (before min-max).

  Each map is ReLU'd, resized to `size`, scaled by tanh(gamma * M / max M)
  (Jiang et al. 2021, eq. 7) and the results are fused by element-wise maximum.
  """
  fused = 0.0
  for cam in maps:
    cam = resize(jax.nn.relu(cam), size)
    peak = cam.max(axis=(-2, -1), keepdims=True)
    fused = jnp.maximum(fused, jnp.tanh(gamma * cam / jnp.where(peak > 0, peak, 1.0)))
  return fused


# The (acts, grads) -> map formulas, for the parity test and for callers with their own core.
CAM_MAPS: dict[str, Callable[[Array, Array], Array]] = {
    'gradcam': gradcam_map,
    'gradcam++': gradcam_plusplus_map,
    'hirescam': hirescam_map,
    'xgradcam': xgradcam_map,
    'layercam': layercam_map,
    'gradcam_elementwise': gradcam_elementwise_map,
    'eigengradcam': eigengradcam_map,
}
