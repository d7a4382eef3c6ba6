r"""Validates DMVR-format TFRecords and prints a summary (see data/README.md).

  python scripts/check_tfrecords.py --input=data/ucf101
  python scripts/check_tfrecords.py --input='data/k400/train-*.tfrecord' --jpeg_check=sample

Exit status: 0 when no problem was found, 1 when some were (each is printed with its
file and record index), 2 on bad arguments or when no file matches.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tcvm_jax.data import check  # pylint: disable=g-import-not-at-top
from tcvm_jax.data import dmvr_format  # pylint: disable=g-import-not-at-top


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="a folder of shards, a glob (quote it) "
                      "or one file.")
  parser.add_argument("--label_map", help="label_map.txt (or its folder); default: the one "
                      "beside the shards, if any.")
  parser.add_argument("--max_records", type=int, default=None,
                      help="stop after this many records (default: all).")
  parser.add_argument("--jpeg_check", default="all", choices=check.JPEG_CHECKS,
                      help="decode every frame (all, default), first/middle/last of each "
                      "record (sample), or none.")
  parser.add_argument("--max_problems", type=int, default=50,
                      help="problems to print (all are counted; default 50).")
  args = parser.parse_args(argv)
  if args.max_records is not None and args.max_records < 1:
    parser.error(f"--max_records must be >= 1, got {args.max_records}")
  files = check.find_tfrecords(args.input)
  if not files:
    parser.error(f"no TFRecord files match --input={args.input}")
  label_map = None
  if args.label_map:
    if os.path.isdir(args.label_map):
      label_map = dmvr_format.read_label_map(args.label_map)
    elif os.path.exists(args.label_map):
      with open(args.label_map, encoding="utf-8") as f:
        label_map = [line.rstrip("\n") for line in f if line.strip()]
    else:
      parser.error(f"--label_map={args.label_map} does not exist")
  report = check.check_tfrecords(files, label_map=label_map, max_records=args.max_records,
                                 jpeg_check=args.jpeg_check)
  print(check.format_report(report, max_problems=args.max_problems))
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
