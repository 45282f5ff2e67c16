"""Every CAM and attribution method of drjax.gradcam.METHODS against pytorch-grad-cam 1.5.7.

  python benchmarks/bench_cam_methods.py --threads 2 --out_dir benchmarks/results/cpu
  python benchmarks/bench_cam_methods.py --threads 2 --methods gradcam,scorecam,fullgrad
  python benchmarks/bench_cam_methods.py --quick          # 64 px, batch 2, 1 warm-up, 2 repeats

The setting of bench_gradcam.py, for each method: DenseNet121 with random weights and 1000
classes, 224 px, fp32, on the CPU; both sides pinned to the same cores with one thread per
core (benchmarks/common.py). Each method is measured by a drjax and a PyTorch worker process
of its own, timed in lockstep, so that one method's hang or crash is a failed row (after its
timeout), not the end of the run. Each repeat times the method and the plain forward pass of
the same process (in alternating order), as bench_gradcam.py does.

- drjax: `drjax.gradcam.METHODS[name](model, variables, images, ...)` as a user calls it (the
  methods jit their own programs) at `denseblock4`, with the settings of `SETTINGS`. The jax
  workers of one run share a persistent compilation cache, so that each compiles the forward
  pass and the shared Grad-CAM core once; compilation is never timed.
- PyTorch: pytorch-grad-cam's class for the method on torchvision's `features.denseblock4`
  with the same settings (`_TORCH`); the multi-layer methods on denseblock2-4 as
  pytorch-grad-cam takes several layers. pytorch-grad-cam has no plain gradients, SmoothGrad or
  Integrated Gradients: for those the PyTorch side is what a user would write
  (`torch.autograd.grad` w.r.t. the input, the same samples and steps), marked as such.
- Targets: each image's predicted class on both sides, except ShapleyCAM: the softmax
  probability of class 0 (`ClassifierOutputSoftmaxTarget(0)`), the paper's pairing; on a raw
  logit its Hessian term is zero and drjax's ShapleyCAM is Grad-CAM.
- Forward passes: how many forward passes of the model a drjax method's call is, from the
  convolution and matmul FLOPs of the optimised HLO of every program the call runs (each
  compiled as the call compiles it, counted as often as it runs) over the jitted forward's;
  a while loop's body counts as often as the loop runs. XLA's own cost analysis counts it
  once; its ratio is recorded too.

The slow methods (`SLOW`) run with `--slow_repeats` timed repeats and one warm-up; the three
that loop over the images on both sides (Score-CAM, AblationCAM, SESS: pytorch-grad-cam runs
them one image at a time, drjax maps over images or windows) run on `--slow_batch` images,
which changes their images/s little and their time a lot (`--slow_batch 0`: `--batch`). A
worker gets 4x its method's time estimate (at least 300 s, or `--timeout_s`); one that runs out
is killed, and the Python stacks it was in shortly before are kept in its result. Writes
benchmarks/results/bench_cam_methods[_quick][_cpu_conv].json (every repeat of every method)
and prints a table.
"""

import argparse
import copy
import faulthandler
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

LAYER = 'denseblock4'
FUSION_LAYERS = ('denseblock2', 'denseblock3', 'denseblock4')

