"""Multi-process (multi-host) training on JAX's own distributed runtime (`jax.distributed`).

One process per host (or per GPU under Slurm) runs the same `scripts/train.py`;
`initialize` joins them into one JAX runtime before anything touches a device.
After that `jax.devices()` lists every device of every process, the train step is
the same `jax.jit` over one global `Mesh` (batch on 'data', state replicated, so
XLA all-reduces the trainable gradients), each process reads its own rows of
every global batch (`drjax.data.pipeline`, `process_index`/`process_count`) and
`jax.make_array_from_process_local_data` assembles the global batch.

Failure model: JAX's coordination service (hosted by process 0) watches every
process's heartbeat. When a process dies, a collective on the others does not
return (gloo waits for the missing peer), so the service is what stops them:
within `heartbeat_timeout_seconds` each survivor aborts with "Terminating process
because the JAX distributed service detected fatal errors ... another task
died" (immediately, when process 0, the coordinator, is the one that died). A
Python exception in one process is turned into a prompt exit of that process
(`peer_failure_context`), because a clean interpreter exit would wait at JAX's
shutdown barrier for peers that are themselves blocked on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from drjax import errors

T = TypeVar('T')

# JAX's own defaults; a dead peer is noticed after DEFAULT_HEARTBEAT_TIMEOUT seconds.
DEFAULT_HEARTBEAT_TIMEOUT = 100
DEFAULT_INITIALIZATION_TIMEOUT = 300
DEFAULT_SHUTDOWN_TIMEOUT = 300
# Waiting for process 0 to build a dataset (EyePACS: hours) is legitimate.
DEFAULT_BARRIER_TIMEOUT = 24 * 3600

_MODES = ('auto', 'on', 'off')

# Environment variables read when the corresponding argument/flag is unset.
ENV_COORDINATOR = 'DRJAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'DRJAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'DRJAX_PROCESS_ID'


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was asked to run (from flags, environment or cluster launcher).

  Attributes:
    coordinator_address: 'host:port' of process 0's coordination service, or
      None to let `jax.distributed.initialize` detect it (Slurm, Open MPI, ...).
    num_processes: total number of processes, or None (detect).
    process_id: this process's rank in [0, num_processes), or None (detect).
    launcher: 'flags', 'slurm', 'openmpi' or None (a plain single process).
  """
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  launcher: str | None


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError as e:
    raise errors.ConfigError(f'{name}={value!r} is not an integer') from e


def _cluster_task_count(environ: Mapping[str, str]) -> tuple[str | None, int]:
  """(launcher, number of tasks) of a Slurm `srun` or Open MPI `mpirun` launch, else (None, 1).

  The Slurm test is the one `jax.distributed` uses to auto-detect Slurm, so a
  process that drjax treats as a Slurm task is also one JAX can configure.
  """
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(k in environ for k in slurm):
    return 'slurm', int(environ['SLURM_NTASKS'])
  if 'OMPI_COMM_WORLD_SIZE' in environ and 'OMPI_MCA_orte_hnp_uri' in environ:
    return 'openmpi', int(environ['OMPI_COMM_WORLD_SIZE'])
  return None, 1


