"""The device mesh: one `data` axis over every device of every process.

The batch is sharded over `data`; parameters and optimizer state are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: all devices, all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  """Fails fast with a message naming the setting when the batch does not split evenly."""
  num_devices = mesh.shape[DATA_AXIS]
  if global_batch_size % num_devices:
    raise ValueError(
        f"config.batch_size={global_batch_size} is not divisible by the number of devices "
        f"({num_devices}); choose a multiple of {num_devices}.")


def host_batch_to_global(host_batch, mesh: Mesh):
  """Turns this process's slice of the batch into global `jax.Array`s sharded over `data`.

  `host_batch` is a pytree of NumPy arrays whose leading dimension is this process's share
  of the global batch (global batch / process count). Process p holds rows
  [p * local, (p + 1) * local) of the global batch, so one process with all devices and
  several processes with a few devices each see the same global array.
  """
  sharding = batch_sharding(mesh)
  num_processes = jax.process_count()

  def to_global(local_array):
    local_array = np.asarray(local_array)
    if local_array.ndim == 0:
      raise ValueError("host_batch_to_global needs arrays with a leading batch dimension.")
    num_local_devices = len(mesh.local_devices)
    if local_array.shape[0] % num_local_devices:
      raise ValueError(
          f"This process's batch of {local_array.shape[0]} does not split over its "
          f"{num_local_devices} local devices; config.batch_size must be a multiple of the "
          f"device count ({mesh.shape[DATA_AXIS]}).")
    global_shape = (local_array.shape[0] * num_processes,) + local_array.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_array, global_shape)

  return jax.tree.map(to_global, host_batch)