# The settings of both sides, as drjax keyword arguments (the PyTorch side reads the same).
SETTINGS = {
    'gradcam': dict(layer=LAYER),
    'gradcam++': dict(layer=LAYER),
    'hirescam': dict(layer=LAYER),
    'xgradcam': dict(layer=LAYER),
    'layercam': dict(layer=LAYER),
    # Masked inputs per forward pass (ScoreCAM's `batch_size` attribute in pytorch-grad-cam).
    'scorecam': dict(layer=LAYER, batch_size=32),
    'gradcam_elementwise': dict(layer=LAYER),
    'eigencam': dict(layer=LAYER),
    'eigengradcam': dict(layer=LAYER),
    'kpcacam': dict(layer=LAYER, kernel='sigmoid', gamma=None),
    'fem': dict(layer=LAYER, k=2.0),
    'shapleycam': dict(layer=LAYER),
    'finercam': dict(layer=LAYER, alpha=1.0, comparison_categories=[1, 2, 3]),
    'randomcam': dict(layer=LAYER, rng=0),
    # Ablated channels per forward pass.
    'ablationcam': dict(layer=LAYER, batch_size=32),
    'refinecam': dict(layer=list(FUSION_LAYERS)),   # Grad-CAM++ per layer on both sides
    'sess': dict(layer=LAYER, num_scales=12, scale_step_ratio=2 / 7, pre_filter_ratio=0.0,
                 theta=0.0, pool='mean', smooth=True, use_softmax_scores=True, batch_size=32),
    'guided_backprop': dict(),
    'guided_gradcam': dict(layer=LAYER),
    'fullgrad': dict(),
    'fusion': dict(layer=list(FUSION_LAYERS)),
    'gradients': dict(),
    'smoothgrad': dict(num_samples=16, noise=0.15),
    'integrated_gradients': dict(steps=32),
}
# What differs from the keyword arguments, said in words for the JSON.
NOTES = {
    'shapleycam': 'targets: softmax(logits)[0] on both sides (ClassifierOutputSoftmaxTarget(0))',
    'sess': 'base method Grad-CAM; window = the image side, stride = the window (both defaults)',
    'refinecam': 'base method Grad-CAM++ (both defaults)',
    'fusion': 'pytorch-grad-cam: LayerCAM on the three layers (its mean of scaled maps); '
              'drjax: LayerCAM fusion (tanh scaling, max)',
    'guided_backprop': "pytorch-grad-cam's GuidedBackpropReLUModel takes one image at a time",
    'guided_gradcam': "GradCAM mask * GuidedBackpropReLUModel, as pytorch-grad-cam's cam.py",
    'fullgrad': 'every biased layer (pytorch-grad-cam: Conv2d and BatchNorm2d)',
    'gradients': 'PyTorch hand-written: torch.autograd.grad of the predicted logit w.r.t. the '
                 'input, max_c |g|, scale_cam_image',
    'smoothgrad': 'PyTorch hand-written: the class from a no_grad forward, then 16 noisy '
                  'copies (sigma 0.15 * (max - min)), torch.autograd.grad each',
    'integrated_gradients': 'PyTorch hand-written: the class from a no_grad forward, then 32 '
                            'midpoint steps from a zero baseline, torch.autograd.grad each',
}
HAND_WRITTEN = ('gradients', 'smoothgrad', 'integrated_gradients')
# Fewer repeats (--slow_repeats) and one warm-up.
SLOW = ('scorecam', 'ablationcam', 'sess', 'refinecam', 'smoothgrad', 'integrated_gradients')
# Looped over images on both sides: run on --slow_batch images.
PER_IMAGE = ('scorecam', 'ablationcam', 'sess')

# torchvision's equivalents of the drjax architectures; densenet_tiny is for smoke tests only.
_TORCH_ARCH = {
    'densenet121': lambda tv: tv.models.densenet121(weights=None),
    'densenet_tiny': lambda tv: tv.models.DenseNet(growth_rate=4, block_config=(1, 2, 1, 1),
                                                   num_init_features=8, bn_size=2),
}
_CHANNELS = {'densenet121': 1024, 'densenet_tiny': 9}   # at denseblock4, for the estimates


# ------------------------------------------------------------------- forward passes from HLO


def _dims(shape: str) -> list[int] | None:
  m = re.match(r'\s*[a-z]\w*\[([\d,]*)\]', shape)
  if m is None:
    return None
  return [int(d) for d in m.group(1).split(',') if d]


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i
  return len(text)


