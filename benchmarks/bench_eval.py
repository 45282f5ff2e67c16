"""Evaluation (forward-only) throughput, drjax vs PyTorch, same machine, same threads.

  python benchmarks/bench_eval.py --quick             # densenet121, batch 16
  python benchmarks/bench_eval.py                     # densenet121/resnet101/vgg16 x batch 16/64
  python benchmarks/bench_eval.py --device=gpu --precision=bf16

One call = uint8 images -> class probabilities (drjax `train.eval_step`, jitted) vs
`model.eval()` + `torch.inference_mode()` + softmax on normalised tensors (see
benchmarks/workloads.py). Writes benchmarks/results/bench_eval*.json.
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
    common.emit(workloads.worker(spec, mode='eval'))
    return
  common.run_benchmark(os.path.abspath(__file__), 'bench_eval', 'eval', args)


if __name__ == '__main__':
  main()
