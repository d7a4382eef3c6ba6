"""tcvm_jax/compilation_cache.py: the persistent compilation cache of the main entry."""

from __future__ import annotations

import os

import jax
import pytest

from tcvm_jax import compilation_cache


@pytest.fixture
def restore_cache_dir():
  before = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def test_cache_defaults_to_the_user_cache_directory(monkeypatch, tmp_path, restore_cache_dir):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  expected = os.path.join(str(tmp_path), "tcvm_jax", "xla")
  assert compilation_cache.enable(None) == expected
  assert jax.config.jax_compilation_cache_dir == expected


def test_environment_variable_wins_and_empty_string_turns_it_off(monkeypatch, tmp_path,
                                                                  restore_cache_dir):
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "from_env"))
  assert compilation_cache.enable(None) == str(tmp_path / "from_env")
  assert jax.config.jax_compilation_cache_dir is None  # jax reads the variable itself
  assert compilation_cache.enable("") is None
  assert jax.config.jax_compilation_cache_dir is None
  explicit = str(tmp_path / "explicit")
  assert compilation_cache.enable(explicit) == explicit  # a flag beats the variable
  assert jax.config.jax_compilation_cache_dir == explicit
