"""Input pipeline throughput: images/s of read + decode (+ on-device augmentation).

  python benchmarks/bench_pipeline.py                          # synthetic_fundus 224 px
  python benchmarks/bench_pipeline.py --dataset idrid --manual_dir ../shared/data/idrid \
      --image_size 512 --threads 1,4,8

Builds the dataset if needed (into --data_dir), then times `pipeline.make_train_iterator`
(ArrayRecord read, PNG/JPEG decode, oversampling, batching on reader threads) and the same
stream followed by `drjax.data.augment` (jitted, on the default JAX device, blocking on each
batch). The pipeline must never be what training waits on: compare with bench_train.py's
images/s on the same machine. Writes benchmarks/results/bench_pipeline_*.json and prints the
README table lines.
"""

import argparse
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from drjax.data import pipeline  # noqa: E402


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='synthetic_fundus')
  parser.add_argument('--manual_dir', default='')
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'drjax_bench'))
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_images', type=int, default=256, help='synthetic_fundus only')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_batches', type=int, default=20)
  parser.add_argument('--threads', default='1,4,8', help='reader thread counts to time')
  parser.add_argument('--no_augment', action='store_true')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--quick', action='store_true',
                      help='64 images at 64 px, 5 timed batches of 16, 1 reader thread')
  args = parser.parse_args()
  if args.quick:
    args.image_size, args.num_images, args.batch_size, args.num_batches = 64, 64, 16, 5
    args.threads = '1'

  cfg = pipeline.default_config()
  cfg.update(dict(dataset=args.dataset, manual_dir=args.manual_dir, data_dir=args.data_dir,
                  image_size=args.image_size, num_images=args.num_images, val_fraction=0.0))
  t0 = time.perf_counter()
  ds = pipeline.get_dataset(cfg)
  prepare_s = time.perf_counter() - t0
  n = len(ds.train)

  # One thread, no grain: the per-image cost of reading + decoding a record.
  idx = np.random.default_rng(0).integers(0, n, 64)
  start = time.perf_counter()
  for i in idx:
    ds.train.get(int(i), with_masks=False)
  decode_ms = (time.perf_counter() - start) / len(idx) * 1e3

  augment_fn, device = None, 'none'
  if not args.no_augment:
    try:
      import jax

      from drjax.data import augment
    except ImportError:
      augment = None
    if augment is not None:
      fn = augment.make_augment_fn(augment.default_config())
      rng = jax.random.key(0)
      device = jax.devices()[0].platform

      def augment_fn(batch):
        out, _ = fn(rng, jax.device_put(batch['image']))
        out.block_until_ready()

  rows = []
  for threads in [int(t) for t in args.threads.split(',')]:
    cfg.num_workers = threads
    cfg.prefetch = max(threads, 2)
    make = lambda: pipeline.make_train_iterator(cfg, ds.train, args.batch_size, seed=0)  # noqa: B023
    row = {'threads': threads,
           'read_decode_images_per_s': _rate(make(), args.num_batches, 2)}
    if augment_fn is not None:
      row['with_augment_images_per_s'] = _rate(make(), args.num_batches, 2, augment_fn)
    rows.append(row)
    print(row, flush=True)

  what = f'{args.dataset} {args.image_size}px ({ds.builder.info.features["image"].encoding_format})'
  info = common.machine()
  cpu = f"{info.get('cpu_model', '?')} ({info['cpu_count']} cores)"
  lines = ['| benchmark | data | batch | reader threads | host CPU | read+decode img/s | '
           '+ augment img/s (device) | decode ms/img (1 thread) |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    aug = r.get('with_augment_images_per_s')
    lines.append(f"| pipeline | {what} | {args.batch_size} | {r['threads']} | {cpu} | "
                 f"{r['read_decode_images_per_s']:.0f} | "
                 f"{f'{aug:.0f} ({device})' if aug else 'n/a'} | {decode_ms:.2f} |")
  payload = {'benchmark': 'bench_pipeline', 'dataset': args.dataset,
             'image_size': args.image_size, 'num_examples': n, 'batch_size': args.batch_size,
             'num_batches': args.num_batches, 'prepare_s': prepare_s,
             'peak_rss_mib': common.peak_rss_mib(),
             'decode_ms_per_image_1_thread': decode_ms, 'augment_device': device, 'rows': rows,
             'machine': info, 'versions': common.versions()}
  path = common.write_json(f'bench_pipeline_{args.dataset}_{args.image_size}', payload,
                           args.out_dir)
  print('\n'.join(lines))
  print(f'peak RSS {payload["peak_rss_mib"]:.0f} MiB; wrote {path}')


if __name__ == '__main__':
  main()
