"""Batch Grad-CAM throughput: drjax vs pytorch-grad-cam, same layer, batch, cores and threads.

  python benchmarks/bench_gradcam.py --threads 1 --batch 4                  # densenet121
  python benchmarks/bench_gradcam.py --threads 1 --batch 4 --arch resnet101
  python benchmarks/bench_gradcam.py --quick                                # batch 2, 2 repeats
  python benchmarks/bench_gradcam.py --device=gpu --batch 16                # on a GPU, fp32

Each side runs in its own fresh process with the same thread limits as bench_train.py and
bench_eval.py (benchmarks/common.py: pinned cores, one XLA/OpenMP thread per core), the two
timed in lockstep (`--no-interleave`: one after the other). Each repeat times the forward
and Grad-CAM once each (in alternating order), so Grad-CAM over the own forward is paired
per repeat as well as Grad-CAM against Grad-CAM:
- drjax: `drjax.gradcam.gradcam(model, variables, images)` on the model's default CAM
  layer, called as a user calls it, and the jitted forward pass alone; XLA's FLOP count
  of Grad-CAM relative to the forward. The batch is split over jax's devices as
  `drjax.cam_study` splits it (`drjax.mesh.shard_padded`, variables replicated); with
  `--one_device_per_core` jax has one CPU device per core (JAX_NUM_CPU_DEVICES), else one.
  `--cpu_conv`: the opt-in CPU convolutions (`drjax.kernels.cpu_conv`).
- PyTorch: pytorch-grad-cam's `GradCAM` on the same layer of the torchvision model, and
  the model's own forward under `torch.no_grad()`.
Random weights (timing does not depend on them), float32, 1000 classes (ImageNet heads,
the target being each image's top class on both sides). Reported: median seconds per
batch after warm-up, images/s, peak RSS of each process. On a GPU (`--device=gpu`) both
sides run on it in float32, each repeat timing 10 calls; drjax's maps stay on the device
(blocked on), pytorch-grad-cam's come back as numpy arrays, as each library returns them. Writes
benchmarks/results/bench_gradcam_<arch>.json and prints the README table line.
"""

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

_TORCH_LAYER = {'densenet121': lambda m: m.features.denseblock4,
                'resnet101': lambda m: m.layer4,
                'vgg16': lambda m: m.features[29]}


def _jax_worker(spec: dict) -> dict:
  import jax
  import numpy as np

  from drjax import gradcam, models
  from drjax import mesh as mesh_lib
  from drjax.kernels import cpu_conv

  model = models.get_model(spec['arch'], num_classes=1000,
                           conv_general_dilated=cpu_conv.make() if spec['cpu_conv'] else None)
  size = spec['image_size']
  x = np.random.default_rng(0).standard_normal((spec['batch'], size, size, 3), np.float32)
  variables = models.init_variables(model, jax.random.key(0), size)
  # As cam_study.compute_heatmaps places them: the batch split over the devices, the
  # variables replicated.
  mesh = mesh_lib.make_mesh(jax.local_devices())
  x = mesh_lib.shard_padded(x, mesh)
  variables = mesh_lib.replicate(variables, mesh)
  forward = jax.jit(lambda v, z: model.apply(v, z, train=False))
  # Grad-CAM timed as a user calls it (the function jits its core itself); the jitted
  # wrapper below is only for XLA's FLOP count.
  timings = common.time_calls_together(
      {'forward': lambda: forward(variables, x).block_until_ready(),
       'gradcam': lambda: gradcam.gradcam(model, variables, x).block_until_ready()},
      spec['warmup'], spec['repeats'], label='forward+gradcam',
      calls_per_repeat=spec['calls_per_repeat'])

  def flops(fn):
    cost = fn.lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get('flops', float('nan')))

  cam_fn = jax.jit(lambda v, z: gradcam.gradcam(model, v, z))
  return dict(layer=model.default_cam_layer, **timings, jax_devices=jax.local_device_count(),
              gradcam_over_forward_flops=flops(cam_fn) / flops(forward))


def _torch_worker(spec: dict) -> dict:
  import numpy as np
  import torch
  import torchvision
  from pytorch_grad_cam import GradCAM

  dev = torch.device('cuda' if spec['device'] == 'gpu' else 'cpu')
  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
  model = getattr(torchvision.models, spec['arch'])(weights=None).eval().to(dev)
  size = spec['image_size']
  x = np.random.default_rng(0).standard_normal((spec['batch'], size, size, 3), np.float32)
  x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)

  plain = copy.deepcopy(model)  # the forward without GradCAM's hooks

  def forward():
    with torch.no_grad():
      plain(x)
    sync()

  with GradCAM(model=model, target_layers=[_TORCH_LAYER[spec['arch']](model)]) as cam:
    # As the drjax worker (lockstep pairs the workers by label and repeat).
    return common.time_calls_together(
        {'forward': forward, 'gradcam': lambda: cam(input_tensor=x, targets=None)},
        spec['warmup'], spec['repeats'], label='forward+gradcam',
        calls_per_repeat=spec['calls_per_repeat'])


