"""Smoke test of the user-facing command with the `:demo` preset, made short.

`python -m tcvm_jax.main --config=configs/pretrain.py:demo` end to end: the synthetic
dataset is generated on first use (a tiny one here), 3 steps are trained, the exported
encoder is evaluated by video retrieval, and the run leaves results.json, a checkpoint,
TensorBoard events and the encoder export.
"""

from __future__ import annotations

import glob
import json
import math
import subprocess
import sys

import numpy as np

from tcvm_jax import checkpointing
from train_test_utils import REPO_ROOT, subprocess_env

# A dataset of a few seconds instead of the demo's minute (same generator, fewer and
# smaller videos).
TINY_DATASET = {"num_train": 48, "num_test": 12, "height": 64, "width": 80,
                "min_frames": 16, "max_frames": 24}


def test_demo_preset_runs_end_to_end(tmp_path):
  workdir, data_dir = tmp_path / "run", tmp_path / "synthetic"
  command = [sys.executable, "-m", "tcvm_jax.main", "--config=configs/pretrain.py:demo",
             f"--workdir={workdir}", "--config.num_train_steps=3",
             f"--config.data.synthetic_dir={data_dir}"]
  command += [f"--config.data.synthetic_params.{k}={v}" for k, v in TINY_DATASET.items()]
  process = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(1),
                           capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-4000:]
  log = process.stderr

  # Progress on every long job: dataset generation, compilation, training with ETA.
  assert "[synthetic] wrote 48 train + 12 test videos" in log
  assert "First step done in" in log
  assert "step 3/3 (100.0%)" in log and "clips/s | ETA" in log
  assert "train/loss=" in log  # the clu logging writer's line
  assert "orbax-checkpoint-tmp" not in log  # orbax's INFO chatter is filtered out

  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["step"] == 3 and math.isfinite(results["loss"])
  assert results["num_train_steps"] == 3 and results["steps_per_epoch"] == 48 // 16
  for name in ("loss_origin", "loss_diff", "learning_rate", "grad_norm", "param_norm",
               "origin_positive_similarity", "diff_negative_similarity"):
    assert math.isfinite(results[name]), name
  assert results["config"]["preset"] == "demo"
  assert results["config"]["model"]["backbone"] == "r3d_tiny"
  assert results["versions"]["jax"] and results["versions"]["flax"]
  assert glob.glob(str(workdir / "events.out.tfevents.*"))
  # Retrieval of the 12 test videos in the 48-video train gallery, with this encoder.
  retrieval = results["retrieval"]
  assert 0.0 <= retrieval["top1"] <= retrieval["top5"] <= retrieval["top10"] <= 1.0
  assert (workdir / "retrieval" / "results.md").exists()

  # The final checkpoint and the encoder export agree.
  checkpointer = checkpointing.Checkpointer(checkpointing.checkpoints_directory(str(workdir)),
                                            every_steps=100, keep=3)
  assert checkpointer.all_steps() == [3]
  state, position = checkpointer.read(3)
  checkpointer.close()
  assert position["batches_consumed"] == 3
  encoder = checkpointing.load_encoder(str(workdir))
  assert encoder.config.model.backbone == "r3d_tiny"
  exported = checkpointing.unnest(encoder.params)
  trained = checkpointing.unnest(state["params"]["backbone"])
  assert exported.keys() == trained.keys() and len(exported) > 10
  for path, value in exported.items():
    np.testing.assert_array_equal(value, trained[path], err_msg="/".join(path))