def _parse_hlo(text: str) -> tuple[dict, str | None]:
  """-> ({computation: [(name, dims, opcode, operands, attributes)]}, entry name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s*->.*)?\{\s*$', line)
      if m:
        current = comps.setdefault(m.group(2), [])
        entry = m.group(2) if m.group(1) else entry
      continue
    if line.strip() == '}':
      current = None
      continue
    m = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$', line)
    if not m:
      continue
    name, rest = m.groups()
    end = _closing(rest, 0) + 1 if rest.startswith('(') else rest.find(' ')
    shape, rest = rest[:end], rest[end:]
    op = re.match(r'\s*([\w\-]+)\(', rest)
    if not op:
      continue
    open_at = op.end() - 1
    close_at = _closing(rest, open_at)
    operands = [o.strip().split()[-1].lstrip('%')
                for o in rest[open_at + 1:close_at].split(',') if o.strip()]
    current.append((name, _dims(shape), op.group(1), operands, rest[close_at + 1:]))
  return comps, entry


def hlo_passes_flops(text: str) -> dict:
  """Convolution and matmul FLOPs of an HLO module, loops counted as often as they run.

  A while loop's body counts `known_trip_count` times (XLA's backend config), else the constant
  its condition compares the counter with (lax.map and scan count from 0 in steps of 1); a
  fusion or call counts its computation; a conditional its costliest branch.

  Returns:
    dict(flops, loops_without_trip_count, custom_calls: the targets of custom calls, which are
    not counted).
  """
  comps, entry = _parse_hlo(text)
  shapes = {c: {name: dims for name, dims, *_ in instrs} for c, instrs in comps.items()}
  everywhere = {name: dims for c in shapes.values() for name, dims in c.items()}
  unknown, custom, memo = [0], set(), {}

  def trip_count(attrs, cond):
    m = re.search(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', attrs)
    if m:
      return int(m.group(1))
    consts = {n: ops[0] for n, _, op, ops, _ in comps.get(cond, []) if op == 'constant' and ops}
    for _, _, op, operands, attrs_ in comps.get(cond, []):
      values = [consts[o] for o in operands if o in consts]
      if op == 'compare' and 'direction=LT' in attrs_ and values and values[0].isdigit():
        return int(values[0])
    unknown[0] += 1
    return 1

  def cost(comp: str) -> float:
    if comp in memo:
      return memo[comp]
    memo[comp] = 0.0   # guards against recursion
    total = 0.0

    def shape(name):
      return shapes[comp].get(name, everywhere.get(name)) or []

    for _, dims, op, operands, attrs in comps.get(comp, []):
      if op == 'convolution' and dims is not None:
        # Each output element: kernel taps x input features per group multiply-adds.
        kernel = shape(operands[1])
        labels = re.search(r'dim_labels=\w+_(\w+)->', attrs)
        out_features = kernel[labels.group(1).index('o')] if labels and kernel else 1
        total += 2.0 * math.prod(dims) * math.prod(kernel) / max(out_features, 1)
      elif op == 'dot' and dims is not None:
        lhs = shape(operands[0])
        contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', attrs)
        k = [lhs[int(i)] for i in contracting.group(1).split(',') if i] if contracting else []
        total += 2.0 * math.prod(dims) * math.prod(k)
      elif op == 'while':
        body = re.search(r'body=%?([\w.\-]+)', attrs).group(1)
        cond = re.search(r'condition=%?([\w.\-]+)', attrs).group(1)
        total += trip_count(attrs, cond) * cost(body)
      elif op == 'conditional':
        branches = re.findall(r'(?:true|false)_computation=%?([\w.\-]+)', attrs)
        listed = re.search(r'branch_computations=\{([^}]*)\}', attrs)
        branches += [b.strip().lstrip('%') for b in listed.group(1).split(',')] if listed else []
        total += max((cost(b) for b in branches), default=0.0)
      elif op == 'custom-call':
        # Host callbacks (warnings) compute nothing.
        custom.update(t for t in re.findall(r'custom_call_target="([^"]+)"', attrs)
                      if 'callback' not in t)
      if op in ('fusion', 'call', 'async-start', 'custom-call'):
        total += sum(cost(c) for c in re.findall(r'\b(?:calls|to_apply)=%?([\w.\-]+)', attrs))
    memo[comp] = total
    return total

  flops = cost(entry) if entry else float('nan')
  return dict(flops=flops, loops_without_trip_count=unknown[0], custom_calls=sorted(custom))


# ------------------------------------------------------------------- the workers


def _jax_worker(spec: dict) -> dict:
  import jax
  if spec.get('cache_dir'):
    # Shared by the run's jax workers: the forward pass and the Grad-CAM core compile once.
    jax.config.update('jax_compilation_cache_dir', spec['cache_dir'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  import jax.numpy as jnp
  import numpy as np

  from drjax import gradcam, models
  from drjax.kernels import cpu_conv

  model = models.get_model(spec['arch'], num_classes=1000,
                           conv_general_dilated=cpu_conv.make() if spec['cpu_conv'] else None)
  size, name = spec['image_size'], spec['method']
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (spec['batch'], size, size, 3), np.float32))
  variables = models.init_variables(model, jax.random.key(0), size)
  kwargs = dict(spec['settings'])
  for key in ('layer', 'comparison_categories'):
    if isinstance(kwargs.get(key), list):
      kwargs[key] = tuple(kwargs[key])
  if name == 'shapleycam':
    kwargs['targets'] = lambda logits: jax.nn.softmax(logits)[0]   # one object: one compile
  method = gradcam.METHODS[name]
  forward = jax.jit(lambda v, z: model.apply(v, z, train=False))
  timings = common.time_calls_together(
      {'forward': lambda: forward(variables, x).block_until_ready(),
       'cam': lambda: method(model, variables, x, **kwargs).block_until_ready()},
      spec['warmup'], spec['repeats'], label=f'forward+{name}')
  return dict(**timings, jax_devices=jax.local_device_count(),
              flops=_jax_flops(forward, lambda v, z: method(model, v, z, **kwargs), variables,
                               x))


def _jax_flops(forward, fn, variables, x) -> dict:
  """Forward passes of an eager call of `fn` (module docstring); after the timing, never timed.

  The call is traced, and each top-level jitted call of the trace (each program the eager call
  runs) is compiled on its own and counted as often as it is called, so that the count is the
  eager call's: jitting the whole would let XLA merge the forward passes of separate programs
  (Guided Grad-CAM's, RefineCAM's) and inline SmoothGrad's loop 17 times.
  """
  import jax
  import jax.extend.core as jex

  def programs(f):
    flops, xla, loops, custom, memo = 0.0, 0.0, 0, set(), {}
    for eqn in jax.make_jaxpr(f)(variables, x).eqns:
      if not (jex.jaxprs_in_params(eqn.params)
              or eqn.primitive.name in ('dot_general', 'conv_general_dilated')):
        continue   # element-wise work outside the programs: no convolution or matmul
      literal = [isinstance(v, jex.Literal) for v in eqn.invars]
      avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
               for v, lit in zip(eqn.invars, literal, strict=True) if not lit]
      key = (eqn.primitive.name, id(eqn.params.get('jaxpr')), str(avals))
      if key not in memo:

        def run(*arrays, eqn=eqn, literal=literal):
          it = iter(arrays)
          args = [v.val if lit else next(it) for v, lit in zip(eqn.invars, literal, strict=True)]
          with eqn.ctx.manager:
            out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
          return out

        compiled = jax.jit(run).lower(*avals).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memo[key] = (hlo_passes_flops(compiled.as_text()),
                     float((cost or {}).get('flops', 0.0)))
      counted, xla_flops = memo[key]
      flops += counted['flops']
      xla += xla_flops
      loops += counted['loops_without_trip_count']
      custom.update(counted['custom_calls'])
    return dict(flops=flops, xla=xla, loops=loops, custom=sorted(custom), programs=len(memo))

  try:
    ours, fwd = programs(fn), programs(forward)
  except Exception as e:   # a count that fails must not lose the timing
    return dict(error=f'{type(e).__name__}: {e}'[:2000])
  return dict(forward_passes=ours['flops'] / fwd['flops'], method_flops=ours['flops'],
              forward_flops=fwd['flops'], xla_cost_analysis_ratio=ours['xla'] / fwd['xla'],
              programs=ours['programs'], loops_without_trip_count=ours['loops'],
              uncounted_custom_calls=ours['custom'])


def _input_grads(model, x, cls):
  """d logit[cls] / d x per image, as a PyTorch user writes it."""
  import torch

  x = x.detach().requires_grad_(True)
  score = model(x).gather(1, cls[:, None]).sum()
  return torch.autograd.grad(score, x)[0]


def _predicted(model, x):
  import torch

  with torch.no_grad():
    return model(x).argmax(1)


def _saliency(g):
  """max_c |g| `[B, C, H, W]` -> `[B, H, W]` in [0, 1], as drjax's pixel maps."""
  from pytorch_grad_cam.utils.image import scale_cam_image

  return scale_cam_image(g.abs().amax(1).numpy())


