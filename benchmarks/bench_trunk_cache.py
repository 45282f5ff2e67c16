"""The train step fed the trunk cache against the step on images, and what the cache costs.

  python benchmarks/bench_trunk_cache.py --cpu_conv --threads 2 --out_dir benchmarks/results/cpu
  python benchmarks/bench_trunk_cache.py --device=gpu --precision=bf16 --batch_size=64

Per backbone, in its own process (benchmarks/common.py), at the paper's freezing (the
`trainable` patterns of configs/*.py, forced on a random init: speed does not depend on the
weights) and 224 px:

  * the train step on images, without augmentation (as bench_train.py) and with the paper's
    (on device, as `:paper` runs it), and the step fed the trunk's output at the cut
    (drjax.trunk_cache), all on device-resident batches and timed in the same repeats, so
    that their ratios pair up;
  * the cache's build per image and view: the paper's augmentation of one view (or none, for
    the plain validation images), the trunk's forward pass, the copy to the host, CRC32s and
    the write into a memory-mapped shard;
  * reading rows back (memory map + CRC32), and the cache's size (`--dtype`, float32 as the
    config's default; bfloat16 halves it).

Decoding the images for the build is left out: it is the input pipeline's usual cost
(bench_pipeline.py), paid once per image instead of once per step. Writes
benchmarks/results/bench_trunk_cache*.json and prints the README table and an estimate for an
EyePACS-sized run.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# An EyePACS-sized run: 35,126 images split 80/20, 8 views of each training image, and the
# paper's 11,000 steps of batch 256 (configs: ':paper').
EYEPACS_IMAGES = 35_126
EYEPACS_TRAIN = round(EYEPACS_IMAGES * 0.8)
EYEPACS_VIEWS = 8
PAPER_STEP_IMAGES = 11_000 * 256
READS = 256


def worker(spec: dict) -> dict:
  """Measures one backbone in this (fresh) process."""
  applied = common.prepare_process(spec)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from benchmarks import workloads
  from drjax import freeze, models, train, trunk_cache
  from drjax.data import augment
  from drjax.kernels import cpu_conv

  dev = jax.devices('gpu' if spec['device'] == 'gpu' else 'cpu')[0]
  kwargs = {'dtype': jnp.bfloat16} if spec['precision'] == 'bf16' else {}
  if spec['cpu_conv']:
    kwargs['conv_general_dilated'] = cpu_conv.make()
  model = models.get_model(spec['model'], num_classes=workloads.NUM_CLASSES, **kwargs)
  batch, size = spec['batch_size'], spec['image_size']
  images, labels = workloads.fake_batch(batch, size)
  with jax.default_device(dev):
    variables = jax.device_put(models.init_variables(model, jax.random.key(0), size), dev)
    label_tree = freeze.trainable_labels(variables['params'], spec['trainable'])
    start = time.perf_counter()
    cut = trunk_cache.find_cut(model, variables, label_tree, size, spec['frozen_bn_inference'])
    find_cut_s = time.perf_counter() - start
    tx = optax.adam(1e-4)
    precision = 'bfloat16' if spec['precision'] == 'bf16' else 'float32'
    trunk_fn = trunk_cache.make_trunk_fn(model, label_tree, cut,
                                         augment=augment.default_config(), dtype=spec['dtype'])
    store = np.uint16 if spec['dtype'] == 'bfloat16' else np.float32
    images, labels = jax.device_put(images, dev), jax.device_put(labels, dev)
    records = jax.device_put(np.arange(batch, dtype=np.int32), dev)
    features = trunk_fn(variables, images, records, np.int32(0))
    inputs = {'image': {'image': images, 'label': labels},
              'trunk': {'trunk': features, 'label': labels}}
    inputs['image_augmented'] = inputs['image']
    holders, steps = {}, {}
    for key, step_cut in (('image', None), ('image_augmented', None), ('trunk', cut)):
      # Each step donates its own copy of the state.
      state = jax.device_put(train.create_train_state(jax.tree.map(jnp.copy, variables), tx,
                                                      label_tree), dev)
      holders[key] = [state]
      augment_fn = (augment.make_augment_fn(augment.default_config())
                    if key == 'image_augmented' else None)
      steps[key] = train.make_train_step(model, tx, label_tree, augment_fn=augment_fn,
                                         frozen_bn_inference=spec['frozen_bn_inference'],
                                         mixed_precision=precision, cut=step_cut)
    rng = jax.random.key(1)

    def make_step(key):
      def run():
        holders[key][0], metrics = steps[key](holders[key][0], inputs[key], rng)
        metrics['loss'].block_until_ready()
      return run

    with tempfile.TemporaryDirectory() as tmp:
      rows = batch * 4
      shard = np.lib.format.open_memmap(os.path.join(tmp, 'train.npy'), mode='w+',
                                        dtype=store, shape=(rows, 1, *cut.shape))
      crcs = np.zeros((rows, 1), np.uint32)
      written = [0]

      def build(plain=False):
        view = -1 if plain else written[0] // batch
        out = np.asarray(jax.device_get(trunk_fn(variables, images, records, np.int32(view))))
        out = out.view(store)
        first = written[0] % rows
        shard[first:first + batch, 0] = out
        crcs[first:first + batch, 0] = [zlib.crc32(x) for x in out]
        shard.flush()
        written[0] += batch

      timing = common.time_calls_together(
          {'image': make_step('image'), 'image_augmented': make_step('image_augmented'),
           'trunk': make_step('trunk'), 'build': build,
           'build_plain': lambda: build(plain=True)},
          spec['warmup'], spec['repeats'], 'trunk_cache')
      order = np.random.default_rng(0).integers(0, rows, READS)
      start = time.perf_counter()
      for i in order:
        row = np.array(shard[i, 0])
        assert zlib.crc32(row) == crcs[i, 0]
      read_s = (time.perf_counter() - start) / READS
  def paired(key):
    pairs = [a / b for a, b in zip(timing[key]['times_s'], timing['trunk']['times_s'],
                                   strict=True)]
    return dict(ratio=timing[key]['median_s'] / timing['trunk']['median_s'],
                median=statistics.median(pairs), min=min(pairs), max=max(pairs))

  row_bytes = int(np.prod(cut.shape)) * np.dtype(store).itemsize
  return dict(
      spec, cut=cut.name, cut_shape=list(cut.shape), find_cut_s=find_cut_s, timing=timing,
      images_per_s={k: batch / t['median_s'] for k, t in timing.items()},
      speedup={key: paired(key) for key in ('image', 'image_augmented')},
      read_rows_per_s=1.0 / read_s, row_bytes=row_bytes,
      mib_per_1000_rows=row_bytes * 1000 / 2**20, thread_limits=applied,
      peak_rss_mib=common.peak_rss_mib(), versions=common.versions())


def eyepacs_estimate(result: dict) -> dict:
  """Disk and time of the cache of an EyePACS-sized run, from one backbone's result."""
  views, plain = EYEPACS_TRAIN * EYEPACS_VIEWS, EYEPACS_IMAGES - EYEPACS_TRAIN
  rates = result['images_per_s']
  return dict(rows=views + plain, disk_gib=(views + plain) * result['row_bytes'] / 2**30,
              build_h=(views / rates['build'] + plain / rates['build_plain']) / 3600,
              paper_steps_h={'images': PAPER_STEP_IMAGES / rates['image_augmented'] / 3600,
                             'trunk_cache': PAPER_STEP_IMAGES / rates['trunk'] / 3600})


