r"""Times the montage's clip augmentation: float32 or bfloat16 planes, and the blur along H
as taps or as one matmul (issue #6).

  python benchmarks/augment_variants.py [--config=configs/pretrain.py] [--batch_size=32]

`augment.augment_clips` on the step's clips (batch_size x montage.num_clips clips of
T / s frames at data.input_size, to montage.output_size, bfloat16 output as the bf16
step), with the planes between passes in float32 (what the step uses) and in bfloat16
(`plane_dtype`; each pass still computes in float32), each with the blur along H as
11 taps over reflect-padded planes or as one (S, S) matmul (`blur_rows`). On the H200
bfloat16 planes took the augmentation from 2.61 to 1.61 ms (now the CUDA default); the
padded copies were 0.37 ms of the float32 montage (docs/performance.md). Jitted, median of
--steps; prints the time of each and how far the bfloat16 planes' output lands from the
float32 one (normalised units: one uint8 level is ~0.017).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import jax_step  # pylint: disable=g-import-not-at-top
from configs import pretrain  # pylint: disable=g-import-not-at-top
from tcvm_jax import augment  # pylint: disable=g-import-not-at-top


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="", help="configs/pretrain.py preset ('' or demo).")
  parser.add_argument("--batch_size", type=int, default=32, help="Videos (B).")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  config = pretrain.get_config(args.preset)
  num_clips = args.batch_size * config.montage.num_clips
  length = config.data.num_frames // config.montage.num_clips
  size, out_size = config.data.input_size, config.montage.output_size
  clips = jnp.asarray(np.random.default_rng(0).integers(0, 256, (num_clips, length, size,
                                                                  size, 3)), jnp.uint8)
  keys = jax.random.split(jax.random.key(0), num_clips)
  params = jax.vmap(lambda key: augment.sample_augment_params(
      key, config.augment, (size, size), out_size))(keys)
  outputs = {}
  for name in ("float32", "bfloat16"):
    for rows in augment.BLUR_ROWS:
      fn = jax.jit(lambda p, c, name=name, rows=rows: augment.augment_clips(
          p, c, jnp.bfloat16, plane_dtype=name, blur_rows=rows))
      outputs[name, rows] = fn(params, clips)
      seconds, _ = jax_step.median_time(lambda fn=fn: fn(params, clips).block_until_ready(),
                                        steps=args.steps, warmup=3)
      print(f"augment_clips, {name:<8} planes, blur rows as {rows:<6} on "
            f"{jax.devices()[0].device_kind}: {seconds * 1e3:8.3f} ms ({num_clips} clips of "
            f"{length} x {size}^2 -> {out_size}^2)", flush=True)
  error = jnp.abs(outputs["bfloat16", "taps"].astype(jnp.float32)
                  - outputs["float32", "taps"].astype(jnp.float32))
  print(f"|bfloat16 planes - float32 planes|: mean {float(error.mean()):.4f}, "
        f"max {float(error.max()):.4f} (normalised units)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
