r"""Runs a grid of scripts/train.py overrides, one workdir each, and tabulates the results.

  python scripts/sweep.py --root=/tmp/sweep \
    --grid='config=configs/densenet.py,configs/resnet.py,configs/vgg.py' \
    --grid='config.optimizer.lr=1e-4,3e-4'

  python scripts/sweep.py --root=/tmp/paper --sweep=configs/sweeps/paper.py

Re-running the same command skips finished runs (resume). A failed run is reported and the
others continue; the exit status is 1 if any run failed. The summary is written to
ROOT/summary.md and ROOT/summary.csv (`--aggregate_only` just rewrites it).
"""


from absl import app, flags

from drjax import runtime, sweep

_ROOT = flags.DEFINE_string('root', None, 'Directory holding one workdir per run.',
                            required=True)
_GRID = flags.DEFINE_multi_string(
    'grid', [], "An axis 'key=v1,v2,...' (config=FILE[:ARG] or config.FIELD=...); repeatable.")
_SWEEP = flags.DEFINE_string('sweep', None, 'A sweep file defining get_sweep() (configs/sweeps/).')
_TRAIN_SCRIPT = flags.DEFINE_string('train_script', 'scripts/train.py', 'The training entry point.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs at a time.')
_TIMEOUT = flags.DEFINE_float('timeout_s', None, 'Per-run time limit in seconds.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands only.')
_AGGREGATE_ONLY = flags.DEFINE_bool('aggregate_only', False,
                                    'Only rewrite the summary of the runs under --root.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _AGGREGATE_ONLY.value:
    print(sweep.write_summary(_ROOT.value)['text'])
    return 0
  overrides = sweep.load_sweep_file(_SWEEP.value) if _SWEEP.value else []
  if _GRID.value:
    grid = sweep.expand_grid(sweep.parse_grid(_GRID.value))
    # A grid next to a sweep file multiplies it (e.g. the paper's sweep at two lrs).
    overrides = [{**o, **g} for o in overrides or [{}] for g in grid]
  if not overrides:
    raise app.UsageError('give --grid and/or --sweep')
  runs = sweep.plan(overrides, _ROOT.value)
  if _DRY_RUN.value:
    for run in runs:
      print(' '.join(sweep.train_command(run, _TRAIN_SCRIPT.value)))
    return 0
  results = sweep.run_sweep(runs, train_script=_TRAIN_SCRIPT.value, parallel=_PARALLEL.value,
                            timeout_s=_TIMEOUT.value)
  summary = sweep.write_summary(_ROOT.value, [r.workdir for r in runs], results)
  print(summary['text'])
  print(f"summary: {summary['markdown']} {summary['csv']}")
  return 1 if any(r.status == 'failed' for r in results) else 0


if __name__ == '__main__':
  runtime.run(main)
