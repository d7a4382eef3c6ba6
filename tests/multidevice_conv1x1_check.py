"""The fused 1x1 conv (Pallas's interpreter) with its rows split over 4 devices against
one device, and what the partitioned program moves between devices; prints a JSON report.

Needs 4 devices before jax starts, e.g.
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice_conv1x1_check.py
`tests/test_conv1x1_kernel.py` runs it in a subprocess and checks the report.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from tcvm_jax import conv1x1_kernel as ck, mesh as mesh_lib

ROWS, IN, OUT = 256, 32, 64
TILING = ck.Tiling(block_m=32, block_n=32, block_k=16)


def loss_and_grads(x, w, affine):
  def loss(x, w, affine):
    y, total, total_sq = ck.conv1x1_stats(x, w, affine, tiling=TILING, interpret=True)
    return (jnp.sum(jnp.sin(y)) + jnp.sum(total * jnp.linspace(-1.0, 1.0, OUT)) * 1e-2
            + jnp.sum(jnp.sqrt(total_sq)) * 1e-1)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, affine)


def main() -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(ROWS, IN)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(IN, OUT)) / np.sqrt(IN), jnp.float32)
  affine = ck.Affine(*(jnp.asarray(v, jnp.float32) for v in (
      rng.normal(1.0, 0.5, IN), rng.uniform(0.2, 1.0, IN), rng.normal(0.0, 0.5, IN))))
  step = jax.jit(loss_and_grads)
  one = jax.device_get(step(x, w, affine))  # on one device
  mesh = mesh_lib.create_mesh()
  x_split = jax.device_put(x, mesh_lib.batch_sharding(mesh))
  compiled = step.lower(x_split, w, affine).compile()
  four = compiled(x_split, w, affine)
  text = compiled.as_text()
  # The largest array any all-gather returns: x gathered whole would be ROWS x IN.
  gathered = [int(np.prod([int(d) for d in dims.split(",") if d]))
              for dims in re.findall(r"\[([\d,]*)\][^ ]* all-gather\(", text)]
  report = {
      "num_devices": len(jax.devices()),
      "x_grad_spec": str(four[1][0].sharding.spec),
      "max_rel_diff": max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(b)) + 1e-12))
          for a, b in zip(jax.tree.leaves(four), jax.tree.leaves(one))),
      "all_reduces": len(re.findall(r" all-reduce(-start)?\(", text)),
      "largest_all_gather": max(gathered, default=0),
      "rows_per_device": sorted({s.data.shape[0] for s in four[1][0].addressable_shards}),
  }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
