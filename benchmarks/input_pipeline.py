"""Input-pipeline throughput for the benchmark: decoded clips per CPU-second.

Runs `scripts/input_throughput.py` (the data engineer's; it imports TensorFlow) in its own
process, so the benchmark itself never imports TensorFlow. It reads TFRecords of JPEG
frames at the config's shapes (num_frames, frame_stride, input_size): the config's
training shards when they exist; for a 'synthetic' config its own dataset; otherwise a
generated stand-in for Kinetics-400 converted at 128 px (250 frames of 228x128 per
record, about 2.5 MB; generated once into data/generated/, ~15 s). Where the script or
TensorFlow is missing (the GPU machine has no TensorFlow) the figure is None and a note
says why.

`input_clips_per_s_per_core` is clips per CPU-second of the pipeline process (all its
threads): the clips/s one fully used core gives, whatever share of the cores the
pipeline got (other jobs on the machine still inflate it somewhat through contention:
+-15% run to run on the shared 2-core dev machine). The wall-clock figures
(`clips_per_s`, `cores_used`, `cores_available`) come along.
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
K400_VIDEO_FRAMES = 250  # 10 s at 25 fps


def _skipped(reason: str) -> dict[str, Any]:
  return {"input_clips_per_s_per_core": None, "input_pipeline_note": reason}


def stand_in_frame_size(input_size: int) -> tuple[int, int]:
  """(height, width) of 16:9 frames with short side max(128, input_size), even width."""
  height = max(128, input_size)
  return height, 2 * round(height * 16 / 9 / 2)


def measure(config: ml_collections.ConfigDict, config_spec: str, *, batches: int = 20,
            repeats: int = 3, timeout_s: int = 900) -> dict[str, Any]:
  """Decoded clips per CPU-second at the config's shapes; {'input_clips_per_s_per_core':
  None, 'input_pipeline_note': why} when it cannot run."""
  if not os.path.exists(SCRIPT):
    return _skipped("scripts/input_throughput.py does not exist; input pipeline skipped.")
  if importlib.util.find_spec("tensorflow") is None:
    return _skipped("TensorFlow is not importable here; input pipeline skipped.")
  data = config.data
  command = [sys.executable, SCRIPT, f"--config={config_spec}", "--json",
             f"--num_frames={data.num_frames}", f"--frame_stride={data.frame_stride}",
             f"--input_size={data.input_size}", f"--batches={batches}",
             f"--repeats={repeats}"]
  pattern = os.path.join(REPO_ROOT, data.train_pattern)
  if data.name == "tfrecord" and glob.glob(pattern):
    command.append(f"--pattern={pattern}")
    source = data.train_pattern
  elif data.name == "synthetic":
    command.append("--synthetic")
    source = f"the config's synthetic dataset ({data.synthetic_dir})"
  else:
    height, width = stand_in_frame_size(data.input_size)
    command += [f"--frame_size={height}x{width}", f"--video_frames={K400_VIDEO_FRAMES}"]
    source = (f"generated K400 stand-in ({K400_VIDEO_FRAMES} frames of {width}x{height} "
              "per record); the config's shards are missing")
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
  figures["input_clips_per_s_per_core"] = figures.get("clips_per_cpu_s")
  figures["source"] = source
  return figures