def worker(spec: dict) -> dict:
  applied = common.prepare_process(spec)
  if spec['framework'] == 'torch':
    common.limit_torch_threads(spec['threads'])
  elif spec['one_device_per_core']:
    os.environ['JAX_NUM_CPU_DEVICES'] = str(len(applied['cpu_affinity']))  # before jax starts
  result = (_jax_worker if spec['framework'] == 'jax' else _torch_worker)(spec)
  for key in ('gradcam', 'forward'):
    result[key]['images_per_s'] = spec['batch'] / result[key]['median_s']
  return dict(spec, **result, peak_rss_mib=common.peak_rss_mib(), thread_limits=applied,
              versions=common.versions())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', default='densenet121', choices=sorted(_TORCH_LAYER))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--threads', type=int, default=None,
                      help='cores for each side (default: all this process may use)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--frameworks', default='jax,torch')
  common.add_device_flags(parser)
  parser.add_argument('--one_device_per_core', action='store_true',
                      help='drjax: one jax CPU device per core, the batch split over them')
  common.add_cpu_conv_flag(parser)
  common.add_keep_freed_memory_flag(parser)
  common.add_interleave_flag(parser)
  parser.add_argument('--quick', action='store_true', help='batch 2, 1 warm-up, 2 repeats')
  parser.add_argument('--out_dir', default=None,
                      help=f'JSON results (default {common.RESULTS_DIR})')
  parser.add_argument('--timeout_s', type=float, default=1800, help='per measurement')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    common.emit(worker(json.loads(args.worker)))
    return
  if args.quick:
    args.batch, args.warmup, args.repeats = 2, 1, 2
  if args.device == 'gpu' and args.one_device_per_core:
    parser.error('--one_device_per_core splits the CPU; it has no meaning with --device=gpu')

  threads = common.default_threads(args)
  specs = [dict(framework=framework, arch=args.arch, batch=args.batch,
                image_size=args.image_size, threads=threads, warmup=args.warmup,
                repeats=args.repeats, keep_freed_memory=args.keep_freed_memory,
                one_device_per_core=args.one_device_per_core, cpu_conv=args.cpu_conv,
                device=args.device,
                calls_per_repeat=common.calls_per_repeat(args))
           for framework in args.frameworks.split(',')]
  print(f"[bench_gradcam] {args.frameworks}: {args.arch} batch {args.batch} on {args.device} "
        f"({threads or 'all'} threads"
        f"{', in lockstep' if common.in_lockstep(specs, args.interleave) else ''}) ...",
        flush=True)
  results = {}
  for r in common.run_workers(os.path.abspath(__file__), specs, args.interleave, args.timeout_s):
    results[r['framework']] = r
    common.print_result(r, lambda r: f"Grad-CAM {r['gradcam']['images_per_s']:.2f} images/s, "
                                     f"forward {r['forward']['images_per_s']:.2f} images/s, "
                                     f"peak RSS {r['peak_rss_mib']:.0f} MiB")

  ours, theirs = results.get('jax', {}), results.get('torch', {})

  def rate(r, key):
    return r[key]['images_per_s'] if key in r else float('nan')

  paired = common.paired_speedups(ours, theirs, 'gradcam')
  own = ours.get('forward', {}).get('times_s'), ours.get('gradcam', {}).get('times_s')
  own_paired = sorted(f / g for f, g in zip(*own, strict=True)) if all(own) else None
  summary = dict(
      speedup_vs_pytorch_grad_cam=rate(ours, 'gradcam') / rate(theirs, 'gradcam'),
      speedup_per_lockstep_pair=common.paired_summary(paired),
      drjax_gradcam_over_own_forward=rate(ours, 'gradcam') / rate(ours, 'forward'),
      drjax_gradcam_over_own_forward_per_repeat=common.paired_summary(own_paired),
      pytorch_grad_cam_over_torch_forward=rate(theirs, 'gradcam') / rate(theirs, 'forward'))
  nan = float('nan')
  where = f'{threads}' if args.device == 'cpu' else common.machine().get('gpu', 'GPU')
  where += (', freed memory kept' if args.keep_freed_memory else '') + \
      (', a device per core' if args.one_device_per_core else '') + \
      (', cpu_conv' if args.cpu_conv else '')
  line = (f"| {args.arch} {ours.get('layer', '?')} | {args.image_size} px | batch {args.batch} | "
          f"{where} | {rate(ours, 'gradcam'):.2f} | {rate(theirs, 'gradcam'):.2f} | "
          f"{summary['speedup_vs_pytorch_grad_cam']:.2f}x | "
          f"{common.paired_text(summary['speedup_per_lockstep_pair'])} | "
          f"{rate(ours, 'forward'):.2f} | "
          f"{rate(theirs, 'forward'):.2f} | {ours.get('gradcam_over_forward_flops', nan):.3f} | "
          f"{ours.get('peak_rss_mib', nan):.0f} / {theirs.get('peak_rss_mib', nan):.0f} |")
  table = '\n'.join([
      f"| model, layer | input | batch | {'CPU threads' if args.device == 'cpu' else 'GPU'} | "
      'drjax Grad-CAM img/s | '
      'pytorch-grad-cam img/s | speedup | per lockstep pair: median (range) | '
      'drjax forward img/s | PyTorch forward img/s | '
      'Grad-CAM / forward FLOPs | peak RSS MiB (drjax / PyTorch) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|', line])
  payload = dict(benchmark='bench_gradcam', args=vars(args), threads=threads,
                 machine=common.machine(), results=results, **summary, readme=table,
                 time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  suffix = ('_quick' if args.quick else '') + ('' if args.device == 'cpu' else '_gpu') + \
      ('_keep_freed_memory' if args.keep_freed_memory else '') + \
      ('_one_device_per_core' if args.one_device_per_core else '') + \
      ('_cpu_conv' if args.cpu_conv else '')
  path = common.write_json(f'bench_gradcam_{args.arch}{suffix}', payload, args.out_dir)
  print(table)
  print(f"drjax Grad-CAM / own forward: {summary['drjax_gradcam_over_own_forward']:.2f}x, per "
        f"repeat {common.paired_text(summary['drjax_gradcam_over_own_forward_per_repeat'])}")
  print(f'results: {path}')


if __name__ == '__main__':
  main()
