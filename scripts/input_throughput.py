r"""Measures the input pipeline: decoded clips per second, per CPU core.

  python scripts/input_throughput.py --config=configs/pretrain.py:demo
  python scripts/input_throughput.py --pattern='data/kinetics400/train-*.tfrecord' \
      --num_frames=32 --frame_stride=2 --input_size=128 --json
  python scripts/input_throughput.py --synthetic --mode=eval --num_clips=10 --num_crops=3

Builds the same pipeline the trainer uses (pipeline.make_train_dataset or
make_eval_dataset), pulls `--warmup` batches (graph building, shuffle buffer fill), then
times `--batches` batches. Prints one line; `--json` adds one JSON object. Besides
wall-clock clips/s divided by the visible cores, it reports clips per CPU-second of this
process, which stays meaningful when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tcvm_jax.data import pipeline  # pylint: disable=g-import-not-at-top


def load_config(spec: str):
  """'path/to/config.py[:preset]' -> config (as ml_collections' config_flags does)."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("throughput_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/pretrain.py:demo",
                      help="config file[:preset] (default configs/pretrain.py:demo).")
  parser.add_argument("--pattern", help="TFRecord glob (default: the config's train split).")
  parser.add_argument("--synthetic", action="store_true",
                      help="use the built-in synthetic dataset (config.data.synthetic_dir).")
  parser.add_argument("--mode", choices=("train", "eval"), default="train")
  for name, kind in (("num_frames", int), ("frame_stride", int), ("input_size", int),
                     ("sampler", str), ("short_video", str), ("shuffle_buffer", int)):
    parser.add_argument(f"--{name}", type=kind, help=f"override config.data.{name}.")
  parser.add_argument("--num_clips", type=int, default=1, help="eval: clips per video.")
  parser.add_argument("--num_crops", type=int, default=1, help="eval: 1 or 3 crops.")
  parser.add_argument("--batch_size", type=int, default=16, help="clips per batch "
                      "(eval: views per batch).")
  parser.add_argument("--warmup", type=int, default=5, help="batches before timing.")
  parser.add_argument("--batches", type=int, default=30, help="batches timed.")
  parser.add_argument("--json", action="store_true", help="also print a JSON object.")
  return parser


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  config = load_config(args.config)
  if args.synthetic:
    config.data.name = "synthetic"
  for name in ("num_frames", "frame_stride", "input_size", "sampler", "short_video",
               "shuffle_buffer"):
    if getattr(args, name) is not None:
      config.data[name] = getattr(args, name)
  if args.mode == "train":
    iterator = pipeline.make_train_dataset(config, batch_size_per_process=args.batch_size,
                                           pattern=args.pattern)
  else:
    iterator = pipeline.make_eval_dataset(config, "test", batch_size_per_process=args.batch_size,
                                          num_clips=args.num_clips, num_crops=args.num_crops,
                                          pattern=args.pattern)
    available = iterator.num_batches
    if args.warmup + args.batches > available:
      print(f"error: the eval split gives {available} batches; lower --warmup/--batches.",
            file=sys.stderr)
      return 2
  for _ in range(args.warmup):
    next(iterator)
  cpu_start, wall_start = cpu_seconds(), time.perf_counter()
  for _ in range(args.batches):
    batch = next(iterator)
  wall = time.perf_counter() - wall_start
  cpu = cpu_seconds() - cpu_start
  clips = args.batches * args.batch_size
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  result = {
      "mode": args.mode, "sampler": config.data.sampler, "num_frames": config.data.num_frames,
      "frame_stride": config.data.frame_stride, "input_size": config.data.input_size,
      "num_clips": args.num_clips if args.mode == "eval" else 1,
      "num_crops": args.num_crops if args.mode == "eval" else 1,
      "batch_shape": list(batch["video"].shape), "clips": clips, "wall_s": round(wall, 3),
      "clips_per_s": round(clips / wall, 2), "cores": cores,
      "clips_per_s_per_core": round(clips / wall / cores, 2),
      "process_cpu_s": round(cpu, 3),
      "clips_per_cpu_s": round(clips / cpu, 2) if cpu > 0 else None,
      "bad_records": iterator.tracker.num_bad,
  }
  print(f"{result['clips_per_s']:.1f} clips/s on {cores} cores = "
        f"{result['clips_per_s_per_core']:.1f} clips/s/core "
        f"({result['clips_per_cpu_s']} clips per CPU-second; {args.mode}, "
        f"{config.data.sampler} {config.data.num_frames}x{config.data.frame_stride}, "
        f"{config.data.input_size}px, batch {tuple(batch['video'].shape)})")
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