def _gradients(model, x, s):
  import torch

  def run():
    x_ = x.detach().requires_grad_(True)
    logits = model(x_)
    score = logits.gather(1, logits.argmax(1)[:, None]).sum()
    return _saliency(torch.autograd.grad(score, x_)[0])
  return run


def _smoothgrad(model, x, s):
  import torch

  def run():
    cls = _predicted(model, x)
    sigma = s['noise'] * (x.amax((1, 2, 3)) - x.amin((1, 2, 3)))
    rng = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(s['num_samples']):
      noise = torch.randn(x.shape, generator=rng) * sigma[:, None, None, None]
      total = total + _input_grads(model, x + noise, cls)
    return _saliency(total / s['num_samples'])
  return run


def _integrated_gradients(model, x, s):
  from pytorch_grad_cam.utils.image import scale_cam_image

  def run():
    cls = _predicted(model, x)
    total = 0.0
    for k in range(s['steps']):   # midpoints of the path from the zero baseline to x
      total = total + _input_grads(model, (k + 0.5) / s['steps'] * x, cls)
    return scale_cam_image((x * total / s['steps']).abs().sum(1).numpy())
  return run


def _guided(model, x):
  """pytorch-grad-cam's guided gradients `[B, H, W, C]`, one image at a time as it takes them."""
  import numpy as np
  from pytorch_grad_cam import GuidedBackpropReLUModel

  gb_model = GuidedBackpropReLUModel(model=model, device='cpu')
  return lambda: np.stack([gb_model(x[i:i + 1], target_category=None) for i in range(len(x))])


