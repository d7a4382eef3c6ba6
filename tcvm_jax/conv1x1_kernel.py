"""A 1x1 convolution fused with the BatchNorm + ReLU before it and the BatchNorm statistics
after it: one GPU kernel (Pallas, Triton backend) per call.

In a bottleneck block, conv_c (1x1) reads relu(bn_b(y_b)) and its output y_c goes to
bn_c, which first sums y_c and y_c^2 per channel. XLA cannot fuse either side into the
matmul: its Triton GEMM fusions take neither a narrowing convert (BatchNorm in float32,
its output in bfloat16) nor a broadcast of a computed vector (the batch mean) as an
operand's producer, and reductions never join them. So per conv_c it writes the
normalised input, reads it back for the matmul, writes y_c and reads y_c again for the
sums: 12 * pixels * inner_features bytes more than one pass that reads y_b and writes
y_c (R3D50, B = 32: ~4.3 GB per step, ~1.2 ms at the H200's bandwidth).

`conv1x1_stats` is that one pass. Each program computes a (block_m, block_n) tile of
y = relu(bf16((x - mean) * gain + bias)) @ w, float32 accumulation, stores it in x's
dtype and writes the tile's column sums of y and y^2 (of the stored values, as a
BatchNorm over y would compute them) to one row of a partial-sums array, which XLA adds
up. Without `affine` the input is used as it is (a block's first conv reads the block
input; the statistics still come free).

The backward pass (`_conv1x1_stats_bwd`) keeps nothing but x and y: the sums' gradient
joins y's, and with `affine` a second kernel (`input_grad_kernel`) computes the input's
gradient tile by tile, grad @ w.T followed by the ReLU's mask and BatchNorm's affine
recomputed from x, and in the same pass the column sums bn_b's gradient needs (which
XLA would make a reduction pass over that gradient and x) and the normalised input for
the weight gradient, an XLA matmul. Without `affine` (or with `backward_kernel=False`)
the backward is XLA ops.

Under a multi-device jit each kernel is a `custom_partitioning` op (`_split_over_rows`):
every device runs it on its rows of the batch and the sums are all-reduced, where XLA's
partitioner, blind to a Pallas call, would gather its inputs whole on every device.

`interpret=True` runs the kernel in Pallas's interpreter on any platform (slowly): what
the tests check it with. `conv1x1_stats_reference` is the same computation as XLA ops:
what other platforms run and what the kernel is tested against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as pallas_triton
from jax.sharding import NamedSharding, PartitionSpec as P


class Affine(NamedTuple):
  """A per-channel affine map in front of the ReLU, float32 (K,) each:
  relu(cast((x - mean) * gain + bias)) is BatchNorm's output, gain = scale / std."""
  mean: jax.Array
  gain: jax.Array
  bias: jax.Array


class Tiling(NamedTuple):
  """The kernels' tile sizes (powers of two, >= 16 for Triton's dot) and launch
  settings: block_m rows by block_n output channels per program, block_k contracted
  channels per step (the input-gradient kernel's outputs are x's channels, it contracts
  over y's). `benchmarks/conv1x1_variants.py` times the choices on a GPU; on an H200 the
  default was the fastest of six, or within 6 % of it, on each of R3D50's stage 1-2
  shapes (2026-11-27)."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3


# Where the kernels beat XLA's ops timed alone, per conv, by its FLOPs per byte
# (`flops_per_byte`): what model.conv1x1_kernel='pallas' fuses ('pallas_all' fuses every
# stride-1 1x1 conv). Measured on an H200 (2026-11-27, benchmarks/results/2026-11-27_h200_c/).
# The forward kernel ran stages 3-4's conv_c (256 -> 1024 and 512 -> 2048 channels, 205
# and 410 FLOPs per byte) at ~190 TFLOP/s, 0.136 ms a call, where the matmul is
# compute-bound; it beat XLA on stages 1-2's convs (<= 102). The input-gradient kernel
# beat XLA's backward on stage 1's conv_c (51; forward + backward 1.014 against 1.085 ms)
# and lost on stage 2's (102; 0.704 against 0.613 ms). In the whole R3D50 step neither
# paid: 'pallas' 1.9 % and 'pallas_all' 3.8 % slower than 'xla' (chained steps).
FORWARD_MAX_FLOPS_PER_BYTE = 128
INPUT_GRAD_MAX_FLOPS_PER_BYTE = 64


def flops_per_byte(in_features: int, out_features: int) -> float:
  """A 1x1 conv's FLOPs per byte of the rows it reads and writes in a 2-byte dtype:
  2 * in * out FLOPs over 2 * (in + out) bytes a row (the weights, read once per tile,
  left out). The input gradient's matmul has the same."""
  return in_features * out_features / (in_features + out_features)


