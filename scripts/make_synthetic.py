r"""Generates the built-in synthetic motion dataset (DMVR-format TFRecords).

  python scripts/make_synthetic.py --output_dir=data/generated/synthetic_motion
  python scripts/make_synthetic.py --output_dir=/tmp/tiny --tiny      # a few seconds
  python scripts/make_synthetic.py --output_dir=DIR --scene_bias=0.5 --seed=3

12 classes defined only by how a foreground object moves, over real photographs with
slow camera drift; `--scene_bias` is the probability that a train video shows its
class's own background (test backgrounds are independent of the class). The default
size (1000 train / 300 test videos, 32-48 frames of 128x160) takes well under a minute
of CPU time per core on 2 cores. An existing directory with the same parameters is
kept as it is; different parameters regenerate it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # spawned workers inherit it too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tcvm_jax.data import synthetic  # pylint: disable=g-import-not-at-top


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output_dir", required=True, help="where the dataset goes.")
  parser.add_argument("--tiny", action="store_true",
                      help=f"the test-sized preset {synthetic.TINY_PARAMS} (flags below that "
                      "are given still override it).")
  defaults = synthetic.SyntheticParams()
  for field in dataclasses.fields(synthetic.SyntheticParams):
    parser.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)),
                        default=None,
                        help=f"default {getattr(defaults, field.name)}.")
  parser.add_argument("--num_workers", type=int, default=2,
                      help="parallel rendering processes (default 2).")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  params = dict(synthetic.TINY_PARAMS) if args.tiny else {}
  for field in dataclasses.fields(synthetic.SyntheticParams):
    value = getattr(args, field.name)
    if value is not None:
      params[field.name] = value
  try:
    synthetic.SyntheticParams(**params).validate()
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  directory = synthetic.ensure_synthetic_dataset(args.output_dir,
                                                 num_workers=args.num_workers, **params)
  print(f"synthetic dataset ready in {directory} "
        f"(fingerprint {synthetic.read_fingerprint(directory)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