def _guided_backprop(model, x, s):
  import numpy as np
  from pytorch_grad_cam.utils.image import scale_cam_image

  guided = _guided(model, x)
  return lambda: scale_cam_image(np.abs(guided()).max(-1))


def _guided_gradcam(model, x, s):
  import numpy as np
  from pytorch_grad_cam import GradCAM
  from pytorch_grad_cam.utils.image import scale_cam_image

  # The guided ReLUs swapped into a copy taken before Grad-CAM's hooks are on the model.
  guided = _guided(copy.deepcopy(model), x)
  cam = GradCAM(model=model, target_layers=_layers(model, s['layer']))

  def run():
    mask = cam(input_tensor=x, targets=None)
    return scale_cam_image(np.abs(mask[..., None] * guided()).max(-1))
  return run


def _layers(model, layer) -> list:
  return [getattr(model.features, name) for name in ([layer] if isinstance(layer, str)
                                                       else layer)]


def _grad_cam_class(cls_name: str, keys=(), batch_size_attr=False, softmax_class0=False):
  """A pytorch-grad-cam class (named, so that the parent never imports torch) on
  `settings['layer']`, given the settings' `keys` as keyword arguments."""

  def build(model, x, s):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    cam = getattr(pytorch_grad_cam, cls_name)(model=model, target_layers=_layers(model, s['layer']),
                                              **{key: s[key] for key in keys})
    if batch_size_attr:   # ScoreCAM reads an attribute, not an argument
      cam.batch_size = s['batch_size']
    targets = [ClassifierOutputSoftmaxTarget(0)] * len(x) if softmax_class0 else None
    return lambda: cam(input_tensor=x, targets=targets)
  return build


def _sess(model, x, s):
  from pytorch_grad_cam import SESS, GradCAM

  keys = ('num_scales', 'scale_step_ratio', 'pre_filter_ratio', 'theta', 'pool', 'smooth',
          'use_softmax_scores', 'batch_size')
  cam = SESS(model=model, target_layers=_layers(model, s['layer']), base_method=GradCAM,
             **{key: s[key] for key in keys})
  return lambda: cam(x, None)


# Each method's PyTorch side: builder(torchvision model, input NCHW, settings) -> callable.
# A method missing here is measured on drjax alone.
_TORCH = {
    'gradcam': _grad_cam_class('GradCAM'),
    'gradcam++': _grad_cam_class('GradCAMPlusPlus'),
    'hirescam': _grad_cam_class('HiResCAM'),
    'xgradcam': _grad_cam_class('XGradCAM'),
    'layercam': _grad_cam_class('LayerCAM'),
    'scorecam': _grad_cam_class('ScoreCAM', batch_size_attr=True),
    'gradcam_elementwise': _grad_cam_class('GradCAMElementWise'),
    'eigencam': _grad_cam_class('EigenCAM'),
    'eigengradcam': _grad_cam_class('EigenGradCAM'),
    'kpcacam': _grad_cam_class('KPCA_CAM', keys=('kernel', 'gamma')),
    'fem': _grad_cam_class('FEM', keys=('k',)),
    'shapleycam': _grad_cam_class('ShapleyCAM', softmax_class0=True),
    'finercam': _grad_cam_class('FinerCAM'),
    'randomcam': _grad_cam_class('RandomCAM'),
    'ablationcam': _grad_cam_class('AblationCAM', keys=('batch_size',)),
    'refinecam': _grad_cam_class('RefineCAM'),
    'sess': _sess,
    'guided_backprop': _guided_backprop,
    'guided_gradcam': _guided_gradcam,
    'fullgrad': lambda model, x, s: _grad_cam_class('FullGrad')(model, x, dict(s, layer=[])),
    'fusion': _grad_cam_class('LayerCAM'),
    'gradients': _gradients,
    'smoothgrad': _smoothgrad,
    'integrated_gradients': _integrated_gradients,
}


