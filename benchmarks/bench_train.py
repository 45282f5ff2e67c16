"""Train throughput of the paper's fine-tuning step, drjax vs PyTorch, same machine, same threads.

  python benchmarks/bench_train.py --quick            # densenet121, batch 16 (~1-2 min)
  python benchmarks/bench_train.py                    # densenet121/resnet101/vgg16 x batch 16/64
  python benchmarks/bench_train.py --threads=1        # both sides on one core
  python benchmarks/bench_train.py --device=gpu --precision=bf16   # bf16 vs PyTorch AMP

One step = forward, cross-entropy, backward through the trainable layers only, Adam update
(see benchmarks/workloads.py for exactly what each side runs). images/s = batch / median
step time after warm-up; each measurement in its own process (benchmarks/common.py).
Writes benchmarks/results/bench_train*.json and prints the README table lines.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser)
  parser.add_argument('--torch_channels_last', action='store_true',
                      help='also give PyTorch channels_last memory format (not the default '
                           'user code; often faster on GPU)')
  args = parser.parse_args()
  if args.worker:
    from benchmarks import workloads
    spec = json.loads(args.worker)
    common.emit(workloads.worker(spec, mode='train'))
    return
  common.run_benchmark(os.path.abspath(__file__), 'bench_train', 'train', args)


if __name__ == '__main__':
  main()
