"""Input pipeline throughput per core: read + decode (+ resize), before and after, and its stages.

  python benchmarks/bench_pipeline.py --quick                  # seconds: 64 px synthetic_fundus
  python benchmarks/bench_pipeline.py --dataset eyepacs_standin --num_images 4000 \
      --stored_size 512 --image_size 224 --threads 1,2        # the paper's read: 512 px -> 224
  python benchmarks/bench_pipeline.py --dataset idrid --manual_dir /path/to/idrid \
      --image_size 512 --threads 1,4,8

Builds the dataset if needed (into --data_dir; `eyepacs_standin` is an EyePACS-sized set of
synthetic photographs built by drjax's eyepacs builder, benchmarks/common.py), then:

  * stages: the per-image cost of each part of a read on one thread, without grain: the
    oversampling index, tfds's parse of a record, `Source.encoded`'s, the JPEG/PNG decode at
    the stored size, at reduced JPEG scale (`draft`) and resized, a resize from the decoded
    stored size, and one host-to-device copy of a batch;
  * read paths, each for every --threads count T with the process pinned to T cores (per
    core = images/s / T): `before` (tfds parses and decodes every record at its stored size,
    as the pipeline read before `Source.encoded`), `tfds_resize` (the same, then resized to
    --image_size: what a resize alone would cost) and `after` (`pipeline.make_train_iterator`
    now: `Source.encoded`, `images.decode_square`); with --reader_processes also `after` read
    in that many grain processes;
  * the `after` stream followed by `drjax.data.augment` (jitted, default JAX device).

Writes benchmarks/results/bench_pipeline_<dataset>_<stored>to<size>.json and prints the
table lines. The pipeline must never be what training waits on: compare with bench_train.py,
or run bench_end_to_end.py, which measures the whole loop.
"""

import argparse
import dataclasses
import io
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from drjax.data import images, pipeline  # noqa: E402


def _rate(batches, num_batches: int, warmup: int, fn=None) -> float:
  """images/s over `num_batches` batches after `warmup` untimed ones."""
  it = iter(batches)
  for b in itertools.islice(it, warmup):
    if fn is not None:
      fn(b)
  n = 0
  start = time.perf_counter()
  for b in itertools.islice(it, num_batches):
    if fn is not None:
      fn(b)
    n += len(b['label'])
  return n / (time.perf_counter() - start)


def _per_call_ms(fn, args) -> float:
  fn(args[0])
  start = time.perf_counter()
  for a in args:
    fn(a)
  return (time.perf_counter() - start) / len(args) * 1e3


def stages(cfg, source: pipeline.Source, builder, num: int) -> dict:
  """Per-image cost in ms of each part of one read, on this thread (module docstring)."""
  rng = np.random.default_rng(0)
  idx = [int(i) for i in rng.integers(0, len(source), num)]
  size = cfg.image_size
  out = {}
  index = pipeline._TrainIndex(len(source), pipeline.sampling_probabilities(
      source.labels, cfg.class_weights), 0, 0, 64, 0, 64)
  start = time.perf_counter()
  index._epoch(1)
  out['oversampling_epoch_draw_ms'] = (time.perf_counter() - start) * 1e3
  out['oversampling_index_ms'] = _per_call_ms(lambda j: index[j], list(range(1000)))
  out['tfds_read_decode_ms'] = _per_call_ms(lambda i: source.get(i, with_masks=False), idx)
  if source.records is not None:
    skip = {'image': pipeline._skip_decoding()}
    keys = builder.info.features.keys()
    skip.update({k: pipeline._skip_decoding() for k in ('masks', 'optic_disc') if k in keys})
    parsed = builder.as_data_source('train', decoders=skip)
    out['tfds_parse_ms'] = _per_call_ms(lambda i: parsed[int(source.indices[i])], idx)
    out['encoded_parse_ms'] = _per_call_ms(source.encoded, idx)
    data = [source.encoded(i)[0] for i in idx]
    out['encoded_bytes_mean'] = float(np.mean([len(d) for d in data]))
    out['decode_stored_ms'] = _per_call_ms(images.decode_square, data)
    if pipeline._read_size(cfg):
      out['decode_draft_ms'] = _per_call_ms(lambda d: _draft(d, size), data)
      out['decode_draft_resize_ms'] = _per_call_ms(lambda d: images.decode_square(d, size), data)
      full = [images.decode_square(d) for d in data]
      out['resize_stored_ms'] = _per_call_ms(lambda a: images.resize_square(a, size), full)
  size = pipeline._read_size(cfg)
  out['load_after_ms'] = _per_call_ms(pipeline._Load(source, False, size), idx)
  before = dataclasses.replace(source, records=None)
  out['load_before_ms'] = _per_call_ms(pipeline._Load(before, False, None), idx)
  return out