def normalised_input(x: jax.Array, affine: Affine | None) -> jax.Array:
  """The matmul's left operand: relu(BatchNorm(x)) rounded to x's dtype (or x)."""
  if affine is None:
    return x
  z = (x.astype(jnp.float32) - affine.mean) * affine.gain + affine.bias
  return jnp.maximum(z.astype(x.dtype), jnp.zeros((), x.dtype))


def _column_sums(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  rows = y.astype(jnp.float32)
  return rows.sum(axis=0), (rows * rows).sum(axis=0)


def conv1x1_stats_reference(x: jax.Array, w: jax.Array, affine: Affine | None = None
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, sum of y, sum of y^2) by XLA ops: y = normalised_input(x) @ w in x's dtype
  (float32 accumulation), the sums per output channel over the rows, float32."""
  y = jnp.dot(normalised_input(x, affine), w.astype(x.dtype),
              preferred_element_type=jnp.float32).astype(x.dtype)
  return (y, *_column_sums(y))


def _largest_dividing_block(size: int, largest: int) -> int | None:
  block = largest
  while block >= 16:
    if size % block == 0:
      return block
    block //= 2
  return None


def kernel_tiling(rows: int, in_features: int, out_features: int,
                  tiling: Tiling = Tiling()) -> Tiling | None:
  """`tiling` shrunk to blocks that divide the shapes, or None where no block of >= 16
  does (Triton's dot needs 16; the caller then runs the reference) or where the input
  channels are not a power of two (a tile holds all of them, and Triton's are powers of
  two)."""
  if in_features & (in_features - 1):
    return None
  blocks = [_largest_dividing_block(size, largest) for size, largest in (
      (rows, tiling.block_m), (out_features, tiling.block_n), (in_features, tiling.block_k))]
  if None in blocks:
    return None
  return tiling._replace(block_m=blocks[0], block_n=blocks[1], block_k=blocks[2])


def _flat_grid(num_row_blocks: int, num_col_blocks: int):
  """(grid, row block of program p, column block of program p) for one grid axis: CUDA's
  second and third allow 65535 blocks (B = 512 would need more). Column blocks vary
  fastest, so the programs sharing a row tile run together (it is read once from
  memory, then from L2)."""
  return ((num_row_blocks * num_col_blocks,), lambda p: p // num_col_blocks,
          lambda p: p % num_col_blocks)


def _tile_kernel(*refs, num_k_blocks: int, block_k: int, with_affine: bool):
  """One (block_m, block_n) tile of y and its column sums."""
  if with_affine:
    x_ref, w_ref, mean_ref, gain_ref, bias_ref, y_ref, sum_ref, sum_sq_ref = refs
  else:
    x_ref, w_ref, y_ref, sum_ref, sum_sq_ref = refs

  def accumulate(k, acc):
    window = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    affine = (Affine(mean_ref[window], gain_ref[window], bias_ref[window]) if with_affine
              else None)
    return acc + jnp.dot(normalised_input(x_ref[:, window], affine), w_ref[window, :],
                         preferred_element_type=jnp.float32)

  block_m, block_n = y_ref.shape
  acc = jax.lax.fori_loop(0, num_k_blocks, accumulate,
                          jnp.zeros((block_m, block_n), jnp.float32))
  y = acc.astype(y_ref.dtype)
  y_ref[...] = y
  rows = y.astype(jnp.float32)
  sum_ref[...] = rows.sum(axis=0)
  sum_sq_ref[...] = (rows * rows).sum(axis=0)


def conv1x1_stats_kernel(x: jax.Array, w: jax.Array, affine: Affine | None = None, *,
                         tiling: Tiling = Tiling(), interpret: bool = False
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`conv1x1_stats_reference` as one Pallas kernel (no gradient: `conv1x1_stats`).
  Raises ValueError for shapes `kernel_tiling` cannot tile."""
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"Expected x (M, K) and w (K, N); got {x.shape} and {w.shape}.")
  rows, in_features = x.shape
  out_features = w.shape[1]
  fitted = kernel_tiling(rows, in_features, out_features, tiling)
  if fitted is None:
    raise ValueError(f"No tiling of blocks >= 16 divides x {x.shape} and w {w.shape}.")
  block_m, block_n, block_k = fitted.block_m, fitted.block_n, fitted.block_k
  num_row_blocks = rows // block_m
  grid, row_block, col_block = _flat_grid(num_row_blocks, out_features // block_n)
  vector_spec = pl.BlockSpec((in_features,), lambda p: (0,))
  in_specs = [pl.BlockSpec((block_m, in_features), lambda p: (row_block(p), 0)),
              pl.BlockSpec((in_features, block_n), lambda p: (0, col_block(p)))]
  operands = [x, w.astype(x.dtype)]
  if affine is not None:
    in_specs += [vector_spec] * 3
    operands += [v.astype(jnp.float32) for v in affine]
  sums_spec = pl.BlockSpec((None, block_n), lambda p: (row_block(p), col_block(p)))
  sums_shape = jax.ShapeDtypeStruct((num_row_blocks, out_features), jnp.float32)
  # `name` also names the call in the compiled program's op_name (a device trace's
  # `benchmarks/trace_summary.py` counts it as a matmul by it).
  y, partial_sum, partial_sum_sq = pl.pallas_call(
      functools.partial(_tile_kernel, num_k_blocks=in_features // block_k, block_k=block_k,
                        with_affine=affine is not None),
      out_shape=(jax.ShapeDtypeStruct((rows, out_features), x.dtype), sums_shape,
                 sums_shape),
      grid=grid,
      in_specs=in_specs,
      out_specs=(pl.BlockSpec((block_m, block_n), lambda p: (row_block(p), col_block(p))),
                 sums_spec, sums_spec),
      compiler_params=pallas_triton.CompilerParams(num_warps=fitted.num_warps,
                                                   num_stages=fitted.num_stages),
      interpret=interpret,
      name="conv1x1_stats",
  )(*operands)
  return y, partial_sum.sum(axis=0), partial_sum_sq.sum(axis=0)


def _input_grad_tile_kernel(grad_ref, w_ref, x_ref, mean_ref, gain_ref, bias_ref,
                            grad_x_ref, z_ref, grad_bias_ref, grad_gain_ref, *,
                            num_n_blocks: int, block_n: int):
  """One (block_m, block_c) tile of the input's gradient through bn_b + ReLU: the matmul
  grad @ w.T for these input channels, then (x, its BatchNorm and ReLU recomputed) the
  ReLU's mask, x's direct gradient and the tile's sums for bias' and gain's gradients;
  also the normalised input itself, for the weight gradient's matmul."""

  def accumulate(n, acc):
    window = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    return acc + jax.lax.dot_general(grad_ref[:, window], w_ref[:, window],
                                     (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  block_m, block_c = grad_x_ref.shape
  grad_z = jax.lax.fori_loop(0, num_n_blocks, accumulate,
                             jnp.zeros((block_m, block_c), jnp.float32))
  centered = x_ref[...].astype(jnp.float32) - mean_ref[...]
  z = (centered * gain_ref[...] + bias_ref[...]).astype(z_ref.dtype)
  grad_pre = jnp.where(z > 0, grad_z, 0.0)
  grad_x_ref[...] = (grad_pre * gain_ref[...]).astype(grad_x_ref.dtype)
  z_ref[...] = jnp.maximum(z, jnp.zeros((), z.dtype))
  grad_bias_ref[...] = grad_pre.sum(axis=0)
  grad_gain_ref[...] = (grad_pre * centered).sum(axis=0)


def input_grad_kernel(grad: jax.Array, w: jax.Array, x: jax.Array, affine: Affine, *,
                      tiling: Tiling = Tiling(), interpret: bool = False
                      ) -> tuple[jax.Array, jax.Array, Affine]:
  """The backward of `conv1x1_stats` from y's total gradient `grad` (M, N) as one Pallas
  kernel: (x's gradient, the normalised input, the affine's gradient). It replaces XLA's
  matmul for the normalised input's gradient and the reduction pass over that gradient
  and x (bn_b's backward sums); the weight gradient stays an XLA matmul of the returned
  normalised input. Raises ValueError for shapes `kernel_tiling` cannot tile."""
  rows, in_features = x.shape
  out_features = w.shape[1]
  # Here the matmul contracts over y's channels and yields x's.
  fitted = kernel_tiling(rows, out_features, in_features, tiling)
  if fitted is None:
    raise ValueError(f"No tiling of blocks >= 16 divides the gradient {grad.shape} and "
                     f"x {x.shape}.")
  block_m, block_c, block_n = fitted.block_m, fitted.block_n, fitted.block_k
  num_row_blocks = rows // block_m
  grid, row_block, col_block = _flat_grid(num_row_blocks, in_features // block_c)
  tile = pl.BlockSpec((block_m, block_c), lambda p: (row_block(p), col_block(p)))
  vector = pl.BlockSpec((block_c,), lambda p: (col_block(p),))
  sums = pl.BlockSpec((None, block_c), lambda p: (row_block(p), col_block(p)))
  sums_shape = jax.ShapeDtypeStruct((num_row_blocks, in_features), jnp.float32)
  grad_x, z, grad_bias, grad_gain = pl.pallas_call(
      functools.partial(_input_grad_tile_kernel, num_n_blocks=out_features // block_n,
                        block_n=block_n),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype),
                 sums_shape, sums_shape),
      grid=grid,
      in_specs=[pl.BlockSpec((block_m, out_features), lambda p: (row_block(p), 0)),
                pl.BlockSpec((block_c, out_features), lambda p: (col_block(p), 0)),
                tile, vector, vector, vector],
      out_specs=(tile, tile, sums, sums),
      compiler_params=pallas_triton.CompilerParams(num_warps=fitted.num_warps,
                                                   num_stages=fitted.num_stages),
      interpret=interpret,
      name="conv1x1_stats_input_grad",
  )(grad.astype(x.dtype), w.astype(x.dtype), x, *(v.astype(jnp.float32) for v in affine))
  grad_bias, grad_gain = grad_bias.sum(axis=0), grad_gain.sum(axis=0)
  # (x - mean) * gain + bias: d/d(mean) = -gain per row.
  return grad_x, z, Affine(-affine.gain * grad_bias, grad_gain, grad_bias)


def _input_grad_reference(grad, w, x, affine):
  """`input_grad_kernel`'s outputs by XLA ops."""
  z, input_vjp = jax.vjp(normalised_input, x, affine)
  grad_x, grad_affine = input_vjp(jnp.dot(grad, w.astype(x.dtype).T))
  return grad_x, z, grad_affine


def _split_over_rows(local_fn, row_args: tuple[int, ...], num_row_outputs: int, rule: str):
  """`local_fn(*arrays)` as one op that XLA's partitioner splits along the rows (axis 0) of
  the operands `row_args` (the batch's pixels under the step's data-parallel jit): each
  device runs it on its own rows, and the outputs after the first `num_row_outputs`,
  per-channel sums over the rows, are added up over the devices. A Pallas call is opaque
  to the partitioner, which would otherwise gather its inputs whole on every device. On
  one device this is `local_fn` itself."""
  split = custom_partitioning(local_fn)

  def shardings(mesh, arg_shapes, num_outputs):
    spec = arg_shapes[row_args[0]].sharding.spec
    rows = spec[0] if len(spec) else None
    by_rows, whole = NamedSharding(mesh, P(rows)), NamedSharding(mesh, P())
    args = tuple(by_rows if i in row_args else whole for i in range(len(arg_shapes)))
    outputs = (by_rows,) * num_row_outputs + (whole,) * (num_outputs - num_row_outputs)
    return rows, args, outputs

  def partition(mesh, arg_shapes, result_shape):
    rows, arg_shardings, out_shardings = shardings(mesh, arg_shapes, len(result_shape))

    def lower_fn(*args):
      outputs = local_fn(*args)
      if rows is None:
        return outputs
      return (*outputs[:num_row_outputs], *jax.lax.psum(outputs[num_row_outputs:], rows))

    return mesh, lower_fn, out_shardings, arg_shardings

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes, len(result_shape))[2]

  # The channels stay whole on every device; Shardy wants these factors in the order
  # they first appear in the rule.
  factors = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
  split.def_partition(partition, infer_sharding_from_operands=infer_sharding_from_operands,
                      sharding_rule=rule,
                      need_replication_factors=tuple(f for f in factors if f in ("k", "n")))
  return split


@functools.lru_cache(maxsize=None)
def _forward_op(tiling: Tiling, interpret: bool, with_affine: bool):
  """The forward kernel (on this device's rows: the reference where they do not tile)
  over (x, w[, mean, gain, bias]), split over the devices by rows."""

  def local(x, w, *affine):
    affine = Affine(*affine) if affine else None
    if kernel_tiling(x.shape[0], x.shape[1], w.shape[1], tiling) is None:
      return conv1x1_stats_reference(x, w, affine)
    return conv1x1_stats_kernel(x, w, affine, tiling=tiling, interpret=interpret)

  rule = "m k, k n" + (", k, k, k" if with_affine else "") + " -> m n, n, n"
  return _split_over_rows(local, row_args=(0,), num_row_outputs=1, rule=rule)


@functools.lru_cache(maxsize=None)
def _input_grad_op(tiling: Tiling, interpret: bool):
  """`input_grad_kernel` over (grad, w, x, mean, gain, bias) -> (grad_x, z, grad_mean,
  grad_gain, grad_bias), split over the devices by rows."""

  def local(grad, w, x, *affine):
    affine = Affine(*affine)
    if kernel_tiling(x.shape[0], w.shape[1], x.shape[1], tiling) is None:
      grad_x, z, grad_affine = _input_grad_reference(grad, w, x, affine)
    else:
      grad_x, z, grad_affine = input_grad_kernel(grad, w, x, affine, tiling=tiling,
                                                 interpret=interpret)
    return (grad_x, z, *grad_affine)

  return _split_over_rows(local, row_args=(0, 2), num_row_outputs=2,
                          rule="m n, k n, m k, k, k, k -> m k, m k, k, k, k")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv1x1_stats(x, w, affine, tiling, interpret, backward_kernel):
  del backward_kernel
  return _forward_op(tiling, interpret, affine is not None)(x, w, *(affine or ()))


def _conv1x1_stats_fwd(x, w, affine, tiling, interpret, backward_kernel):
  del backward_kernel
  x, w, affine = jax.tree.map(lambda primal: primal.value, (x, w, affine))
  y, total, total_sq = _forward_op(tiling, interpret, affine is not None)(x, w,
                                                                          *(affine or ()))
  # y is kept for the statistics' gradient; the BatchNorm after this keeps it anyway.
  return (y, total, total_sq), (x, w, affine, y)


def _is_zero(cotangent) -> bool:
  return isinstance(cotangent, jax.custom_derivatives.SymbolicZero)


def _conv1x1_stats_bwd(tiling, interpret, backward_kernel, residuals, cotangents):
  x, w, affine, y = residuals
  grad_y, grad_sum, grad_sum_sq = cotangents
  # The sums' gradient joins y's: d(sum y)/dy = 1, d(sum y^2)/dy = 2y, per channel.
  grad = (jnp.zeros(y.shape, jnp.float32) if _is_zero(grad_y)
          else grad_y.astype(jnp.float32))
  if not _is_zero(grad_sum):
    grad = grad + grad_sum
  if not _is_zero(grad_sum_sq):
    grad = grad + 2.0 * y.astype(jnp.float32) * grad_sum_sq
  grad = grad.astype(x.dtype)
  if backward_kernel and affine is not None:
    grad_x, z, *grad_affine = _input_grad_op(tiling, interpret)(grad, w.astype(x.dtype), x,
                                                                 *affine)
    grad_affine = Affine(*grad_affine)
  elif affine is not None:
    grad_x, z, grad_affine = _input_grad_reference(grad, w, x, affine)
  else:
    z, grad_affine = x, None
    grad_x = jnp.dot(grad, w.astype(x.dtype).T)
  grad_w = jnp.dot(z.T, grad, preferred_element_type=jnp.float32).astype(w.dtype)
  return grad_x, grad_w, grad_affine


_conv1x1_stats.defvjp(_conv1x1_stats_fwd, _conv1x1_stats_bwd, symbolic_zeros=True)


def conv1x1_stats(x: jax.Array, w: jax.Array, affine: Affine | None = None, *,
                  tiling: Tiling = Tiling(), interpret: bool = False,
                  backward_kernel: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, sum of y, sum of y^2) as `conv1x1_stats_reference`: the forward pass one kernel;
  with `affine` and `backward_kernel` the input's gradient another (`input_grad_kernel`),
  the rest of the backward XLA. Under a multi-device jit each device runs the kernels on
  its rows of x (`_split_over_rows`) and the sums are added up over the devices. Shapes
  the kernels cannot tile run the reference."""
  if kernel_tiling(x.shape[0], x.shape[1], w.shape[1], tiling) is None:
    return conv1x1_stats_reference(x, w, affine)
  return _conv1x1_stats(x, w, affine, tiling, interpret, backward_kernel)
