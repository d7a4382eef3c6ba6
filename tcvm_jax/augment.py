"""On-device clip augmentation: the MoCo v2 recipe [8], one parameter set per clip.

Pure JAX, arrays in, arrays out, a key for randomness. A clip (L, H, W, 3) uint8 becomes
(L, S, S, 3) normalised floats; every frame of the clip gets the same parameters.
`augment_clips` does a batch of clips as one vmapped program (what the montage runs).

Sampling and applying are separate (`sample_augment_params` / `apply_augment`) because the
Video Montage variants share one parameter set across different sets of clips.

Pipeline (torchvision semantics unless noted):
  1. RandomResizedCrop to S x S: area scale `crop_scale`, aspect ratio `crop_ratio`, 10
     candidate boxes drawn at once and the first valid one taken, torchvision's centre-crop
     fallback when none is valid. Integer boxes as in torchvision. Resampling is bilinear
     with antialiasing when shrinking (torchvision `antialias=True`, PIL-style triangle
     filter), computed as two matmuls per frame: out = Ry @ frame @ Rx^T.
  2. Colour jitter with prob `jitter_prob`: brightness, contrast, saturation, hue factors as
     in torchvision's ColorJitter, applied in a random order (torchvision does too). Contrast
     blends with the mean grey level of each frame (what torchvision does on a (T, C, H, W)
     tensor). Everything is float in [0, 1]; unlike PIL there is no uint8 rounding between
     the ops.
  3. Grayscale with prob `grayscale_prob` (0.2989 R + 0.587 G + 0.114 B, 3 equal channels).
  4. Gaussian blur with prob `blur_prob`. `blur_sigma` is in pixels of a 224 px image
     (MoCo v2) and is scaled by S / 224; the kernel spans ~10% of the image
     (2 * (int(0.1 S) // 2) + 1 taps, 23 at 224 px, 11 at 112 px) with reflect borders,
     separable: shifted multiply-adds along H, a matmul along W.
  5. Horizontal flip with prob `flip_prob`. It commutes with steps 2-4 (pointwise ops,
     per-frame means, a symmetric kernel with symmetric borders), so it is folded into
     step 1 by reversing the rows of Rx.
  6. (x - mean) / std, cast to the requested dtype. The arithmetic itself runs in float32;
     the matmuls at HIGHEST precision for float32 output, DEFAULT (TF32 on GPUs) for
     16-bit output, whose own rounding is coarser.

Speed (docs/performance.md): steps 1-4 work on three separate colour planes. XLA fuses
elementwise chains into single loops that recompute a producer for every element they
read; a colour op reads all three channels of a pixel, so on interleaved RGB a chain of n
ops costs ~3^n evaluations. The colour jitter's blend slots run in two short loops, whose
carries are materialised for the same reason; on CUDA, `augment.jitter_kernel='pallas'`
runs jitter and grayscale as one fused kernel instead (`jitter_kernel.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from tcvm_jax import colour, cpu_chunks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CROP_TRIES = 10
BLUR_REFERENCE_SIZE = 224  # `blur_sigma` is given in pixels of an image this size.
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
# The planes' dtype between the augmentation's passes (`augment.plane_dtype`); 'auto' picks
# per platform (`augment_clips`).
PLANE_DTYPES = ("float32", "bfloat16")
PLANE_DTYPE_CHOICES = ("auto",) + PLANE_DTYPES
# How the blur filters along H (`augment.blur_rows`, `_blur_planes`); 'auto' picks per
# platform (`ComputeOptions.resolved`).
BLUR_ROWS = ("taps", "matmul")
BLUR_ROWS_CHOICES = ("auto",) + BLUR_ROWS
# How the colour jitter and grayscale run (`augment.jitter_kernel`): XLA passes, or one
# fused Pallas kernel (`jitter_kernel`); 'auto' picks per platform.
JITTER_KERNELS = ("xla", "pallas")
JITTER_KERNEL_CHOICES = ("auto",) + JITTER_KERNELS
# The switches that say how the augmentation computes, not what (`ComputeOptions`).
COMPUTE_CHOICES = {"plane_dtype": PLANE_DTYPE_CHOICES, "blur_rows": BLUR_ROWS_CHOICES,
                   "jitter_kernel": JITTER_KERNEL_CHOICES}
# What 'auto' means on CUDA and elsewhere. On an H200 (2026-11-27, the paper's batch: 128
# clips of 8 x 128^2 -> 112^2, benchmarks/augment_variants.py) bfloat16 planes took 1.70
# ms against 2.49 in float32; then the blur's matmul 1.33 ms, the Pallas jitter 1.19 ms,
# both 0.87 ms. On the CPU float32 and the XLA passes were faster (docs/performance.md);
# TPU takes those until measured there.
AUTO_ON_CUDA = {"plane_dtype": "bfloat16", "blur_rows": "matmul", "jitter_kernel": "pallas"}
AUTO_ELSEWHERE = {"plane_dtype": "float32", "blur_rows": "taps", "jitter_kernel": "xla"}
_HIGHEST = jax.lax.Precision.HIGHEST  # exact uint8 values through the one-hot matrices.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Parameters of one clip's augmentation (leaves may carry leading batch axes)."""
  crop_box: jax.Array       # (4,) int32: top, left, height, width in input pixels.
  flip: jax.Array           # () bool.
  jitter: jax.Array         # () bool: apply the colour jitter at all.
  brightness: jax.Array     # () float32 factor, 1 = identity.
  contrast: jax.Array       # () float32 factor, 1 = identity.
  saturation: jax.Array     # () float32 factor, 1 = identity.
  hue: jax.Array            # () float32 shift in turns, 0 = identity.
  jitter_order: jax.Array   # (4,) int32 permutation of (brightness, contrast, saturation, hue).
  grayscale: jax.Array      # () bool.
  blur: jax.Array           # () bool.
  blur_sigma: jax.Array     # () float32, in output pixels (already scaled by S / 224).
  out_size: int = dataclasses.field(default=112, metadata=dict(static=True))
  mean: tuple[float, ...] = dataclasses.field(default=IMAGENET_MEAN, metadata=dict(static=True))
  std: tuple[float, ...] = dataclasses.field(default=IMAGENET_STD, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
  """How the augmentation computes, never what: every choice gives the same augmentation up
  to rounding. From `config.augment` by `compute_options`; 'auto' picks per platform.

  plane_dtype: the planes' dtype between the passes, `PLANE_DTYPE_CHOICES` or a dtype.
  blur_rows: how the blur filters along H, `BLUR_ROWS_CHOICES` (`_blur_planes`).
  jitter_kernel: how the colour jitter and grayscale run, `JITTER_KERNEL_CHOICES`
  (`_jitter_and_gray`).
  'auto' (each field's default): `AUTO_ON_CUDA` in `augment_clips` on CUDA (each measured
  faster on an H200), `AUTO_ELSEWHERE` elsewhere and in `apply_augment` called directly.
  """
  plane_dtype: str = "auto"
  blur_rows: str = "auto"
  jitter_kernel: str = "auto"

  def __post_init__(self):
    if not isinstance(self.plane_dtype, str):  # a dtype: stored by name, so hashable.
      object.__setattr__(self, "plane_dtype", jnp.dtype(self.plane_dtype).name)
    for name, choices in COMPUTE_CHOICES.items():
      value = getattr(self, name)
      if value not in choices:
        raise ValueError(f"augment.{name}={value!r}; choose from {choices}.")

  @property
  def has_auto(self) -> bool:
    return any(getattr(self, name) == "auto" for name in COMPUTE_CHOICES)

  def resolved(self, on_cuda: bool = False) -> ComputeOptions:
    """Every 'auto' replaced by its choice on CUDA (`on_cuda`) or elsewhere."""
    auto = AUTO_ON_CUDA if on_cuda else AUTO_ELSEWHERE
    return ComputeOptions(**{name: auto[name] if getattr(self, name) == "auto"
                             else getattr(self, name) for name in COMPUTE_CHOICES})

  def planes_dtype(self, on_cuda: bool = False) -> jnp.dtype:
    """The planes' dtype, 'auto' resolved for CUDA (`on_cuda`) or elsewhere."""
    return jnp.dtype(self.resolved(on_cuda).plane_dtype)


def compute_options(aug_config: Any, **overrides: str) -> ComputeOptions:
  """`ComputeOptions` from `config.augment` (fields it lacks take the defaults), then
  `overrides`. Raises ValueError naming a setting outside its choices."""
  values = {name: getattr(aug_config, name, getattr(ComputeOptions, name))
            for name in COMPUTE_CHOICES} if aug_config is not None else {}
  return ComputeOptions(**{**values, **overrides})


# --- Validation -----------------------------------------------------------------------


def _check_range(name: str, value: Sequence[float], low: float, high: float,
                 low_open: bool = False) -> None:
  if len(value) != 2 or not value[0] <= value[1]:
    raise ValueError(f"augment.{name}={tuple(value)} must be a (min, max) pair with min <= max.")
  too_low = value[0] <= low if low_open else value[0] < low
  if too_low or value[1] > high:
    bracket = "(" if low_open else "["
    raise ValueError(f"augment.{name}={tuple(value)} must lie in {bracket}{low}, {high}].")


def validate_augment_config(aug_config: Any) -> None:
  """Fails with a message naming the setting and its allowed range."""
  _check_range("crop_scale", aug_config.crop_scale, 0.0, 1.0, low_open=True)
  _check_range("crop_ratio", aug_config.crop_ratio, 0.0, math.inf, low_open=True)
  _check_range("blur_sigma", aug_config.blur_sigma, 0.0, math.inf, low_open=True)
  for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
    value = getattr(aug_config, name)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"augment.{name}={value} must lie in [0, 1].")
  for name in ("brightness", "contrast", "saturation"):
    value = getattr(aug_config, name)
    if value < 0:
      raise ValueError(f"augment.{name}={value} must be >= 0.")
  if not 0.0 <= aug_config.hue <= 0.5:
    raise ValueError(f"augment.hue={aug_config.hue} must lie in [0, 0.5].")
  for name in ("mean", "std"):
    if len(getattr(aug_config, name)) != 3:
      raise ValueError(f"augment.{name}={getattr(aug_config, name)} needs one value per RGB "
                       "channel.")
  if min(aug_config.std) <= 0:
    raise ValueError(f"augment.std={aug_config.std} must be > 0.")
  compute_options(aug_config)  # its three switches


