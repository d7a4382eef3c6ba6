"""Shared helpers for the training tests: a tiny config and subprocess runners."""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO_ROOT, "tests", "train_helper.py")
# The demo config shrunk to a few-second step (8 frames in 2 clips, 32 px): the fields,
# then the same as command-line overrides for scripts/benchmark.py and the tools that run it.
TINY_BENCHMARK_FIELDS = {
    "data.num_frames": 8, "montage.num_clips": 2, "data.input_size": 40,
    "montage.output_size": 32, "model.ofc_hidden_dim": 32, "model.ofc_dim": 16}
TINY_BENCHMARK_OVERRIDES = [
    "--config=" + os.path.join(REPO_ROOT, "configs", "pretrain.py") + ":demo",
    *(f"--config.{field}={value}" for field, value in TINY_BENCHMARK_FIELDS.items())]


def gpu_session_variants(array_name: str) -> list[str]:
  """The NAME=FLAGS words of `scripts/gpu_session.sh`'s bash array `array_name` (LEVERS:
  the R3D50 A/B's, empty when no lever waits; TSM_TRITON_VARIANTS: TSM50's), split as
  bash splits them: bare words, or quoted ones holding several flags."""
  with open(os.path.join(REPO_ROOT, "scripts", "gpu_session.sh")) as f:
    script = f.read()
  body = re.search(rf'^{array_name}=\(((?:"[^"]*"|[^")])*)\)', script, re.MULTILINE)
  assert body is not None, array_name
  return shlex.split(body.group(1), comments=True)