def resolve_launch(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None,
                   environ: Mapping[str, str] | None = None) -> Launch:
  """Merges explicit arguments, DRJAX_* variables and a detected cluster launch.

  Explicit arguments win over `DRJAX_COORDINATOR_ADDRESS`, `DRJAX_NUM_PROCESSES`
  and `DRJAX_PROCESS_ID`; what is still unset is left to JAX's cluster detection.

  Returns:
    A `Launch`; `launcher` is None when nothing asks for more than one process.
  """
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR, '').strip() or None
  if num_processes is None:
    num_processes = _env_int(environ, ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(environ, ENV_PROCESS_ID)
  if num_processes is not None and num_processes < 1:
    raise errors.ConfigError(f'num_processes must be >= 1, got {num_processes}')
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise errors.ConfigError(f'process_id must be in [0, {num_processes}), got {process_id}')
  if num_processes == 1:
    return Launch(coordinator_address, 1, process_id, None)
  if (num_processes or 0) > 1 or coordinator_address is not None:
    if num_processes is not None and coordinator_address is None and \
        _cluster_task_count(environ)[0] is None:
      raise errors.ConfigError(f'num_processes={num_processes} needs --coordinator_address '
                               f'host:port (or {ENV_COORDINATOR}) outside Slurm/Open MPI.')
    return Launch(coordinator_address, num_processes, process_id, 'flags')
  launcher, tasks = _cluster_task_count(environ)
  if tasks > 1:
    return Launch(None, None, None, launcher)
  return Launch(None, None, None, None)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = 'auto',
               heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT,
               initialization_timeout_seconds: int = DEFAULT_INITIALIZATION_TIMEOUT,
               shutdown_timeout_seconds: int = DEFAULT_SHUTDOWN_TIMEOUT,
               environ: Mapping[str, str] | None = None) -> bool:
  """Joins this process to a multi-process JAX run when it is launched as one.

  Must run before any JAX computation or `jax.devices()` call.

  Args:
    coordinator_address, num_processes, process_id: see `resolve_launch`.
    mode: 'auto' initialises when `resolve_launch` finds more than one process
      (flags, DRJAX_* variables, `srun` with several tasks, `mpirun`); 'on'
      always calls `jax.distributed.initialize` (JAX then detects e.g. TPU pods
      or Kubernetes); 'off' never does.
    heartbeat_timeout_seconds: a process silent this long is declared dead and
      the others are stopped with an error instead of waiting forever.
    initialization_timeout_seconds: how long to wait for every process to connect.
    shutdown_timeout_seconds: how long a finished process waits for the others
      at exit.
    environ: environment to read (default `os.environ`).

  Returns:
    True when running as several processes (or with mode='on'), False for a
    plain single-process run.

  Raises:
    RuntimeError: the processes could not connect (the message says what to check).
  """
  if mode not in _MODES:
    raise errors.ConfigError(f'mode must be one of {_MODES}, got {mode!r}')
  if jax.distributed.is_initialized():
    return True
  if mode == 'off':
    return False
  launch = resolve_launch(coordinator_address, num_processes, process_id, environ)
  if launch.launcher is None and mode == 'auto':
    return False
  # Cross-process collectives on CPU need a transport; gloo (TCP) ships with
  # jaxlib. Harmless on GPU/TPU, whose collectives are NCCL/ICI.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = launch.coordinator_address or '(auto-detected)'
  try:
    jax.distributed.initialize(
        launch.coordinator_address, launch.num_processes, launch.process_id,
        initialization_timeout=initialization_timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        shutdown_timeout_seconds=shutdown_timeout_seconds)
  except Exception as e:
    raise RuntimeError(
        f'drjax: could not join the multi-process run (coordinator {where}, '
        f'num_processes={launch.num_processes}, process_id={launch.process_id}, launcher '
        f'{launch.launcher}): {type(e).__name__}: {e}\nEvery process must get the same '
        '--coordinator_address (host:port of process 0, reachable from all hosts) and '
        '--num_processes, and a distinct --process_id in 0..N-1; all must start within '
        f'--initialization_timeout={initialization_timeout_seconds}s.') from e
  if jax.default_backend() == 'cpu' and jax.process_count() > 1:
    # XLA's gloo gives the processes 30 s to meet when it first connects a set of
    # devices; later collectives on that set wait as long as needed (a dead peer
    # is the heartbeat's job). Connect now, while initialize has just aligned the
    # processes, rather than at the first train step, which a process that
    # compiles 30 s slower than the others would miss.
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices('drjax: connect gloo')
  message = (f'drjax: process {jax.process_index()} of {jax.process_count()} '
             f'(coordinator {where}, {jax.local_device_count()} local / {jax.device_count()} '
             f'global {jax.default_backend()} devices). A process silent for '
             f'{heartbeat_timeout_seconds}s is declared dead and the others then stop with '
             '"JAX distributed service detected fatal errors".')
  logging.info(message)
  print(message, flush=True)
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and figures."""
  return jax.process_index() == 0


def global_devices() -> list[jax.Device]:
  """All devices, process-major: process p's devices hold rows [p*b, (p+1)*b) of a batch.

  This is the layout `drjax.data.pipeline` assumes (process p reads rows
  [p * B/P, (p + 1) * B/P) of every global batch), so a 1-D mesh over this list
  sees the same global batch whatever the number of processes.
  """
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def _client():
  from jax._src import distributed as jax_distributed  # noqa: PLC0415 - orbax uses it too

  return jax_distributed.global_state.client


def barrier(name: str, timeout_seconds: int = DEFAULT_BARRIER_TIMEOUT) -> None:
  """Blocks until every process reached `barrier(name)`; a no-op in a single process.

  Uses the coordination service's barrier, not a device collective, so that a
  long wait (process 0 building a dataset) has its own timeout and a dead
  peer is still reported by the heartbeat.
  """
  if jax.process_count() == 1:
    return
  _client().wait_at_barrier(f'drjax/{name}', timeout_in_ms=int(timeout_seconds * 1000))


def process_zero_first(fn: Callable[[], T], name: str,
                       timeout_seconds: int = DEFAULT_BARRIER_TIMEOUT) -> T:
  """Runs `fn` on process 0, then on the others.

  For work with a shared on-disk side effect, e.g. building a tfds dataset or
  filling a cache: process 0 writes it, the others then only read it.
  """
  if jax.process_count() == 1:
    return fn()
  result = fn() if is_main_process() else None
  barrier(f'{name}/process_zero_done', timeout_seconds)
  return result if is_main_process() else fn()


def broadcast_str(name: str, value: str, timeout_seconds: int = 600) -> str:
  """Process 0's `value` on every process (e.g. a default workdir's timestamp)."""
  if jax.process_count() == 1:
    return value
  key = f'drjax/broadcast/{name}'
  if is_main_process():
    _client().key_value_set(key, value)
    return value
  return _client().blocking_key_value_get(key, int(timeout_seconds * 1000))


def gather_rows(x: Any) -> np.ndarray:
  """Concatenates every process's host-local rows along axis 0, in process order.

  Args:
    x: host-local array [b, ...] (same shape on every process).

  Returns:
    [P * b, ...], the rows of process 0 first; `x` itself in a single process.
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def collective_failed(e: BaseException) -> bool:
  """Whether `e` is a failed collective, which in a multi-process run means a lost peer."""
  # Host-side collectives (multihost_utils over gloo) raise a plain ValueError.
  return isinstance(e, jax.errors.JaxRuntimeError) or (
      isinstance(e, (ValueError, RuntimeError))
      and any(m in str(e) for m in ('Gloo', 'gloo', 'Connection closed by peer')))


