"""Orbax checkpoints of a training run: save, resume from the latest good step, check the run.

A step directory holds three items:
  * 'variables': `{'params', 'batch_stats'}`, what inference needs (`load_variables`);
  * 'train': `{'step', 'opt_state'}`, what resuming needs besides the variables;
  * 'meta': JSON (model name, num_classes, effective trainable patterns, weights
    source, data-iterator position), checked before any array is read, so that a
    workdir of another architecture is a clear error rather than a shape
    mismatch deep inside orbax.

Resume order (big_vision): the workdir's own latest checkpoint, else the
configured init. A latest step that fails to restore (truncated or missing
files) is moved aside to `<workdir>/corrupt_checkpoints/` with a warning and the
previous step is tried.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from drjax import errors

_ITEMS = ('variables', 'train', 'meta')

# Meta fields that must agree between a checkpoint and the run that resumes it.
COMPAT_KEYS = ('model', 'num_classes', 'config_trainable')


def quiet_orbax_info_logs() -> None:
  """Keeps orbax's INFO records out of the log; its warnings and errors still show.

  Orbax logs every phase of a save at INFO through absl, burying a run's own lines and its
  progress bar. `drjax.runtime.setup` calls this; absl's `--verbosity=1` (or more) lets them
  through again. Idempotent.
  """
  absl_logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _OrbaxInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxInfoFilter())


class _OrbaxInfoFilter(logging.Filter):
  """Drops records below WARNING logged from orbax's source files, unless verbosity >= 1."""

  _ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= 1
            or not os.path.abspath(record.pathname).startswith(self._ORBAX_DIR))


class IncompatibleCheckpointError(errors.UserError, ValueError):
  """The workdir's checkpoint belongs to a different model or recipe."""


class CheckpointError(errors.UserError, RuntimeError):
  """No checkpoint in the workdir could be restored."""


# Where orbax writes a step until it is complete and renamed: `<step>.orbax-checkpoint-tmp-<t>`.
_TMP_STEP_GLOB = '*' + ocp.path.atomicity_types.TMP_DIR_SUFFIX + '*'


def make_manager(directory: str | pathlib.Path, max_to_keep: int | None = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """CheckpointManager with the three items; saving steps is decided by the caller."""
  directory = pathlib.Path(directory).absolute()
  if not read_only and jax.process_index() == 0:
    remove_interrupted_saves(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, create=not read_only,
      read_only=read_only, save_interval_steps=0 if read_only else 1,
      # Done above instead: orbax's clean-up runs in a thread that `close` does not wait for,
      # which a process ending soon after (a config error) kills with a traceback.
      cleanup_tmp_directories=False)
  return ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)


def remove_interrupted_saves(directory: pathlib.Path) -> None:
  """Deletes the folders of saves that a killed process left unfinished (never valid steps)."""
  if directory.is_dir():
    for path in directory.glob(_TMP_STEP_GLOB):
      shutil.rmtree(path, ignore_errors=True)


def has_steps(directory: str | pathlib.Path) -> bool:
  """Whether `directory` holds a checkpoint step, without opening a manager on it."""
  directory = pathlib.Path(directory)
  return directory.is_dir() and bool(ocp.utils.checkpoint_steps(directory))


def save(manager: ocp.CheckpointManager, step: int, variables: Mapping[str, Any],
         train: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Starts an (asynchronous) save of `step`; orbax commits it atomically."""
  manager.save(step, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(dict(variables)),
      train=ocp.args.StandardSave(dict(train)),
      meta=ocp.args.JsonSave(dict(meta))), force=True)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON metadata of `step`."""
  return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])


