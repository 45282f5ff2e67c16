"""Process set-up shared by drjax's scripts, and how they report a user's mistakes.

Every script runs `runtime.run(main)` instead of absl's `app.run(main)`: after the flags are
parsed and before `main` touches jax, `setup()` keeps compiled programs on disk and orbax's INFO
logs out of stderr; a `drjax.errors.UserError` from `main` becomes one line on stderr and exit
status 1. In a notebook, call `setup()` yourself before the first jax computation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import platform
import sys
from collections.abc import Callable, Sequence

from absl import app

from drjax import errors

CACHE_ENV_VAR = 'DRJAX_COMPILATION_CACHE'
# jax's least-recently-used eviction keeps the compilation cache under this size.
CACHE_MAX_BYTES = 2 << 30


def run(main: Callable[[Sequence[str]], int | None]) -> None:
  """absl's `app.run(main)`, with `setup()` first and user errors as one line.

  Flag errors (an unknown flag, a bad value, a config file or variant that cannot be loaded)
  are one line too, where absl would print the config file's traceback.
  """

  def main_with_setup(argv):
    setup()
    try:
      return main(argv)
    except errors.UserError as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      return 1

  app.run(main_with_setup, flags_parser=_parse_flags)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a user's flag mistake as one `error:` line and exit status 1."""
  from absl import flags

  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with_error(flag_error_line(str(e)))
  except KeyError as e:  # ml_collections' unknown `--config.FIELD`, with its did-you-mean
    _exit_with_error(f'unknown config field: {" ".join(str(e.args[0]).split())}')
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    # ml_collections defers a config file it cannot read to the first use of the config.
    if type(value).__name__ == '_ErrorConfig':
      try:
        value.lock()
      except OSError as e:
        _exit_with_error(f'flag --{name}: cannot load the config file: '
                         f'{str(e).strip().splitlines()[-1].strip()}')
  return argv


def _exit_with_error(line: str) -> None:
  print(f'error: {line}', file=sys.stderr, flush=True)
  sys.exit(1)


def flag_error_line(message: str) -> str:
  """One line for absl's flag error `message`.

  ml_collections puts the config file's whole traceback into the message of an error raised
  by `get_config` (a misspelt variant, a bad value): the flag and the exception's own line
  are what the user needs.
  """
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if 'Traceback (most recent call last):' not in lines:
    return ' '.join(lines)
  flag = lines[0].split('Error whilst parsing config file')[0].strip()
  last = lines[-1]
  kind, sep, text = last.partition(': ')
  if sep and kind.replace('.', '').replace('_', '').isalnum() and kind.endswith(('Error',
                                                                                 'Exception')):
    last = text
  return f'{flag} {last}'.strip()


def setup() -> None:
  """What every script does before its first jax computation."""
  from drjax import checkpoint  # imports orbax, which the scripts need anyway

  enable_compilation_cache()
  checkpoint.quiet_orbax_info_logs()


def cache_root() -> pathlib.Path:
  """drjax's cache folder: `$DRJAX_CACHE`, else ~/.cache/drjax (converted weights, programs)."""
  return pathlib.Path(os.environ.get('DRJAX_CACHE') or
                      pathlib.Path.home() / '.cache' / 'drjax').expanduser()


def default_compilation_cache_dir() -> pathlib.Path:
  """`cache_root()`/xla/<this processor>.

  XLA:CPU compiles for the processor it runs on and jax's cache key does not name the CPU's
  features, so each kind of processor gets its own folder.
  """
  described = [platform.machine(), platform.processor()]
  try:
    with open('/proc/cpuinfo') as f:
      described += sorted({line.strip() for line in f
                           if line.startswith(('model name', 'flags', 'Features'))})
  except OSError:
    pass
  return cache_root() / 'xla' / hashlib.sha256('\n'.join(described).encode()).hexdigest()[:12]


def enable_compilation_cache() -> str | None:
  """Keeps jax's compiled programs on disk, so that the next run of them skips compiling.

  jax's persistent compilation cache in `$DRJAX_COMPILATION_CACHE`, else in
  `default_compilation_cache_dir()`; `DRJAX_COMPILATION_CACHE=0` turns it off, and a cache
  the user set up for jax (`JAX_COMPILATION_CACHE_DIR`) is left as it is. It holds at most
  `CACHE_MAX_BYTES`; a damaged entry is reported by jax as a warning and compiled again.

  Returns:
    The cache directory in use, or None (turned off, or the folder could not be created,
    which is logged as a warning).
  """
  import jax

  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  value = os.environ.get(CACHE_ENV_VAR, '').strip()
  if value.lower() in ('0', 'false', 'no', 'off'):
    return None
  path = pathlib.Path(value).expanduser() if value else default_compilation_cache_dir()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning('Cannot create the compilation cache %s (%s); compiling without one.',
                    path, e)
    return None
  jax.config.update('jax_compilation_cache_dir', str(path))
  if jax.config.jax_compilation_cache_max_size == -1:  # jax's default: no limit
    jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  logging.info('Compiled programs are cached in %s (%s=0 turns this off).', path, CACHE_ENV_VAR)
  return str(path)