def tiny_benchmark_config(backbone: str = "r3d_tiny") -> ml_collections.ConfigDict:
  """The config TINY_BENCHMARK_OVERRIDES describe, as an object."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("demo")
  for field, value in TINY_BENCHMARK_FIELDS.items():
    set_field(config, field, value)
  config.model.backbone = backbone
  return config


# For tests that check what a benchmark reports, not its speed: compile fast.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")
# One XLA compilation cache per test session: the children of a test compile the same
# programs, and a cache hit turns ~30 s of CPU compilation into ~1 s. Results do not
# depend on it (the cached executable is the one that would have been compiled).
COMPILATION_CACHE_DIR = tempfile.mkdtemp(prefix="tcvm_test_xla_cache_")
atexit.register(shutil.rmtree, COMPILATION_CACHE_DIR, ignore_errors=True)


def export_demo_encoder(directory: str, *, seed: int, stats_offset: float = 0.0):
  """Builds the demo TCVM (init seed `seed`) and exports it as a pretraining encoder into
  `directory`; `stats_offset` shifts the BatchNorm running statistics (fresh ones are all
  0 / 1). Returns (config, params, batch_stats)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from tcvm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from tcvm_jax.model import build_model  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("demo")
  params, batch_stats = jax.jit(lambda: nnx.split(
      build_model(config, rngs=nnx.Rngs(seed)), nnx.Param, nnx.BatchStat)[1:])()
  batch_stats = jax.tree.map(lambda x: x + stats_offset, batch_stats)
  checkpointing.save_encoder(os.path.join(directory, checkpointing.ENCODER_DIRNAME), params,
                             batch_stats, config)
  return config, params, batch_stats


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """r3d_tiny on 8-frame, 32 px noise videos: a step takes well under a second on CPU."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config("demo")
  config.data.name = "random"
  config.data.num_frames = 8
  config.data.input_size = 40
  config.montage.num_clips = 2
  config.montage.output_size = 32
  config.model.backbone = "r3d_tiny"
  config.model.ofc_hidden_dim = 32
  config.model.ofc_dim = 16
  config.batch_size = 8
  config.base_learning_rate = 0.1
  config.schedule = "step"
  config.warmup_epochs = 0.0
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 10
  config.eval_retrieval = ""
  for key, value in overrides.items():
    set_field(config, key, value)
  return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets a nested config field by its dotted name, e.g. `data.num_frames`."""
  node = config
  *parents, leaf = dotted.split(".")
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def subprocess_env(num_devices: int) -> dict[str, str]:
  """Environment for a child with `num_devices` simulated CPU devices (set before jax loads)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE_DIR
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def run_json_child(code: str, num_devices: int, *args: str, timeout: float = 300) -> dict:
  """Runs `python -c code *args` with `num_devices` simulated CPU devices from the repo
  root; asserts it exits 0 and returns the JSON object its last stdout line prints."""
  completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                             text=True, env=subprocess_env(num_devices), cwd=REPO_ROOT,
                             timeout=timeout)
  assert completed.returncode == 0, completed.stderr[-3000:]
  return json.loads(completed.stdout.strip().splitlines()[-1])


def run_helper(args: dict, num_devices: int = 1, timeout: float = 300
               ) -> tuple[int, dict | None, str]:
  return finish(start_helper(args, num_devices), timeout)


def start_helper(args: dict, num_devices: int = 1) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, HELPER, json.dumps(args)], cwd=REPO_ROOT,
                          env=subprocess_env(num_devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, dict | None, str]:
  """(returncode, the JSON the helper printed last or None, stderr)."""
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    stdout, stderr = process.communicate()
    raise AssertionError(f"helper timed out after {timeout}s; stderr tail:\n{stderr[-3000:]}")
  result = None
  for line in stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
  return process.returncode, result, stderr


# Agreement asked of two runs' states, relative to the largest magnitude in each group.
# Losses agree to ~1e-6 between device layouts, but the TC head takes differences of
# neighbouring frames' features (cancellation) and normalises them with BatchNorm, which
# turns float32 round-off (another summation order, another compilation) into relative
# gradient differences of up to ~1e-2 in that head after a few steps; the momentum
# (opt_state) carries them, the parameters only lr times them.
STATE_TOLERANCES = {"params": 1e-3, "batch_stats": 1e-4, "opt_state": 2e-2}


def assert_states_close(actual: dict, expected: dict,
                        rel: dict[str, float] | None = None) -> None:
  """Flat checkpoint dicts ({path tuple: array}) agree: integer leaves (step, RNG key data)
  exactly, float leaves to `rel[group]` times the largest magnitude in their group
  (params, batch_stats, opt_state)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rel = STATE_TOLERANCES if rel is None else rel
  assert actual.keys() == expected.keys()
  scales: dict[str, float] = {}
  for path, value in expected.items():
    if np.issubdtype(np.asarray(value).dtype, np.floating):
      scales[path[0]] = max(scales.get(path[0], 0.0), float(np.abs(value).max(initial=0)))
  for path, value in expected.items():
    name = "/".join(path)
    if np.issubdtype(np.asarray(value).dtype, np.floating):
      np.testing.assert_allclose(actual[path], value, rtol=0,
                                 atol=rel[path[0]] * scales[path[0]], err_msg=name)
    else:
      np.testing.assert_array_equal(actual[path], value, err_msg=name)


def variadic_reductions(stablehlo_text: str) -> int:
  """Two-result reductions in lowered StableHLO (BatchNorm's pairs of sums as one)."""
  return stablehlo_text.count(":2 = stablehlo.reduce(")


def bfloat16_ops(stablehlo_text: str) -> int:
  """Lines of lowered StableHLO with a bfloat16 value, constants left out: a
  `platform_dependent`'s constants of every branch are hoisted into each platform's
  lowering, unused."""
  return sum("xbf16>" in line and "stablehlo.constant" not in line
             for line in stablehlo_text.splitlines())


def reduce_window_max_pool(x, window: int = 3, stride: int = 2):
  """The max-pools' reference: XLA's reduce_window max over H and W of (..., H, W, C),
  PyTorch padding (window // 2, -inf), differentiated by JAX (select-and-scatter)."""
  import jax  # pylint: disable=g-import-not-at-top

  pad = window // 2
  leading = x.ndim - 3
  return jax.lax.reduce_window(x, -float("inf"), jax.lax.max,
                               (1,) * leading + (window, window, 1),
                               (1,) * leading + (stride, stride, 1),
                               ((0, 0),) * leading + ((pad, pad), (pad, pad), (0, 0)))