def _torch_worker(spec: dict) -> dict:
  import numpy as np
  import torch
  import torchvision

  model = _TORCH_ARCH[spec['arch']](torchvision).eval()
  size = spec['image_size']
  x = np.random.default_rng(0).standard_normal((spec['batch'], size, size, 3), np.float32)
  x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  plain = copy.deepcopy(model)   # the forward without the method's hooks or swapped ReLUs

  def forward():
    with torch.no_grad():
      plain(x)

  run = _TORCH[spec['method']](model, x, spec['settings'])
  # As the drjax worker (lockstep pairs the workers by label and repeat).
  return common.time_calls_together({'forward': forward, 'cam': run}, spec['warmup'],
                                    spec['repeats'], label=f"forward+{spec['method']}")


def worker(spec: dict) -> dict:
  applied = common.prepare_process(spec)
  if spec.get('stall_file'):
    # Where a worker that is about to time out waits (a hang's Python stacks), for its row.
    stall = open(spec['stall_file'], 'w')   # open until the process ends
    faulthandler.dump_traceback_later(spec['stall_after_s'], file=stall)
  if spec['framework'] == 'torch':
    common.limit_torch_threads(spec['threads'])
  result = (_jax_worker if spec['framework'] == 'jax' else _torch_worker)(spec)
  for key in ('cam', 'forward'):
    result[key]['images_per_s'] = spec['batch'] / result[key]['median_s']
  own = sorted(c / f for c, f in zip(result['cam']['times_s'], result['forward']['times_s'],
                                     strict=True))
  return dict(spec, **result, time_over_own_forward=statistics.median(own),
              peak_rss_mib=common.peak_rss_mib(), thread_limits=applied,
              versions=common.versions())


# ------------------------------------------------------------------- the parent


def nominal_passes(name: str, image_size: int, channels: int) -> dict[str, float]:
  """Rough forward-pass equivalents per image of each side, for the time estimates only: a
  backward pass counts 2 with PyTorch's parameter gradients, 1 without (drjax's CAMs)."""
  if name == 'sess':
    from drjax.gradcam import sliding
    windows = sum(len(sliding.window_starts(s, image_size, image_size)) ** 2
                  for s in sliding.default_scales(image_size, SETTINGS['sess']['num_scales']))
    return dict(torch=1 + 4 * windows, jax=1 + 2 * windows)
  if name in ('smoothgrad', 'integrated_gradients'):
    n = SETTINGS[name].get('num_samples') or SETTINGS[name]['steps']
    return dict(torch=1 + 3 * n, jax=2 + 2 * n)
  torch, jax = {
      'scorecam': (channels + 1, channels + 1),
      'ablationcam': (channels, 2),   # drjax: the trunk once, the head per channel
      'eigencam': (1, 1), 'kpcacam': (1, 1), 'fem': (1, 1), 'randomcam': (3, 1),
      'shapleycam': (5, 3), 'guided_backprop': (3, 2), 'guided_gradcam': (6, 3),
      'refinecam': (9, 4), 'fullgrad': (3, 2), 'gradients': (3, 2),
  }.get(name, (3, 1))
  return dict(torch=torch, jax=jax)


def estimate_s(name, spec, forward_ips, channels) -> float:
  """Seconds for one method's pair of workers: start-up, warm-ups and repeats, both sides."""
  calls = spec['warmup'] + spec['repeats']
  passes = nominal_passes(name, spec['image_size'], channels)
  sides = passes.values() if name in _TORCH else [passes['jax']]
  # + the timed forward, and 0.5 s between turns
  return 20 + sum(calls * (spec['batch'] * (p + 1) / forward_ips + 0.5) for p in sides)


