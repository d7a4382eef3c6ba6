"""The ResNet stem's conv and max-pool in a 4x4-block layout (`model.stem_layout`, #6).

The stem is conv 7x7 / 2 (padding 3) -> BatchNorm -> ReLU -> max-pool 3x3 / 2 (padding
1). Cut each frame into 4 x 4-pixel blocks (the product of the two strides) and both
strided ops become dense ones over the (H/4, W/4) block grid:
- the conv is ONE stride-1 3x3 conv from 16 * Cin channels (a block's pixels) to
  4 * Cout (a block of 2 x 2 output pixels): output pixel 2p + r reads input pixels
  4p + 2r + k - 3 (k < 7), i.e. blocks p - 1 .. p + 1. The rearranged kernel is zero
  where a tap falls outside the 7x7 window: 432 multiply-adds per output value for 147
  (2.9x), but a dense convolution over 48 channels instead of one over 3 (or 12, padded
  to 16 by cuDNN, in the space-to-depth path);
- BatchNorm and ReLU are per value, indifferent to where a pixel sits;
- each of the max-pool's 9 taps is one of a block's 2 x 2 pixels, of the same block or
  of the one above / to the left: slices and one-block shifts, no strided access, and
  its gradient the same in reverse.

The block layout of the conv's output is (N, H/4, W/4, 2, 2, C): block (p, q), pixel
(r, s) within it is output pixel (2p + r, 2q + s). The same values and gradients as the
pixel layout (`layers.VideoConv` + `layers.max_pool_spatial`), up to float summation
order; the parameters are the same (a (1, 7, 7, 3, C) kernel).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 4  # input pixels per block side: the conv's stride times the pool's
STEM_LAYOUTS = ("auto", "pixels", "blocks")


def supports_blocks(height: int, width: int, kernel_hw: tuple[int, int]) -> bool:
  """Whether the block layout computes this stem: frames whose sides are multiples of 4
  (so the conv's output has even sides) and an odd square kernel."""
  kh, kw = kernel_hw
  return height % BLOCK == 0 and width % BLOCK == 0 and kh == kw and kh % 2 == 1


def _tap_index(kernel_size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """(blocks, 4, 2) int: [b, s, r] = the kernel tap that takes output pixel r of a block
  from input pixel s of block offset b + first (kernel_size where none does); and the
  conv's padding in blocks (before, after)."""
  pad = kernel_size // 2
  # Output pixel 2p + r reads input pixel 2(2p + r) + k - pad = 4p + (2r + k - pad).
  offsets = [2 * r + k - pad for r in range(2) for k in range(kernel_size)]
  first, last = min(offsets) // BLOCK, max(offsets) // BLOCK
  taps = np.full((last - first + 1, BLOCK, 2), kernel_size, np.int32)
  for r in range(2):
    for k in range(kernel_size):
      block, pixel = divmod(2 * r + k - pad, BLOCK)
      taps[block - first, pixel, r] = k
  return taps, (-first, last)


def block_kernel(kernel: jax.Array) -> jax.Array:
  """(k, k, Cin, Cout) -> (b, b, 16 * Cin, 4 * Cout): the stride-2 conv's kernel for
  input blocks (channels ordered pixel row, pixel column, Cin) to output blocks (output
  row, output column, Cout). b = 3 for k = 7.

  Each entry is one weight or 0: a gather from the kernel padded with a zero row and
  column (exact; a product with one-hot matrices would be a matmul that XLA may hand to
  Triton or round to TF32).
  """
  kernel_size, _, channels, features = kernel.shape
  taps, _ = _tap_index(kernel_size)
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # tap kernel_size is zero
  rows = taps[:, None, :, None, :, None]  # (a, 1, s, 1, r, 1)
  columns = taps[None, :, None, :, None, :]  # (1, b, 1, t, 1, u)
  blocks = padded[rows, columns]  # (a, b, s, t, r, u, Cin, Cout)
  size = taps.shape[0]
  return blocks.transpose(0, 1, 2, 3, 6, 4, 5, 7).reshape(
      size, size, BLOCK * BLOCK * channels, 4 * features)


def to_blocks(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, H/4, W/4, 16 * C), channels ordered (pixel row, column, C)."""
  num, height, width, channels = x.shape
  x = x.reshape(num, height // BLOCK, BLOCK, width // BLOCK, BLOCK, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(num, height // BLOCK, width // BLOCK,
                                               BLOCK * BLOCK * channels)


def conv_blocks(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 7x7 stride-2 stem conv (PyTorch padding k // 2) of (N, H, W, Cin) frames,
  output in the block layout (N, H/4, W/4, 2, 2, Cout)."""
  num, height, width, _ = x.shape
  if not supports_blocks(height, width, kernel.shape[:2]):
    raise ValueError(f"The block-layout stem needs frame sides that are multiples of "
                     f"{BLOCK} and an odd square kernel; got frames {height}x{width}, "
                     f"kernel {kernel.shape[:2]}.")
  _, (before, after) = _tap_index(kernel.shape[0])
  y = jax.lax.conv_general_dilated(
      to_blocks(x), block_kernel(kernel), (1, 1), ((before, after), (before, after)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(num, height // BLOCK, width // BLOCK, 2, 2, kernel.shape[-1])


# The max-pool's taps along one axis, in PyTorch's order (full-resolution rows 2i - 1,
# 2i, 2i + 1 of output row i): (pixel within the block, 1 if from the block before).
_POOL_TAPS = ((1, 1), (0, 0), (1, 0))


def _pool_tap(y: jax.Array, tap_h: int, tap_w: int) -> jax.Array:
  """Tap (tap_h, tap_w) of every output of the 3x3 / 2 max-pool of block-layout y
  (N, P, Q, 2, 2, C): (N, P, Q, C), -inf where it falls on the padding."""
  (row, up), (column, left) = _POOL_TAPS[tap_h], _POOL_TAPS[tap_w]
  tap = y[:, :, :, row, column]
  return jax.lax.pad(tap, jnp.array(-jnp.inf, y.dtype),
                     ((0, 0, 0), (up, -up, 0), (left, -left, 0), (0, 0, 0)))


def max_of_taps(taps: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Elementwise max over same-shape taps and which one holds it (int8 index, the first
  in the given order): the forward pass of both max-pools of the stem, this layout's and
  `layers.max_pool_spatial`'s."""
  pooled, winner = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for index, tap in enumerate(taps[1:], start=1):
    larger = tap > pooled  # strict: ties keep the earlier tap, as reduce_window's gradient
    pooled = jnp.where(larger, tap, pooled)
    winner = jnp.where(larger, jnp.int8(index), winner)
  return pooled, winner


def _max_pool_blocks_forward(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Max over the 9 taps in raster order, and which one holds it."""
  return max_of_taps([_pool_tap(y, *divmod(index, 3)) for index in range(9)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_blocks(y: jax.Array, gradient: str) -> jax.Array:
  del gradient
  return _max_pool_blocks_forward(y)[0]


def _max_pool_blocks_fwd(y, gradient):
  del gradient
  return _max_pool_blocks_forward(y)


def _pixel_gradients(winner: jax.Array, grad: jax.Array) -> list[list[jax.Array]]:
  """[r][s]: the gradient of pixel (r, s) of every block, (N, P, Q, C): the sum of the
  taps that read it, shifted back by a block where they came from the block before (taps
  of the padding never win)."""
  zero = jnp.zeros((), grad.dtype)
  pixels = [[None, None], [None, None]]
  for index in range(9):
    tap_h, tap_w = divmod(index, 3)
    (row, up), (column, left) = _POOL_TAPS[tap_h], _POOL_TAPS[tap_w]
    part = jnp.where(winner == index, grad, zero)
    # Output (i, j) read block (i - up, j - left): move its gradient there.
    part = jax.lax.pad(part, zero, ((0, 0, 0), (-up, up, 0), (-left, left, 0), (0, 0, 0)))
    previous = pixels[row][column]
    pixels[row][column] = part if previous is None else previous + part
  return pixels


def _max_pool_blocks_bwd(gradient, winner, grad):
  """Each output's gradient to the pixel its max came from, assembled into the block
  layout (N, P, Q, 2, 2, C) by stacking the four pixels' gradients ('stack') or by one
  select per value between them ('select'). The same values; XLA makes the first a
  concatenate fusion (0.82 ms at 1.3 TB/s for R3D50's stem on an H200, 2026-11-27: the
  slowest memory-bound kernel of the step) and the second a loop fusion."""
  pixels = _pixel_gradients(winner, grad)
  if gradient == "stack":
    rows = [jnp.stack(pixels[row], axis=3) for row in range(2)]  # (N, P, Q, 2, C) each
    return (jnp.stack(rows, axis=3),)
  shape = (1, 1, 1, 2, 2, 1)
  row = jax.lax.broadcasted_iota(jnp.int32, shape, 3)
  column = jax.lax.broadcasted_iota(jnp.int32, shape, 4)
  (top_left, top_right), (bottom_left, bottom_right) = [
      [pixel[:, :, :, None, None, :] for pixel in pair] for pair in pixels]
  return (jnp.where(row == 0, jnp.where(column == 0, top_left, top_right),
                    jnp.where(column == 0, bottom_left, bottom_right)),)


_max_pool_blocks.defvjp(_max_pool_blocks_fwd, _max_pool_blocks_bwd)

POOL_GRADIENTS = ("auto", "stack", "select")  # model.stem_pool_gradient


def max_pool_blocks(y: jax.Array, gradient: str = "stack") -> jax.Array:
  """PyTorch's 3x3 / 2 max-pool (padding 1, -inf) of the block-layout conv output
  (N, P, Q, 2, 2, C) -> (N, P, Q, C): `layers.max_pool_spatial`'s values and gradient
  (ties to the first maximum in raster order) without strided access. `gradient`: how
  the backward pass assembles the block layout ('stack' or 'select', the same values;
  'auto' is 'stack' until a GPU A/B says otherwise)."""
  if y.ndim != 6 or y.shape[3:5] != (2, 2):
    raise ValueError(f"max_pool_blocks expects the block layout (N, P, Q, 2, 2, C); got "
                     f"shape {y.shape}.")
  if gradient not in POOL_GRADIENTS:
    raise ValueError(f"Stem pool gradient {gradient!r} (model.stem_pool_gradient); choose "
                     f"from {POOL_GRADIENTS}.")
  return _max_pool_blocks(y, "stack" if gradient == "auto" else gradient)


def pixels_from_blocks(y: jax.Array) -> jax.Array:
  """(N, P, Q, 2, 2, C) block layout -> (N, 2P, 2Q, C) pixels (for tests and checks)."""
  num, rows, columns, _, _, channels = y.shape
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(num, 2 * rows, 2 * columns, channels)
