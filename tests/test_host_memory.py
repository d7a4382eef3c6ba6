"""tcvm_jax/host_memory.py: the malloc settings that stop XLA:CPU's step buffers from being
page-faulted in again every step."""

import os
import subprocess
import sys
import textwrap

import pytest

from tcvm_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates a 64 MiB block with malloc (glibc serves it with mmap by default), writes every
# page and frees it, and prints the minor page faults per round after a warm-up round.
_FAULTS_CHILD = textwrap.dedent("""
    import ctypes, resource, sys
    from tcvm_jax import host_memory
    if sys.argv[1] == "retain":
      assert host_memory.configure("retain")
    else:
      assert not host_memory.configure("release")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20
    def one_round():
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      one_round()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def _faults_per_round(mode: str) -> float:
  completed = subprocess.run([sys.executable, "-c", _FAULTS_CHILD, mode], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120, check=True)
  return float(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory._is_glibc_linux(), reason="glibc malloc settings only")
def test_retained_memory_is_not_faulted_in_again():
  pages_per_round = 64 * 2**20 / os.sysconf("SC_PAGE_SIZE")
  # glibc's default: each round maps the block afresh and faults every page in.
  assert _faults_per_round("release") > 0.9 * pages_per_round
  # Retained: the freed block is reused from the heap, its pages still mapped.
  assert _faults_per_round("retain") < 0.05 * pages_per_round


def test_unknown_mode_is_an_error():
  with pytest.raises(ValueError, match="choose from"):
    host_memory.configure("keep")


def test_release_changes_nothing(monkeypatch):
  def fail():
    raise AssertionError("mallopt must not be called")
  monkeypatch.setattr(host_memory, "retain_freed_memory", fail)
  assert host_memory.configure("release") is False


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", True), ("cuda", False), ("tpu,cpu", False), ("cpu,cuda", True)])
def test_auto_retains_only_for_a_cpu_backend(monkeypatch, platforms, expected):
  calls = []
  monkeypatch.setattr(host_memory, "_configured_platforms", lambda: platforms)
  monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
  assert host_memory.configure("auto") is expected
  assert len(calls) == int(expected)


def test_auto_without_platforms_looks_for_accelerator_plugins(monkeypatch):
  monkeypatch.setattr(host_memory, "_configured_platforms", lambda: None)
  monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  assert host_memory.accelerator_expected()
  monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(host_memory.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setitem(sys.modules, "jax_plugins", None)  # `import jax_plugins` fails
  assert not host_memory.accelerator_expected()
