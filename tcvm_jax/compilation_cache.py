"""JAX's persistent compilation cache for the command-line jobs (tcvm_jax/main.py).

A rerun or a resumed run then loads the compiled step instead of compiling it again
(R3D50's step: ~45 s on a GPU; the demo's first step: 12.6 -> 2.7 s on a 2-core CPU).
"""

from __future__ import annotations

import os


def default_directory() -> str:
  """$XDG_CACHE_HOME/tcvm_jax/xla, by default ~/.cache/tcvm_jax/xla."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
  return os.path.join(cache_home, "tcvm_jax", "xla")


def enable(path: str | None) -> str | None:
  """Points JAX's persistent compilation cache at `path` (None: the default above; an
  already set JAX_COMPILATION_CACHE_DIR wins, jax reads it itself; '': off). Returns the
  directory in use, or None."""
  if path == "":
    return None
  if path is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  import jax  # pylint: disable=g-import-not-at-top
  path = path or default_directory()
  jax.config.update("jax_compilation_cache_dir", path)
  return path
