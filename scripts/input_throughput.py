r"""Measures the input pipeline: decoded clips per CPU-second (= clips/s/core at full use).

  python scripts/input_throughput.py --config=configs/pretrain.py:demo
  python scripts/input_throughput.py --config=configs/pretrain.py --frame_size=128x228 \
      --video_frames=250 --json          # the paper's shape on K400-like generated records
  python scripts/input_throughput.py --pattern='data/kinetics400/train-*.tfrecord' --json
  python scripts/input_throughput.py --synthetic --mode=eval --num_clips=10 --num_crops=3

Builds the same pipeline the trainer uses (pipeline.make_train_dataset or
make_eval_dataset), pulls `--warmup` batches (graph building, shuffle buffer fill,
autotuning), then times `--repeats` windows of `--batches` batches each.

What "per core" means here. The headline figure is clips per CPU-second: clips divided by
the CPU time (user + system, all threads: tf.data's threads run inside this process, see
`resource.getrusage(RUSAGE_SELF)`) the process used while producing them. It equals the
clips/s one fully used core would give, whatever share of the cores the pipeline got
(contention from other jobs still inflates it somewhat: +-15% between runs on a shared
2-core machine, so compare versions back to back, in alternation). Also reported:
wall-clock clips/s, the cores the pipeline actually used (CPU-seconds / wall seconds),
the cores it may use (the affinity mask), wall clips/s per available core (what a
dedicated machine would see if tf.data kept every core busy; on a shared machine it
understates), CPU milliseconds per clip, the main thread's share of the CPU time
(Python's `next()` and the NumPy hand-over), the kernel's share and page faults per clip.
Windows are reported as median and range. In eval mode a record yields all its
num_clips x num_crops views at once, so a window should hold many records' views (raise
--batches); a warning says when it does not.

Data. `--frame_size=HxW` (with `--video_frames`, `--num_videos`) generates the built-in
synthetic dataset at that frame size into its own directory (default
data/generated/throughput_<H>x<W>_<N>f, kept for later runs) and reads it. Records then
have the real datasets' shape: e.g. Kinetics-400 converted with --short_side=128 holds
10 s at 25 fps = 250 frames of 228x128 (16:9) or 170x128 (4:3) per record, about 2.5 MB;
reading and parsing a record costs CPU in proportion to its size, so the small default
synthetic records (32-48 frames of 160x128) flatter the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tcvm_jax.config_files import load_config  # pylint: disable=g-import-not-at-top
from tcvm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from tcvm_jax.data import synthetic  # pylint: disable=g-import-not-at-top

DATA_FIELDS = (("num_frames", int), ("frame_stride", int), ("input_size", int),
               ("sampler", str), ("short_video", str), ("shuffle_buffer", int))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/pretrain.py:demo",
                      help="config file[:preset] (default configs/pretrain.py:demo).")
  parser.add_argument("--pattern", help="TFRecord glob (default: the config's train split).")
  parser.add_argument("--synthetic", action="store_true",
                      help="use the built-in synthetic dataset (config.data.synthetic_dir).")
  parser.add_argument("--frame_size", help="HxW: read a synthetic set generated at this "
                      "frame size (e.g. 128x228), see --video_frames and --num_videos.")
  parser.add_argument("--video_frames", type=int, default=250,
                      help="with --frame_size: frames per video (default 250 = 10 s at 25 fps).")
  parser.add_argument("--num_videos", type=int, default=64,
                      help="with --frame_size: train videos to generate (default 64).")
  parser.add_argument("--data_dir", help="with --frame_size: where the set goes (default "
                      "data/generated/throughput_<H>x<W>_<N>f).")
  parser.add_argument("--mode", choices=("train", "eval"), default="train")
  for name, kind in DATA_FIELDS:
    parser.add_argument(f"--{name}", type=kind, help=f"override config.data.{name}.")
  parser.add_argument("--num_clips", type=int, default=1, help="eval: clips per video.")
  parser.add_argument("--num_crops", type=int, default=1, help="eval: 1 or 3 crops.")
  parser.add_argument("--batch_size", type=int, default=16, help="clips per batch "
                      "(eval: views per batch).")
  parser.add_argument("--warmup", type=int, default=10, help="batches before timing.")
  parser.add_argument("--batches", type=int, default=30, help="batches per timed window.")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows.")
  parser.add_argument("--json", action="store_true", help="also print a JSON object.")
  return parser


def parse_frame_size(text: str) -> tuple[int, int]:
  """'128x228' -> (128, 228): height x width."""
  try:
    height, width = (int(part) for part in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--frame_size={text!r}; expected HxW, e.g. 128x228.") from None
  if min(height, width) < 32:
    raise ValueError(f"--frame_size={text!r}; both sides must be >= 32 px.")
  return height, width


def generated_dataset(args: argparse.Namespace) -> str:
  """Directory of a synthetic set at --frame_size (generated once, then reused)."""
  height, width = parse_frame_size(args.frame_size)
  if args.video_frames < 1 or args.num_videos < 1:
    raise ValueError(f"--video_frames={args.video_frames}, --num_videos={args.num_videos}; "
                     "both must be >= 1.")
  directory = args.data_dir or os.path.join(
      REPO_ROOT, "data", "generated", f"throughput_{height}x{width}_{args.video_frames}f")
  return synthetic.ensure_synthetic_dataset(
      directory, num_train=args.num_videos, num_test=max(1, args.num_videos // 8),
      height=height, width=width, min_frames=args.video_frames,
      max_frames=args.video_frames, num_train_shards=min(8, args.num_videos),
      num_test_shards=1)


def process_usage() -> dict[str, float]:
  """CPU time (user, system) and minor page faults of the whole process, every thread."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return {"user_s": usage.ru_utime, "system_s": usage.ru_stime,
          "page_faults": float(usage.ru_minflt)}


