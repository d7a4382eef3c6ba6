"""Runs one training job in a fresh process, for the fault-tolerance and multi-device tests.

  python tests/train_helper.py '{"workdir": "...", "overrides": {"batch_size": 8}, ...}'

The parent sets XLA_FLAGS (simulated CPU devices) in the environment. Options (JSON):
  workdir, overrides          where to train; dotted config fields over tiny_config().
  coordinator_address, num_processes, process_id
                              join a multi-process run (jax.distributed, gloo).
  sigkill_before_batch: k     SIGKILL this process when the train step is called for global
                              batch k (0-based), i.e. after step k was dispatched. (Not when
                              the input is asked for it: a prefetch thread reads ahead.)
  sigterm_before_batch: k     send this process SIGTERM at the same point (preemption).
  nan_from_step: n            make the loss metric NaN from step n on (divergence).
Prints `RESULT {json}` (train_and_evaluate's results) when training returns.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tcvm_jax import distributed  # pylint: disable=g-import-not-at-top


def _signal_at_batches(train, options: dict) -> None:
  """Makes the train step deliver a signal when it is called for a given global batch."""
  signals = []
  if "sigkill_before_batch" in options:
    signals.append((options["sigkill_before_batch"], signal.SIGKILL))
  if "sigterm_before_batch" in options:
    signals.append((options["sigterm_before_batch"], signal.SIGTERM))
  jit_train_step = train.train_step_lib.jit_train_step

  def jit_with_signals(*args, **kwargs):
    step_fn = jit_train_step(*args, **kwargs)

    def step_with_signals(state, videos):
      batch_index = int(state["step"])  # = batches trained on so far (also after a resume)
      for when, signum in signals:
        if batch_index == when:
          print(f"SIGNAL {signum} before batch {batch_index}", flush=True)
          os.kill(os.getpid(), signum)
      return step_fn(state, videos)

    return step_with_signals

  train.train_step_lib.jit_train_step = jit_with_signals


def _inject_nan(train, from_step: int) -> None:
  """Replaces the loss metric by NaN from `from_step` on, outside the compiled step (so the
  step itself, and its compilation-cache entry, stay the same)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  jit_train_step = train.train_step_lib.jit_train_step

  def jit_with_nan(*args, **kwargs):
    step_fn = jit_train_step(*args, **kwargs)

    def step_with_nan(state, videos):
      new_state, metrics = step_fn(state, videos)
      if int(new_state["step"]) >= from_step:
        metrics = {**metrics, "loss": np.float32(np.nan)}
      return new_state, metrics

    return step_with_nan

  train.train_step_lib.jit_train_step = jit_with_nan


def main() -> None:
  options = json.loads(sys.argv[1])
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  distributed.initialize(options.get("coordinator_address"), options.get("num_processes"),
                         options.get("process_id"))
  from tcvm_jax import train  # pylint: disable=g-import-not-at-top
  from train_test_utils import tiny_config  # pylint: disable=g-import-not-at-top

  _signal_at_batches(train, options)
  if "nan_from_step" in options:
    _inject_nan(train, options["nan_from_step"])
  config = tiny_config(**options.get("overrides", {}))
  results = train.train_and_evaluate(config, options["workdir"])
  print("RESULT " + json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
  main()
