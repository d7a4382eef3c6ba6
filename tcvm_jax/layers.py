"""Building blocks shared by the backbones: a video conv lowered to 2D convs, BatchNorm.

XLA's CPU backend runs 3D convolutions slowly. Every kernel in R3D50/TSM50 is either
purely spatial (1, kh, kw) or purely temporal (kt, 1, 1), so `VideoConv` keeps a
Conv3D-shaped parameter (checkpoints look like a Conv3D) and computes it as a 2D
convolution (or a matmul) over a reshaped tensor. On an H200 (bf16, R3D50, 8 x 32 x 112^2)
this matched native 3D convolutions: 18.8 vs 18.1 ms per forward+backward, one run each.

Four speed-ups with custom gradients (docs/performance.md): the stem's strided conv over 3
channels trains through space-to-depth (CPU and CUDA); on CPU the other strided convs
take their gradients from their taps instead of stride-dilated convolutions; the
max-pool records its winning tap instead of using XLA's select-and-scatter gradient; and
on CPU BatchNorm's gradient is written in closed form (`BatchNorm`, `batch_norm_train`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tcvm_jax import conv1x1_kernel, cpu_chunks, folded_batch_norm, stem

Dtype = Any


@functools.partial(jax.jit, static_argnums=(1, 2))
def _standard_normal_bucket(key: jax.Array, size: int, dtype: Dtype) -> jax.Array:
  return jax.random.normal(key, (size,), dtype)


def standard_normal(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32
                    ) -> jax.Array:
  """i.i.d. N(0, 1) of `shape`, drawn from a 1D sample of the next power-of-two size.

  XLA:CPU takes ~0.5-2 s to compile a normal sampler, once per shape; power-of-two
  buckets let every kernel of every model share a dozen compiled samplers, which cuts
  model init from tens of seconds to a few on CPU.
  """
  size = math.prod(shape)
  bucket = 1 << max(size - 1, 0).bit_length()
  return _standard_normal_bucket(key, bucket, jnp.dtype(dtype))[:size].reshape(shape)


def he_fan_out_normal(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32
                      ) -> jax.Array:
  """kaiming_normal_(mode='fan_out', nonlinearity='relu') as in torchvision/SlowFast.

  Kernel (..., Cin, Cout): std = sqrt(2 / fan_out), fan_out = prod(receptive) * Cout.
  """
  fan_out = math.prod(shape[:-2]) * shape[-1]
  return (math.sqrt(2.0 / fan_out) * standard_normal(key, shape, dtype)).astype(dtype)


# PyTorch's nn.Linear default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); also cheap
# to compile, unlike flax's truncated-normal default.
torch_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _compute_dtype(dtype: Dtype | None, *arrays: jax.Array) -> Dtype:
  return dtype if dtype is not None else jnp.result_type(*arrays)


def _conv2d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """NHWC x HWIO convolution with PyTorch padding (k // 2 on both sides)."""
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _space_to_depth_geometry(x_shape: tuple[int, ...], kernel_hw: tuple[int, int],
                             stride: int) -> tuple[int, int, int, int, int, int]:
  """(out_h, out_w, blocks_h, blocks_w, span_h, span_w) of `_conv2d_space_to_depth`."""
  _, height, width, _ = x_shape
  kh, kw = kernel_hw
  out_h = (height + 2 * (kh // 2) - kh) // stride + 1
  out_w = (width + 2 * (kw // 2) - kw) // stride + 1
  blocks_h, blocks_w = -(-kh // stride), -(-kw // stride)  # kernel size in blocks
  # Rows/columns the stride-1 conv reads: (out - 1 + blocks) blocks of `stride` pixels.
  return (out_h, out_w, blocks_h, blocks_w, stride * (out_h - 1 + blocks_h),
          stride * (out_w - 1 + blocks_w))


def _to_blocks(x: jax.Array, kernel_hw: tuple[int, int], stride: int) -> jax.Array:
  """(N, H, W, C) -> (N, span_h / s, span_w / s, s * s * C): padded, cut to the span the
  convolution reads, each s x s block of pixels as one pixel."""
  num, height, width, channels = x.shape
  kh, kw = kernel_hw
  *_, span_h, span_w = _space_to_depth_geometry(x.shape, kernel_hw, stride)
  padded = jnp.pad(x, ((0, 0), (kh // 2, max(0, span_h - height - kh // 2)),
                       (kw // 2, max(0, span_w - width - kw // 2)), (0, 0)))
  padded = padded[:, :span_h, :span_w]
  blocks = padded.reshape(num, span_h // stride, stride, span_w // stride, stride, channels)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(
      num, span_h // stride, span_w // stride, stride * stride * channels)


def _block_kernel(kernel: jax.Array, stride: int) -> jax.Array:
  """(kh, kw, C, O) -> (ceil(kh / s), ceil(kw / s), s * s * C, O), zero-padded."""
  kh, kw, channels, _ = kernel.shape
  blocks_h, blocks_w = -(-kh // stride), -(-kw // stride)
  padded = jnp.pad(kernel, ((0, blocks_h * stride - kh), (0, blocks_w * stride - kw),
                            (0, 0), (0, 0)))
  padded = padded.reshape(blocks_h, stride, blocks_w, stride, channels, -1)
  return padded.transpose(0, 2, 1, 3, 4, 5).reshape(
      blocks_h, blocks_w, stride * stride * channels, -1)


def _conv2d_on_blocks(blocks: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return jax.lax.conv_general_dilated(blocks, _block_kernel(kernel, stride), (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv2d_space_to_depth(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """`_conv2d` as a stride-1 convolution of the space-to-depth input.

  Each stride x stride block of input pixels becomes one pixel with stride^2 * Cin
  channels, and the kernel, zero-padded to a multiple of the stride, is rearranged to
  match: (k, k, Cin) -> (ceil(k / s), ceil(k / s), s^2 * Cin). The same sums (plus zero
  terms), but a dense stride-1 convolution over more channels, which XLA:CPU runs far
  faster than a strided one over 3 channels (the demo's stem: 40 -> 26 ms).
  """
  return _conv2d_on_blocks(_to_blocks(x, kernel.shape[:2], stride), kernel, stride)


def _conv2d_space_to_depth_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """`_conv2d_space_to_depth` as one matmul (im2col on the space-to-depth blocks).

  Each output pixel's ceil(k / s)^2 blocks are gathered into one row of
  ceil(k / s)^2 * s^2 * Cin values (192 for the 7 x 7 stem at stride 2), times the block
  kernel reshaped to (192, Cout). A GPU runs that dense product on its tensor cores, where
  a convolution over 12 channels uses them poorly (the H200 ran the stem's convolutions at
  34-55 TFLOP/s, docs/performance.md); the price is writing and reading the rows.
  Not used by the model yet: `benchmarks/stem_variants.py` times it against the others.
  """
  out_h, out_w, blocks_h, blocks_w, *_ = _space_to_depth_geometry(x.shape, kernel.shape[:2],
                                                                  stride)
  blocks = _to_blocks(x, kernel.shape[:2], stride)
  rows = jnp.concatenate([blocks[:, i:i + out_h, j:j + out_w]
                          for i in range(blocks_h) for j in range(blocks_w)], axis=-1)
  y = rows.reshape(-1, rows.shape[-1]) @ _block_kernel(kernel, stride).reshape(
      rows.shape[-1], kernel.shape[-1])
  return y.reshape(x.shape[0], out_h, out_w, kernel.shape[-1])


# Strided convs with at most this many input channels (the stems) use space-to-depth on
# CPU and CUDA in training. Measured on CPU: 3 channels 40 -> 26 ms; 16 or 32 slower.
SPACE_TO_DEPTH_MAX_CHANNELS = 4
# On CPU only up to this many output channels: the stem of 256 frames of 56^2 (float32, 2
# cores, forward, median of 15) took 12.5 ms that way against 20 ms plain at 8 and 16
# channels, but 133 against 89 ms at 32 and 180 against 72 ms at 64 (R3D50's width).
SPACE_TO_DEPTH_CPU_MAX_FEATURES = 16


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _strided_conv_few_channels(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A strided conv over few input channels: `_conv2d`'s values, faster in training.

  The primal is the plain convolution (what inference runs, and what MAC counters see).
  The training forward pass (the custom_vjp fwd rule) runs it by space-to-depth on CUDA
  and on CPU up to `SPACE_TO_DEPTH_CPU_MAX_FEATURES` output channels, plainly elsewhere;
  the weight gradient is the space-to-depth graph's on CUDA, the plain convolution's
  summed over cache-sized chunks of frames on CPU
  (`_conv_vjp_weight_grad_in_chunks`) and the plain convolution's elsewhere. Measured
  (docs/performance.md): CPU, the demo's stem, forward 40 -> 26 ms, weight gradient
  23 ms plain vs 137 by space-to-depth (before the chunks); H200,
  bf16, 1024 x 112^2 x 3 -> 64: forward 2.07 -> 1.15 ms, forward + weight gradient
  3.24 -> 2.07 ms.
  """
  return _conv2d(x, kernel, stride)


def _strided_conv_few_channels_fwd(x, kernel, stride):
  plain = functools.partial(_conv2d, stride=stride)
  by_blocks = functools.partial(_conv2d_space_to_depth, stride=stride)
  on_cpu = by_blocks if kernel.shape[-1] <= SPACE_TO_DEPTH_CPU_MAX_FEATURES else plain
  y = jax.lax.platform_dependent(x, kernel, cpu=on_cpu, cuda=by_blocks, default=plain)
  return y, (x, kernel)


def _autodiff_vjp(conv, stride: int):
  """(x, kernel, grad) -> (dx, dkernel) of `conv(x, kernel, stride)` by XLA's autodiff."""
  return lambda x, kernel, grad: jax.vjp(functools.partial(conv, stride=stride), x,
                                         kernel)[1](grad)


def _strided_conv_few_channels_bwd(stride, residuals, grad):
  x, kernel = residuals
  return jax.lax.platform_dependent(
      x, kernel, grad, cpu=functools.partial(_conv_vjp_weight_grad_in_chunks, stride=stride),
      cuda=_autodiff_vjp(_conv2d_space_to_depth, stride),
      default=_autodiff_vjp(_conv2d, stride))


# On CPU the stem's weight gradient is summed over chunks of about this many input pixels
# (frames x H x W): ~1.2 MB of float32 RGB, which fits a core's L2 cache.
CPU_WEIGHT_GRAD_CHUNK_PIXELS = 100_000


def _conv_vjp_weight_grad_in_chunks(x: jax.Array, kernel: jax.Array, grad: jax.Array,
                                    stride: int, chunk_pixels: int | None = None
                                    ) -> tuple[jax.Array, jax.Array]:
  """(dx, dkernel) of `_conv2d`, the weight gradient summed over chunks of frames.

  XLA:CPU runs a few-channel conv's weight gradient as one single-threaded op whose
  working set (all frames) overflows the cache. Chunks of ~100k pixels (at most
  `cpu_chunks.MAX_CHUNKS` of them) each fit a core's L2 (XLA may also run the
  independent chunks side by side; in the demo step they ran one after another): the
  demo's stem (256 frames of 56 x 56) 15-22 -> 8.4 ms alone (32-frame chunks), 112 x 112
  frames to 64 channels 376 -> 103 ms (8-frame chunks); docs/performance.md.

  Chunk c holds frames c, c + n, c + 2n, ... (n chunks): when the frames are split over
  devices (the batch's sharding), each chunk takes the same share of every device's
  frames, so no chunk moves between devices. Runs of consecutive frames each lay on one
  or two devices, and XLA moved them with collective-permutes (28 MB per device per
  demo step on 8 simulated devices).
  """
  num, height, width, _ = x.shape
  chunk = cpu_chunks.chunk_size(num, height * width,
                                chunk_pixels or CPU_WEIGHT_GRAD_CHUNK_PIXELS)
  num_chunks = cpu_chunks.strided_chunk_count(num, chunk)
  dx = jax.vjp(lambda x: _conv2d(x, kernel, stride), x)[1](grad)[0]  # unused for the stem
  x_chunks = x.reshape(num // num_chunks, num_chunks, *x.shape[1:])
  grad_chunks = grad.reshape(num // num_chunks, num_chunks, *grad.shape[1:])

  def chunk_weight_grad(index):
    x_chunk, grad_chunk = x_chunks[:, index], grad_chunks[:, index]
    return jax.vjp(lambda k: _conv2d(x_chunk, k, stride), kernel)[1](grad_chunk)[0]

  dkernel = functools.reduce(jnp.add, [chunk_weight_grad(i) for i in range(num_chunks)])
  return dx, dkernel


_strided_conv_few_channels.defvjp(_strided_conv_few_channels_fwd,
                                  _strided_conv_few_channels_bwd)


def _strided_conv_vjp_by_taps(x: jax.Array, kernel: jax.Array, grad: jax.Array,
                              stride: int) -> tuple[jax.Array, jax.Array]:
  """(dx, dkernel) of `_conv2d(x, kernel, stride)` from its kh * kw taps, no dilation.

  XLA computes a strided convolution's input gradient as a convolution over the output
  gradient dilated by the stride (stride^2 times the work, mostly zeros) and its weight
  gradient as one with a dilated kernel; XLA:CPU runs both slowly. Here the taps (the
  strided views of the padded input each kernel position reads) make one (P, kh*kw*Cin)
  matrix: the weight gradient is one matmul with the output gradient, the input
  gradient one matmul back to the taps, each added in at its strided positions.
  """
  kh, kw, cin, cout = kernel.shape
  num, height, width, _ = x.shape
  _, out_h, out_w, _ = grad.shape
  pad_h, pad_w = kh // 2, kw // 2
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  padded_h = max(height + 2 * pad_h, kh - 1 + span_h)
  padded_w = max(width + 2 * pad_w, kw - 1 + span_w)
  padded = jnp.pad(x, ((0, 0), (pad_h, padded_h - height - pad_h),
                       (pad_w, padded_w - width - pad_w), (0, 0)))
  taps = [(i, j) for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(
      [padded[:, i:i + span_h:stride, j:j + span_w:stride] for i, j in taps], axis=-1)
  grad_2d = grad.reshape(-1, cout)
  dkernel = jax.lax.dot_general(patches.reshape(-1, kh * kw * cin), grad_2d,
                                (((0,), (0,)), ((), ()))).reshape(kernel.shape)
  dpatches = (grad_2d @ kernel.reshape(-1, cout).T).reshape(num, out_h, out_w, kh * kw, cin)
  zero = jnp.zeros((), x.dtype)
  dpadded = sum(
      jax.lax.pad(dpatches[:, :, :, t], zero,
                  ((0, 0, 0), (i, padded_h - i - span_h, stride - 1),
                   (j, padded_w - j - span_w, stride - 1), (0, 0, 0)))
      for t, (i, j) in enumerate(taps))
  return dpadded[:, pad_h:pad_h + height, pad_w:pad_w + width], dkernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _strided_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A strided conv over many channels: `_conv2d`'s values; on CPU its gradients come
  from `_strided_conv_vjp_by_taps` (the demo's three: 10 -> 6.3 ms alone,
  docs/performance.md), elsewhere from XLA's own."""
  return _conv2d(x, kernel, stride)


def _strided_conv_fwd(x, kernel, stride):
  return _conv2d(x, kernel, stride), (x, kernel)


def _strided_conv_bwd(stride, residuals, grad):
  x, kernel = residuals
  by_taps = functools.partial(_strided_conv_vjp_by_taps, stride=stride)
  return jax.lax.platform_dependent(x, kernel, grad, cpu=by_taps,
                                    default=_autodiff_vjp(_conv2d, stride))


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


class VideoConv(nnx.Module):
  """Bias-free video convolution with a (kt, kh, kw, Cin, Cout) kernel.

  Supported kernels: (1, kh, kw) with spatial stride, computed as a 2D conv over
  (B*T, H, W, C) (a strided one over <= 4 input channels, i.e. the stem, trains
  through space-to-depth on CPU and CUDA); (kt, 1, 1) with 'same' temporal padding,
  computed as a 2D conv with a (kt, 1) kernel over (B, T, H*W, C); (1, 1, 1) is a matmul.
  There is never a temporal stride. Padding is PyTorch-style (k // 2 on both sides), so
  output sizes match the reference implementations: H' = (H + 2 * (kh // 2) - kh) // stride
  + 1.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: tuple[int, int, int],
      *,
      stride: int = 1,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: nnx.Initializer = he_fan_out_normal,
      rngs: nnx.Rngs,
  ):
    kernel_size = tuple(int(k) for k in kernel_size)
    if len(kernel_size) != 3 or min(kernel_size) < 1:
      raise ValueError(f"VideoConv kernel_size must be 3 positive ints (kt, kh, kw); "
                       f"got {kernel_size}.")
    kt, kh, kw = kernel_size
    if kt > 1 and (kh, kw) != (1, 1):
      raise ValueError(
          f"VideoConv supports (1, kh, kw) or (kt, 1, 1) kernels only (computed as 2D "
          f"convs); got kernel_size={kernel_size}.")
    if any(k % 2 == 0 for k in kernel_size):
      raise ValueError(f"VideoConv needs odd kernel sizes for symmetric 'same' padding; "
                       f"got kernel_size={kernel_size}.")
    if stride < 1:
      raise ValueError(f"VideoConv stride must be >= 1; got {stride}.")
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.stride = stride
    self.dtype = dtype
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (*kernel_size, in_features, out_features), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, T, H, W, Cin) -> (B, T, H', W', Cout)."""
    if x.ndim != 5 or x.shape[-1] != self.in_features:
      raise ValueError(f"VideoConv expects (B, T, H, W, {self.in_features}); got {x.shape}.")
    if self.kernel_size == (1, 1, 1):
      # One (pixels, Cin) x (Cin, Cout) matmul. Written 2D, its weight gradient is a plain
      # dot over the pixels; as a 5D einsum XLA:CPU contracted four axes with transposed
      # copies (backward 2.5-3.5x slower on the demo's shapes, docs/performance.md).
      rows, kernel, out_shape = self.pointwise_operands(x)
      return (rows @ kernel).reshape(out_shape)
    kernel = self.kernel[...]
    dtype = _compute_dtype(self.dtype, x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    kt, kh, kw = self.kernel_size
    batch, frames = x.shape[:2]

    if (kh, kw) == (1, 1) and self.stride > 1:
      # A 1x1 spatial kernel without padding reads exactly the strided pixels.
      x = x[:, :, ::self.stride, ::self.stride]
    height, width = x.shape[2:4]

    if kt == 1:
      # Spatial conv, frames folded into the batch.
      frames_2d = x.reshape(batch * frames, height, width, -1)  # (B*T, H, W, Cin)
      if self.stride > 1 and self.in_features <= SPACE_TO_DEPTH_MAX_CHANNELS:
        y = _strided_conv_few_channels(frames_2d, kernel[0], self.stride)
      elif self.stride > 1:
        y = _strided_conv(frames_2d, kernel[0], self.stride)
      else:
        y = _conv2d(frames_2d, kernel[0], self.stride)
      return y.reshape(batch, frames, *y.shape[1:])

    pixels = x.reshape(batch, frames, height * width, -1)  # (B, T, H*W, Cin)
    y = jax.lax.platform_dependent(pixels, kernel[:, 0, 0], cpu=_temporal_conv_as_matmuls,
                                   default=_temporal_conv_2d)
    return y.reshape(batch, frames, height, width, -1)

  def pointwise_operands(self, x: jax.Array
                         ) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """A (1, 1, 1) conv (any stride) of x (B, T, H, W, Cin) as a matmul: x's rows
    (pixels, Cin) and the kernel (Cin, Cout), both in the compute dtype, and the output's
    shape (B, T, H', W', Cout). conv(x) = (rows @ kernel).reshape(shape)."""
    if self.kernel_size != (1, 1, 1):
      raise ValueError(f"pointwise_operands takes a (1, 1, 1) conv; got kernel "
                       f"{self.kernel_size}.")
    kernel = self.kernel[...]
    dtype = _compute_dtype(self.dtype, x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.stride > 1:  # a 1x1 kernel without padding reads exactly the strided pixels
      x = x[:, :, ::self.stride, ::self.stride]
    return (x.reshape(-1, self.in_features), kernel[0, 0, 0],
            (*x.shape[:-1], self.out_features))

  def blocks(self, x: jax.Array) -> jax.Array:
    """The stem's (1, k, k) stride-2 conv with its output in the 4x4-block layout of
    `stem.py`: (B, T, H, W, Cin) -> (B, T, H/4, W/4, 2, 2, Cout)."""
    if self.kernel_size[0] != 1 or self.stride != 2 or x.ndim != 5:
      raise ValueError(f"VideoConv.blocks computes (1, k, k) stride-2 convs of (B, T, H, W, "
                       f"C) videos; got kernel {self.kernel_size}, stride {self.stride}, "
                       f"input {x.shape}.")
    kernel = self.kernel[...]
    dtype = _compute_dtype(self.dtype, x, kernel)
    batch, frames = x.shape[:2]
    y = stem.conv_blocks(x.astype(dtype).reshape(batch * frames, *x.shape[2:]),
                         kernel[0].astype(dtype))
    return y.reshape(batch, frames, *y.shape[1:])


CONV1X1_KERNELS = ("auto", "xla", "pallas", "pallas_all")
# model.bn_fold: which 1x1 convs train with their BatchNorm folded into the conv
# (`BatchNorm.conv1x1_folded`): none, those with >= 4x or >= 2x as many outputs as inputs
# (backbones.Bottleneck).
BN_FOLDS = ("auto", "none", "widening_4x", "widening_2x")


def is_pointwise(conv: VideoConv) -> bool:
  """Whether `conv` is a (1, 1, 1) stride-1 conv: a plain matmul over pixels, what
  `conv1x1_with_statistics` computes."""
  return conv.kernel_size == (1, 1, 1) and conv.stride == 1


def conv1x1_with_statistics(conv: VideoConv, x: jax.Array,
                            affine: conv1x1_kernel.Affine | None = None, *,
                            backward_kernel: bool = True
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`conv`, a (1, 1, 1) stride-1 VideoConv, of relu(affine(x)) (of x without `affine`),
  with the per-channel sums of its output and their squares over all other axes (float32;
  over x as the program sees it: the global batch under jit, this device's part inside
  shard_map): (y, sum, sum of squares). On CUDA one Pallas kernel computes all three
  (`conv1x1_kernel`: the normalised input and a second read of y never go through
  memory; split over the devices by rows; with `affine` and `backward_kernel` another
  kernel computes the input's gradient); elsewhere the same by XLA ops."""
  if not is_pointwise(conv):
    raise ValueError(f"conv1x1_with_statistics takes a (1, 1, 1) stride-1 conv; got "
                     f"kernel {conv.kernel_size}, stride {conv.stride}.")
  if x.shape[-1] != conv.in_features:
    raise ValueError(f"Expected {conv.in_features} input channels; got {x.shape}.")
  rows, kernel, out_shape = conv.pointwise_operands(x)
  y, total, total_sq = jax.lax.platform_dependent(
      rows, kernel, affine,
      cuda=functools.partial(conv1x1_kernel.conv1x1_stats, backward_kernel=backward_kernel),
      default=conv1x1_kernel.conv1x1_stats_reference)
  return y.reshape(out_shape), total, total_sq


def _temporal_conv_2d(pixels: jax.Array, kernel: jax.Array) -> jax.Array:
  """(B, T, P, Cin) x (kt, Cin, Cout), 'same' in time: a 2D conv, time as its first
  spatial axis and pixels as its second."""
  kt = kernel.shape[0]
  return jax.lax.conv_general_dilated(
      pixels, kernel[:, None], window_strides=(1, 1), padding=((kt // 2, kt // 2), (0, 0)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _temporal_conv_as_matmuls(pixels: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_temporal_conv_2d` as kt time-shifted (pixels, Cin) x (Cin, Cout) matmuls, which
  XLA:CPU differentiates faster: forward + backward of the demo's two temporal convs
  7.35 -> 4.14 and 7.33 -> 3.48 ms (docs/performance.md). CPU only."""
  batch, frames, num_pixels, in_features = pixels.shape
  kt = kernel.shape[0]
  padded = jnp.pad(pixels, ((0, 0), (kt // 2, kt // 2), (0, 0), (0, 0)))
  y = sum(padded[:, k:k + frames].reshape(-1, in_features) @ kernel[k] for k in range(kt))
  return y.reshape(batch, frames, num_pixels, -1)


@jax.custom_jvp
def _row_sums_in_one_reduction(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Sums over the rows of same-shape (P, C) arrays as ONE variadic reduction: XLA then
  reads an input they share (x for the sums of x and x^2) once, where two plain sums may
  each read it (on the H200 the forward statistics were two kernels reading the same
  activation). Sums are linear, so the tangents are plain sums (transposable)."""
  zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
  return tuple(jax.lax.reduce(arrays, zeros,
                              lambda xs, ys: tuple(x + y for x, y in zip(xs, ys)), (0,)))


@_row_sums_in_one_reduction.defjvp
def _row_sums_in_one_reduction_jvp(primals, tangents):
  return (_row_sums_in_one_reduction(*primals),
          tuple(t.sum(axis=0) for t in tangents))


def _channel_sums(axis_name: str | None, *arrays: jax.Array, one_reduction: bool = False
                  ) -> tuple[jax.Array, ...]:
  """Per-channel sums over the rows of (P, C) arrays, over the `axis_name` devices too
  (one collective for all of them); `one_reduction`: see `_row_sums_in_one_reduction`."""
  if one_reduction:
    sums = jnp.stack(_row_sums_in_one_reduction(*arrays))
  else:
    sums = jnp.stack([a.sum(axis=0) for a in arrays])
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return tuple(sums)


def _row_count(rows: int, axis_name: str | None) -> jax.Array | int:
  return rows if axis_name is None else jax.lax.psum(rows, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None, out_dtype: Any, one_reduction: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over the last axis: (y, batch mean, batch variance).

  The same arithmetic as flax's BatchNorm (float32 statistics, variance as
  E[x^2] - E[x]^2 clipped at 0, y = (x - mean) * (rsqrt(var + eps) * scale) + bias), with
  the gradient in closed form: two per-channel sums of the output gradient (plain and
  times x - mean) and one affine pass, dx = a * dy + b * (x - mean) + c per channel,
  instead of autodiff's graph through the statistics. The mean and variance outputs
  (for the running averages) get their gradient terms too, although the step never uses
  them. The variance's clip at 0 passes no gradient in flax; here it does, which only
  matters for a channel that is constant over the batch, where x - mean is 0 anyway.
  `one_reduction`: each pair of sums as one variadic reduction (`model.bn_statistics`).
  """
  y, mean, var, _ = _batch_norm_train_forward(x, scale, bias, epsilon, axis_name, out_dtype,
                                              one_reduction)
  return y, mean, var


def _batch_norm_train_forward(x, scale, bias, epsilon, axis_name, out_dtype,
                              one_reduction=False):
  """(y, mean, var, rsqrt(var + epsilon)) by plain JAX ops: the closed form's forward
  pass, and what autodiff differentiates for 'auto' off the CPU."""
  features = x.shape[-1]
  rows = x.reshape(-1, features).astype(jnp.float32)
  count = _row_count(rows.shape[0], axis_name)
  total, total_sq = _channel_sums(axis_name, rows, rows * rows, one_reduction=one_reduction)
  return _normalise_with_sums(x.shape, rows, total, total_sq, count, scale, bias, epsilon,
                              out_dtype)


def _moments(total: jax.Array, total_sq: jax.Array, count, epsilon: float
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean, variance, rsqrt(variance + epsilon)) from per-channel sums of x and x^2."""
  mean = total / count
  var = jnp.maximum(0.0, total_sq / count - mean * mean)
  return mean, var, jax.lax.rsqrt(var + epsilon)


def _normalise_with_sums(shape, rows, total, total_sq, count, scale, bias, epsilon,
                         out_dtype):
  """(y of `shape`, mean, var, rsqrt(var + epsilon)): the float32 `rows` of x normalised
  with the batch statistics its per-channel sums give."""
  mean, var, inv_std = _moments(total, total_sq, count, epsilon)
  y = (rows - mean) * (inv_std * scale) + bias
  return y.reshape(shape).astype(out_dtype), mean, var, inv_std


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, out_dtype, one_reduction):
  y, mean, var, inv_std = _batch_norm_train_forward(x, scale, bias, epsilon, axis_name,
                                                    out_dtype, one_reduction)
  return (y, mean, var), (x, scale, mean, inv_std)


def _batch_norm_train_bwd(epsilon, axis_name, out_dtype, one_reduction, residuals,
                          cotangents):
  del epsilon, out_dtype
  x, scale, mean, inv_std = residuals
  grad, grad_mean, grad_var = cotangents
  features = x.shape[-1]
  centered = x.reshape(-1, features).astype(jnp.float32) - mean
  grad_rows = grad.reshape(-1, features).astype(jnp.float32)
  count = _row_count(centered.shape[0], axis_name)
  grad_sum, grad_centered_sum = _channel_sums(axis_name, grad_rows, grad_rows * centered,
                                              one_reduction=one_reduction)
  gain = scale.astype(jnp.float32) * inv_std
  centered_coef = (-gain * inv_std * inv_std * grad_centered_sum + 2.0 * grad_var) / count
  offset = (-gain * grad_sum + grad_mean) / count
  grad_x = gain * grad_rows + centered_coef * centered + offset
  return (grad_x.reshape(x.shape).astype(x.dtype),
          (grad_centered_sum * inv_std).astype(scale.dtype), grad_sum.astype(scale.dtype))


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


BATCH_NORM_GRADIENTS = ("auto", "autodiff", "closed_form")
BATCH_NORM_STATISTICS = ("auto", "separate", "one_reduction")


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm (same parameters, statistics and evaluation path) with a choice of
  training gradient (`model.bn_gradient`):
    'autodiff'     flax's BatchNorm differentiated by JAX;
    'closed_form'  `batch_norm_train` (same values, a hand-written gradient);
    'auto'         closed form on CPU, where it made the demo step ~5 % faster
                   (docs/performance.md), autodiff elsewhere until measured there;
  and of how the two per-channel sums are reduced (`model.bn_statistics`, not for
  'autodiff', which is flax's own): 'separate' (two reductions), 'one_reduction' (one
  variadic reduction, `_row_sums_in_one_reduction`), 'auto' = one reduction on CUDA (the
  R3D50 step 2.4 % faster on an H200, chained), separate elsewhere (the variadic one ran
  ~10x slower on CPU; not measured on TPU).
  """

  def __init__(self, num_features: int, *, gradient: str = "auto", statistics: str = "auto",
               **kwargs):
    if gradient not in BATCH_NORM_GRADIENTS:
      raise ValueError(f"BatchNorm gradient {gradient!r} (model.bn_gradient); choose from "
                       f"{BATCH_NORM_GRADIENTS}.")
    if statistics not in BATCH_NORM_STATISTICS:
      raise ValueError(f"BatchNorm statistics {statistics!r} (model.bn_statistics); choose "
                       f"from {BATCH_NORM_STATISTICS}.")
    if gradient == "autodiff" and statistics == "one_reduction":
      raise ValueError("model.bn_statistics='one_reduction' needs model.bn_gradient 'auto' "
                       "or 'closed_form' ('autodiff' is flax's BatchNorm, its own sums).")
    super().__init__(num_features, **kwargs)
    self.gradient = gradient
    self.statistics = statistics

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if use_running_average is None:
      use_running_average = self.use_running_average
    if (self.gradient == "autodiff" or use_running_average is None or use_running_average
        or mask is not None or self.axis not in (-1, x.ndim - 1)
        or not self.use_fast_variance or self.axis_index_groups is not None
        or self.scale is None or self.bias is None):
      return super().__call__(x, use_running_average, mask=mask)
    y, mean, var = self._train_outputs(x)
    self._update_running_averages(mean, var)
    return y

  def _train_outputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, batch mean, batch variance) in training, by `gradient` and `statistics`; the
    running averages untouched. Not for 'autodiff' (flax's own)."""
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]),
                                        dtype=self.dtype)
    out_dtype = self.dtype if self.dtype is not None else jnp.result_type(x, scale, bias)
    static = (self.epsilon, self.axis_name, out_dtype)

    def closed_form(one_reduction):
      return lambda *a: batch_norm_train(*a, *static, one_reduction)

    def autodiff_of_forward(one_reduction):
      return lambda *a: _batch_norm_train_forward(*a, *static, one_reduction)[:3]

    # gradient 'auto': closed form on CPU, autodiff of the plain ops elsewhere.
    form = closed_form if self.gradient == "closed_form" else autodiff_of_forward
    explicit = self.statistics == "one_reduction"
    if form is closed_form and self.statistics != "auto":
      return closed_form(explicit)(x, scale, bias)  # the same on every platform
    branches = {"cpu": closed_form(explicit), "default": form(explicit)}
    if self.statistics == "auto":  # one reduction on CUDA only (R3D50 step 2.4 % faster)
      branches["cuda"] = form(True)
    return jax.lax.platform_dependent(x, scale, bias, **branches)

  def _update_running_averages(self, mean: jax.Array, var: jax.Array) -> None:
    momentum = self.momentum
    self.mean[...] = jax.lax.stop_gradient(momentum * self.mean[...] + (1 - momentum) * mean)
    self.var[...] = jax.lax.stop_gradient(momentum * self.var[...] + (1 - momentum) * var)

  # The methods below split this BatchNorm around a 1x1 convolution that applies it
  # (`affine`) or sums its input (`from_sums`) in the same pass (`conv1x1_with_statistics`,
  # model.conv1x1_kernel), or fold it into one (`conv1x1_folded`, model.bn_fold). The
  # first two differentiate the plain ops (model.bn_gradient's 'auto' off the CPU), the
  # fold has its own closed form; all need this module's usual setup: channels last,
  # scale and bias.

  def _check_split(self) -> None:
    if (self.axis != -1 or not self.use_fast_variance
        or self.axis_index_groups is not None or self.scale is None or self.bias is None):
      raise ValueError("BatchNorm.affine/from_sums/conv1x1_folded need axis=-1, "
                       "use_fast_variance, no axis_index_groups, a scale and a bias.")

  def _promoted(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # As __call__: with dtype set, scale and bias round to it before they are applied.
    return self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)

  def affine(self, x: jax.Array) -> conv1x1_kernel.Affine:
    """This BatchNorm of x as per-channel (mean, gain, bias), y = (x - mean) * gain + bias:
    x's batch statistics in training (the running averages updated as by __call__), the
    running averages in evaluation."""
    self._check_split()
    x, scale, bias = self._promoted(x)
    if self.use_running_average:  # evaluation
      mean, var = self.mean[...], self.var[...]
      inv_std = jax.lax.rsqrt(var + self.epsilon)
    else:
      rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)

      def sums(one_reduction):
        return lambda r: _channel_sums(self.axis_name, r, r * r,
                                       one_reduction=one_reduction)

      if self.statistics == "auto":  # one reduction on CUDA, as __call__
        total, total_sq = jax.lax.platform_dependent(rows, cuda=sums(True),
                                                     default=sums(False))
      else:
        total, total_sq = sums(self.statistics == "one_reduction")(rows)
      mean, var, inv_std = _moments(total, total_sq, _row_count(rows.shape[0],
                                                                self.axis_name),
                                    self.epsilon)
      self._update_running_averages(mean, var)
    return conv1x1_kernel.Affine(mean, inv_std * scale, bias.astype(jnp.float32))

  def conv1x1_folded(self, conv: VideoConv, x: jax.Array, platform: str | None = None
                     ) -> jax.Array:
    """This BatchNorm of conv(x), `conv` a (1, 1, 1) VideoConv (any stride), folded into
    the conv in training (`folded_batch_norm`: the statistics from x's Gram matrix,
    conv(x) read only to normalise it, a closed-form gradient whatever `gradient` says);
    the same values up to rounding, the running averages updated as by __call__.
    `platform` (e.g. 'cuda', model.bn_fold 'auto'): folded on that platform only, conv
    then this BatchNorm on the others (one program per platform, `lax.platform_dependent`).
    Evaluation: self(conv(x))."""
    if conv.kernel_size != (1, 1, 1):
      raise ValueError(f"BatchNorm.conv1x1_folded takes a (1, 1, 1) conv; got kernel "
                       f"{conv.kernel_size}.")
    if x.ndim != 5 or x.shape[-1] != conv.in_features:
      raise ValueError(f"Expected (B, T, H, W, {conv.in_features}); got {x.shape}.")
    if self.use_running_average:
      return self(conv(x))
    self._check_split()
    if platform is not None and self.gradient == "autodiff":
      # The other platforms' branch must return the statistics, which flax's BatchNorm
      # writes into its running averages itself.
      raise ValueError("BatchNorm.conv1x1_folded on one platform needs gradient 'auto' or "
                       "'closed_form' (model.bn_gradient), not 'autodiff'.")
    scale, bias = self.scale[...], self.bias[...]
    if self.dtype is not None:  # as __call__'s promote_dtype: rounded to the BN's dtype
      scale, bias = scale.astype(self.dtype), bias.astype(self.dtype)

    def folded(x):
      rows, kernel, out_shape = conv.pointwise_operands(x)
      out_dtype = (self.dtype if self.dtype is not None
                   else jnp.result_type(rows.dtype, scale, bias))
      z, mean, var = folded_batch_norm.conv1x1_batch_norm(
          rows, kernel, scale, bias, self.epsilon, self.axis_name, out_dtype)
      return z.reshape(out_shape), mean, var

    if platform is None:
      z, mean, var = folded(x)
    else:  # the running averages' update stays outside the branches
      z, mean, var = jax.lax.platform_dependent(
          x, default=lambda x: self._train_outputs(conv(x)), **{platform: folded})
    self._update_running_averages(mean, var)
    return z

  def from_sums(self, x: jax.Array, total: jax.Array, total_sq: jax.Array) -> jax.Array:
    """This BatchNorm of x given this device's per-channel sums of x and x^2 (float32,
    over all rows but the channel axis; across devices with `axis_name`). Evaluation
    uses the running averages, as __call__."""
    self._check_split()
    if self.use_running_average:
      return self(x)
    x, scale, bias = self._promoted(x)
    out_dtype = self.dtype if self.dtype is not None else jnp.result_type(x, scale, bias)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if self.axis_name is not None:
      total, total_sq = jax.lax.psum((total, total_sq), self.axis_name)
    y, mean, var, _ = _normalise_with_sums(
        x.shape, rows, total, total_sq, _row_count(rows.shape[0], self.axis_name), scale,
        bias, self.epsilon, out_dtype)
    self._update_running_averages(mean, var)
    return y


def batch_norm(
    num_features: int,
    *,
    axis_name: str | None = None,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    zero_init_scale: bool = False,
    dtype: Dtype | None = None,
    gradient: str = "auto",
    statistics: str = "auto",
    rngs: nnx.Rngs,
) -> BatchNorm:
  """BatchNorm over all but the last axis, float32 params and statistics.

  `axis_name` is the mesh axis to average statistics over inside `shard_map` (None under
  plain jit sharding). `zero_init_scale` starts a residual branch's last BN at 0 so each
  block begins as identity (SlowFast ZERO_INIT_FINAL_BN / torchvision zero_init_residual).
  `gradient`, `statistics`: see `BatchNorm`.
  """
  scale_init = nnx.initializers.zeros_init() if zero_init_scale else nnx.initializers.ones_init()
  return BatchNorm(
      num_features, gradient=gradient, statistics=statistics, momentum=momentum,
      epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init,
      axis_name=axis_name, rngs=rngs)


BLOCK_RELU_GRADIENTS = ("auto", "from_input", "from_output")


@jax.custom_vjp
def relu_grad_from_output(x: jax.Array) -> jax.Array:
  """ReLU whose gradient mask is read off its output (y > 0 exactly where x > 0).

  Autodiff's ReLU keeps its input for the backward pass. At a residual block's end that
  input is the sum residual + shortcut, which XLA then writes out besides the output:
  two full tensors per block where one would do (the H200 trace's
  `loop_add_maximum_fusion`s, docs/performance.md). The output is kept anyway, as the
  next block's input. `model.block_relu_gradient`.
  """
  return jnp.maximum(x, 0)


def _relu_grad_from_output_fwd(x):
  y = jnp.maximum(x, 0)
  return y, y


def _relu_grad_from_output_bwd(y, grad):
  return (jnp.where(y > 0, grad, jnp.zeros((), grad.dtype)),)


relu_grad_from_output.defvjp(_relu_grad_from_output_fwd, _relu_grad_from_output_bwd)


def _pool_geometry(size: int, window: int, stride: int) -> tuple[int, int]:
  """(padding per side, output size) of a PyTorch-style pool along one axis."""
  pad = window // 2
  return pad, (size + 2 * pad - window) // stride + 1


def _pool_taps(x: jax.Array, window: int, stride: int) -> list[jax.Array]:
  """The window * window strided views of x (B, T, H, W, C) padded with -inf, in raster
  order: tap (i, j) holds x[..., stride * h' + i - pad, stride * w' + j - pad, :]."""
  batch, frames, height, width, channels = x.shape
  pad, out_h = _pool_geometry(height, window, stride)
  _, out_w = _pool_geometry(width, window, stride)
  padded = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)),
                   constant_values=-jnp.inf)
  return [jax.lax.slice(padded, (0, 0, i, j, 0),
                        (batch, frames, i + (out_h - 1) * stride + 1,
                         j + (out_w - 1) * stride + 1, channels),
                        (1, 1, stride, stride, 1))
          for i in range(window) for j in range(window)]


def _max_pool_forward(x: jax.Array, window: int, stride: int) -> tuple[jax.Array, jax.Array]:
  """Max over the taps and which tap (int8, the first in raster order) holds it."""
  return stem.max_of_taps(_pool_taps(x, window, stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  return _max_pool_forward(x, window, stride)[0]


def _max_pool_fwd(x, window, stride):
  pooled, winner = _max_pool_forward(x, window, stride)
  return pooled, (winner, x.shape)


def _max_pool_bwd(window, stride, residuals, grad):
  """Each output's gradient goes to the input its max came from.

  Computed per stride phase of the padded input grid: padded row P = stride * q + r
  receives from taps i = r + m * stride of output row q - m (m = 0, 1, ...), so each
  phase is a sum of a few shifted, masked copies of the output gradient, and the phases
  are interleaved at the end. Cheaper than placing each tap's gradients back with an
  interior padding (each padded element then evaluates all window^2 pads).
  """
  winner, (batch, frames, height, width, channels) = residuals
  pad, out_h = _pool_geometry(height, window, stride)
  _, out_w = _pool_geometry(width, window, stride)
  phases_h = -(-(height + 2 * pad) // stride)  # q ranges of the padded grid
  phases_w = -(-(width + 2 * pad) // stride)
  zero = jnp.zeros((), grad.dtype)

  def shifted(tap_grad, shift_h, shift_w):
    """tap_grad[q - shift] on the (phases_h, phases_w) grid, zero outside."""
    return jax.lax.pad(tap_grad, zero, ((0, 0, 0), (0, 0, 0),
                                        (shift_h, phases_h - out_h - shift_h, 0),
                                        (shift_w, phases_w - out_w - shift_w, 0), (0, 0, 0)))

  rows = []
  for phase_h in range(stride):
    columns = []
    for phase_w in range(stride):
      total = None
      for tap_h in range(phase_h, window, stride):
        for tap_w in range(phase_w, window, stride):
          index = tap_h * window + tap_w
          part = shifted(jnp.where(winner == index, grad, zero), (tap_h - phase_h) // stride,
                         (tap_w - phase_w) // stride)
          total = part if total is None else total + part
      if total is None:  # no tap lands on this phase (stride > window)
        total = jnp.zeros((batch, frames, phases_h, phases_w, channels), grad.dtype)
      columns.append(total)
    rows.append(jnp.stack(columns, axis=4))  # (B, T, Qh, Qw, s_w, C)
  grid = jnp.stack(rows, axis=3)  # (B, T, Qh, s_h, Qw, s_w, C)
  grid = grid.reshape(batch, frames, phases_h * stride, phases_w * stride, channels)
  return (grid[:, :, pad:pad + height, pad:pad + width],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_spatial(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Per-frame max-pool, PyTorch padding (window // 2, padded with -inf).

  x: (B, T, H, W, C) -> (B, T, H', W', C).

  The max of window^2 strided slices, with a custom gradient: the forward pass also
  records which tap won (int8), and the backward pass routes each output's gradient to
  that input. The same values and the same gradient as `lax.reduce_window` + autodiff
  (ties go to the first maximum in raster order there too; sums of gradients that meet
  at one input may round differently), without XLA's generic select-and-scatter, which
  is slow on CPU: fwd + bwd of the demo's stem output 55 -> 10 ms (docs/performance.md).
  """
  if x.ndim != 5:
    raise ValueError(f"max_pool_spatial expects (B, T, H, W, C); got shape {x.shape}.")
  if not 1 <= window <= 11 or stride < 1:
    raise ValueError(f"max_pool_spatial needs 1 <= window <= 11 (the winning tap is kept "
                     f"as int8) and stride >= 1; got window={window}, stride={stride}.")
  return _max_pool(x, window, stride)
