"""The files of a run's workdir: the lock that keeps a second run out, and its metrics.

`workdir_lock` holds `workdir/.lock` while a run lives; `metric_writer` appends TensorBoard
scalars and `metrics.jsonl` lines, which `read_metrics_jsonl` reads back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping

from drjax import distributed, errors


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another live run holds the workdir's lock."""


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """Holds an exclusive lock on `workdir/.lock` for one run (process 0 only).

  Two runs writing one workdir would interleave checkpoints and metrics and overwrite each
  other's results. The lock is an flock, so the kernel drops it when its holder dies, even by
  SIGKILL: a killed run never blocks its resume.
  """
  if not distributed.is_main_process():
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / '.lock'
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      raise WorkdirBusyError(
          f'{workdir} is in use by another drjax run ({holder}). Wait for it to finish, '
          'stop it, or pass another --workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def metric_writer(workdir: pathlib.Path, start_step: int) -> Iterator[Callable[[int, dict],
                                                                              None]]:
  """Yields `write(step, scalars)`: TensorBoard scalars (tensorboardX) and a metrics.jsonl line.

  A resumed run replays the steps after its checkpoint, so their earlier lines and events
  are dropped. Processes other than 0 get a writer that writes nothing.
  """
  if not distributed.is_main_process():
    yield lambda step, scalars: None
    return
  import tensorboardX

  path = workdir / 'metrics.jsonl'
  if path.exists():
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)['step'] <= start_step]
    path.write_text(''.join(line + '\n' for line in kept))
  tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'), purge_step=start_step or None)

  def write(step: int, scalars: Mapping[str, float]) -> None:
    with path.open('a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    for k, v in scalars.items():
      tb.add_scalar(k, v, step)

  try:
    yield write
  finally:
    tb.close()


def read_metrics_jsonl(workdir: str | pathlib.Path) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`, one dict per line."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