def available_cores() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def describe_records(pattern: str) -> dict[str, Any]:
  """Record count, mean record size and the first frame's size of the files read."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tcvm_jax.data import dmvr_format  # pylint: disable=import-outside-toplevel
  files = pipeline.list_shards(pattern)
  num_records = sum(pipeline.shard_record_counts(files))
  total_bytes = sum(tf.io.gfile.stat(path).length for path in files)
  first = next(iter(tf.data.TFRecordDataset(files[:1])))
  frames = dmvr_format.parse_sequence_example(first)[dmvr_format.IMAGE_KEY]
  height, width, _ = tf.io.extract_jpeg_shape(frames[0]).numpy().tolist()
  return {"records": num_records, "record_mb": round(total_bytes / max(num_records, 1) / 1e6, 3),
          "frame_size": f"{height}x{width}", "frames_in_first_record": int(tf.size(frames)),
          "jpeg_kb_in_first_record": round(
              float(tf.reduce_mean(tf.cast(tf.strings.length(frames), tf.float32))) / 1e3, 2)}


def summarise(values: list[float], digits: int = 2) -> dict[str, float]:
  return {"median": round(statistics.median(values), digits),
          "min": round(min(values), digits), "max": round(max(values), digits)}


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.warmup < 1 or args.batches < 1 or args.repeats < 1:
    print("error: --warmup, --batches and --repeats must be >= 1.", file=sys.stderr)
    return 2
  config = load_config(args.config)
  pattern = args.pattern
  if args.frame_size:
    try:
      directory = generated_dataset(args)
    except ValueError as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
    split = "train" if args.mode == "train" else "test"
    pattern = os.path.join(directory, f"{split}-*.tfrecord")
  elif args.synthetic:
    config.data.name = "synthetic"
  for name, _ in DATA_FIELDS:
    if getattr(args, name) is not None:
      config.data[name] = getattr(args, name)

  started = time.perf_counter()
  if args.mode == "train":
    iterator = pipeline.make_train_dataset(config, batch_size_per_process=args.batch_size,
                                           pattern=pattern)
  else:
    iterator = pipeline.make_eval_dataset(config, "test", batch_size_per_process=args.batch_size,
                                          num_clips=args.num_clips, num_crops=args.num_crops,
                                          pattern=pattern)
    needed = args.warmup + args.batches * args.repeats
    if needed > iterator.num_batches:
      print(f"error: the eval split gives {iterator.num_batches} batches, {needed} needed; "
            "lower --warmup/--batches/--repeats.", file=sys.stderr)
      return 2
  batch = next(iterator)
  first_batch_s = time.perf_counter() - started
  for _ in range(args.warmup - 1):
    batch = next(iterator)

  windows = []
  for repeat in range(args.repeats):
    usage_start, main_start = process_usage(), time.thread_time()
    wall_start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(iterator)
    wall = time.perf_counter() - wall_start
    used = {key: value - usage_start[key] for key, value in process_usage().items()}
    windows.append({"wall_s": wall, "cpu_s": used["user_s"] + used["system_s"],
                    "system_s": used["system_s"], "page_faults": used["page_faults"],
                    "main_thread_cpu_s": time.thread_time() - main_start})
    print(f"[window {repeat + 1}/{args.repeats}] {args.batches * args.batch_size / wall:.1f} "
          f"clips/s, {windows[-1]['cpu_s'] / wall:.2f} cores busy", file=sys.stderr, flush=True)

  clips = args.batches * args.batch_size  # per window (eval: views)
  views_per_record = args.num_clips * args.num_crops if args.mode == "eval" else 1
  if clips < 8 * views_per_record:
    print(f"warning: a window holds {clips} views, under 8 records' worth "
          f"({views_per_record} each); buffered records blur the figures. Raise --batches.",
          file=sys.stderr)
  cores = available_cores()
  per_cpu_s = [clips / w["cpu_s"] for w in windows]
  per_s = [clips / w["wall_s"] for w in windows]
  cores_used = [w["cpu_s"] / w["wall_s"] for w in windows]
  main_share = [w["main_thread_cpu_s"] / w["cpu_s"] for w in windows]
  system_share = [w["system_s"] / w["cpu_s"] for w in windows]
  faults = [w["page_faults"] / clips for w in windows]
  result = {
      "mode": args.mode, "sampler": config.data.sampler, "num_frames": config.data.num_frames,
      "frame_stride": config.data.frame_stride, "input_size": config.data.input_size,
      "num_clips": args.num_clips if args.mode == "eval" else 1,
      "num_crops": args.num_crops if args.mode == "eval" else 1,
      "batch_shape": list(batch["video"].shape),
      "source": pattern or pipeline.split_pattern(config, "train" if args.mode == "train"
                                                  else "test"),
      "clips_per_window": clips, "windows": len(windows),
      "first_batch_s": round(first_batch_s, 2),
      # The headline figure: clips per CPU-second = clips/s/core at full use.
      "clips_per_cpu_s": round(statistics.median(per_cpu_s), 2),
      "clips_per_cpu_s_range": summarise(per_cpu_s),
      "cpu_ms_per_clip": round(1e3 / statistics.median(per_cpu_s), 3),
      "clips_per_s": round(statistics.median(per_s), 2),
      "clips_per_s_range": summarise(per_s),
      "cores_used": round(statistics.median(cores_used), 2),
      "cores_available": cores,
      "clips_per_s_per_available_core": round(statistics.median(per_s) / cores, 2),
      "main_thread_cpu_share": round(statistics.median(main_share), 3),
      # Kernel time, mostly page faults: fresh pages for multi-MB records and clips.
      "system_cpu_share": round(statistics.median(system_share), 3),
      "page_faults_per_clip": round(statistics.median(faults), 1),
      "bad_records": iterator.tracker.num_bad,
  }
  result.update(describe_records(result["source"]))
  ranges = result["clips_per_cpu_s_range"]
  print(f"{result['clips_per_cpu_s']:.1f} clips per CPU-second "
        f"(range {ranges['min']:.1f}-{ranges['max']:.1f} over {len(windows)} windows; "
        f"{result['cpu_ms_per_clip']:.2f} ms CPU per clip); wall {result['clips_per_s']:.1f} "
        f"clips/s using {result['cores_used']:.2f} of {cores} cores; {args.mode}, "
        f"{config.data.sampler} {config.data.num_frames}x{config.data.frame_stride}, "
        f"{config.data.input_size}px crops of {result['frame_size']} frames, "
        f"{result['record_mb']} MB records, batch {tuple(batch['video'].shape)}")
  if args.json:
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
