r"""Batch Grad-CAM throughput: drjax vs pytorch-grad-cam on DenseNet121's denseblock4.

  python benchmarks/bench_gradcam.py --batch 8 --image_size 224 --threads 2 \
      --out benchmarks/bench_gradcam.json

Both run on the same CPU cores (the process is pinned to the first --threads
cores and torch.set_num_threads(--threads)), same batch, same layer, random
weights (timing does not depend on them). Reported: median seconds per batch
over --repeats timed runs after --warmup untimed ones (compilation excluded),
images/s for drjax Grad-CAM, drjax forward pass alone and pytorch-grad-cam's
GradCAM, and XLA's FLOP count of Grad-CAM relative to the forward pass. Prints
a README table line.
"""

import json
import os
import platform
import statistics
import time

from absl import app, flags

flags.DEFINE_integer('batch', 8, 'Images per batch.')
flags.DEFINE_integer('image_size', 224, 'Square input side.')
flags.DEFINE_integer('threads', 2, 'CPU cores / threads for both frameworks.')
flags.DEFINE_integer('warmup', 2, 'Untimed runs (compilation, caches).')
flags.DEFINE_integer('repeats', 5, 'Timed runs; the median is reported.')
flags.DEFINE_string('arch', 'densenet121', 'densenet121 | resnet101 | vgg16.')
flags.DEFINE_string('out', 'benchmarks/bench_gradcam.json', 'JSON result path.')
flags.DEFINE_bool('torch', True, 'Also time pytorch-grad-cam.')
FLAGS = flags.FLAGS

_TORCH_LAYER = {'densenet121': lambda m: m.features.denseblock4,
                'resnet101': lambda m: m.layer4,
                'vgg16': lambda m: m.features[29]}


def _median_time(fn, warmup, repeats):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def main(argv):
  del argv
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, set(range(min(FLAGS.threads, os.cpu_count() or 1))))
  import jax
  import numpy as np

  from drjax import gradcam, models

  b, s = FLAGS.batch, FLAGS.image_size
  model = models.get_model(FLAGS.arch, num_classes=1000)
  x = np.random.default_rng(0).standard_normal((b, s, s, 3)).astype(np.float32)
  variables = jax.jit(lambda z: model.init(jax.random.PRNGKey(0), z, train=False))(x[:1])
  xj = jax.device_put(x)

  forward = jax.jit(lambda v, z: model.apply(v, z, train=False))
  # Timed as a user calls it (the function jits its core itself); the jitted wrapper
  # is for XLA's FLOP count below.
  cam_fn = jax.jit(lambda v, z: gradcam.gradcam(model, v, z))
  t_fwd, _ = _median_time(lambda: forward(variables, xj).block_until_ready(),
                          FLAGS.warmup, FLAGS.repeats)
  t_cam, cam_times = _median_time(
      lambda: gradcam.gradcam(model, variables, xj).block_until_ready(),
      FLAGS.warmup, FLAGS.repeats)

  def flops(fn):
    cost = fn.lower(variables, xj).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get('flops', float('nan')))

  result = dict(
      arch=FLAGS.arch, layer=model.default_cam_layer, batch=b, image_size=s,
      threads=FLAGS.threads, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
      cpu=platform.processor() or platform.machine(), jax=jax.__version__,
      jax_backend=jax.default_backend(),
      drjax_gradcam_s_per_batch=t_cam, drjax_gradcam_images_per_s=b / t_cam,
      drjax_forward_s_per_batch=t_fwd, drjax_forward_images_per_s=b / t_fwd,
      drjax_gradcam_over_forward_time=t_cam / t_fwd,
      drjax_gradcam_over_forward_flops=flops(cam_fn) / flops(forward),
      drjax_gradcam_times=cam_times)

  if FLAGS.torch:
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM

    torch.set_num_threads(FLAGS.threads)
    tmodel = getattr(torchvision.models, FLAGS.arch)(weights=None).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with GradCAM(model=tmodel, target_layers=[_TORCH_LAYER[FLAGS.arch](tmodel)]) as cam:
      t_torch, torch_times = _median_time(lambda: cam(input_tensor=xt, targets=None), FLAGS.warmup,
                                          FLAGS.repeats)

    def torch_forward():
      with torch.no_grad():
        tmodel(xt)

    t_torch_fwd, _ = _median_time(torch_forward, FLAGS.warmup, FLAGS.repeats)
    result.update(
        torch=torch.__version__, torch_gradcam_s_per_batch=t_torch,
        torch_gradcam_images_per_s=b / t_torch, torch_forward_images_per_s=b / t_torch_fwd,
        torch_gradcam_times=torch_times, speedup_vs_pytorch_grad_cam=t_torch / t_cam)

  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if not k.endswith('_times')}, indent=1))
  line = (f'| {FLAGS.arch} {result["layer"]} | {s} px | batch {b} | {FLAGS.threads} | '
          f'{result["drjax_gradcam_images_per_s"]:.2f} | '
          f'{result.get("torch_gradcam_images_per_s", float("nan")):.2f} | '
          f'{result.get("speedup_vs_pytorch_grad_cam", float("nan")):.2f}x | '
          f'{result["drjax_forward_images_per_s"]:.2f} | '
          f'{result["drjax_gradcam_over_forward_flops"]:.3f} |')
  print('| model, layer | input | batch | CPU threads | drjax Grad-CAM img/s | '
        'pytorch-grad-cam img/s | speedup | drjax forward img/s | Grad-CAM / forward FLOPs |')
  print('|---|---|---|---|---|---|---|---|---|')
  print(line)


if __name__ == '__main__':
  app.run(main)
