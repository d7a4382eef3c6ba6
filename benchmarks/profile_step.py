r"""Where the pretraining step's device time goes: a trace of a few steps, summarised.

  python benchmarks/profile_step.py --config=configs/pretrain.py[:preset] --batch_size=32 \
      --dtype=bfloat16 --out=DIR [--steps=3] [--time_steps=20] [--without_montage] \
      [--config.FIELD=VALUE ...]

Compiles the same step as scripts/benchmark.py (device-resident synthetic uint8 videos),
times it, traces `--steps` more steps with `jax.profiler` and writes:
  DIR/trace.json.gz  the Perfetto/Chrome trace (open in ui.perfetto.dev),
  DIR/hlo.txt.gz     the compiled program (op metadata for the summary),
  DIR/summary.json   device time per step by phase and category, and the top ops,
and prints the summary (benchmarks/trace_summary.py; it can be rerun on the files).
Imports neither TensorFlow nor torch (the GPU machine has no TensorFlow).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
from absl import app, flags  # pylint: disable=g-import-not-at-top

# step_flags defines --config, --batch_size, --dtype and --host_memory.
from benchmarks import jax_step, step_flags, trace_summary  # pylint: disable=g-import-not-at-top
from tcvm_jax import host_memory  # pylint: disable=g-import-not-at-top

_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps.")
_TIME_STEPS = flags.DEFINE_integer("time_steps", 20, "Timed steps (median).")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_WITHOUT_MONTAGE = flags.DEFINE_bool(
    "without_montage", False, "Profile the step after the montage (fed float pseudo-videos, "
    "as the PyTorch reference is) instead of the whole step.")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_memory.configure(step_flags.HOST_MEMORY.value)  # before the first JAX computation
  config = step_flags.config_from_flags()
  out, steps, time_steps = _OUT.value, _STEPS.value, _TIME_STEPS.value
  os.makedirs(out, exist_ok=True)
  step = jax_step.CompiledStep(config, without_montage=_WITHOUT_MONTAGE.value)
  print(f"compiled in {step.compile_time_s:.1f} s on {jax.devices()[0].device_kind}",
        flush=True)
  with gzip.open(os.path.join(out, "hlo.txt.gz"), "wt") as f:
    f.write(step.compiled.as_text())
  median_s, times = jax_step.median_time(step.run_blocking, steps=time_steps, warmup=3)
  print(f"step: median {median_s * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms "
        f"({config.batch_size / median_s:.1f} videos/s)", flush=True)

  # Back to back, as in training: the device never waits for the host between steps.
  chained_s, _ = jax_step.chained_time(step.run, steps=time_steps)
  print(f"step, back to back: {chained_s * 1e3:.2f} ms ({config.batch_size / chained_s:.1f} "
        f"videos/s)", flush=True)

  trace_dir = tempfile.mkdtemp(prefix="tcvm_trace_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  traced_per_step_s, _ = jax_step.chained_time(step.run, steps=steps)
  jax.profiler.stop_trace()
  found = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    print(f"no perfetto trace was written under {trace_dir}", file=sys.stderr)
    return 1
  trace_path = os.path.join(out, "trace.json.gz")
  shutil.copy(found[0], trace_path)
  shutil.rmtree(trace_dir, ignore_errors=True)

  summary = trace_summary.summarize(trace_path, os.path.join(out, "hlo.txt.gz"),
                                    num_steps=steps)
  summary.update(step_time_s=median_s, step_times_s=times, chained_step_time_s=chained_s,
                 traced_wall_s=traced_per_step_s * steps,
                 batch_size=config.batch_size, backbone=config.model.backbone,
                 dtype=config.model.dtype, device_kind=jax.devices()[0].device_kind,
                 compile_time_s=step.compile_time_s)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(trace_summary.format_summary(summary), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
