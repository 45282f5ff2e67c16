"""End-to-end training throughput: the real training loop against its step alone, same batch.

  python benchmarks/bench_end_to_end.py --quick           # densenet_tiny, 64 -> 32 px, seconds
  python benchmarks/bench_end_to_end.py --models=densenet121 --precisions=fp32 \
      --batch_size=16 --num_images=3000 --log_every=5 --warmup_steps=5 --steps=20   # a CPU
  python benchmarks/bench_end_to_end.py --device=gpu      # 3 backbones x fp32/bf16, batch 64,
                                                          # 35,126 images stored at 512 px

The loop is `drjax.train.train_and_evaluate` itself, as `scripts/train.py` runs it with a
backbone's `:paper` config: the grain pipeline of drjax/data/pipeline.py (ArrayRecord read,
JPEG decode at reduced scale, resize from --stored_size to --image_size, the paper's
oversampling), the batches copied ahead to the devices, the paper's augmentation and the
jitted step on device, metrics fetched and written every --log_every steps. The data is an
EyePACS-sized stand-in built by drjax's eyepacs builder from synthetic photographs
(`common.eyepacs_standin`, --num_images of them, stored as prepare_data.py stores EyePACS).
No pretrained weights (random init, the configured layers trainable as with ImageNet
weights), no checkpoint or evaluation inside the timed steps.

Loop images/s = batch x steps / time from the end of log step --warmup_steps to the end of
log step --warmup_steps + --steps (a log step waits for its metrics, so both ends are
synchronised with the device). Step-only images/s = the same jitted step
(`train.make_train_step` with the same model, optimizer, augmentation and freezing) called
--steps times back to back on one device-resident batch, timed before and after the loop.
`loop_vs_step` = loop / mean(step-only); the target is >= 0.9. Each (model, precision) runs
in its own process (benchmarks/common.py). Writes benchmarks/results/bench_end_to_end*.json.
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

TARGET = 0.9  # loop images/s over step-only images/s
_CONFIG_FILES = {'densenet': 'densenet.py', 'resnet': 'resnet.py', 'vgg': 'vgg.py'}


def paper_config(model: str):
  """The `:paper` config of `model`'s backbone; a tiny variant takes its `:smoke` layers."""
  family = re.match(r'[a-z]+', model).group(0)
  path = os.path.join(common.REPO, 'configs', _CONFIG_FILES[family])
  spec = importlib.util.spec_from_file_location(f'e2e_config_{family}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('paper')
  if config.model != model:
    smoke = module.get_config('smoke')
    if smoke.model != model:
      raise ValueError(f'{model} is neither {config.model} nor {smoke.model} ({path})')
    config.model, config.trainable = smoke.model, smoke.trainable
  return config


def loop_config(spec: dict):
  """The config the loop runs: `paper_config` at the benchmark's sizes and step counts."""
  config = paper_config(spec['model'])
  log_every, warmup, steps = spec['log_every'], spec['warmup_steps'], spec['steps']
  num_steps = warmup + steps + log_every  # the last step evaluates and checkpoints: untimed
  config.input.update(dict(spec['data'], image_size=spec['image_size'],
                           val_fraction=spec['val_fraction'], num_workers=spec['reader_threads'],
                           prefetch=max(spec['reader_threads'], 2),
                           reader_processes=spec['reader_processes'],
                           device_prefetch=spec['device_prefetch'], build_workers=1))
  config.update(dict(batch_size=spec['batch_size'], eval_batch_size=spec['batch_size'],
                     mixed_precision='bfloat16' if spec['precision'] == 'bf16' else 'float32',
                     num_steps=num_steps, log_every=log_every, eval_every=num_steps,
                     checkpoint_every=num_steps, keep_checkpoints=1, progress_bar=False))
  config.weights.update(dict(pretrained=False, random_init_trains_all=False))
  config.gradcam.num_images = 0
  return config


def step_only(config, batch, steps: int) -> dict:
  """images/s of the loop's step, called `steps` times on one device-resident batch."""
  import jax
  import jax.numpy as jnp

  from benchmarks import workloads
  from drjax import evaluate, freeze, models, train
  from drjax import mesh as mesh_lib
  from drjax.data import augment

  mesh = mesh_lib.make_mesh()
  model = evaluate.build_model(config)
  variables = models.init_variables(model, jax.random.key(config.seed, impl='rbg'),
                                    config.input.image_size)
  labels = freeze.trainable_labels(variables['params'], list(config.trainable))
  tx = train.make_optimizer(config.optimizer, config.num_steps)
  state = mesh_lib.replicate(train.create_train_state(variables, tx, labels), mesh)
  del variables
  # As train._make_step_fn builds it for the loop.
  dtype = jnp.bfloat16 if config.mixed_precision == 'bfloat16' else jnp.float32
  step_fn = train.make_train_step(
      model.clone(dtype=dtype), tx, labels,
      augment_fn=augment.make_augment_fn(config.augment) if config.augment_enabled else None,
      frozen_bn_inference=config.frozen_bn_inference, mixed_precision=config.mixed_precision,
      mesh=mesh)
  batch = mesh_lib.shard_batch({'image': batch['image'], 'label': batch['label']}, mesh)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  start = time.perf_counter()
  state, metrics = step_fn(state, batch, rng)
  jax.block_until_ready(metrics)
  first_call_s = time.perf_counter() - start
  state, metrics = step_fn(state, batch, rng)  # one more untimed: warm caches and allocator
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, batch, rng)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  memory = workloads.compiled_memory(step_fn, state, batch, rng)
  return {'images_per_s': steps * config.batch_size / seconds, 'seconds': seconds,
          'first_call_s': first_call_s, 'compiled_memory': memory}