@contextlib.contextmanager
def peer_failure_context() -> Iterator[None]:
  """Makes an error in one process of a multi-process run end it promptly and clearly.

  In a single process this does nothing. In several, an exception is printed
  with the process rank and the process exits at once with status 1: a normal
  interpreter exit would first wait (up to the shutdown timeout) at JAX's
  shutdown barrier for peers that are blocked in a collective waiting for this
  one. The peers then stop through the coordination service's heartbeat check.
  A collective that itself fails (gloo: "Connection closed by peer") is
  reported as the likely death of another process.
  """
  try:
    yield
  except BaseException as e:  # noqa: BLE001 - every exit path of a multi-process run
    if not jax.distributed.is_initialized() or isinstance(e, SystemExit) and not e.code:
      raise
    rank = f'process {jax.process_index()} of {jax.process_count()}'
    if collective_failed(e):
      headline = (f'drjax: a collective failed on {rank}: another process probably died or '
                  'lost its network connection; see its log for the first error.')
    else:
      headline = f'drjax: {rank} failed with {type(e).__name__}; stopping this process.'
    traceback.print_exc()
    print(f'{headline}\n  {type(e).__name__}: {str(e)[:2000]}', file=sys.stderr, flush=True)
    logging.error('%s %s: %s', headline, type(e).__name__, e)
    sys.stdout.flush()
    os._exit(1)
