r"""Converts videos into sharded DMVR-format TFRecords (see data/README.md).

  python scripts/make_tfrecords.py --csv=videos.csv --output_dir=data/mine
  python scripts/make_tfrecords.py --format=ucf101 --split_file=ucfTrainTestlist \
      --video_root=UCF-101 --output_dir=data/ucf101 --num_workers=8

Exit status: 0 when at least one video was converted, 1 when every video failed,
2 on bad arguments, 3 when some shards could not be written (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # spawned workers inherit it too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tcvm_jax.data import convert  # pylint: disable=g-import-not-at-top
from tcvm_jax.data import dataset_lists  # pylint: disable=g-import-not-at-top


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  inputs = parser.add_argument_group("input")
  inputs.add_argument("--format", default="csv", choices=dataset_lists.FORMATS,
                      help="layout of the video list (default: csv).")
  inputs.add_argument("--csv", help="csv: a CSV of path,label[,start,end] (a header naming "
                      "the columns is optional); kinetics400: the official CSV (or a folder "
                      "of them).")
  inputs.add_argument("--split_file", help="ssv2: the labels folder (labels.json, train.json, "
                      "...) or one split JSON; ucf101: the ucfTrainTestlist folder or one "
                      "trainlist/testlist file; hmdb51: the folder of *_test_splitN.txt.")
  inputs.add_argument("--video_root", help="folder of the videos (required for the official "
                      "layouts; for csv, relative paths resolve against it, else against the "
                      "CSV's folder).")
  inputs.add_argument("--fold", type=int, default=1,
                      help="official fold for ucf101/hmdb51: 1, 2 or 3 (default 1).")
  inputs.add_argument("--split", help="comma-separated splits to convert (default: all in "
                      "the list except hmdb51's 'unused'). For a csv without a split column, "
                      "the split name of its rows (default 'train').")
  output = parser.add_argument_group("output")
  output.add_argument("--output_dir", required=True, help="folder for shards, label map, "
                      "manifest (created).")
  output.add_argument("--shard_prefix", help="shard name prefix (default: the split name); "
                      "only with a single split.")
  output.add_argument("--num_shards", type=int, default=0, help="shards per split (default "
                      f"0: one per {convert.VIDEOS_PER_SHARD} videos).")
  output.add_argument("--overwrite", action="store_true", help="rewrite shards and label map "
                      "left by a different conversion instead of stopping.")
  encoding = parser.add_argument_group("frames")
  encoding.add_argument("--fps", type=float, default=None, help="resample to this frame rate "
                        "by taking the nearest frame (default: keep the source rate).")
  encoding.add_argument("--short_side", type=int, default=128, help="resize so the short side "
                        "is this many pixels, even (default 128: the pipeline crops 112-128 px "
                        "from it); 0 keeps the source size.")
  encoding.add_argument("--jpeg_quality", type=int, default=90, help="1-100 (default 90).")
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                      help="parallel processes (default: all CPU cores; 1 = no subprocess).")
  parser.add_argument("--progress_every", type=float, default=10.0,
                      help="seconds between progress lines on stderr (default 10).")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.format in ("csv", "kinetics400"):
    input_path = args.csv or args.split_file
  else:
    input_path = args.split_file or args.csv
  if not input_path:
    parser.error(f"--format={args.format} needs "
                 f"{'--csv' if args.format in ('csv', 'kinetics400') else '--split_file'}")
  splits = [s.strip() for s in args.split.split(",") if s.strip()] if args.split else None
  csv_split = splits[0] if args.format == "csv" and splits and len(splits) == 1 else "train"
  try:
    dataset = dataset_lists.load_dataset_list(
        args.format, input_path, video_root=args.video_root, fold=args.fold, split=csv_split)
    filename_root = args.video_root or (
        os.path.dirname(os.path.abspath(input_path)) if args.format == "csv" else None)
    options = convert.ConvertOptions(
        fps=args.fps, short_side=args.short_side, jpeg_quality=args.jpeg_quality,
        num_workers=args.num_workers, overwrite=args.overwrite, filename_root=filename_root,
        progress_every_s=args.progress_every)
    print(f"{len(dataset.records)} videos listed in {input_path}; writing to "
          f"{args.output_dir} with {args.num_workers} worker(s).", file=sys.stderr, flush=True)
    result = convert.convert_dataset(
        dataset, args.output_dir, splits=splits, shard_prefix=args.shard_prefix,
        num_shards=args.num_shards, options=options)
  except (dataset_lists.DatasetListError, convert.ConversionError) as error:
    parser.error(str(error))
  print(convert.format_summary(result, args.output_dir), file=sys.stderr, flush=True)
  run = result["run"]
  if run["num_videos"] == 0:
    print("Error: every video failed; nothing was converted.", file=sys.stderr)
    return 1
  if run["shards_incomplete"]:
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
