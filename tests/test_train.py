"""The training loop: device-count invariance, divergence handling, results, progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tcvm_jax import checkpointing, config_validation, metrics, train
from train_test_utils import (REPO_ROOT, assert_states_close, run_helper, subprocess_env,
                              tiny_config)


def test_one_device_and_four_devices_give_the_same_loss_and_gradients(tmp_path):
  output = tmp_path / "sharding.npz"
  process = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests",
                                                         "sharding_helper.py"), str(output)],
                           env=subprocess_env(4), cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=400)
  assert process.returncode == 0, process.stderr[-3000:]
  results = dict(np.load(output))

  for step in (0, 1):
    one, four = results[f"one:loss_{step}"], results[f"four:loss_{step}"]
    assert np.isfinite(one)
    np.testing.assert_allclose(four, one, rtol=2e-5, err_msg=f"loss at step {step}")
    np.testing.assert_allclose(results[f"four:grad_norm_{step}"],
                               results[f"one:grad_norm_{step}"], rtol=1e-4)
  # The first update is -lr * (gradient + wd * param) with identical params: it compares
  # the gradients. Tolerance relative to the largest update (see STATE_TOLERANCES for why
  # not per entry: the TC head amplifies round-off).
  one = {("delta", key): value for key, value in results.items()
         if key.startswith("one:delta/")}
  four = {("delta", key.replace("four:", "one:", 1)): value
          for key, value in results.items() if key.startswith("four:delta/")}
  assert len(one) > 20  # every parameter of backbone + heads
  assert_states_close(four, one, rel={"delta": 1e-3})
  moved = sum(bool(np.abs(value).max() > 0) for value in one.values())
  assert moved > len(one) // 2  # the updates are real, not all zero

  # bfloat16 compute: finite loss near the float32 one; params and momentum stay float32.
  assert list(results["bf16:param_dtypes"]) == ["float32"]
  assert list(results["one:param_dtypes"]) == ["float32"]
  np.testing.assert_allclose(results["bf16:loss_0"], results["one:loss_0"], rtol=0.05)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  overrides = {"num_train_steps": 6, "checkpoint_every_steps": 2}
  code, result, stderr = run_helper({"workdir": str(tmp_path), "overrides": overrides,
                                     "nan_from_step": 3})
  assert code != 0 and result is None
  assert "NonFiniteLossError" in stderr
  assert "Non-finite training metrics at step 3" in stderr
  assert "last good checkpoint is step 2" in stderr
  checkpoints = checkpointing.Checkpointer(
      checkpointing.checkpoints_directory(str(tmp_path)), every_steps=2, keep=10)
  assert checkpoints.all_steps() == [2]
  state, position = checkpoints.read(2)
  checkpoints.close()
  assert position["batches_consumed"] == 2 and int(state["step"]) == 2
  assert all(np.isfinite(v).all() for v in checkpointing.unnest(state).values())

  # Restarted without the fault, it resumes from that checkpoint and finishes.
  code, result, stderr = run_helper({"workdir": str(tmp_path), "overrides": overrides})
  assert code == 0, stderr[-3000:]
  assert result["resumed_from_step"] == 2 and result["step"] == 6
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["step"] == 6 and np.isfinite(saved["loss"])
  assert saved["config"]["batch_size"] == 8 and saved["config"]["data"]["name"] == "random"
  assert {"jax", "flax", "optax", "orbax-checkpoint"} <= set(saved["versions"])
  assert [entry["step"] for entry in saved["history"]] == [3, 4, 5, 6]
  assert os.path.isdir(tmp_path / "encoder" / "state")


def test_epochs_set_the_run_length_unless_steps_are_given():
  config = tiny_config(num_train_steps=-1, num_epochs=3, batch_size=8)
  assert train.num_train_steps_for(config, 100) == (12, 36)
  config.num_train_steps = 7
  assert train.num_train_steps_for(config, 100) == (12, 7)
  with pytest.raises(config_validation.ConfigError, match="config.batch_size=8"):
    train.num_train_steps_for(config, 5)


def test_random_source_is_the_same_global_batch_for_any_process_count():
  config = tiny_config(batch_size=8)
  whole = next(train.random_video_batches(config, process_index=0, batch_size_per_process=8,
                                          start_batch=3))
  halves = [next(train.random_video_batches(config, process_index=p,
                                            batch_size_per_process=4, start_batch=3))
            for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["video"] for h in halves]), whole["video"])
  np.testing.assert_array_equal(whole["video_index"], np.arange(24, 32))
  assert whole["video"].dtype == np.uint8
  assert whole["video"].shape == (8, 8, 40, 40, 3)
  later = train.random_video_batches(config, process_index=0, batch_size_per_process=8)
  next(later), next(later), next(later)
  np.testing.assert_array_equal(next(later)["video"], whole["video"])  # resume = skip


def test_progress_numbers():
  accumulator = metrics.MeanAccumulator()
  accumulator.add({"loss": 2.0, "learning_rate": 0.1})
  accumulator.add({"loss": 4.0, "learning_rate": 0.1})
  means = accumulator.pop_means()
  assert means == {"loss": 3.0, "learning_rate": 0.1} and len(accumulator) == 0
  speed = {"steps_per_sec": 2.0, "clips_per_sec": 32.0, "eta_seconds": 125.0}
  line = metrics.progress_line(50, 100, means, speed)
  assert "step 50/100 (50.0%)" in line and "loss 3.0000" in line
  assert "32.0 clips/s" in line and "ETA 2m05s" in line
  scalars = metrics.train_scalars(means, {**speed, "eta_seconds": float("inf")})
  assert scalars == {"train/loss": 3.0, "train/learning_rate": 0.1,
                     "train/steps_per_sec": 2.0, "train/clips_per_sec": 32.0}
  assert metrics.format_duration(3725) == "1h02m05s"
