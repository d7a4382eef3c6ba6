"""Multi-process training: 1 process x 4 CPU devices == 2 processes x 2 CPU devices.

The two-process run uses jax.distributed with a coordinator on 127.0.0.1 and gloo CPU
collectives; each process feeds its half of every global batch. From the same seed both
set-ups must train identically: the same loss at every step, the same final parameters.
"""

from __future__ import annotations

import numpy as np

from tcvm_jax import checkpointing
from train_test_utils import assert_states_close, finish, free_port, start_helper

OVERRIDES = {"num_train_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 100,
             "batch_size": 8}


def _losses(results: dict) -> list[tuple[int, float]]:
  return [(entry["step"], entry["loss"]) for entry in results["history"]]


def _final_state(workdir) -> dict:
  checkpointer = checkpointing.Checkpointer(checkpointing.checkpoints_directory(str(workdir)),
                                            every_steps=100, keep=3)
  tree, position = checkpointer.read()
  checkpointer.close()
  assert position["batches_consumed"] == 3
  return checkpointing.unnest(tree)


def test_two_processes_train_like_one(tmp_path):
  single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
  port = free_port()
  # The pair first (they wait for each other), then the single process; run one after the
  # other so that the 2 CPU cores are not oversubscribed.
  pair = [start_helper({"workdir": str(multi_dir), "overrides": OVERRIDES,
                        "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                        "process_id": process_id}, num_devices=2)
          for process_id in (0, 1)]
  pair_results = [finish(process, timeout=400) for process in pair]
  for code, result, stderr in pair_results:
    assert code == 0 and result is not None, stderr[-3000:]
  code, single, stderr = finish(start_helper({"workdir": str(single_dir),
                                              "overrides": OVERRIDES}, num_devices=4),
                                timeout=400)
  assert code == 0, stderr[-3000:]

  (_, first, first_err), (_, second, _) = pair_results
  assert "process 0 of 2, 2 local / 4 global devices" in first_err
  assert _losses(first) == _losses(second)  # both processes see the same global metrics
  single_losses, multi_losses = _losses(single), _losses(first)
  assert [step for step, _ in single_losses] == [1, 2, 3]
  assert [step for step, _ in multi_losses] == [1, 2, 3]
  for (step, expected), (_, actual) in zip(single_losses, multi_losses):
    assert np.isfinite(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, err_msg=f"step {step}")
  # A loss that never changes would make the comparison above empty.
  assert single_losses[0][1] != single_losses[-1][1]

  # The final state: parameters, BatchNorm statistics, momentum, step and RNG.
  assert_states_close(_final_state(multi_dir), _final_state(single_dir))
  assert (multi_dir / "results.json").exists()  # written by process 0
