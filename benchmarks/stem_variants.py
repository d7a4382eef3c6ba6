r"""Times the stem convolution (7x7, stride 2, 3 -> 64 channels) three ways and the whole
stem (conv, BatchNorm, ReLU, max-pool) in both layouts (issue #6).

  python benchmarks/stem_variants.py [--frames=1024] [--size=112] [--dtype=bfloat16]

'plain': one strided conv over 3 channels; 'space_to_depth': the same sums as a stride-1
4x4 conv over 12 channels (`layers._conv2d_space_to_depth`, what the model trains with on
CUDA, and on CPU for stems of up to 16 channels); 'space_to_depth_matmul': those as one
(pixels, 192) x (192, 64) matmul (`layers._conv2d_space_to_depth_matmul`). Each is timed
forward and forward + weight gradient (the stem's input needs no gradient), jitted, median
of 20. They must agree (max relative difference to 'plain' printed). Then the whole stem
as the model trains it (`VideoResNet._stem`, BatchNorm in training mode) with
`model.stem_layout` 'pixels' and 'blocks' (tcvm_jax/stem.py): forward, and forward + the
gradient of the stem's parameters; the pooled outputs must agree too.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from benchmarks import jax_step  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
from tcvm_jax import backbones, layers  # pylint: disable=g-import-not-at-top


def time_whole_stem(videos: jax.Array, features: int, steps: int) -> dict[str, jax.Array]:
  """Times `VideoResNet._stem` in each layout; returns each layout's pooled output."""
  outputs = {}
  for layout in ("pixels", "blocks"):
    model = backbones.ResNet3D(stage_sizes=(1,), stage_temporal_kernels=(1,), width=features,
                               dtype=videos.dtype, stem_layout=layout, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, rest, videos, graphdef=graphdef):
      # copy=True: fresh Variables at this trace level, whose BatchNorm updates may land.
      model = nnx.merge(graphdef, params, rest, copy=True)
      return model._stem(videos)  # pylint: disable=protected-access

    def loss(params, rest, videos, graphdef=graphdef):
      return jnp.mean(run(params, rest, videos, graphdef).astype(jnp.float32) ** 2)

    forward = jax.jit(run)
    gradient = jax.jit(jax.value_and_grad(loss))
    outputs[layout] = forward(params, rest, videos)
    fwd_s, _ = jax_step.median_time(
        lambda: forward(params, rest, videos).block_until_ready(), steps=steps, warmup=3)
    both_s, _ = jax_step.median_time(
        lambda: jax.block_until_ready(gradient(params, rest, videos)), steps=steps, warmup=3)
    print(f"whole stem {layout:<8} {jax.devices()[0].device_kind}: forward "
          f"{fwd_s * 1e3:7.3f} ms, forward + parameter gradient {both_s * 1e3:7.3f} ms "
          f"({videos.shape[1]} frames of {videos.shape[2]}^2, {videos.dtype})", flush=True)
  return outputs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--frames", type=int, default=1024, help="B * T frames.")
  parser.add_argument("--size", type=int, default=112)
  parser.add_argument("--features", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  key_x, key_k, key_g = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (args.frames, args.size, args.size, 3), dtype)
  kernel = jax.random.normal(key_k, (7, 7, 3, args.features), jnp.float32) * 0.1
  variants = {"plain": functools.partial(layers._conv2d, stride=2),  # pylint: disable=protected-access
              "space_to_depth": functools.partial(layers._conv2d_space_to_depth, stride=2),  # pylint: disable=protected-access
              "space_to_depth_matmul": functools.partial(
                  layers._conv2d_space_to_depth_matmul, stride=2)}  # pylint: disable=protected-access
  outputs = {}
  for name, conv in variants.items():
    forward = jax.jit(lambda x, k, conv=conv: conv(x, k.astype(x.dtype)))
    out_shape = jax.eval_shape(forward, x, kernel)
    cotangent = jax.random.normal(key_g, out_shape.shape, out_shape.dtype)

    def weight_grad(x, k, g, conv=conv):
      y, vjp = jax.vjp(lambda k: conv(x, k.astype(x.dtype)), k)
      return y, vjp(g)[0]

    weight_grad = jax.jit(weight_grad)
    outputs[name] = forward(x, kernel)
    fwd_s, _ = jax_step.median_time(lambda: forward(x, kernel).block_until_ready(),
                                    steps=args.steps, warmup=3)
    both_s, _ = jax_step.median_time(
        lambda: jax.block_until_ready(weight_grad(x, kernel, cotangent)),
        steps=args.steps, warmup=3)
    print(f"stem {name:<15} {jax.devices()[0].device_kind}: forward {fwd_s * 1e3:7.3f} ms, "
          f"forward + weight gradient {both_s * 1e3:7.3f} ms "
          f"({args.frames} x {args.size}^2 x 3 -> {args.features}, {args.dtype})", flush=True)
  plain = outputs["plain"].astype(jnp.float32)
  for name in list(variants)[1:]:
    relative = float(jnp.abs(plain - outputs[name].astype(jnp.float32)).max()
                     / jnp.abs(plain).max())
    print(f"max |plain - {name}| / max |plain| = {relative:.2e}")
  pooled = time_whole_stem(x[None], args.features, args.steps)
  pixels = pooled["pixels"].astype(jnp.float32)
  relative = float(jnp.abs(pixels - pooled["blocks"].astype(jnp.float32)).max()
                   / jnp.abs(pixels).max())
  print(f"whole stem: max |pixels - blocks| / max |pixels| = {relative:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
