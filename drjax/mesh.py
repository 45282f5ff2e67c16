"""The one sharding model: a 1-D device mesh with the batch on its 'data' axis.

Batches are sharded on 'data', parameters and optimizer state replicated, and `jax.jit`
places the computation accordingly.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def shard_padded(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """`x [n, ...]` (one process's) sharded on its first axis over `mesh`.

  Padded to a multiple of the device count with copies of its last row (a real example, so
  nothing degenerate), whose results the caller drops.
  """
  pad = -len(x) % mesh.devices.size
  if pad:
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
  return jax.device_put(x, NamedSharding(mesh, P('data')))
