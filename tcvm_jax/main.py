r"""Entry point: parses flags and runs the config's task.

  python -m tcvm_jax.main --config=configs/pretrain.py:demo --workdir=/tmp/tcvm_demo
  python -m tcvm_jax.main --config=configs/pretrain.py --workdir=/runs/r3d50 \
      --config.batch_size=64 --config.num_train_steps=1000
  python -m tcvm_jax.main --config=configs/retrieval.py:demo \
      --config.init_checkpoint=/tmp/tcvm_demo --workdir=/tmp/retrieval_demo

`config.task` picks the job (TASKS below); configs without it are pretraining
(`train.train_and_evaluate`). `--workdir` defaults to `config.workdir` when the config has
one.

Multi-host: start one process per host with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables, or under SLURM / Open MPI with nothing at all).
See docs/training.md.
"""

from __future__ import annotations

import importlib
import logging as python_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tcvm_jax import compilation_cache, distributed, host_memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, with an optional preset: configs/pretrain.py[:demo].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results.json (default: "
    "config.workdir, if the config has one).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-host: total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-host: this process's index in [0, num_processes).")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Persistent XLA compilation cache: a rerun or a resumed "
    "run skips compiling what an earlier run compiled (R3D50's step: ~45 s on a GPU). "
    "Default: $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/tcvm_jax/xla "
    "(~/.cache/tcvm_jax/xla); '' turns it off.")
_HOST_MEMORY = flags.DEFINE_enum(
    "host_memory", "auto", host_memory.MODES, "'retain': keep freed host memory in the "
    "process so XLA:CPU does not page-fault its step buffers in again every step (the demo "
    "step ~10-25% faster, ~0.6 GiB more resident); 'release': the C library's default; "
    "'auto': retain when JAX will run on the CPU. See tcvm_jax/host_memory.py.")
_LIBRARY_LOGS = flags.DEFINE_bool(
    "library_logs", False, "Keep orbax's INFO log lines (one per checkpoint file operation).")

flags.mark_flags_as_required(["config"])

# config.task -> (module, function(config, workdir) -> results dict).
TASKS = {
    "pretrain": ("tcvm_jax.train", "train_and_evaluate"),
    "retrieval": ("tcvm_jax.retrieval", "run"),
    "linear_probe": ("tcvm_jax.linear_probe", "run"),
    "finetune": ("tcvm_jax.finetune", "run"),
}


class _DropLibraryInfo(python_logging.Filter):
  """Hides orbax's INFO chatter so the training lines stay readable; warnings pass."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_DropLibraryInfo())
    # TensorFlow (input pipeline only) prints C++ INFO lines at import; keep warnings.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  # Before JAX starts its CPU client: its threads keep the malloc arena they start with.
  if host_memory.configure(_HOST_MEMORY.value):
    logging.info("Host memory: freed memory stays in the process (--host_memory=release "
                 "turns this off).")
  # Before anything touches a device: join the other processes, if any.
  distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cache_dir = compilation_cache.enable(_COMPILATION_CACHE_DIR.value)
  if cache_dir:
    logging.info("XLA compilation cache: %s (--compilation_cache_dir='' turns it off).",
                 cache_dir)
  # Imported after initialisation (none of them touches a device at import).
  from tcvm_jax import config_validation, train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  task = config.get("task", "pretrain")
  if task not in TASKS:
    raise app.UsageError(f"config.task={task!r}; choose one of {tuple(TASKS)}.")
  workdir = _WORKDIR.value or config.get("workdir", None)
  if not workdir:
    raise app.UsageError("--workdir is required (this config has no `workdir` field).")
  module_name, function_name = TASKS[task]
  run_task = getattr(importlib.import_module(module_name), function_name)
  try:
    results = run_task(config, workdir)
  except (config_validation.ConfigError, train.NonFiniteLossError) as error:
    # Say what is wrong in one line instead of a traceback; exit status 1.
    logging.error("%s", error)
    raise SystemExit(f"error: {error}") from None
  if results.get("preempted"):
    logging.warning("Stopped by SIGTERM at step %d; run the same command to resume.",
                    results["step"])
    return
  summary = {k: results[k] for k in ("step", "loss", "top1", "top5") if k in results}
  logging.info("Finished %s: %s; results in %s.", task, summary, workdir)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