def _draft(data: bytes, size: int):
  from PIL import Image

  im = Image.open(io.BytesIO(data))
  im.draft('RGB', (size, size))
  im.load()
  return im


def read_paths(cfg, source: pipeline.Source, threads: list[int], batch_size: int,
               num_batches: int, reader_processes: int) -> list[dict]:
  """images/s and per core of each read path (module docstring) at each thread count."""
  resized = pipeline._read_size(cfg) is not None
  before_cfg = cfg.copy_and_resolve_references()
  before_cfg.stored_size = 0  # images as stored: no resize
  variants = [('before', before_cfg, dataclasses.replace(source, records=None), 0)]
  if resized:
    variants.append(('tfds_resize', cfg, dataclasses.replace(source, records=None), 0))
  variants.append(('after', cfg, source, 0))
  if reader_processes:
    variants.append((f'after_{reader_processes}_processes', cfg, source, reader_processes))
  # Reader threads (and grain's processes) inherit the affinity of the thread that starts them.
  available = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_setaffinity') else []
  rows = []
  try:
    for t in threads:
      cores = available[:t]
      if cores:
        os.sched_setaffinity(0, cores)
      for name, c, src, processes in variants:
        c = c.copy_and_resolve_references()
        c.update(num_workers=t, prefetch=max(t, 2), reader_processes=processes)
        it = pipeline.make_train_iterator(c, src, batch_size, seed=0)
        rate = _rate(it, num_batches, 2 + 2 * processes)
        if hasattr(it, 'close'):
          it.close()  # grain's processes
        row = {'read_path': name, 'threads': t, 'processes': processes, 'cores': len(cores),
               'images_per_s': rate,
               'images_per_s_per_core': rate / len(cores) if cores else None}
        rows.append(row)
        print(row, flush=True)
  finally:
    if available:
      os.sched_setaffinity(0, available)
  return rows


def with_augment(cfg, source: pipeline.Source, batch_size: int, num_batches: int) -> dict:
  """The `after` stream followed by the paper's augmentation on the default JAX device."""
  import jax

  from drjax.data import augment

  fn = augment.make_augment_fn(augment.default_config())
  rng = jax.random.key(0)
  images_ = np.zeros((batch_size, cfg.image_size, cfg.image_size, 3), np.uint8)
  start = time.perf_counter()
  copies = 10
  for _ in range(copies):
    jax.device_put(images_).block_until_ready()
  copy_ms = (time.perf_counter() - start) / copies * 1e3

  def run(batch):
    out, _ = fn(rng, jax.device_put(batch['image']))
    out.block_until_ready()

  rate = _rate(pipeline.make_train_iterator(cfg, source, batch_size, seed=0), num_batches, 2, run)
  return {'with_augment_images_per_s': rate, 'augment_device': jax.devices()[0].platform,
          'host_to_device_ms_per_batch': copy_ms,
          'host_to_device_mb_per_s': images_.nbytes / 2**20 / (copy_ms / 1e3)}


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='synthetic_fundus',
                      help="a drjax dataset, or 'eyepacs_standin' (benchmarks/common.py)")
  parser.add_argument('--manual_dir', default='')
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'drjax_bench'))
  parser.add_argument('--image_size', type=int, default=224, help='what the model gets')
  parser.add_argument('--stored_size', type=int, default=0,
                      help='side of the stored images (0: --image_size)')
  parser.add_argument('--num_images', type=int, default=256,
                      help='synthetic_fundus and eyepacs_standin')
  parser.add_argument('--unique_images', type=int, default=64, help='eyepacs_standin')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_batches', type=int, default=20)
  parser.add_argument('--stage_images', type=int, default=64)
  parser.add_argument('--threads', default=None,
                      help='reader thread counts to time, each pinned to as many cores '
                           '(default: 1 and all cores)')
  parser.add_argument('--reader_processes', type=int, default=0,
                      help='also time `after` read in this many grain processes')
  parser.add_argument('--no_augment', action='store_true')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--quick', action='store_true',
                      help='64 images at 64 px, 5 timed batches of 16, 1 reader thread')
  args = parser.parse_args()
  if args.quick:
    args.image_size, args.num_images, args.batch_size, args.num_batches = 64, 64, 16, 5
    args.threads, args.stage_images = '1', 16
  if args.threads is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    args.threads = ','.join(str(t) for t in sorted({1, cores}))
  return args


