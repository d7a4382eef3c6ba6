"""The command-line flags scripts/benchmark.py and benchmarks/profile_step.py share.

Both time the same pretraining step, so they read its config, batch size, compute dtype
and host malloc setting the same way. Importing this module defines the flags (absl).
"""

from __future__ import annotations

import os

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from tcvm_jax import host_memory

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO_ROOT, "configs", "pretrain.py"),
    "Pretraining config file (with an optional ':preset'); any field can be overridden "
    "(`--config.data.num_frames=8`).", lock_config=False)
BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: config's).")
DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                          "Compute dtype (default: config.model.dtype).")
HOST_MEMORY = flags.DEFINE_enum(
    "host_memory", "auto", host_memory.MODES,
    "Host malloc settings (tcvm_jax/host_memory.py): 'auto' retains freed memory when JAX "
    "runs on the CPU, as `python -m tcvm_jax.main` does. scripts/benchmark.py gives its "
    "torch reference and scaling runs the same setting.")


def config_from_flags() -> ml_collections.ConfigDict:
  """--config with --batch_size and --dtype applied; a usage error for a batch below 1."""
  config = CONFIG.value
  if BATCH_SIZE.value is not None:
    config.batch_size = BATCH_SIZE.value
  if DTYPE.value is not None:
    config.model.dtype = DTYPE.value
  if config.batch_size < 1:
    raise app.UsageError(f"--batch_size={config.batch_size} must be >= 1.")
  return config
