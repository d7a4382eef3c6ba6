"""Config files by path, as `python -m tcvm_jax.main --config=FILE[:preset]` names them.

For the trainer's follow-up evaluation and for scripts that parse their own arguments
(no absl config flags). Imports nothing heavy: benchmarks load configs with it on GPU
machines that have JAX but no TensorFlow, and `tcvm_jax.train` pulls TensorFlow in
through clu's metric writers where it is installed.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(path: str, preset: str = "") -> ml_collections.ConfigDict:
  """`get_config(preset)` of a config file; relative paths are tried from the working
  directory, then from the repository root (where `configs/` lives)."""
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(_REPO_ROOT, path)
  spec = importlib.util.spec_from_file_location(
      "_tcvm_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'path/to/config.py[:preset]' -> the config."""
  path, _, preset = spec.partition(":")
  return load_config_file(path, preset)
