"""Video ResNet backbones that keep every frame: R3D50 (Slow pathway) and TSM50.

Both map (B, T, H, W, 3) to frame-wise features (B, T, H/32, W/32, C) with T preserved
(TCVM removes all temporal down-sampling, paper Sec. 4.1), C = `num_features`.

  R3D50 = pytorchvideo `slow_r50` without its head: temporal kernel 3 in the first 1x1
          conv of every block of res4/res5, 31,634,496 parameters.
  TSM50 = torchvision ResNet-50 without fc, per frame, with the Temporal Shift Module on
          the input of every residual branch, 23,508,032 parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tcvm_jax import conv1x1_kernel, layers, stem

Dtype = Any


# model.tsm_shift: how the temporal shift meets the conv after it (the same values).
# 'fused': XLA may fuse the shift into the op that reads it; 'barrier': the shifted tensor
# is materialised behind an optimization barrier, so no GEMM fusion can take the
# concatenation in (the suspected trigger of XLA's abort compiling TSM50 with Triton GEMM
# fusions, tcvm_jax/xla_options.py; on cuBLAS it is materialised anyway). 'auto' = fused
# until a GPU session compiles and times 'barrier' with Triton GEMMs on.
TSM_SHIFTS = ("auto", "fused", "barrier")

# What model.bn_fold 'auto' folds on CUDA (layers.BN_FOLDS); 'none' on the other
# platforms, where the CPU step gained nothing. 'none' until scripts/gpu_session.sh's A/B
# shows a fold winning on the GPU by >= 2 % (docs/performance.md); any other value folds
# those convs in CUDA's program only (Bottleneck._conv_bn, BatchNorm.conv1x1_folded).
CUDA_AUTO_BN_FOLD = "none"


def temporal_shift(x: jax.Array, shift_div: int = 8, barrier: bool = False) -> jax.Array:
  """Temporal Shift Module (Lin et al. 2019), zero-filled, within each video.

  x: (B, T, H, W, C). Channels [0, C//shift_div) take the NEXT frame's values
  (out[t] = x[t+1], zero at t = T-1); channels [C//shift_div, 2*C//shift_div) take the
  PREVIOUS frame's (out[t] = x[t-1], zero at t = 0); the rest are unchanged. This is the
  channel layout of the official TSM code (`shift` with fold_div=8). Videos never mix:
  time is its own axis. `barrier`: the result behind `jax.lax.optimization_barrier`
  (model.tsm_shift='barrier'; its gradient passes one too).
  """
  fold = x.shape[-1] // shift_div
  if fold == 0:
    return x
  zeros = jnp.zeros_like(x[:, :1, ..., :fold])
  from_next = jnp.concatenate([x[:, 1:, ..., :fold], zeros], axis=1)
  from_previous = jnp.concatenate([zeros, x[:, :-1, ..., fold:2 * fold]], axis=1)
  shifted = jnp.concatenate([from_next, from_previous, x[..., 2 * fold:]], axis=-1)
  return jax.lax.optimization_barrier(shifted) if barrier else shifted


class Bottleneck(nnx.Module):
  """ResNet bottleneck: (kt,1,1) -> (1,3,3) with spatial stride -> (1,1,1), x4 expansion.

  The stride sits on the 3x3 conv (pytorchvideo / torchvision v1.5). With `shift_div`
  set, the residual branch sees the temporally shifted input; the shortcut does not.
  """

  def __init__(
      self,
      in_features: int,
      inner_features: int,
      *,
      temporal_kernel: int,
      stride: int,
      shift_div: int | None,
      zero_init_residual: bool,
      dtype: Dtype | None,
      bn_axis_name: str | None,
      bn_momentum: float,
      bn_gradient: str = "auto",
      bn_statistics: str = "auto",
      block_relu_gradient: str = "auto",
      conv1x1_kernel: str = "auto",
      bn_fold: str = "auto",
      tsm_shift: str = "auto",
      rngs: nnx.Rngs,
  ):
    out_features = 4 * inner_features
    conv = functools.partial(layers.VideoConv, dtype=dtype, rngs=rngs)
    bn = functools.partial(layers.batch_norm, axis_name=bn_axis_name, momentum=bn_momentum,
                           dtype=dtype, gradient=bn_gradient, statistics=bn_statistics,
                           rngs=rngs)
    self.shift_div = shift_div
    self.shift_barrier = tsm_shift == "barrier"  # 'auto' = 'fused' (TSM_SHIFTS above)
    self.block_relu_gradient = block_relu_gradient
    # 'auto' = 'xla': faster on an H200 than either kernel value (docs/performance.md).
    self.conv1x1_kernel = "xla" if conv1x1_kernel == "auto" else conv1x1_kernel
    # 'auto': 'none', and CUDA_AUTO_BN_FOLD on CUDA where the fold can take conv_c (XLA's
    # 1x1 convs) and its BatchNorm can return its statistics (not flax's 'autodiff').
    self.bn_fold = "none" if bn_fold == "auto" else bn_fold
    self.cuda_bn_fold = "none"
    if bn_fold == "auto" and self.conv1x1_kernel == "xla" and bn_gradient != "autodiff":
      self.cuda_bn_fold = CUDA_AUTO_BN_FOLD
    self.conv_a = conv(in_features, inner_features, (temporal_kernel, 1, 1))
    self.bn_a = bn(inner_features)
    self.conv_b = conv(inner_features, inner_features, (1, 3, 3), stride=stride)
    self.bn_b = bn(inner_features)
    self.conv_c = conv(inner_features, out_features, (1, 1, 1))
    self.bn_c = bn(out_features, zero_init_scale=zero_init_residual)
    if stride != 1 or in_features != out_features:
      self.shortcut_conv = conv(in_features, out_features, (1, 1, 1), stride=stride)
      self.shortcut_bn = bn(out_features)
    else:
      self.shortcut_conv = self.shortcut_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = (temporal_shift(x, self.shift_div, barrier=self.shift_barrier)
                if self.shift_div else x)
    residual = nnx.relu(self._conv_bn(self.conv_a, self.bn_a, residual))
    if self._fuses(self.conv_c):
      # bn_b + ReLU run inside conv_c's kernel, which also sums its output for bn_c.
      conv_b_out = self.conv_b(residual)
      residual = self.bn_c.from_sums(*layers.conv1x1_with_statistics(
          self.conv_c, conv_b_out, self.bn_b.affine(conv_b_out),
          backward_kernel=self._fuses(self.conv_c, backward=True)))
    else:
      residual = nnx.relu(self.bn_b(self.conv_b(residual)))
      residual = self._conv_bn(self.conv_c, self.bn_c, residual)
    shortcut = x
    if self.shortcut_conv is not None:
      shortcut = self._conv_bn(self.shortcut_conv, self.shortcut_bn, x)
    # 'auto' = from_input (autodiff's ReLU): from_output gained nothing on an H200; layers.
    if self.block_relu_gradient == "from_output":
      return layers.relu_grad_from_output(residual + shortcut)
    return nnx.relu(residual + shortcut)

  def _conv_bn(self, conv: layers.VideoConv, bn: layers.BatchNorm, x: jax.Array
               ) -> jax.Array:
    """bn(conv(x)); with model.bn_fold set, a widening 1x1 conv (`_folds`) trains with
    bn folded into the conv; with model.conv1x1_kernel 'pallas' or 'pallas_all' a
    stride-1 1x1 conv (`_fuses`) sums its output for bn in the same pass."""
    if self._folds(conv, self.bn_fold):
      return bn.conv1x1_folded(conv, x)
    if self._folds(conv, self.cuda_bn_fold):  # model.bn_fold 'auto'
      return bn.conv1x1_folded(conv, x, platform="cuda")
    if self._fuses(conv):
      return bn.from_sums(*layers.conv1x1_with_statistics(conv, x))
    return bn(conv(x))

  @staticmethod
  def _folds(conv: layers.VideoConv, bn_fold: str) -> bool:
    """Whether `conv` trains with its BatchNorm folded into it under `bn_fold`: a 1x1 conv
    with >= 4x as many outputs as inputs with 'widening_4x' (each block's conv_c, stage
    1's projection shortcut), >= 2x with 'widening_2x' (the other shortcuts too).
    Folding adds in / out of the conv's FLOPs and saves memory passes over its output
    (folded_batch_norm): the wider the output, the better the trade."""
    if bn_fold == "none" or conv.kernel_size != (1, 1, 1):
      return False
    widening = 4 if bn_fold == "widening_4x" else 2
    return conv.out_features >= widening * conv.in_features

  def _fuses(self, conv: layers.VideoConv, backward: bool = False) -> bool:
    """Whether `conv` runs as `conv1x1_kernel`'s forward kernel (`backward`: its input
    gradient as the input-gradient kernel): with 'pallas_all' every stride-1 1x1 conv,
    with 'pallas' those whose FLOPs per byte are within what the kernel was measured to
    win at (conv1x1_kernel.FORWARD_MAX_FLOPS_PER_BYTE, INPUT_GRAD_MAX_FLOPS_PER_BYTE)."""
    if self.conv1x1_kernel == "xla" or not layers.is_pointwise(conv):
      return False
    if self.conv1x1_kernel == "pallas_all":
      return True
    limit = (conv1x1_kernel.INPUT_GRAD_MAX_FLOPS_PER_BYTE if backward
             else conv1x1_kernel.FORWARD_MAX_FLOPS_PER_BYTE)
    return conv1x1_kernel.flops_per_byte(conv.in_features, conv.out_features) <= limit


class VideoResNet(nnx.Module):
  """ResNet with (1,7,7) stem, 3x3 max-pool and 4 bottleneck stages; no temporal stride.

  `stage_temporal_kernels[i]` is the kt of conv_a in every block of stage i;
  `shift_div` (None: off) turns on the Temporal Shift Module in every block.
  Attributes: `stem_conv`, `stem_bn`, `stages` (a list of lists of `Bottleneck`).
  """

  def __init__(
      self,
      *,
      stage_sizes: Sequence[int],
      stage_temporal_kernels: Sequence[int],
      width: int = 64,
      shift_div: int | None = None,
      zero_init_residual: bool = True,
      dtype: Dtype | None = None,
      bn_axis_name: str | None = None,
      bn_momentum: float = 0.9,
      bn_gradient: str = "auto",
      bn_statistics: str = "auto",
      stem_layout: str = "auto",
      stem_pool_gradient: str = "auto",
      block_relu_gradient: str = "auto",
      conv1x1_kernel: str = "auto",
      bn_fold: str = "auto",
      tsm_shift: str = "auto",
      rngs: nnx.Rngs,
  ):
    if len(stage_sizes) != len(stage_temporal_kernels):
      raise ValueError(f"stage_sizes {tuple(stage_sizes)} and stage_temporal_kernels "
                       f"{tuple(stage_temporal_kernels)} must have the same length.")
    if width < 1 or any(n < 1 for n in stage_sizes):
      raise ValueError(f"width ({width}) and every stage size ({tuple(stage_sizes)}) must "
                       f"be >= 1.")
    if stem_layout not in stem.STEM_LAYOUTS:
      raise ValueError(f"Stem layout {stem_layout!r} (model.stem_layout); choose from "
                       f"{stem.STEM_LAYOUTS}.")
    if stem_pool_gradient not in stem.POOL_GRADIENTS:
      raise ValueError(f"Stem pool gradient {stem_pool_gradient!r} "
                       f"(model.stem_pool_gradient); choose from {stem.POOL_GRADIENTS}.")
    if block_relu_gradient not in layers.BLOCK_RELU_GRADIENTS:
      raise ValueError(f"Block ReLU gradient {block_relu_gradient!r} "
                       f"(model.block_relu_gradient); choose from "
                       f"{layers.BLOCK_RELU_GRADIENTS}.")
    if conv1x1_kernel not in layers.CONV1X1_KERNELS:
      raise ValueError(f"1x1 conv kernel {conv1x1_kernel!r} (model.conv1x1_kernel); choose "
                       f"from {layers.CONV1X1_KERNELS}.")
    if bn_fold not in layers.BN_FOLDS:
      raise ValueError(f"BatchNorm folding {bn_fold!r} (model.bn_fold); choose from "
                       f"{layers.BN_FOLDS}.")
    if tsm_shift not in TSM_SHIFTS:
      raise ValueError(f"TSM shift {tsm_shift!r} (model.tsm_shift); choose from "
                       f"{TSM_SHIFTS}.")
    if bn_fold not in ("auto", "none") and conv1x1_kernel.startswith("pallas"):
      # Both rewrite conv_c with its BatchNorms; one at a time.
      raise ValueError(f"model.bn_fold={bn_fold!r} needs model.conv1x1_kernel 'auto' or "
                       f"'xla'; got {conv1x1_kernel!r}.")
    dtype = jnp.dtype(dtype) if dtype is not None else None
    self.stem_layout = stem_layout
    self.stem_pool_gradient = stem_pool_gradient
    self.stem_conv = layers.VideoConv(3, width, (1, 7, 7), stride=2, dtype=dtype, rngs=rngs)
    self.stem_bn = layers.batch_norm(width, axis_name=bn_axis_name, momentum=bn_momentum,
                                     dtype=dtype, gradient=bn_gradient, statistics=bn_statistics,
                           rngs=rngs)
    stages = []
    in_features = width
    for stage_index, (num_blocks, temporal_kernel) in enumerate(
        zip(stage_sizes, stage_temporal_kernels)):
      inner_features = width * 2**stage_index
      blocks = []
      for block_index in range(num_blocks):
        blocks.append(Bottleneck(
            in_features, inner_features, temporal_kernel=temporal_kernel,
            stride=2 if stage_index > 0 and block_index == 0 else 1, shift_div=shift_div,
            zero_init_residual=zero_init_residual, dtype=dtype, bn_axis_name=bn_axis_name,
            bn_momentum=bn_momentum, bn_gradient=bn_gradient, bn_statistics=bn_statistics,
            block_relu_gradient=block_relu_gradient, conv1x1_kernel=conv1x1_kernel,
            bn_fold=bn_fold, tsm_shift=tsm_shift, rngs=rngs))
        in_features = 4 * inner_features
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.num_features = in_features
    self.dtype = dtype

  def __call__(self, videos: jax.Array) -> jax.Array:
    """videos: (B, T, H, W, 3) float -> frame features (B, T, H/32, W/32, C)."""
    if videos.ndim != 5 or videos.shape[-1] != 3:
      raise ValueError(f"Backbone expects videos of shape (B, T, H, W, 3); got {videos.shape}.")
    if self.dtype is not None:
      videos = videos.astype(self.dtype)
    x = self._stem(videos)
    for blocks in self.stages:
      for block in blocks:
        x = block(x)
    return x

  def _stem(self, videos: jax.Array) -> jax.Array:
    """Conv 7x7 / 2 -> BN -> ReLU -> max-pool 3x3 / 2, in the pixel layout or the 4x4-block
    one (`stem.py`, `model.stem_layout`): the same values and parameters either way.
    'auto' is the block layout on CUDA (the R3D50 step 2.7 % faster, chained, on an H200),
    pixels elsewhere. Frame sides that are not multiples of 4 take the pixel layout."""
    layout = self.stem_layout
    if not stem.supports_blocks(*videos.shape[2:4], self.stem_conv.kernel_size[1:]):
      layout = "pixels"
    batch, frames, height, width = videos.shape[:4]

    if layout == "pixels":  # any frame size
      return layers.max_pool_spatial(nnx.relu(self.stem_bn(self.stem_conv(videos))))

    # Below, sides are multiples of 4. Each layout's pool takes its conv's values in that
    # layout's order, in any shape.
    def pool_pixels(y):
      return layers.max_pool_spatial(y.reshape(batch, frames, height // 2, width // 2, -1))

    def pool_blocks(y):
      pooled = stem.max_pool_blocks(
          y.reshape(batch * frames, height // 4, width // 4, 2, 2, -1),
          gradient=self.stem_pool_gradient)
      return pooled.reshape(batch, frames, *pooled.shape[1:])

    if layout == "blocks":
      return pool_blocks(nnx.relu(self.stem_bn(self.stem_conv.blocks(videos))))
    # 'auto': each platform's conv and pool, one BatchNorm between them. Both layouts'
    # conv outputs become the same rows (one per output pixel, C values; the order
    # differs, which per-channel statistics do not see), so the BatchNorm and its
    # statistics' update stay outside the per-platform branches.
    as_rows = lambda y: y.reshape(-1, y.shape[-1])
    rows = jax.lax.platform_dependent(
        videos, cuda=lambda v: as_rows(self.stem_conv.blocks(v)),
        default=lambda v: as_rows(self.stem_conv(v)))
    rows = nnx.relu(self.stem_bn(rows))
    return jax.lax.platform_dependent(rows, cuda=pool_blocks, default=pool_pixels)


class ResNet3D(VideoResNet):
  """Slow-only 3D ResNet (SlowFast's Slow pathway); R3D50 by default."""

  def __init__(
      self,
      *,
      stage_sizes: Sequence[int] = (3, 4, 6, 3),
      stage_temporal_kernels: Sequence[int] = (1, 1, 3, 3),
      width: int = 64,
      **kwargs,
  ):
    super().__init__(stage_sizes=stage_sizes, stage_temporal_kernels=stage_temporal_kernels,
                     width=width, shift_div=None, **kwargs)


class TSMResNet(VideoResNet):
  """2D ResNet applied per frame with the Temporal Shift Module; TSM50 by default."""

  def __init__(
      self,
      *,
      stage_sizes: Sequence[int] = (3, 4, 6, 3),
      width: int = 64,
      shift_div: int = 8,
      **kwargs,
  ):
    if shift_div < 2:
      raise ValueError(f"TSM shift_div must be >= 2 (1/shift_div of channels shift each "
                       f"way); got {shift_div}.")
    super().__init__(stage_sizes=stage_sizes, stage_temporal_kernels=(1,) * len(stage_sizes),
                     width=width, shift_div=shift_div, **kwargs)


_TINY = dict(stage_sizes=(1, 1, 1, 1), width=8)

BACKBONES: dict[str, Callable[..., VideoResNet]] = {
    "r3d50": functools.partial(ResNet3D, stage_sizes=(3, 4, 6, 3)),
    "tsm50": functools.partial(TSMResNet, stage_sizes=(3, 4, 6, 3)),
    # Same code paths at a fraction of the cost; r3d_tiny keeps kt=3 in stages 3-4.
    "r3d_tiny": functools.partial(ResNet3D, **_TINY),
    "tsm_tiny": functools.partial(TSMResNet, **_TINY),
}


# The config.model fields that say how the backbone computes, not what ('auto' where unset).
COMPUTE_OPTION_FIELDS = ("bn_gradient", "bn_statistics", "stem_layout", "stem_pool_gradient",
                         "block_relu_gradient", "conv1x1_kernel", "bn_fold", "tsm_shift")


def compute_options(model_config: Any) -> dict[str, str]:
  """`get_backbone`'s keyword arguments for config.model's compute switches."""
  return {name: model_config.get(name, "auto") for name in COMPUTE_OPTION_FIELDS}


def get_backbone(
    name: str,
    *,
    dtype: Dtype | str | None = None,
    bn_axis_name: str | None = None,
    bn_momentum: float = 0.9,
    bn_gradient: str = "auto",
    bn_statistics: str = "auto",
    stem_layout: str = "auto",
    stem_pool_gradient: str = "auto",
    block_relu_gradient: str = "auto",
    conv1x1_kernel: str = "auto",
    bn_fold: str = "auto",
    tsm_shift: str = "auto",
    rngs: nnx.Rngs,
    **kwargs,
) -> VideoResNet:
  """Builds a registered backbone; `kwargs` override its architecture settings."""
  if name not in BACKBONES:
    raise ValueError(f"Unknown backbone {name!r} (config.model.backbone); choose from "
                     f"{sorted(BACKBONES)}.")
  return BACKBONES[name](dtype=dtype, bn_axis_name=bn_axis_name, bn_momentum=bn_momentum,
                         bn_gradient=bn_gradient, bn_statistics=bn_statistics,
                         stem_layout=stem_layout, stem_pool_gradient=stem_pool_gradient,
                         block_relu_gradient=block_relu_gradient,
                         conv1x1_kernel=conv1x1_kernel, bn_fold=bn_fold,
                         tsm_shift=tsm_shift, rngs=rngs, **kwargs)
