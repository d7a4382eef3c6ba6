r"""Times the blocks' 1x1 convs as the step runs them with `model.conv1x1_kernel` 'xla'
(the matmul between BatchNorm passes) and with the Pallas kernel (one kernel that applies
bn_b + ReLU in front and sums the output for the next BatchNorm,
tcvm_jax/conv1x1_kernel.py) at several tilings, on the shapes the backbone calls it with
under 'pallas_all' (every stride-1 1x1 conv; 'pallas' fuses a subset) (issue #6).

  python benchmarks/conv1x1_variants.py [--config=configs/pretrain.py] [--batch_size=32]
      [--json=FILE] [--budget_s=70]

The shapes come from tracing the config's backbone on its step's input (B pseudo-videos
of T frames; R3D50 at B = 32: nine distinct (rows, in -> out) shapes, 24 calls). Each
variant is timed on each shape, forward (y and the two sums) and, for 'xla' and each
shape's fastest tiling, forward + backward: behind bn_b + ReLU with the input-gradient
kernel (`conv1x1_kernel.input_grad_kernel`) and with all of the backward by XLA ('...
(XLA backward)'; it recomputes the normalised input the 'xla' form keeps; the weight
gradient is an XLA matmul in both). Times are the mean of
back-to-back calls, median of 3 such runs. The last lines add them up per step
(count x time): what the step would gain, as far as these calls in isolation tell.
Outputs agree to the reference's rounding (max relative difference printed). Stops
starting new shapes after --budget_s seconds. Runs on any platform (the kernel needs a
GPU; elsewhere only 'xla' is timed unless --interpret).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import jax_step  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
from tcvm_jax import backbones, config_files, conv1x1_kernel as ck, layers  # pylint: disable=g-import-not-at-top

# Tile sizes tried (block_m, block_n, block_k, num_warps, num_stages); the first is the
# kernel's default. Blocks shrink to divide each shape (`conv1x1_kernel.kernel_tiling`).
TILINGS = (ck.Tiling(),
           ck.Tiling(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
           ck.Tiling(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
           ck.Tiling(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
           ck.Tiling(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
           ck.Tiling(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4))

Shape = collections.namedtuple("Shape", "rows in_features out_features with_affine")
XLA_BACKWARD = "{} (XLA backward)"  # the kernel forward, all of the backward by XLA


def tiling_name(tiling: ck.Tiling) -> str:
  return "pallas_{}x{}x{}_w{}_s{}".format(*tiling)


def backbone_calls(config, batch_size: int) -> collections.Counter:
  """Counter of the `Shape`s the config's backbone calls `conv1x1_with_statistics` with,
  over one forward pass of the step's pseudo-videos (traced, nothing computed), with
  model.conv1x1_kernel='pallas_all' (every 1x1 conv the kernel can take: all are timed)."""
  options = dict(backbones.compute_options(config.model), conv1x1_kernel="pallas_all")
  backbone = nnx.eval_shape(lambda: backbones.get_backbone(
      config.model.backbone, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **options))
  graphdef, state = nnx.split(backbone)
  size = config.montage.output_size
  videos = jax.ShapeDtypeStruct((batch_size, config.data.num_frames, size, size, 3),
                                jnp.bfloat16)
  calls = collections.Counter()
  original = layers.conv1x1_with_statistics

  def record(conv, x, affine=None, **kwargs):
    calls[Shape(int(np.prod(x.shape[:-1])), conv.in_features, conv.out_features,
                affine is not None)] += 1
    return original(conv, x, affine, **kwargs)

  layers.conv1x1_with_statistics = record
  try:
    jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v), state, videos)
  finally:
    layers.conv1x1_with_statistics = original
  return calls


def shape_inputs(shape: Shape, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(shape.rows, shape.in_features)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(shape.in_features, shape.out_features))
                  / np.sqrt(shape.in_features), jnp.bfloat16)
  affine = None
  if shape.with_affine:
    affine = ck.Affine(*(jnp.asarray(v, jnp.float32) for v in (
        rng.normal(size=shape.in_features) * 0.1, rng.uniform(0.5, 1.5, shape.in_features),
        rng.normal(size=shape.in_features) * 0.1)))
  cotangents = (jnp.asarray(rng.normal(size=(shape.rows, shape.out_features)), jnp.bfloat16),
                jnp.asarray(rng.normal(size=shape.out_features) * 1e-3, jnp.float32),
                jnp.asarray(rng.normal(size=shape.out_features) * 1e-4, jnp.float32))
  return x, w, affine, cotangents


def timed(fn, args, steps: int) -> float:
  """Median over 3 runs of the mean time of `steps` back-to-back calls."""
  jax.block_until_ready(fn(*args))
  runs = [jax_step.chained_time(lambda: fn(*args), steps=steps)[0] for _ in range(3)]
  return float(np.median(runs))


def per_step_totals(results: list[dict]) -> dict[str, float]:
  """Milliseconds per step (count x time over the shapes timed) for 'xla', each tiling and
  each shape's fastest tiling; a shape a variant did not run adds 'xla''s time, as the
  step would run the reference there."""
  totals = collections.defaultdict(float)
  for row in results:
    count, forward, both = row["count"], row["forward_ms"], row["both_ms"]
    if "xla" not in forward:
      continue
    kernels = {name: ms for name, ms in forward.items() if name != "xla"}
    best = min(kernels, key=kernels.get) if kernels else "xla"
    totals["forward:xla"] += count * forward["xla"]
    totals["forward:pallas_best"] += count * forward[best]
    for tiling in TILINGS:
      fitted = ck.kernel_tiling(row["shape"]["rows"], row["shape"]["in_features"],
                                row["shape"]["out_features"], tiling)
      name = tiling_name(fitted) if fitted is not None else "xla"
      totals[f"forward:{tiling_name(tiling)}"] += count * forward.get(name, forward["xla"])
    if "xla" in both:
      totals["forward+backward:xla"] += count * both["xla"]
      totals["forward+backward:pallas_best"] += count * both.get(best, both["xla"])
      totals["forward+backward:pallas_best_xla_backward"] += count * both.get(
          XLA_BACKWARD.format(best), both.get(best, both["xla"]))
  return dict(totals)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/pretrain.py")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--budget_s", type=float, default=70.0)
  parser.add_argument("--interpret", action="store_true",
                      help="Run the kernel in Pallas's interpreter (any platform, slowly).")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  config = config_files.load_config(args.config)
  calls = backbone_calls(config, args.batch_size)
  device = jax.devices()[0]
  run_kernel = device.platform == "gpu" or args.interpret
  print(f"{config.model.backbone}, B = {args.batch_size}: {sum(calls.values())} fused 1x1 "
        f"calls, {len(calls)} shapes; {device.device_kind}"
        + ("" if run_kernel else " (no GPU: only 'xla' timed)"), flush=True)
  results = []
  for shape, count in sorted(calls.items(), key=lambda item: -item[0].rows):
    if time.perf_counter() - start > args.budget_s:
      print(f"budget of {args.budget_s:.0f} s spent: shapes left out", flush=True)
      break
    x, w, affine, cotangents = shape_inputs(shape)
    variants = {"xla": ck.conv1x1_stats_reference}
    if run_kernel:
      for tiling in TILINGS:
        fitted = ck.kernel_tiling(shape.rows, shape.in_features, shape.out_features, tiling)
        if fitted is not None and tiling_name(fitted) not in variants:
          variants[tiling_name(fitted)] = fitted
    want = jax.jit(ck.conv1x1_stats_reference)(x, w, affine)
    row = {"shape": shape._asdict(), "count": count, "forward_ms": {}, "both_ms": {},
           "errors": {}, "max_rel_diff": {}}
    def kernel(tiling, backward_kernel=True):
      return lambda x, w, a: ck.conv1x1_stats(x, w, a, tiling=tiling, interpret=args.interpret,
                                              backward_kernel=backward_kernel)

    for name, variant in variants.items():
      fn = variant if name == "xla" else kernel(variant)
      try:
        forward = jax.jit(fn)
        got = forward(x, w, affine)
        scale = float(jnp.max(jnp.abs(want[0].astype(jnp.float32))))
        row["max_rel_diff"][name] = float(jnp.max(jnp.abs(
            got[0].astype(jnp.float32) - want[0].astype(jnp.float32)))) / scale
        row["forward_ms"][name] = timed(forward, (x, w, affine), args.steps) * 1e3
      except Exception as error:  # pylint: disable=broad-except
        row["errors"][name] = f"{type(error).__name__}: {str(error)[:300]}"
    timed_forward = {k: v for k, v in row["forward_ms"].items() if k != "xla"}
    best = min(timed_forward, key=timed_forward.get) if timed_forward else None
    backwards = {"xla": variants["xla"]}
    if best:  # the best forward tiling, with the input-gradient kernel and without
      backwards[best] = kernel(variants[best])
      if shape.with_affine:
        backwards[XLA_BACKWARD.format(best)] = kernel(variants[best], backward_kernel=False)
    for name, fn in backwards.items():

      def both(x, w, affine, cotangents, fn=fn):
        outputs, vjp = jax.vjp(fn, x, w, affine)
        return outputs[0], vjp(cotangents)

      try:
        row["both_ms"][name] = timed(jax.jit(both), (x, w, affine, cotangents),
                                     args.steps) * 1e3
      except Exception as error:  # pylint: disable=broad-except
        row["errors"][name + " (backward)"] = f"{type(error).__name__}: {str(error)[:300]}"
    results.append(row)
    if args.json:  # after every shape: a timeout keeps what was measured
      write_json(args, device, results, start)
    # The fewest bytes: x read and y written once (bfloat16).
    moved_gb = 2 * shape.rows * (shape.in_features + shape.out_features) / 1e9
    fastest = min(row["forward_ms"].values(), default=None)
    line = ", ".join(f"{name} {ms:.3f}" for name, ms in row["forward_ms"].items())
    print(f"{shape.rows} x {shape.in_features} -> {shape.out_features}"
          f"{' (bn + relu in front)' if shape.with_affine else ''} x{count}: forward ms: "
          f"{line}; fwd+bwd ms: "
          + ", ".join(f"{name} {ms:.3f}" for name, ms in row["both_ms"].items())
          + f"; {moved_gb:.3f} GB at least"
          + (f", {moved_gb / fastest * 1e3:.0f} GB/s at the fastest" if fastest else "")
          + (f"; errors: {row['errors']}" if row["errors"] else ""), flush=True)
  print("per step (count x time, the shapes timed):")
  for key, ms in sorted(per_step_totals(results).items()):
    print(f"  {key:<40} {ms:8.3f} ms")
  if args.json:
    write_json(args, device, results, start)
  return 0


def write_json(args, device, results: list[dict], start: float) -> None:
  with open(args.json, "w") as f:
    json.dump({"device": device.device_kind, "config": args.config,
               "batch_size": args.batch_size, "shapes": results,
               "per_step_ms": per_step_totals(results),
               "seconds": time.perf_counter() - start}, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
