r"""Times the montage's clip augmentation in its variants (issue #6): the planes' dtype, the
blur along H, and the colour jitter as XLA passes or one fused Pallas kernel.

  python benchmarks/augment_variants.py [--config=configs/pretrain.py] [--batch_size=32]
      [--json=FILE] [--winner_flags=FILE] [--min_gain=0.05]

`augment.augment_clips` on the step's clips (batch_size x montage.num_clips clips of
T / s frames at data.input_size, to montage.output_size, bfloat16 output as the bf16
step). Variants, each a set of `config.augment` overrides of the defaults:
  default           the config's fields ('auto': `augment.AUTO_ON_CUDA` on CUDA, bfloat16
                    planes, the blur's matmul and the Pallas jitter; `AUTO_ELSEWHERE`
                    elsewhere: float32, taps, XLA)
  planes_float32    the planes between passes in float32 (`plane_dtype`)
  blur_taps         / blur_matmul: the blur along H as 11 taps / one (S, S) matmul
                    (`blur_rows`)
  jitter_xla        / jitter_pallas: jitter + grayscale as XLA passes / one kernel
                    (`jitter_kernel`, tcvm_jax/jitter_kernel.py)
  none              float32, taps and XLA: the augmentation before any of them
On CUDA the first of each pair is the default less one of its choices; elsewhere the
second is the one that differs (the others compile to the default's program and are not
timed). 'pallas' is timed on GPUs only (elsewhere it runs the XLA form). On the H200
(2026-11-27): default 0.87 ms, none 2.49 ms for the paper's batch (docs/performance.md).

Compiled first; a variant whose program is the default's is not timed again. Then
--rounds alternating rounds (listed order, reversed) of --steps calls each: each time is
the median over rounds of the median of the calls. Prints each, its ratio to 'default',
and how far each output lands from the default's (normalised units: one uint8 level is
~0.017).
--without=NAME,...: leaves variants out (gpu_session.sh's second try when a kernel took
the process down). --winner_flags: writes the fastest variant's overrides as
'--config.augment.F=V ...' when it beats 'default' by at least --min_gain (else an empty
file), for scripts/gpu_session.sh to pass on to the benchmark. Imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import ab_rounds, jax_step  # pylint: disable=g-import-not-at-top
from tcvm_jax import augment, config_files  # pylint: disable=g-import-not-at-top

DEFAULT = "default"
# name -> overrides of config.augment; the order is the order they are timed in.
VARIANTS = {
    DEFAULT: {},
    "planes_float32": {"plane_dtype": "float32"},
    "blur_taps": {"blur_rows": "taps"},
    "blur_matmul": {"blur_rows": "matmul"},
    "jitter_xla": {"jitter_kernel": "xla"},
    "jitter_pallas": {"jitter_kernel": "pallas"},
    "none": {"plane_dtype": "float32", "blur_rows": "taps", "jitter_kernel": "xla"},
}

def winner(times: dict[str, float], min_gain: float) -> str | None:
  """The fastest variant if it beats 'default' by at least `min_gain`, else None."""
  best = min(times, key=times.get)
  if best != DEFAULT and times[best] <= (1.0 - min_gain) * times[DEFAULT]:
    return best
  return None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/pretrain.py",
                      help="configs/pretrain.py[:preset].")
  parser.add_argument("--batch_size", type=int, default=32, help="Videos (B).")
  parser.add_argument("--steps", type=int, default=10, help="Timed calls per round.")
  parser.add_argument("--rounds", type=int, default=4, help="Alternating rounds.")
  parser.add_argument("--json", default=None, help="Write every figure to this file.")
  parser.add_argument("--winner_flags", default=None,
                      help="Write the winner's config flags (or nothing) to this file.")
  parser.add_argument("--without", default="",
                      help="Comma-separated variants to leave out (not 'default').")
  parser.add_argument("--min_gain", type=float, default=0.05,
                      help="How much faster than 'default' a winner must be.")
  args = parser.parse_args(argv)
  left_out = {name for name in args.without.split(",") if name}
  if left_out - set(VARIANTS) or DEFAULT in left_out:
    parser.error(f"--without={args.without!r}: choose among {sorted(set(VARIANTS) - {DEFAULT})}")
  config = config_files.load_config(args.config)
  num_clips = args.batch_size * config.montage.num_clips
  length = config.data.num_frames // config.montage.num_clips
  size, out_size = config.data.input_size, config.montage.output_size
  clips = jnp.asarray(np.random.default_rng(0).integers(0, 256, (num_clips, length, size,
                                                                  size, 3)), jnp.uint8)
  keys = jax.random.split(jax.random.key(0), num_clips)
  params = jax.vmap(lambda key: augment.sample_augment_params(
      key, config.augment, (size, size), out_size))(keys)
  on_gpu = jax.default_backend() == "gpu"
  device = jax.devices()[0].device_kind
  functions, programs, outputs, skipped, failed = {}, {}, {}, [], {}
  computes = {name: augment.compute_options(config.augment, **overrides)
              for name, overrides in VARIANTS.items()}
  for name, compute in computes.items():
    if name in left_out:
      skipped.append(name)
      continue
    if compute.jitter_kernel == "pallas" and not on_gpu:
      skipped.append(name)
      print(f"{name}: not timed on {device} (the XLA form off CUDA)", flush=True)
      continue
    try:
      compiled = jax.jit(lambda p, c, compute=compute: augment.augment_clips(
          p, c, jnp.bfloat16, compute)).lower(params, clips).compile()
      outputs[name] = compiled(params, clips).astype(jnp.float32)
    except Exception as error:  # pylint: disable=broad-except  # report it, time the rest
      failed[name] = f"{type(error).__name__}: {error}"
      print(f"{name}: FAILED, {failed[name][:2000]}", flush=True)
      continue
    programs[name] = ab_rounds.program_text(compiled)
    if name != DEFAULT and programs[name] == programs.get(DEFAULT):
      skipped.append(name)
      print(f"{name}: the default's program on {device}, not timed again", flush=True)
      continue
    functions[name] = compiled
  # Alternating rounds (listed order, then reversed): drifts of the device's clock or
  # load hit every variant alike.
  per_round = {name: [] for name in functions}
  for index in range(args.rounds):
    for name in ab_rounds.round_order(list(functions), index):
      seconds, _ = jax_step.median_time(
          lambda fn=functions[name]: fn(params, clips).block_until_ready(),
          steps=args.steps, warmup=1)
      per_round[name].append(seconds)
  times = {name: statistics.median(values) for name, values in per_round.items()}
  # If the default failed there is nothing to compare with (nan ratios, no winner).
  reference_time, reference = times.get(DEFAULT, math.nan), outputs.get(DEFAULT)
  errors = {name: (float(jnp.abs(outputs[name] - reference).max())
                   if reference is not None else math.nan) for name in times}
  for name in times:
    settings = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(computes[name]).items())
    print(f"{name:<26} {times[name] * 1e3:8.3f} ms  x{times[name] / reference_time:.3f}  "
          f"max |out - default| {errors[name]:.4f}  ({settings})", flush=True)
  print(f"on {device}: {num_clips} clips of {length} x {size}^2 -> {out_size}^2, median "
        f"over {args.rounds} rounds of the median of {args.steps} calls")
  best = winner(times, args.min_gain) if DEFAULT in times else None
  flags = ([f"--config.augment.{k}={v}" for k, v in VARIANTS[best].items()]
           if best else [])
  print(f"winner (>= {args.min_gain:.0%} faster than default): {best or 'none'} "
        f"{' '.join(flags)}")
  if args.winner_flags:
    with open(args.winner_flags, "w") as f:
      f.write(" ".join(flags))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device, "num_clips": num_clips, "clip_length": length,
                 "input_size": size, "output_size": out_size,
                 "times_s": times, "max_abs_difference_to_default": errors,
                 "skipped": skipped, "failed": failed, "winner": best,
                 "winner_flags": flags}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