def _check_sizes(in_hw: Sequence[int], out_size: int) -> None:
  if len(in_hw) != 2 or min(in_hw) < 1:
    raise ValueError(f"Input frame size {tuple(in_hw)} must be two positive ints (H, W).")
  if out_size < 1:
    raise ValueError(f"montage.output_size={out_size} must be >= 1.")


def resolve_dtype(dtype: Any) -> jnp.dtype:
  resolved = jnp.dtype(dtype)
  if resolved.name not in OUTPUT_DTYPES:
    raise ValueError(f"Augmentation output dtype {resolved.name!r} (model.dtype); choose from "
                     f"{OUTPUT_DTYPES}.")
  return resolved


# --- Crop, resize, flip ---------------------------------------------------------------


def _uniform_int(uniform: jax.Array, count: jax.Array) -> jax.Array:
  """Maps u ~ U[0, 1) to an int uniform on [0, count)."""
  return jnp.minimum(jnp.floor(uniform * count).astype(jnp.int32), count - 1)


def sample_crop_box(key: jax.Array, in_hw: Sequence[int],
                    scale: Sequence[float] = (0.2, 1.0),
                    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
                    num_tries: int = NUM_CROP_TRIES) -> jax.Array:
  """torchvision RandomResizedCrop.get_params, vectorised: (4,) int32 (top, left, h, w)."""
  uniforms = jax.random.uniform(key, (2 * num_tries + 2,))
  return crop_box_from_uniforms(uniforms, in_hw, scale, ratio)


