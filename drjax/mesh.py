"""The one sharding model: a 1-D device mesh with the batch on its 'data' axis.

Batches are sharded on 'data', parameters and optimizer state replicated, and `jax.jit`
places the computation accordingly.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from drjax import distributed


def make_mesh(devices=None) -> Mesh:
  """1-D mesh over all devices of all processes (process-major), axis 'data'."""
  devices = distributed.global_devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` on every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded on 'data' along axis 0."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                     ahead: int = 2) -> Iterator[dict[str, jax.Array]]:
  """`shard_batch` of each of `batches`, in order, with `ahead` more already sent.

  A batch's host-to-device copy is issued while the steps before it still run (jax
  dispatches both asynchronously), so a step need not wait for its input to arrive.
  `ahead=0` shards each batch only when it is asked for. The batches and their order are
  exactly those of `batches`; up to `ahead` batches past the last one taken are read.
  """
  batches = iter(batches)
  queue = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(batches, n):
      queue.append(shard_batch(batch, mesh))

  enqueue(max(0, ahead) + 1)
  while queue:
    yield queue.popleft()
    enqueue(1)


def shard_padded(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """`x [n, ...]` (one process's) sharded on its first axis over `mesh`.

  Padded to a multiple of the device count with copies of its last row (a real example, so
  nothing degenerate), whose results the caller drops.
  """
  pad = -len(x) % mesh.devices.size
  if pad:
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
  return jax.device_put(x, NamedSharding(mesh, P('data')))