def loop(config, spec: dict) -> dict:
  """images/s of `train.train_and_evaluate` between two log steps (module docstring)."""
  from drjax import train

  stamps = {}
  workdir = tempfile.mkdtemp(prefix='drjax_e2e_')
  train._step_hook = lambda step: stamps.setdefault(step, time.perf_counter())
  start = time.perf_counter()
  try:
    report = train.train_and_evaluate(config, workdir)
  finally:
    train._step_hook = None
    shutil.rmtree(workdir, ignore_errors=True)
  total_s = time.perf_counter() - start
  ends = list(range(spec['warmup_steps'], spec['warmup_steps'] + spec['steps'] + 1,
                    spec['log_every']))
  windows = [config.batch_size * (b - a) / (stamps[b] - stamps[a])
             for a, b in zip(ends, ends[1:], strict=False)]
  seconds = stamps[ends[-1]] - stamps[ends[0]]
  return {'images_per_s': spec['steps'] * config.batch_size / seconds, 'seconds': seconds,
          'images_per_s_per_log_interval': windows, 'run_s': total_s,
          'time_to_first_timed_step_s': stamps[ends[0]] - start,
          'final_val_kappa': report.get('kappa')}


def worker(spec: dict) -> dict:
  """Measures one (model, precision) in this fresh process."""
  applied = common.prepare_process(spec)
  if spec['device'] == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax

  from drjax import runtime
  from drjax.data import pipeline

  runtime.setup()  # what scripts/train.py does: compiled programs kept on disk
  if spec['device'] == 'gpu' and jax.default_backend() != 'gpu':
    raise RuntimeError(f'--device=gpu but jax runs on {jax.default_backend()}')
  config = loop_config(spec)
  ds = pipeline.get_dataset(config.input)
  one_process = config.input.copy_and_resolve_references()
  one_process.reader_processes = 0  # one batch is not worth starting processes for
  first = next(pipeline.make_train_iterator(one_process, ds.train, config.batch_size,
                                            config.seed))
  before = step_only(config, first, spec['steps'])
  looped = loop(config, spec)
  after = step_only(config, first, spec['steps'])
  step_rate = (before['images_per_s'] + after['images_per_s']) / 2
  peak_device = None
  if spec['device'] == 'gpu':
    stats = jax.devices()[0].memory_stats() or {}
    peak_device = stats.get('peak_bytes_in_use', 0) / 2**20 or None
  return dict(
      spec, loop_images_per_s=looped['images_per_s'], step_images_per_s=step_rate,
      loop_vs_step=looped['images_per_s'] / step_rate, target=TARGET,
      meets_target=looped['images_per_s'] >= TARGET * step_rate, loop=looped,
      step_before=before, step_after=after, compiled_memory=before['compiled_memory'],
      num_train_examples=len(ds.train), stored_size=pipeline.stored_size(config.input),
      trainable=list(config.trainable), mixed_precision=config.mixed_precision,
      jax_devices=str(jax.devices()), peak_rss_mib=common.peak_rss_mib(),
      peak_device_mib=peak_device, thread_limits=applied, versions=common.versions())


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='densenet121,resnet101,vgg16',
                      help='drjax model names; a tiny variant (densenet_tiny) runs with its '
                           "backbone's :smoke trainable layers")
  parser.add_argument('--precisions', default='fp32,bf16')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=224, help='what the model gets')
  parser.add_argument('--stored_size', type=int, default=512,
                      help='side of the stored JPEGs (prepare_data.py: 512)')
  parser.add_argument('--num_images', type=int, default=35126,
                      help='images in the stand-in (EyePACS: 35,126)')
  parser.add_argument('--unique_images', type=int, default=64,
                      help='distinct synthetic photographs the stand-in repeats')
  parser.add_argument('--val_fraction', type=float, default=0.02,
                      help='held out (evaluated once, after the timed steps)')
  parser.add_argument('--log_every', type=int, default=10)
  parser.add_argument('--warmup_steps', type=int, default=20, help='untimed loop steps first')
  parser.add_argument('--steps', type=int, default=100, help='timed steps')
  parser.add_argument('--reader_threads', type=int, default=None,
                      help="config.input.num_workers (default: the :paper config's)")
  parser.add_argument('--reader_processes', type=int, default=0,
                      help='config.input.reader_processes (grain processes)')
  parser.add_argument('--device_prefetch', type=int, default=2,
                      help='config.input.device_prefetch (0: no batch copied ahead)')
  parser.add_argument('--threads', type=int, default=None,
                      help='cores the process may use (CPU only; default: all)')
  common.add_device_flags(parser)
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'drjax_bench'))
  parser.add_argument('--build_workers', type=int, default=None,
                      help='processes building the stand-in (default: all CPUs)')
  parser.add_argument('--quick', action='store_true',
                      help='densenet_tiny fp32, 48 images stored at 64 px read at 32, batch 8, '
                           '4 timed steps')
  parser.add_argument('--out_dir', default=None,
                      help=f'JSON results (default {common.RESULTS_DIR})')
  parser.add_argument('--timeout_s', type=float, default=3600, help='per measurement')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.precisions, args.batch_size, args.image_size = 'densenet_tiny', 'fp32', 8, 32
    args.stored_size, args.num_images, args.unique_images, args.val_fraction = 64, 48, 4, 0.25
    args.log_every, args.warmup_steps, args.steps = 2, 2, 4
    args.reader_threads = args.reader_threads or 1
  if (args.warmup_steps % args.log_every or args.steps % args.log_every or not args.steps
      or not args.warmup_steps):
    parser.error('--warmup_steps and --steps must be positive multiples of --log_every')
  return args