def main():
  args = _parse_args()
  cfg = pipeline.default_config()
  cfg.update(dict(dataset=args.dataset, manual_dir=args.manual_dir, data_dir=args.data_dir,
                  image_size=args.image_size, stored_size=args.stored_size,
                  num_images=args.num_images, val_fraction=0.0))
  t0 = time.perf_counter()
  if args.dataset == 'eyepacs_standin':
    cfg.update(common.eyepacs_standin(args.data_dir, args.num_images,
                                      args.stored_size or args.image_size, args.unique_images))
  ds = pipeline.get_dataset(cfg)
  prepare_s = time.perf_counter() - t0
  feature = ds.builder.info.features['image']
  what = (f'{args.dataset} {pipeline.stored_size(cfg)}->{cfg.image_size}px '
          f'({feature.encoding_format})')
  print(what, flush=True)

  stage_ms = stages(cfg, ds.train, ds.builder, args.stage_images)
  print({k: round(v, 4) for k, v in stage_ms.items()}, flush=True)
  threads = [int(t) for t in args.threads.split(',')]
  rows = read_paths(cfg, ds.train, threads, args.batch_size, args.num_batches,
                    args.reader_processes)
  device = {} if args.no_augment else with_augment(cfg, ds.train, args.batch_size,
                                                   args.num_batches)
  one_thread = [r for r in rows if r['read_path'] == 'after' and r['threads'] == 1]
  if one_thread:  # what grain adds to a read on one thread: batching, threads, prefetch
    stage_ms['grain_overhead_ms'] = 1e3 / one_thread[0]['images_per_s'] - stage_ms['load_after_ms']

  info = common.machine()
  cpu = f"{info.get('cpu_model', '?')} ({info['cpu_count']} cores)"
  lines = ['| benchmark | data | batch | read path | reader threads (cores) | host CPU | '
           'img/s | img/s per core |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    per = r['images_per_s_per_core']
    lines.append(f"| pipeline | {what} | {args.batch_size} | {r['read_path']} | "
                 f"{r['threads']} ({r['cores'] or '?'}) | {cpu} | {r['images_per_s']:.0f} | "
                 f"{'n/a' if per is None else f'{per:.0f}'} |")
  payload = {'benchmark': 'bench_pipeline', 'description': what, 'dataset': args.dataset,
             'image_size': cfg.image_size, 'stored_size': pipeline.stored_size(cfg),
             'encoding': feature.encoding_format, 'num_examples': len(ds.train),
             'batch_size': args.batch_size, 'num_batches': args.num_batches,
             'prepare_s': prepare_s, 'stages_ms_per_image': stage_ms, 'rows': rows,
             **device, 'peak_rss_mib': common.peak_rss_mib(), 'args': vars(args),
             'machine': info, 'versions': common.versions(), 'readme': '\n'.join(lines),
             'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
  name = f'bench_pipeline_{args.dataset}_{pipeline.stored_size(cfg)}to{cfg.image_size}'
  path = common.write_json(name + ('_quick' if args.quick else ''), payload, args.out_dir)
  print('\n'.join(lines))
  if device:
    print(f"+ augment on {device['augment_device']}: "
          f"{device['with_augment_images_per_s']:.0f} img/s")
  print(f'peak RSS {payload["peak_rss_mib"]:.0f} MiB; wrote {path}')


if __name__ == '__main__':
  main()