def check_compatible(meta: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """Raises IncompatibleCheckpointError when `meta` disagrees with `expected` on COMPAT_KEYS."""
  diffs = []
  for key in COMPAT_KEYS:
    if key in expected and key in meta:
      have, want = meta[key], expected[key]
      if isinstance(have, list | tuple) and isinstance(want, list | tuple):
        have, want = list(have), list(want)
      if have != want:
        diffs.append(f'{key}: checkpoint has {have!r}, this run wants {want!r}')
  if diffs:
    raise IncompatibleCheckpointError(
        f'{where} holds a checkpoint of a different run ({"; ".join(diffs)}). '
        'Use a fresh --workdir for a different architecture or recipe, or delete the old one.')


def _move_aside(manager: ocp.CheckpointManager, step: int, workdir: pathlib.Path) -> None:
  src = pathlib.Path(manager.directory) / str(step)
  dst = workdir / 'corrupt_checkpoints' / f'{step}_{int(time.time())}'
  dst.parent.mkdir(parents=True, exist_ok=True)
  if src.exists():
    shutil.move(str(src), str(dst))
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager,
                   make_abstract: Callable[[dict], tuple[Any, Any]],
                   expected_meta: Mapping[str, Any], workdir: str | pathlib.Path
                   ) -> tuple[int, Any, Any, dict] | None:
  """Restores the newest readable step, or returns None when there is none.

  Args:
    manager: from `make_manager`.
    make_abstract: meta -> (abstract 'variables', abstract 'train'): pytrees of
      `jax.ShapeDtypeStruct` with shardings (the optimizer state's structure
      depends on the trainable patterns recorded in meta).
    expected_meta: this run's meta; COMPAT_KEYS must agree (checked on the
      newest step before any array is read).
    workdir: where corrupt steps are moved (`corrupt_checkpoints/`).

  Returns:
    `(step, variables, train, meta)` or None.

  Raises:
    IncompatibleCheckpointError: the checkpoint belongs to another model/recipe.
    CheckpointError: checkpoints exist but none could be restored.
  """
  workdir = pathlib.Path(workdir)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    try:
      meta = read_meta(manager, step)
    except Exception as e:  # noqa: BLE001 - any unreadable step is handled the same way
      meta, error = None, e
    if meta is not None:
      check_compatible(meta, expected_meta, f'{workdir}/checkpoints/{step}')
      abstract_variables, abstract_train = make_abstract(meta)
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(abstract_variables),
            train=ocp.args.StandardRestore(abstract_train)))
        jax.block_until_ready((restored['variables'], restored['train']))
        if failures:
          logging.warning('Resumed from step %d after skipping corrupt step(s) %s.', step,
                          [s for s, _ in failures])
        return step, restored['variables'], restored['train'], meta
      except Exception as e:  # noqa: BLE001
        error = e
    logging.warning('Checkpoint step %d in %s is unreadable (%s: %s); moving it to '
                    '%s/corrupt_checkpoints and trying the previous one.',
                    step, manager.directory, type(error).__name__, str(error)[:300], workdir)
    print(f'WARNING: checkpoint step {step} is corrupt ({type(error).__name__}); '
          'falling back to the previous one.', flush=True)
    failures.append((step, error))
    _move_aside(manager, step, workdir)
  raise CheckpointError(f'No checkpoint in {manager.directory} could be restored: '
                        f'{[(s, repr(e)[:200]) for s, e in failures]}')


def load_variables(directory: str | pathlib.Path, abstract_variables: Any,
                   step: int | None = None) -> tuple[int, Any, dict]:
  """Restores only 'variables' (and meta) of `step` (default: latest), for inference.

  Returns:
    `(step, variables, meta)`.
  """
  manager = make_manager(directory, max_to_keep=None, read_only=True)
  try:
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise CheckpointError(f'no checkpoint in {directory}')
    errors = []
    for s in steps:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(abstract_variables),
            meta=ocp.args.JsonRestore()))
        return s, restored['variables'], dict(restored['meta'])
      except Exception as e:  # noqa: BLE001
        logging.warning('Checkpoint step %d unreadable (%s); trying the previous one.', s, e)
        errors.append((s, e))
    raise CheckpointError(f'No checkpoint in {directory} could be restored: {errors}')
  finally:
    manager.close()