def _table(rows: list[dict], where: str) -> str:
  lines = ['| benchmark | model | batch | precision | device (threads) | data | reader threads '
           '(processes) | loop img/s | step-only img/s | loop / step | >= 0.9 |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if 'error' in r:
      lines.append(f"| end-to-end | {r['model']} | {r['batch_size']} | {r['precision']} | "
                   f"{where} | ERROR: {r['error'].splitlines()[-1][:80]} |")
      continue
    data = f"{r['num_images']} JPEGs {r['stored_size']}->{r['image_size']} px"
    lines.append(
        f"| end-to-end | {r['model']} | {r['batch_size']} | {r['precision']} | {where} | "
        f"{data} | {r['reader_threads']} ({r['reader_processes']}) | "
        f"{common.images_per_s_text(r['loop_images_per_s'])} | "
        f"{common.images_per_s_text(r['step_images_per_s'])} | {r['loop_vs_step']:.2f} | "
        f"{'yes' if r['meets_target'] else 'no'} |")
  return '\n'.join(lines)


def main(argv=None) -> dict:
  args = _parse_args(argv)
  if args.worker:
    common.emit(worker(json.loads(args.worker)))
    return {}
  threads = common.default_threads(args)
  start = time.perf_counter()
  data = common.eyepacs_standin(args.data_dir, args.num_images, args.stored_size,
                                args.unique_images, args.build_workers)
  print(f'[bench_end_to_end] stand-in ready in {time.perf_counter() - start:.0f} s: '
        f"{data['data_dir']}", flush=True)
  base = dict(batch_size=args.batch_size, image_size=args.image_size, data=data,
              num_images=args.num_images, val_fraction=args.val_fraction,
              log_every=args.log_every, warmup_steps=args.warmup_steps, steps=args.steps,
              reader_processes=args.reader_processes, device_prefetch=args.device_prefetch,
              device=args.device, threads=threads, framework='jax')
  results = []
  for model in args.models.split(','):
    reader_threads = args.reader_threads or paper_config(model).input.num_workers
    for precision in args.precisions.split(','):
      spec = dict(base, model=model, precision=precision, reader_threads=reader_threads)
      print(f'[bench_end_to_end] {model} {precision} batch {args.batch_size} on {args.device} '
            f'...', flush=True)
      r = common.run_worker(os.path.abspath(__file__), spec, args.timeout_s)
      results.append(r)
      common.print_result(r, lambda r: f"loop {r['loop_images_per_s']:.1f} img/s, step-only "
                                       f"{r['step_images_per_s']:.1f} img/s, loop/step "
                                       f"{r['loop_vs_step']:.2f}")
  where = f'{args.device} ({threads})' if threads else args.device
  table = _table(results, where)
  payload = dict(benchmark='bench_end_to_end', target_loop_vs_step=TARGET, threads=threads,
                 machine=common.machine(), versions=common.versions(), args=vars(args),
                 rows=results, readme=table,
                 time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  suffix = ('_quick' if args.quick else '') + ('' if args.device == 'cpu' else '_gpu')
  path = common.write_json('bench_end_to_end' + suffix, payload, args.out_dir)
  print(table)
  print(f'results: {path}')
  return payload


if __name__ == '__main__':
  main()
