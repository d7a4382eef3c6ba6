"""Keeps freed host memory in the process so XLA:CPU's step buffers are not re-faulted.

On the CPU backend XLA allocates each step's temporary buffer with malloc (143 MiB for the
demo preset's step). glibc serves such large blocks with a fresh `mmap` and unmaps them on
`free`, so every step the kernel maps and zeroes that memory again, page by page. Measured
on the 2-core CI-class machine (demo step, 20 steps): 137 MiB of page faults and 64 ms of
kernel time per ~150 ms step; with the settings below 6-26 MiB and 7-14 ms, and the step
10-25 ms faster (docs/performance.md), at the price of a larger resident size (1.6 GiB
instead of 1.0 GiB, stable over 150 steps).

The settings (glibc `mallopt`): one malloc arena (a non-main arena would still mmap blocks
above 64 MiB), no mmap for large blocks, and no trimming of the heap below 2 GiB of free
space. They must be set before JAX starts its CPU client: the thread that runs the
program keeps the arena it got at its first allocation. Elsewhere (GPU or TPU training,
musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import platform
import sys

MODES = ("auto", "retain", "release")

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: the largest it accepts.


def _is_glibc_linux() -> bool:
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def accelerator_expected() -> bool:
  """Whether JAX will pick a GPU/TPU backend, judged without starting any backend.

  Reads `jax_platforms` (JAX_PLATFORMS) when set, else looks for what jax itself would
  load: PJRT plugins (the `jax_plugins` entry points and namespace package, e.g. the CUDA
  plugin) and libtpu.
  """
  platforms = _configured_platforms()
  if platforms:
    return platforms.split(",")[0].strip().lower() not in ("cpu", "")
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  import pkgutil  # pylint: disable=g-import-not-at-top
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def _configured_platforms() -> str | None:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.config.jax_platforms


def retain_freed_memory() -> bool:
  """Applies the settings above; False (and nothing changed) where libc is not glibc."""
  if not _is_glibc_linux():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def configure(mode: str = "auto") -> bool:
  """'retain': apply the settings; 'release': leave malloc as it is; 'auto': retain when
  the backend will be the CPU. Call before the first JAX computation. Returns whether the
  settings are in force."""
  if mode not in MODES:
    raise ValueError(f"host memory mode {mode!r}; choose from {MODES}.")
  if mode == "release" or (mode == "auto" and accelerator_expected()):
    return False
  return retain_freed_memory()
