"""Tests for drjax.kernels.cpu_conv: lax's convolution, computed the way XLA:CPU runs fastest.

Every path is held to `lax.conv_general_dilated` (values and both gradients); the models
with the backend on are held to the models without it, and to torchvision (test_models.py).
"""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drjax import models
from drjax.kernels import cpu_conv

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


def _lax_and_drjax_conv(stride, padding, threads=1):
  kwargs = dict(window_strides=(stride, stride), padding=((padding, padding),) * 2,
                dimension_numbers=cpu_conv.NHWC_HWIO)
  return (functools.partial(jax.lax.conv_general_dilated, **kwargs),
          functools.partial(cpu_conv.CpuConv(threads=threads), **kwargs))


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_cpu_conv_matches_lax_values_and_gradients(case):
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
def test_cpu_conv_takes_the_dot_paths(case, forward_convs, kernel_grad_dots,
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


W, WF, WB = cpu_conv.winograd_conv3x3, cpu_conv._winograd_forward, cpu_conv._winograd_forward_banded


# threads: each device's share of the cores (`cpu_conv.xla_cpu_threads`).
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
def test_winograd_only_where_measured_faster(shape, dtype, threads, path):
  batch, height, width, in_channels, out_channels = shape
  x = jnp.zeros((batch, height, width, in_channels), dtype)
  kernel = jnp.zeros((3, 3, in_channels, out_channels), dtype)
  assert cpu_conv._winograd_path(x, kernel, (1, 1), ((1, 1), (1, 1)), threads) is path
  _, conv = _lax_and_drjax_conv(1, 1, threads)
  jaxpr = str(jax.make_jaxpr(conv)(x, kernel))
  assert (jaxpr.count(' dot_general[') == 16) == (path is not None)
  assert (jaxpr.count(' conv_general_dilated[') == 0) == (path is not None)


@pytest.mark.parametrize('threads, height, width', [(2, 14, 15), (1, 28, 29)])
def test_densenet_winograd_keeps_the_direct_convolutions_gradients(threads, height, width):
  """DenseNet's 128 -> 32 (whole batch, banded): Winograd forward, `_conv_tap_grad`'s backward."""
  x = jax.random.normal(jax.random.key(0), (2, height, width, 128))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 128, 32)) / np.sqrt(9 * 128)
  reference, ours = _lax_and_drjax_conv(1, 1, threads)
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
  np.testing.assert_allclose(cpu_conv.winograd_conv3x3(x, kernel, band_pixels=band_pixels),
                             reference(x, kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tile_rows, wanted, num_bands', [
    (14, 2.0, 2), (14, 4.0, 7), (14, 0.3, 1), (14, 100.0, 14), (28, 8.0, 7),
    (7, 2.6, 1), (7, 2.7, 7)])  # 7 rows of tiles: 1 or 7 bands, either side of sqrt(7)
def test_band_count_is_the_divisor_nearest_the_wanted_count(tile_rows, wanted, num_bands):
  assert cpu_conv._nearest_divisor(tile_rows, wanted) == num_bands


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
  banded = jax.jit(functools.partial(cpu_conv.winograd_conv3x3, band_pixels=band_pixels))
  hlo = banded.lower(x, kernel).compile().as_text()
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo and 'while' in hlo
  y = banded(x, kernel)
  assert y.sharding.is_equivalent_to(sharded, y.ndim)
  reference, _ = _lax_and_drjax_conv(1, 1)
  np.testing.assert_allclose(y, reference(x, kernel), rtol=1e-5, atol=1e-5)


def test_banded_winograd_takes_an_empty_batch():
  x, kernel = jnp.zeros((0, 28, 28, 8)), jnp.zeros((3, 3, 8, 4))
  assert cpu_conv.winograd_conv3x3(x, kernel, band_pixels=100).shape == (0, 28, 28, 4)
  dx = jax.grad(lambda x: cpu_conv._winograd_forward_banded(x, kernel, None).sum())(x)
  assert dx.shape == x.shape


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


def test_cpu_conv_keeps_bfloat16():
  x = jnp.ones((1, 16, 16, 4), jnp.bfloat16)
  kernel = jnp.full((3, 3, 4, 2), 0.5, jnp.bfloat16)
  _, conv = _lax_and_drjax_conv(1, 1)
  y, pullback = jax.vjp(conv, x, kernel)
  dx, dkernel = pullback(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.bfloat16,) * 3
  # Interior taps see all 16 x 16 pixels of x = 1 and dy = 1: 256, exact in bfloat16.
  assert float(dkernel[1, 1, 0, 0]) == 256.0


@pytest.mark.parametrize('kernel_size, padding', [(1, 0), (3, 1)])
def test_bfloat16_convolutions_are_lax_own(kernel_size, padding):
  # The CPU forms are held to float32 rounding only: bfloat16 keeps XLA's program, gradients too.
  lax_conv, conv = _lax_and_drjax_conv(1, padding)
  x = jnp.ones((2, 16, 16, 64), jnp.bfloat16)
  kernel = jnp.ones((kernel_size, kernel_size, 64, 64), jnp.bfloat16)

  def program(f):
    return str(jax.make_jaxpr(jax.grad(lambda x, k: f(x, k).astype(jnp.float32).sum(),
                                       argnums=(0, 1)))(x, kernel))

  assert program(conv) == program(lax_conv)


def test_make_is_the_cpu_backend_only(monkeypatch):
  conv = cpu_conv.make(threads=3)
  assert conv == cpu_conv.CpuConv(threads=3)
  assert hash(conv) == hash(cpu_conv.CpuConv(threads=3))  # jit caches a model holding it
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert cpu_conv.make() is None


def test_xla_cpu_threads_is_the_affinity_over_the_devices(monkeypatch):
  cores = len(os.sched_getaffinity(0))
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)))
  monkeypatch.setattr(jax, 'local_device_count', lambda backend=None: 4)
  assert cpu_conv.xla_cpu_threads() == 2
  monkeypatch.setattr(jax, 'local_device_count', lambda backend=None: 16)
  assert cpu_conv.xla_cpu_threads() == 1
  assert cores >= 1


@pytest.mark.parametrize('name', ['densenet_tiny', 'resnet_tiny', 'vgg_tiny'])
def test_models_with_the_backend_compute_the_same_function(name):
  """Logits, stage activations and parameter gradients, with the backend on and off."""
  plain = models.get_model(name)
  fast = models.get_model(name, conv_general_dilated=cpu_conv.CpuConv(threads=2))
  variables = models.init_variables(plain, jax.random.key(0), 64)
  chex.assert_trees_all_equal_shapes(variables, models.init_variables(fast, jax.random.key(0),
                                                                      64))
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))

  def loss(params, model):
    logits, state = model.apply({**variables, 'params': params}, x, train=False,
                                mutable=['intermediates'])
    return jnp.sum(jnp.sin(logits)), (logits, state['intermediates'])

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  (g_plain, (l_plain, i_plain)), (g_fast, (l_fast, i_fast)) = (
      grad_fn(variables['params'], m) for m in (plain, fast))
  chex.assert_trees_all_close(l_fast, l_plain, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(i_fast, i_plain, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(g_fast, g_plain, rtol=1e-4, atol=1e-5)