def crop_box_from_uniforms(uniforms: jax.Array, in_hw: Sequence[int], scale: Sequence[float],
                           ratio: Sequence[float]) -> jax.Array:
  """`sample_crop_box` given 2 * num_tries + 2 draws from U[0, 1).

  The first num_tries draws pick areas, the next num_tries aspect ratios (log-uniform),
  the last two the position; the first candidate that fits wins.
  """
  height, width = in_hw
  num_tries = (uniforms.shape[0] - 2) // 2
  area_u, ratio_u = uniforms[:num_tries], uniforms[num_tries:2 * num_tries]
  top_u, left_u = uniforms[-2], uniforms[-1]
  target_area = height * width * (scale[0] + (scale[1] - scale[0]) * area_u)
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * ratio_u)
  widths = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  heights = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  valid = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
  first_valid = jnp.argmax(valid)
  found = jnp.any(valid)

  # The fallback depends only on static sizes: torchvision's centre crop.
  in_ratio = width / height
  if in_ratio < min(ratio):
    fallback_w, fallback_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fallback_w, fallback_h = int(round(height * max(ratio))), height
  else:
    fallback_w, fallback_h = width, height

  crop_h = jnp.where(found, heights[first_valid], fallback_h)
  crop_w = jnp.where(found, widths[first_valid], fallback_w)
  top = jnp.where(found, _uniform_int(top_u, height - crop_h + 1), (height - fallback_h) // 2)
  left = jnp.where(found, _uniform_int(left_u, width - crop_w + 1), (width - fallback_w) // 2)
  return jnp.stack([top, left, crop_h, crop_w]).astype(jnp.int32)


def interpolation_matrix(start: jax.Array, length: jax.Array, in_size: int,
                         out_size: int) -> jax.Array:
  """(out_size, in_size) weights resampling input[start:start+length] to out_size samples.

  Half-pixel centres; triangle (bilinear) kernel widened by the shrink factor when
  downscaling (antialias); samples outside the crop are dropped and the rest renormalised,
  which equals edge clamping for plain bilinear upscaling.
  """
  start = jnp.asarray(start, jnp.float32)
  length = jnp.asarray(length, jnp.float32)
  step = length / out_size  # input pixels per output pixel
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step - 0.5  # (S,)
  support = jnp.maximum(step, 1.0)
  positions = jnp.arange(in_size, dtype=jnp.float32)  # (in,)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(positions[None, :] - centres[:, None]) / support)
  inside = (positions >= start) & (positions < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  return weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-12)


def resize_matrices(crop_box: jax.Array, in_hw: Sequence[int], out_size: int,
                    flip: jax.Array | bool = False) -> tuple[jax.Array, jax.Array]:
  """Row (S, H) and column (S, W) matrices: out = rows @ frame @ cols^T; flip mirrors cols."""
  top, left, crop_h, crop_w = crop_box[0], crop_box[1], crop_box[2], crop_box[3]
  rows = interpolation_matrix(top, crop_h, in_hw[0], out_size)
  cols = interpolation_matrix(left, crop_w, in_hw[1], out_size)
  cols = jnp.where(flip, cols[::-1], cols)
  return rows, cols


def _crop_resize_planes(clip: jax.Array, crop_box: jax.Array, flip: jax.Array | bool,
                        out_size: int, precision: jax.lax.Precision,
                        plane_dtype: Any = jnp.float32) -> jax.Array:
  """(L, H, W, 3) uint8 -> (3, L, S, S) `plane_dtype` in [0, 1]: one plane per channel."""
  rows, cols = resize_matrices(crop_box, clip.shape[1:3], out_size, flip)
  # Contract W first, on (H, L, 3, W): both matmuls then see their contracted axis last /
  # first without a float transpose in between (the one transpose is on uint8 input).
  frames = jnp.transpose(clip, (1, 0, 3, 2)).astype(plane_dtype)  # (H, L, 3, W)
  frames = jnp.einsum("hlcw,tw->hlct", frames, (cols * (1.0 / 255.0)).astype(plane_dtype),
                      precision=precision)
  return jnp.einsum("sh,hlct->clst", rows.astype(plane_dtype), frames,
                    precision=precision)  # (3, L, S, S)


def crop_resize_flip(clip: jax.Array, crop_box: jax.Array, flip: jax.Array | bool,
                     out_size: int, precision: jax.lax.Precision = _HIGHEST) -> jax.Array:
  """(L, H, W, 3) uint8 -> (L, S, S, 3) float32 in [0, 1], same box and flip for all frames.

  `precision` of the two matmuls: HIGHEST keeps uint8 values exact through the one-hot
  rows of an identity resize on every backend; DEFAULT (TF32 on recent GPUs) is enough
  when the result is cast to bfloat16 anyway (see `matmul_precision`).
  """
  planes = _crop_resize_planes(clip, crop_box, flip, out_size, precision)
  return jnp.moveaxis(planes, 0, -1)


def matmul_precision(dtype: Any) -> jax.lax.Precision:
  """Resampling precision for an output `dtype`: exact float32 unless the output is 16-bit."""
  return _HIGHEST if resolve_dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


# --- Colour (images (..., H, W, 3) float in [0, 1]) -------------------------------------
#
# The public ops take channels-last images; inside they work on three separate planes.
# Every op mixes the channels of a pixel, and XLA's fused loops recompute a producer once
# per distinct element they read: on interleaved RGB a chain of n such ops costs ~3^n
# evaluations per pixel, on separate planes (same index for all three) it costs one.

Planes = colour.Planes  # red, green, blue; each (..., H, W).


def _split(images: jax.Array) -> Planes:
  return images[..., 0], images[..., 1], images[..., 2]


def _merge(planes: Planes) -> jax.Array:
  return jnp.stack(planes, axis=-1)


def _mean_gray_plane(planes: Planes) -> jax.Array:
  """Mean luma of each image, shaped (..., 1, 1) to broadcast against a plane."""
  return colour.gray_plane(planes).mean(axis=(-2, -1), keepdims=True)


def rgb_to_gray(images: jax.Array) -> jax.Array:
  """(..., H, W, 3) -> (..., H, W) luma with torchvision's weights."""
  return colour.gray_plane(_split(images))


def grayscale(images: jax.Array) -> jax.Array:
  """Luma copied into three channels."""
  return jnp.broadcast_to(rgb_to_gray(images)[..., None], images.shape)


def adjust_brightness(images: jax.Array, factor: jax.Array) -> jax.Array:
  return _merge(colour.blend_planes(_split(images), jnp.zeros((), images.dtype), factor))


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with the mean grey level of each image (frame)."""
  planes = _split(images)
  return _merge(colour.blend_planes(planes, _mean_gray_plane(planes), factor))


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
  planes = _split(images)
  return _merge(colour.blend_planes(planes, colour.gray_plane(planes), factor))


def rgb_to_hsv(images: jax.Array) -> jax.Array:
  """torchvision's _rgb2hsv, channels last; hue in turns [0, 1) (reference form)."""
  red, green, blue = images[..., 0], images[..., 1], images[..., 2]
  max_c = images.max(axis=-1)
  min_c = images.min(axis=-1)
  grey = max_c == min_c
  chroma = max_c - min_c
  saturation = chroma / jnp.where(grey, 1.0, max_c)
  divisor = jnp.where(grey, 1.0, chroma)
  red_c = (max_c - red) / divisor
  green_c = (max_c - green) / divisor
  blue_c = (max_c - blue) / divisor
  is_red = max_c == red
  is_green = (max_c == green) & ~is_red
  is_blue = ~is_red & ~is_green
  hue = (is_red * (blue_c - green_c) + is_green * (2.0 + red_c - blue_c)
         + is_blue * (4.0 + green_c - red_c))
  hue = jnp.mod(hue / 6.0 + 1.0, 1.0)
  return jnp.stack([hue, saturation, max_c], axis=-1)


def hsv_to_rgb(images: jax.Array) -> jax.Array:
  """torchvision's _hsv2rgb, channels last (reference form)."""
  hue, saturation, value = images[..., 0], images[..., 1], images[..., 2]
  sector = jnp.floor(hue * 6.0)
  fraction = hue * 6.0 - sector
  sector = jnp.mod(sector.astype(jnp.int32), 6)
  p = jnp.clip(value * (1.0 - saturation), 0.0, 1.0)
  q = jnp.clip(value * (1.0 - saturation * fraction), 0.0, 1.0)
  t = jnp.clip(value * (1.0 - saturation * (1.0 - fraction)), 0.0, 1.0)
  red = jnp.select([sector == i for i in range(6)], [value, q, p, p, t, value])
  green = jnp.select([sector == i for i in range(6)], [t, value, value, q, p, p])
  blue = jnp.select([sector == i for i in range(6)], [p, p, t, value, value, q])
  return jnp.stack([red, green, blue], axis=-1)


def adjust_hue(images: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotates hue by `shift` turns (torchvision's hue_factor), in one elementwise pass.

  The same maths as `hsv_to_rgb(rgb_to_hsv(x))` with the hue moved, without the sector
  selects: with V = max, C = max - min and the hue in sixths of a turn h6, channel
  n (R: 5, G: 3, B: 1) is V - C * clip(min(k, 4 - k), 0, 1), k = (n + h6) mod 6.
  Grey pixels (C = 0) stay as they are.
  """
  return _merge(colour.hue_planes(_split(images), shift))


def _jitter_planes(planes: Planes, brightness: jax.Array, contrast: jax.Array,
                   saturation: jax.Array, hue: jax.Array, order: jax.Array) -> Planes:
  """`color_jitter` on planes. Each pass computes in float32 and stores the planes in
  their own dtype (bfloat16 planes: half the bytes, float32 arithmetic)."""
  stored = planes[0].dtype
  ops, factors = colour.jitter_slots(brightness, contrast, saturation, order)

  def in_float32(planes):
    return tuple(plane.astype(jnp.float32) for plane in planes)

  def stored_as(planes):
    return tuple(plane.astype(stored) for plane in planes)

  def blend_slot(slot, planes, after_hue):
    planes = in_float32(planes)
    gray = colour.gray_plane(planes)
    mean_gray = gray.mean(axis=(-2, -1), keepdims=True)  # contrast's reference level
    return stored_as(colour.blend_slot(planes, ops[slot], factors[slot + 3 * after_hue],
                                       gray, mean_gray))

  # Loops, not unrolled code: the carry is materialised between slots. Unrolled, XLA
  # fuses the whole chain into one loop, where each slot reads all three planes of the
  # previous one, so the work grows as ~4^slots (seconds instead of milliseconds on CPU).
  planes = jax.lax.fori_loop(0, 3, functools.partial(blend_slot, after_hue=0), planes)
  planes = stored_as(colour.hue_planes(in_float32(planes), hue))
  return jax.lax.fori_loop(0, 3, functools.partial(blend_slot, after_hue=1), planes)


def color_jitter(images: jax.Array, brightness: jax.Array, contrast: jax.Array,
                 saturation: jax.Array, hue: jax.Array, order: jax.Array) -> jax.Array:
  """The four adjustments in the order given by `order`, a permutation of range(4): six
  blend slots around one hue shift, branch-free (`colour`'s docstring)."""
  return _merge(_jitter_planes(_split(images), brightness, contrast, saturation, hue, order))


# --- Blur and normalisation -------------------------------------------------------------


def blur_radius(size: int) -> int:
  """Kernel half-width: the kernel spans ~10% of the image (23 taps at 224 px)."""
  return min(max(1, int(0.1 * size) // 2), size - 1)


def gaussian_kernel(sigma: jax.Array, radius: int) -> jax.Array:
  """(2 * radius + 1,) normalised Gaussian taps."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  return kernel / kernel.sum()


def blur_matrix(sigma: jax.Array, size: int, radius: int) -> jax.Array:
  """(size, size) Gaussian filter with reflect borders; rows sum to 1 (reference form)."""
  offsets = jnp.arange(-radius, radius + 1)
  sources = jnp.arange(size)[:, None] + offsets[None, :]  # (size, taps)
  sources = jnp.abs(sources)  # reflect at 0 (-1 -> 1)
  sources = jnp.where(sources > size - 1, 2 * (size - 1) - sources, sources)
  one_hot = jax.nn.one_hot(sources, size, dtype=jnp.float32)  # (size, taps, size)
  return jnp.einsum("k,pkq->pq", gaussian_kernel(sigma, radius), one_hot)


def _correlate_valid(padded: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
  """Valid correlation of `padded` with `kernel` (taps on its last axis) along `axis`."""
  num_taps = kernel.shape[-1]
  size = padded.shape[axis] - num_taps + 1
  filtered = kernel[..., 0] * jax.lax.slice_in_dim(padded, 0, size, axis=axis)
  for tap in range(1, num_taps):
    filtered = filtered + kernel[..., tap] * jax.lax.slice_in_dim(padded, tap, tap + size,
                                                                   axis=axis)
  return filtered


def _blur_planes(planes: jax.Array, sigma: jax.Array, enabled: jax.Array | bool,
                 radius: int, precision: jax.lax.Precision = _HIGHEST,
                 rows: str = "taps") -> jax.Array:
  """Separable blur over the last two axes (H, W) of `planes`; reflect borders.

  Along H (`rows`, `augment.blur_rows`): 'taps', 2 * radius + 1 shifted multiply-adds (11
  at 112 px) over the reflect-padded planes, one fused elementwise pass; or 'matmul', the
  dense (H, H) filter with the reflection folded in (no padded copy; more FLOPs, which a
  GPU has to spare: the padding's copies were 0.37 ms of the H200's 2.15 ms montage with
  float32 planes). Along W: a matmul with the dense (W, W) filter. The matmul costs more
  FLOPs but ends the chain of fused elementwise work: XLA:CPU would otherwise recompute
  the first pass inside every tap of the second, and the whole blur inside each consumer
  of the augmented frames (the stem's forward and its weight gradient read them twice).
  """
  if rows not in BLUR_ROWS:
    raise ValueError(f"augment.blur_rows={rows!r}; choose from {BLUR_ROWS}.")
  height, width = planes.shape[-2:]
  if rows == "matmul":
    row_filter = jnp.where(enabled, blur_matrix(sigma, height, radius), jnp.eye(height))
    rows_done = jnp.einsum("uh,...hw->...uw", row_filter.astype(planes.dtype), planes,
                           precision=precision)
  else:
    # Off: a unit impulse, so every output is 1 * x + 0 * neighbours, exactly x.
    impulse = jnp.zeros(2 * radius + 1, jnp.float32).at[radius].set(1.0)
    kernel = jnp.where(enabled, gaussian_kernel(sigma, radius), impulse).astype(planes.dtype)
    pad = [(0, 0)] * (planes.ndim - 2) + [(radius, radius), (0, 0)]
    padded = jnp.pad(planes, pad, mode="reflect")  # numpy 'reflect': -1 -> 1
    rows_done = _correlate_valid(padded, kernel, axis=planes.ndim - 2)  # (..., H, W)
  columns = jnp.where(enabled, blur_matrix(sigma, width, radius), jnp.eye(width))
  return jnp.einsum("...hw,vw->...hv", rows_done, columns.astype(planes.dtype),
                    precision=precision)


def gaussian_blur(images: jax.Array, sigma: jax.Array,
                  enabled: jax.Array | bool = True) -> jax.Array:
  """Separable blur of (..., H, W, 3) images; `enabled=False` is an exact identity.

  2 * radius + 1 shifted multiply-adds per axis (11 at 112 px) rather than a dense
  (S, S) matmul per axis: ~10x fewer FLOPs, one fused elementwise pass per axis.
  """
  height, width = images.shape[-3], images.shape[-2]
  planes = jnp.moveaxis(images, -1, 0)  # (3, ..., H, W)
  blurred = _blur_planes(planes, sigma, enabled, blur_radius(min(height, width)))
  return jnp.moveaxis(blurred, 0, -1)


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def denormalize_to_uint8(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """Inverse of `normalize` back to 0..255 (for inspection and tests)."""
  images = images.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
  return jnp.clip(jnp.round(images * 255.0), 0, 255).astype(jnp.uint8)


# --- Sample / apply ----------------------------------------------------------------------


def sample_augment_params(key: jax.Array, aug_config: Any, in_hw: Sequence[int],
                          out_size: int) -> AugmentParams:
  """One clip's parameters drawn from the MoCo v2 distributions in `aug_config`."""
  validate_augment_config(aug_config)
  _check_sizes(in_hw, out_size)
  # One draw for everything: each random call inlines a threefry hash, and XLA's compile
  # time grows with their number (this runs vmapped over every slot of the montage).
  num_crop_draws = 2 * NUM_CROP_TRIES + 2
  uniforms = jax.random.uniform(key, (num_crop_draws + 13,))
  (flip_u, jitter_u, gray_u, blur_u, brightness_u, contrast_u, saturation_u, hue_u,
   sigma_u, *order_u) = uniforms[num_crop_draws:]

  def between(uniform, low, high):
    return low + (high - low) * uniform

  def factor(uniform, strength):
    return between(uniform, max(0.0, 1.0 - strength), 1.0 + strength)

  sigma_scale = out_size / BLUR_REFERENCE_SIZE
  return AugmentParams(
      crop_box=crop_box_from_uniforms(uniforms[:num_crop_draws], in_hw, aug_config.crop_scale,
                                      aug_config.crop_ratio),
      flip=flip_u < aug_config.flip_prob,
      jitter=jitter_u < aug_config.jitter_prob,
      brightness=factor(brightness_u, aug_config.brightness),
      contrast=factor(contrast_u, aug_config.contrast),
      saturation=factor(saturation_u, aug_config.saturation),
      hue=between(hue_u, -aug_config.hue, aug_config.hue),
      jitter_order=jnp.argsort(jnp.stack(order_u)).astype(jnp.int32),  # uniform permutation
      grayscale=gray_u < aug_config.grayscale_prob,
      blur=blur_u < aug_config.blur_prob,
      blur_sigma=sigma_scale * between(sigma_u, *aug_config.blur_sigma),
      out_size=int(out_size),
      mean=tuple(float(m) for m in aug_config.mean),
      std=tuple(float(s) for s in aug_config.std),
  )


def center_crop_params(in_hw: Sequence[int], out_size: int,
                       mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> AugmentParams:
  """Augmentation off: the largest centred square, resized to S; no colour ops, no flip."""
  _check_sizes(in_hw, out_size)
  height, width = in_hw
  side = min(height, width)
  false = jnp.zeros((), bool)
  one = jnp.ones((), jnp.float32)
  return AugmentParams(
      crop_box=jnp.asarray([(height - side) // 2, (width - side) // 2, side, side], jnp.int32),
      flip=false, jitter=false, brightness=one, contrast=one, saturation=one,
      hue=jnp.zeros((), jnp.float32), jitter_order=jnp.arange(4, dtype=jnp.int32),
      grayscale=false, blur=false, blur_sigma=one,
      out_size=int(out_size), mean=tuple(float(m) for m in mean),
      std=tuple(float(s) for s in std))


# Where `augment.jitter_kernel='pallas'` finds no GPU, the XLA form runs (the kernel is
# Triton code). Tests set this to run the kernel in Pallas's interpreter instead.
_INTERPRET_KERNEL_OFF_CUDA = False


def _jitter_and_gray(params: AugmentParams, planes: jax.Array, kernel: str = "xla"
                     ) -> jax.Array:
  """Steps 2-3 on a clip's RGB planes (3, L, S, S): colour jitter if `params.jitter`, then
  grayscale if `params.grayscale`. kernel: 'xla' (`_jitter_planes`: ~20 passes over the
  planes), or 'pallas': on CUDA one fused kernel (`jitter_kernel`, the same maths in
  float32), elsewhere the XLA form. ('auto' is resolved before: `ComputeOptions`.)"""

  def xla_form(planes, _=None):
    rgb = (planes[0], planes[1], planes[2])
    jittered = _jitter_planes(rgb, params.brightness, params.contrast, params.saturation,
                              params.hue, params.jitter_order)
    rgb = tuple(jnp.where(params.jitter, new, old) for new, old in zip(jittered, rgb))
    gray = colour.gray_plane(rgb)
    return jnp.stack([jnp.where(params.grayscale, gray, plane) for plane in rgb])

  if kernel != "pallas":
    return xla_form(planes)
  # Imported when used: Pallas's Triton modules add ~0.14 s to every process's start.
  from tcvm_jax import jitter_kernel as jitter_kernel_lib  # pylint: disable=g-import-not-at-top
  row = jitter_kernel_lib.frame_params(params.brightness, params.contrast, params.saturation,
                                       params.hue, params.jitter_order, params.jitter,
                                       params.grayscale)
  rows = jnp.broadcast_to(row, (planes.shape[1], row.shape[0]))
  interpreted = functools.partial(jitter_kernel_lib.jitter_gray_frames, interpret=True)
  return jax.lax.platform_dependent(
      planes, rows, cuda=jitter_kernel_lib.jitter_gray_frames,
      default=interpreted if _INTERPRET_KERNEL_OFF_CUDA else xla_form)


def apply_augment(params: AugmentParams, clip: jax.Array, dtype: Any = jnp.float32,
                  compute: ComputeOptions = ComputeOptions()) -> jax.Array:
  """(L, H, W, 3) uint8 -> (L, S, S, 3) normalised `dtype`, one parameter set for all frames.

  `compute` (`ComputeOptions`): how, not what; 'auto' here is `AUTO_ELSEWHERE` (the
  choice per platform is `augment_clips`'s). Its `plane_dtype` is the planes' dtype from
  the resampling to the normalisation: float32 (the step's on CPU); bfloat16 halves the
  bytes every pass moves, which is what the GPU's montage time is made of
  (docs/performance.md), for ~3 significant digits (8-bit input has ~2.4): the step's on
  CUDA (`augment_clips`).
  """
  compute = compute.resolved(on_cuda=False)
  if clip.ndim != 4 or clip.shape[-1] != 3:
    raise ValueError(f"Expected a clip (L, H, W, 3), got shape {clip.shape}.")
  if clip.dtype != jnp.uint8:
    raise TypeError(f"Expected a uint8 clip, got {clip.dtype}.")
  dtype = resolve_dtype(dtype)
  height, width = clip.shape[1:3]
  out_size = params.out_size
  planes = _crop_resize_planes(clip, params.crop_box, params.flip, out_size,
                               matmul_precision(dtype), compute.planes_dtype())
  planes = _jitter_and_gray(params, planes, compute.jitter_kernel)  # (3, L, S, S)
  planes = _blur_planes(planes, params.blur_sigma, params.blur,
                        blur_radius(out_size), matmul_precision(dtype),
                        compute.blur_rows)  # (3, L, S, S)
  frames = jnp.moveaxis(planes, 0, -1)  # (L, S, S, 3)
  return normalize(frames, params.mean, params.std).astype(dtype)


# On CPU, clips are augmented in chunks of about this many input pixels (clips x frames x
# H x W): each chunk's float planes (~3 MB) stay in cache between the ops of the chain.
CPU_AUGMENT_CHUNK_PIXELS = 262_144


def augment_clips(params: AugmentParams, clips: jax.Array, dtype: Any = jnp.float32,
                  compute: ComputeOptions = ComputeOptions()) -> jax.Array:
  """A batch of clips at once: (K, L, H, W, 3) uint8, params with leaves (K, ...) ->
  (K, L, S, S, 3) `dtype`.

  `compute` (`ComputeOptions`): how, not what. Its 'auto' fields take `AUTO_ON_CUDA` on
  CUDA (bfloat16 planes, the blur's matmul and the Pallas jitter: the paper's batch in
  0.87 ms against 2.49 ms with none of them on an H200, benchmarks/augment_variants.py),
  `AUTO_ELSEWHERE` on other platforms.

  One vmapped program: the resampling and blur become batched matmuls / fused
  elementwise passes over all K clips, with no per-clip loop. On CPU the clips go in
  chunks of ~`CPU_AUGMENT_CHUNK_PIXELS` input pixels (at most `cpu_chunks.MAX_CHUNKS`),
  one such program each (the demo's 64 clips: 4 chunks, ~2-5 % of the whole step,
  docs/performance.md). Each clip's result
  equals `apply_augment` on it up to float rounding (XLA may order the contrast mean's
  sum differently for different K, ~1e-7).
  """
  if clips.ndim != 5 or clips.shape[-1] != 3:
    raise ValueError(f"Expected clips (K, L, H, W, 3), got shape {clips.shape}.")

  auto = compute.has_auto

  def batched(params, clips, on_cuda=False):
    resolved = compute.resolved(on_cuda)
    return jax.vmap(lambda p, c: apply_augment(p, c, dtype, resolved))(params, clips)

  num_clips, clip_len, height, width, _ = clips.shape
  chunk = cpu_chunks.chunk_size(num_clips, clip_len * height * width,
                                CPU_AUGMENT_CHUNK_PIXELS)

  def in_chunks(params, clips):
    return jnp.concatenate([
        batched(jax.tree.map(lambda leaf: leaf[start:start + chunk], params),
                clips[start:start + chunk])
        for start in range(0, num_clips, chunk)])

  on_cpu = batched if chunk >= num_clips else in_chunks
  if on_cpu is batched and not auto:
    return batched(params, clips)  # one program on every platform
  branches = {"cpu": on_cpu, "default": batched}
  if auto:
    branches["cuda"] = functools.partial(batched, on_cuda=True)
  return jax.lax.platform_dependent(params, clips, **branches)


def augment_clip(key: jax.Array, clip: jax.Array, aug_config: Any, out_size: int,
                 dtype: Any = jnp.float32) -> jax.Array:
  """Sample and apply in one go: (L, H, W, 3) uint8 -> (L, S, S, 3) `dtype`."""
  params = sample_augment_params(key, aug_config, clip.shape[1:3], out_size)
  return apply_augment(params, clip, dtype)


def center_crop_resize(clip: jax.Array, out_size: int, dtype: Any = jnp.float32,
                       mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """Evaluation / augmentation-off transform: centred square crop, resize, normalise."""
  return apply_augment(center_crop_params(clip.shape[1:3], out_size, mean, std), clip, dtype)

