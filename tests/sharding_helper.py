"""Child process for test_train.py: the same train steps on 1 device and on all devices.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4. Writes an .npz with, per
mesh size, the losses / gradient norms of two steps and the parameter change of the first
step (SGD's first update is -lr * (grad + wd * param), so it carries the gradients), plus
one bfloat16-compute step on one device.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from tcvm_jax import checkpointing, optim, train, train_step
from tcvm_jax import mesh as mesh_lib
from train_test_utils import tiny_config


def _flat_params(state) -> dict[str, np.ndarray]:
  # Copies: the step donates (reuses) the old state's buffers.
  return {"/".join(k): np.array(v, copy=True)
          for k, v in checkpointing.flatten_by_path(state["params"]).items()}


def run(config, devices, num_steps: int = 2) -> dict[str, np.ndarray]:
  mesh = mesh_lib.create_mesh(devices)
  # The trainer's own schedule arguments, so that the compiled step is the one
  # train_and_evaluate builds (and the test session's compilation cache is shared).
  steps_per_epoch, _ = train.num_train_steps_for(config, train.RANDOM_NUM_VIDEOS)
  optimizer, schedule = optim.create_optimizer(config, steps_per_epoch, num_steps)
  graphdef, state = train_step.create_train_state(config, mesh, optimizer)
  step_fn = train_step.jit_train_step(
      train_step.make_train_step(config, graphdef, mesh, optimizer, schedule), mesh)
  batches = train.random_video_batches(config, process_index=0,
                                       batch_size_per_process=config.batch_size)
  out = {}
  initial = _flat_params(state)
  for index in range(num_steps):
    videos = mesh_lib.host_batch_to_global(next(batches)["video"], mesh)
    assert len(videos.sharding.device_set) == len(devices)
    state, metrics = step_fn(state, videos)
    out[f"loss_{index}"] = np.asarray(metrics["loss"])
    out[f"grad_norm_{index}"] = np.asarray(metrics["grad_norm"])
    if index == 0:
      for name, value in _flat_params(state).items():
        out[f"delta/{name}"] = value - initial[name]
  dtypes = {str(x.dtype) for x in jax.tree.leaves((state["params"], state["opt_state"]))
            if np.issubdtype(x.dtype, np.floating) or x.dtype == jax.numpy.bfloat16}
  out["param_dtypes"] = np.array(sorted(dtypes))
  return out


def main() -> None:
  output_path = sys.argv[1]
  assert jax.device_count() == 4, jax.devices()
  config = tiny_config(batch_size=8)
  results = {}
  for label, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
    for key, value in run(config, devices).items():
      results[f"{label}:{key}"] = value
  bf16 = run(tiny_config(batch_size=8, **{"model.dtype": "bfloat16"}), jax.devices()[:1], 1)
  for key in ("loss_0", "param_dtypes"):
    results[f"bf16:{key}"] = bf16[key]
  np.savez(output_path, **results)


if __name__ == "__main__":
  main()
