r"""Where the pretraining step's device time goes: a trace of a few steps, summarised.

  python benchmarks/profile_step.py --config=configs/pretrain.py --batch_size=32 \
      --dtype=bfloat16 --out=DIR [--steps=3] [--time_steps=20]

Compiles the same step as scripts/benchmark.py (device-resident synthetic uint8 videos),
times it, traces `--steps` more steps with `jax.profiler` and writes:
  DIR/trace.json.gz  the Perfetto/Chrome trace (open in ui.perfetto.dev),
  DIR/hlo.txt.gz     the compiled program (op metadata for the summary),
  DIR/summary.json   device time per step by phase and category, and the top ops,
and prints the summary (benchmarks/trace_summary.py; it can be rerun on the files).
Imports neither TensorFlow nor torch (the GPU machine has no TensorFlow).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top

from benchmarks import jax_step, trace_summary  # pylint: disable=g-import-not-at-top
from tcvm_jax import train  # pylint: disable=g-import-not-at-top


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/pretrain.py",
                      help="Config file with an optional ':preset'.")
  parser.add_argument("--batch_size", type=int, default=None, help="Global batch.")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  parser.add_argument("--steps", type=int, default=3, help="Traced steps.")
  parser.add_argument("--time_steps", type=int, default=20, help="Timed steps (median).")
  parser.add_argument("--out", required=True, help="Output directory.")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="Config override, e.g. --set=model.backbone=tsm50 (repeatable).")
  return parser.parse_args(argv)


def load_config(args):
  path, _, preset = args.config.partition(":")
  config = train.load_config_file(path, preset)
  if args.batch_size:
    config.batch_size = args.batch_size
  if args.dtype:
    config.model.dtype = args.dtype
  for item in args.set:
    field, _, value = item.partition("=")
    node = config
    *parents, leaf = field.split(".")
    for parent in parents:
      node = node[parent]
    current = node[leaf]
    if isinstance(current, bool):
      if value.lower() not in ("true", "false"):
        raise ValueError(f"--set {field}: expected true or false, got {value!r}")
      node[leaf] = value.lower() == "true"
    else:
      node[leaf] = type(current)(value) if current is not None else value
  return config


def main(argv=None) -> int:
  args = parse_args(argv)
  config = load_config(args)
  os.makedirs(args.out, exist_ok=True)
  step = jax_step.CompiledStep(config)
  print(f"compiled in {step.compile_time_s:.1f} s on {jax.devices()[0].device_kind}",
        flush=True)
  with gzip.open(os.path.join(args.out, "hlo.txt.gz"), "wt") as f:
    f.write(step.compiled.as_text())
  median_s, times = jax_step.median_time(step.run_blocking, steps=args.time_steps, warmup=3)
  print(f"step: median {median_s * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms "
        f"({config.batch_size / median_s:.1f} videos/s)", flush=True)

  # Back to back, as in training: the device never waits for the host between steps.
  start = time.perf_counter()
  for _ in range(args.time_steps):
    metrics = step.run()
  jax.block_until_ready(metrics)
  chained_s = (time.perf_counter() - start) / args.time_steps
  print(f"step, back to back: {chained_s * 1e3:.2f} ms ({config.batch_size / chained_s:.1f} "
        f"videos/s)", flush=True)

  trace_dir = tempfile.mkdtemp(prefix="tcvm_trace_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(args.steps):
    metrics = step.run()
  jax.block_until_ready(metrics)
  traced_s = time.perf_counter() - start
  jax.profiler.stop_trace()
  found = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    print(f"no perfetto trace was written under {trace_dir}", file=sys.stderr)
    return 1
  trace_path = os.path.join(args.out, "trace.json.gz")
  shutil.copy(found[0], trace_path)
  shutil.rmtree(trace_dir, ignore_errors=True)

  summary = trace_summary.summarize(trace_path, os.path.join(args.out, "hlo.txt.gz"),
                                    num_steps=args.steps)
  summary.update(step_time_s=median_s, step_times_s=times, chained_step_time_s=chained_s,
                 traced_wall_s=traced_s,
                 batch_size=config.batch_size, backbone=config.model.backbone,
                 dtype=config.model.dtype, device_kind=jax.devices()[0].device_kind,
                 compile_time_s=step.compile_time_s)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(trace_summary.format_summary(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
