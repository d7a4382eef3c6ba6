"""Input-pipeline throughput for the benchmark: decoded clips/s per CPU core.

Runs `scripts/input_throughput.py` (the data engineer's; it imports TensorFlow) in its own
process, so the benchmark itself never imports TensorFlow. It reads TFRecords of JPEG
frames at the config's shapes (num_frames, frame_stride, input_size): the config's
training shards when they exist, else the built-in synthetic dataset (128x160 JPEG
frames, generated on first use). Where the script or TensorFlow is missing (the GPU
machine has no TensorFlow) the figure is None and a note says why.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "input_throughput.py")


def _skipped(reason: str) -> dict[str, Any]:
  return {"input_clips_per_s_per_core": None, "input_pipeline_note": reason}


def measure(config: ml_collections.ConfigDict, config_spec: str, *, batches: int = 20,
            timeout_s: int = 900) -> dict[str, Any]:
  """Decoded clips/s per core at the config's shapes; {'input_clips_per_s_per_core': None,
  'input_pipeline_note': why} when it cannot run."""
  if not os.path.exists(SCRIPT):
    return _skipped("scripts/input_throughput.py does not exist; input pipeline skipped.")
  if importlib.util.find_spec("tensorflow") is None:
    return _skipped("TensorFlow is not importable here; input pipeline skipped.")
  data = config.data
  command = [sys.executable, SCRIPT, f"--config={config_spec}", "--json",
             f"--num_frames={data.num_frames}", f"--frame_stride={data.frame_stride}",
             f"--input_size={data.input_size}", f"--batches={batches}"]
  source = "synthetic TFRecords (128x160 JPEG frames)"
  pattern = os.path.join(REPO_ROOT, data.train_pattern)
  if data.name == "tfrecord" and glob.glob(pattern):
    command.append(f"--pattern={pattern}")
    source = data.train_pattern
  else:
    command.append("--synthetic")
  try:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                               cwd=REPO_ROOT)
  except subprocess.TimeoutExpired:
    return _skipped(f"input_throughput.py did not finish in {timeout_s} s.")
  json_lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
  if completed.returncode != 0 or not json_lines:
    return _skipped(f"input_throughput.py failed (exit {completed.returncode}): "
                    f"{completed.stderr.strip()[-500:]}")
  figures = json.loads(json_lines[-1])
  figures["input_clips_per_s_per_core"] = figures.get("clips_per_s_per_core")
  figures["source"] = source
  return figures