def _ratio_text(row) -> str:
  if row.get('errors'):
    return 'FAILED: ' + '; '.join(f'{k}: {v}' for k, v in row['errors'].items())[:160]
  if row['paired_ratio_median'] is not None:
    return common.paired_text(row)
  return 'n/a' if row['ratio'] is None else f"{row['ratio']:.2f}x (not paired)"


def table(rows) -> str:
  lines = ['| method | forward passes (drjax, XLA FLOPs) | pytorch-grad-cam img/s | drjax img/s | '
           'ratio (paired median, range) |', '|---|---|---|---|---|']
  for r in rows:
    label = r['method'] + (' (PyTorch hand-written)' if r['torch_side'] == 'hand-written'
                           else ' (drjax only)' if r['torch_side'] is None else '')
    label += f" (batch {r['batch']})" if r['batch'] != r['default_batch'] else ''
    passes = 'n/a' if r['forward_passes'] is None else f"{r['forward_passes']:.3g}"
    lines.append(f"| {label} | {passes} | {common.images_per_s_text(r['torch_images_per_s'])} | "
                 f"{common.images_per_s_text(r['jax_images_per_s'])} | {_ratio_text(r)} |")
  return '\n'.join(lines)


def make_row(name, spec, results, default_batch) -> dict:
  ours = next((r for r in results if r['framework'] == 'jax'), {})
  theirs = next((r for r in results if r['framework'] == 'torch'), {})

  def rate(r):
    return r.get('cam', {}).get('images_per_s')

  ips_a, ips_b = rate(ours), rate(theirs)
  flops = ours.get('flops') or {}
  return dict(
      method=name, batch=spec['batch'], default_batch=default_batch,
      warmup=spec['warmup'], repeats=spec['repeats'], settings=spec['settings'],
      note=NOTES.get(name),
      torch_side=(None if name not in _TORCH else 'hand-written' if name in HAND_WRITTEN
                  else 'pytorch-grad-cam'),
      forward_passes=flops.get('forward_passes'), forward_passes_error=flops.get('error'),
      xla_cost_analysis_ratio=flops.get('xla_cost_analysis_ratio'),
      jax_images_per_s=ips_a, torch_images_per_s=ips_b,
      ratio=ips_a / ips_b if ips_a and ips_b else None,
      **common.paired_summary(common.paired_speedups(ours, theirs, 'cam')),
      jax_time_over_own_forward=ours.get('time_over_own_forward'),
      torch_time_over_own_forward=theirs.get('time_over_own_forward'),
      jax_forward_images_per_s=(ours.get('forward') or {}).get('images_per_s'),
      torch_forward_images_per_s=(theirs.get('forward') or {}).get('images_per_s'),
      jax_first_call_s=(ours.get('cam') or {}).get('first_call_s'),
      torch_first_call_s=(theirs.get('cam') or {}).get('first_call_s'),
      jax_peak_rss_mib=ours.get('peak_rss_mib'), torch_peak_rss_mib=theirs.get('peak_rss_mib'),
      errors={r['framework']: r['error'] for r in results if 'error' in r} or None)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--methods', default='all',
                      help='comma-separated names of drjax.gradcam.METHODS, or all')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--slow_batch', type=int, default=1,
                      help=f"images per call for {', '.join(PER_IMAGE)} (0: --batch)")
  parser.add_argument('--threads', type=int, default=None,
                      help='cores for each side (default: all this process may use)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls (slow methods: 1)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--slow_repeats', type=int, default=1,
                      help=f"timed repeats of {', '.join(SLOW)}")
  common.add_cpu_conv_flag(parser)
  common.add_interleave_flag(parser)
  parser.add_argument('--arch', default='densenet121', choices=sorted(_TORCH_ARCH),
                      help='densenet_tiny: smoke tests only')
  parser.add_argument('--quick', action='store_true',
                      help='64 px, batch 2, 1 warm-up, 2 repeats (1 for the slow methods)')
  parser.add_argument('--out_dir', default=None,
                      help=f'JSON results (default {common.RESULTS_DIR})')
  parser.add_argument('--timeout_s', type=float, default=None,
                      help='per worker (default: 4x the estimate of its method, at least 300 s)')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    common.emit(worker(json.loads(args.worker)))
    return None
  if args.quick:
    args.image_size, args.batch, args.warmup, args.repeats, args.slow_repeats = 64, 2, 1, 2, 1
  from drjax.gradcam import METHODS

  names = list(METHODS) if args.methods == 'all' else args.methods.split(',')
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise SystemExit(f'unknown methods {unknown}; valid: {", ".join(METHODS)}')
  threads = common.default_threads(args)
  channels = _CHANNELS[args.arch]
  # Until a pair has run: DenseNet121's forward on 2 cores at 224 px (benchmarks/README.md).
  forward_ips = 12.0 * (224 / args.image_size) ** 2 * (threads or 2) / 2
  work_dir = tempfile.mkdtemp(prefix='bench_cam_methods_')
  cache_dir = os.path.join(work_dir, 'xla_cache')
  script = os.path.abspath(__file__)
  specs = {}
  for name in names:
    slow = name in SLOW
    batch = (args.slow_batch or args.batch) if name in PER_IMAGE else args.batch
    specs[name] = dict(arch=args.arch, method=name, batch=batch, image_size=args.image_size,
                       threads=threads, warmup=1 if slow else args.warmup,
                       repeats=args.slow_repeats if slow else args.repeats,
                       cpu_conv=args.cpu_conv, device='cpu', cache_dir=cache_dir,
                       settings=SETTINGS[name])
  total = sum(estimate_s(n, s, forward_ips, channels) for n, s in specs.items())
  print(f'[bench_cam_methods] {len(names)} methods, {args.arch} {args.image_size} px, '
        f'{threads} threads{", cpu_conv" if args.cpu_conv else ""}: estimate ~{total / 60:.0f} '
        f'min before measuring', flush=True)
  rows, results, started = [], [], time.monotonic()
  try:
    for i, name in enumerate(names):
      spec = specs[name]
      estimate = estimate_s(name, spec, forward_ips, channels)
      left = sum(estimate_s(n, specs[n], forward_ips, channels) for n in names[i:])
      timeout = args.timeout_s or max(300.0, 4 * estimate)
      sides = [dict(spec, framework=fw, stall_after_s=0.9 * timeout,
                    stall_file=os.path.join(work_dir, f'{i:02d}_{fw}.stall'))
               for fw in ('jax', 'torch') if fw == 'jax' or name in _TORCH]
      print(f"[{i + 1}/{len(names)}] {name}: batch {spec['batch']}, {spec['warmup']} warm-up + "
            f"{spec['repeats']} timed, {' vs '.join(s['framework'] for s in sides)}: estimate "
            f"~{estimate:.0f} s, ~{left / 60:.0f} min left (timeout {timeout:.0f} s per "
            f"worker) ...", flush=True)
      t0 = time.monotonic()
      pair = common.run_workers(script, sides, args.interleave, timeout)
      for r in pair:
        common.print_result(r, lambda r: (
            f"{r['cam']['images_per_s']:.3g} img/s (forward {r['forward']['images_per_s']:.3g}, "
            f"x{r['time_over_own_forward']:.2f} its time), first call "
            f"{r['cam']['first_call_s']:.1f} s"))
      for side, r in zip(sides, pair, strict=True):
        if 'error' in r and os.path.exists(side['stall_file']) and os.path.getsize(
            side['stall_file']):
          with open(side['stall_file']) as f:
            r['stall_traceback'] = f.read()[-4000:]
          print(f"  {r['framework']} stalled in:\n{r['stall_traceback']}", flush=True)
      results += pair
      rows.append(make_row(name, spec, pair, args.batch))
      passes = rows[-1]['forward_passes']
      print(f"  forward passes (drjax): {'n/a' if passes is None else f'{passes:.3g}'}; "
            f"{time.monotonic() - t0:.0f} s", flush=True)
      fwd = [r['forward']['images_per_s'] for r in pair if 'forward' in r]
      if fwd and spec['batch'] == args.batch:
        forward_ips = statistics.mean(fwd)
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)
  text = table(rows)
  payload = dict(benchmark='bench_cam_methods', args=vars(args), threads=threads,
                 machine=common.machine(), versions=common.versions(), layer=LAYER,
                 fusion_layers=FUSION_LAYERS, rows=rows, results=results, readme=text,
                 wall_s=time.monotonic() - started,
                 time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  suffix = ('_quick' if args.quick else '') + ('_cpu_conv' if args.cpu_conv else '')
  path = common.write_json(f'bench_cam_methods{suffix}', payload, args.out_dir)
  print(text)
  print(f'{time.monotonic() - started:.0f} s; results: {path}')
  return payload


if __name__ == '__main__':
  main()
