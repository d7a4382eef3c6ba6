"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or environment.

Call `initialize(...)` before anything touches a JAX device. A process joins a
multi-process run when any of these asks for it (first match wins):

  1. flags: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`;
  2. environment: `JAX_COORDINATOR_ADDRESS` (read by JAX itself), with `JAX_NUM_PROCESSES`
     and `JAX_PROCESS_ID` (read here);
  3. a cluster JAX detects by itself (SLURM with several tasks, Open MPI), e.g. `srun`.

Otherwise the run is single-process and nothing is initialised. With several processes
the CPU backend needs a collectives implementation; we select gloo (harmless on GPU/TPU).
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"


def _int_or_none(value: str | int | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError as error:
    raise ValueError(f"{name}={value!r} must be an integer.") from error


def _cluster_detected() -> bool:
  """SLURM or Open MPI launched several tasks: JAX can find its own settings."""
  for variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if (_int_or_none(os.environ.get(variable), variable) or 1) > 1:
      return True
  return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Initialises multi-process JAX when asked to; returns whether it did."""
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS)
  if num_processes is None:
    num_processes = _int_or_none(os.environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_or_none(os.environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)

  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if not explicit and not _cluster_detected():
    return False
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if (num_processes is not None and process_id is not None
      and not 0 <= process_id < num_processes):
    raise ValueError(f"--process_id={process_id} must lie in [0, {num_processes - 1}] "
                     f"(--num_processes={num_processes}).")
  if explicit and num_processes == 1:
    return False  # One process: nothing to coordinate.
  # Only the CPU backend reads this; without it CPU processes cannot exchange data.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("JAX distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