def readme_table(results: list[dict], threads, device: str) -> str:
  lines = [
      '| model | cut: cached [h, w, C] | step on images img/s: plain / augmented | step on '
      'the cache img/s | speedup over plain / augmented (per repeat: median, range) | build '
      f'img/s per view: augmented / plain | MiB per 1000 image-views ({results[0]["dtype"]}) '
      '| EyePACS, 8 views: disk, build, 11k steps of 256 augmented -> on the cache |',
      '|---|---|---|---|---|---|---|---|']

  def speedup(s):
    return f"{s['ratio']:.1f}x ({s['median']:.1f}x, {s['min']:.1f}-{s['max']:.1f})"

  for r in results:
    if 'error' in r:
      lines.append(f"| {r['model']} | error: {r['error'][:80]} | | | | | | |")
      continue
    est, rates = eyepacs_estimate(r), r['images_per_s']
    lines.append(
        f"| {r['model']} | `{r['cut']}` {r['cut_shape']} | {rates['image']:.3g} / "
        f"{rates['image_augmented']:.3g} | {rates['trunk']:.3g} | "
        f"{speedup(r['speedup']['image'])} / {speedup(r['speedup']['image_augmented'])} | "
        f"{rates['build']:.3g} / {rates['build_plain']:.3g} | {r['mib_per_1000_rows']:.0f} | "
        f"{est['disk_gib']:.0f} GiB, {est['build_h']:.1f} h, "
        f"{est['paper_steps_h']['images']:.0f} h -> {est['paper_steps_h']['trunk_cache']:.1f} h |")
  where = f"{device}, {threads or 'all'} threads"
  return '\n'.join(lines) + f'\n\n({where}; batch {results[0]["batch_size"]}, ' \
      f'{results[0]["image_size"]} px, {results[0]["precision"]})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='densenet121,resnet101,vgg16')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--threads', type=int, default=None,
                      help='cores (default: all this process may use; CPU only)')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  common.add_device_flags(parser)
  parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help="the cache's storage dtype (config.trunk_cache.dtype)")
  common.add_cpu_conv_flag(parser)
  parser.add_argument('--out_dir', default=None, help=f'JSON results (default '
                                                      f'{common.RESULTS_DIR})')
  parser.add_argument('--timeout_s', type=float, default=1800, help='per backbone')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    common.emit(worker(json.loads(args.worker)))
    return
  from benchmarks import workloads

  threads = common.default_threads(args)
  results = []
  for name in args.models.split(','):
    trainable, frozen_bn_inference, source = workloads.trainable_patterns(name)
    spec = dict(model=name, batch_size=args.batch_size, image_size=args.image_size,
                trainable=trainable, frozen_bn_inference=frozen_bn_inference,
                trainable_source=source, threads=threads, warmup=args.warmup,
                repeats=args.repeats, device=args.device, precision=args.precision,
                cpu_conv=args.cpu_conv, dtype=args.dtype)
    print(f'[bench_trunk_cache] {name} batch {args.batch_size} {args.precision} on '
          f"{args.device} ({threads or 'all'} threads) ...", flush=True)
    start, load = time.perf_counter(), os.getloadavg()
    result = common.run_worker(os.path.abspath(__file__), spec, args.timeout_s)
    # Other processes on the same cores slow both steps alike; the record says how busy.
    result.update(wall_s=time.perf_counter() - start, load_average_before_after=[
        load[0], os.getloadavg()[0]])
    if 'error' not in result:
      result['eyepacs'] = eyepacs_estimate(result)
      rates = result['images_per_s']
      print(f"  cut {result['cut']} {result['cut_shape']}: images {rates['image']:.3g} "
            f"(augmented {rates['image_augmented']:.3g}), cache {rates['trunk']:.3g} img/s "
            f"({result['speedup']['image']['ratio']:.1f}x), build {rates['build']:.3g} img/s, "
            f"{result['wall_s']:.0f} s", flush=True)
    else:
      print(f"  error: {result['error']}", flush=True)
    results.append(result)
  table = readme_table(results, threads, args.device)
  payload = dict(benchmark='bench_trunk_cache', description='train step on the trunk cache',
                 threads=threads, machine=common.machine(), versions=common.versions(),
                 args=vars(args), results=results, readme=table,
                 time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  suffix = ('' if args.device == 'cpu' else '_gpu') + \
      ('' if args.precision == 'fp32' else f'_{args.precision}') + \
      ('_cpu_conv' if args.cpu_conv else '') + ('' if args.dtype == 'float32' else '_bf16_cache')
  path = common.write_json('bench_trunk_cache' + suffix, payload, args.out_dir)
  print(table)
  print(f'results: {path}')


if __name__ == '__main__':
  main()
