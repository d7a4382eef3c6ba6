"""Video Montage + MoCo v2 clip augmentation in PyTorch, batched on the device (issue #6).

The part of the TCVM step that `torch_reference.py`'s model-only step leaves out, so that
the reference can time the same step as the JAX one (montage + augmentation + forward +
backward + update). The same operations as tcvm_jax/montage.py and tcvm_jax/augment.py,
written as a PyTorch user would put them on the GPU: every clip's parameters drawn at
once with torch's RNG, then one batched tensor program over all clips (no per-clip loop,
no torchvision, which this environment lacks).

  Montage         N videos of T frames -> N * s clips of L = T / s frames; pseudo-video n,
                  slot k <- clip k of video order[(n + offset_k) mod N] (a random
                  permutation and s distinct offsets, as montage.montage_assignment); the
                  label of a slot is its source video.
  Crop + resize   torchvision RandomResizedCrop parameters (10 tries, centre-crop
                  fallback), bilinear with antialias as two matmuls per frame with the
                  same (S, H) / (S, W) interpolation matrices as augment.py; the flip
                  mirrors the column matrix.
  Colour jitter   brightness, contrast, saturation as blends clip(f x + (1 - f) other),
                  hue as a rotation, in a random order per clip: three blend slots before
                  the hue shift and three after it, as augment.color_jitter.
  Grayscale, Gaussian blur (reflect borders, sigma scaled by S / 224, dense (S, S) filter
  matrices on both axes), (x - mean) / std.

Given the same parameters, `augment_clips` equals tcvm_jax.augment.apply_augment to float
rounding (tests/test_torch_reference.py); the random draws differ (torch's RNG, not JAX's).
Never imported by the `tcvm_jax` package.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

NUM_CROP_TRIES = 10
BLUR_REFERENCE_SIZE = 224  # blur_sigma is given in pixels of an image this size
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """`config.augment` of the pretraining config (configs/pretrain.py)."""
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class ClipParams:
  """Augmentation parameters of K clips (leading axis K), fields as augment.AugmentParams."""
  crop_box: torch.Tensor      # (K, 4) int64: top, left, height, width.
  flip: torch.Tensor          # (K,) bool.
  jitter: torch.Tensor        # (K,) bool.
  brightness: torch.Tensor    # (K,) float32 factors, 1 = identity.
  contrast: torch.Tensor
  saturation: torch.Tensor
  hue: torch.Tensor           # (K,) float32 shift in turns.
  jitter_order: torch.Tensor  # (K, 4) int64 permutations of (bright., contr., sat., hue).
  grayscale: torch.Tensor     # (K,) bool.
  blur: torch.Tensor          # (K,) bool.
  blur_sigma: torch.Tensor    # (K,) float32, in output pixels.


# --- Montage -----------------------------------------------------------------------------


def montage_assignment(num_videos: int, num_clips: int,
                       device: torch.device) -> torch.Tensor:
  """(N, s) int64 source video of each slot; each (video, clip) is used exactly once."""
  order = torch.randperm(num_videos, device=device)
  if num_videos >= num_clips:
    offsets = torch.randperm(num_videos, device=device)[:num_clips]
  else:  # fewer videos than slots: sources repeat unavoidably
    start = torch.randint(num_videos, (), device=device)
    offsets = (start + torch.arange(num_clips, device=device)) % num_videos
  rows = (torch.arange(num_videos, device=device)[:, None] + offsets[None, :]) % num_videos
  return order[rows]


# --- Parameters ----------------------------------------------------------------------------


def crop_boxes(uniforms: torch.Tensor, in_hw: Sequence[int], scale: Sequence[float],
               ratio: Sequence[float]) -> torch.Tensor:
  """torchvision RandomResizedCrop.get_params for K clips from (K, 2 * tries + 2) uniforms:
  areas, log-uniform aspect ratios, then the position; the first candidate that fits wins,
  the centre crop when none does. (K, 4) int64 (top, left, height, width)."""
  height, width = in_hw
  tries = (uniforms.shape[1] - 2) // 2
  area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :tries])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = torch.exp(log_low + (log_high - log_low) * uniforms[:, tries:2 * tries])
  widths = torch.round(torch.sqrt(area * aspect)).long()
  heights = torch.round(torch.sqrt(area / aspect)).long()
  valid = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
  first = valid.int().argmax(dim=1, keepdim=True)
  found = valid.any(dim=1)
  in_ratio = width / height
  if in_ratio < min(ratio):
    fallback_w, fallback_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fallback_w, fallback_h = int(round(height * max(ratio))), height
  else:
    fallback_w, fallback_h = width, height
  crop_h = torch.where(found, heights.gather(1, first)[:, 0], fallback_h)
  crop_w = torch.where(found, widths.gather(1, first)[:, 0], fallback_w)

  def position(uniform, room):  # uniform integer in [0, room]
    return torch.minimum(torch.floor(uniform * (room + 1)).long(), room)

  top = torch.where(found, position(uniforms[:, -2], height - crop_h),
                    (height - fallback_h) // 2)
  left = torch.where(found, position(uniforms[:, -1], width - crop_w),
                     (width - fallback_w) // 2)
  return torch.stack([top, left, crop_h, crop_w], dim=1)


def sample_params(num: int, in_hw: Sequence[int], out_size: int, settings: AugmentSettings,
                  device: torch.device) -> ClipParams:
  """Parameters of `num` clips, one independent draw each (the paper's C-A-S)."""
  crop_draws = 2 * NUM_CROP_TRIES + 2
  uniforms = torch.rand(num, crop_draws + 9, device=device)
  flip_u, jitter_u, gray_u, blur_u, bright_u, contrast_u, sat_u, hue_u, sigma_u = (
      uniforms[:, crop_draws:].unbind(dim=1))

  def between(uniform, low, high):
    return low + (high - low) * uniform

  def factor(uniform, strength):
    return between(uniform, max(0.0, 1.0 - strength), 1.0 + strength)

  return ClipParams(
      crop_box=crop_boxes(uniforms[:, :crop_draws], in_hw, settings.crop_scale,
                          settings.crop_ratio),
      flip=flip_u < settings.flip_prob,
      jitter=jitter_u < settings.jitter_prob,
      brightness=factor(bright_u, settings.brightness),
      contrast=factor(contrast_u, settings.contrast),
      saturation=factor(sat_u, settings.saturation),
      hue=between(hue_u, -settings.hue, settings.hue),
      jitter_order=torch.argsort(torch.rand(num, 4, device=device), dim=1),
      grayscale=gray_u < settings.grayscale_prob,
      blur=blur_u < settings.blur_prob,
      blur_sigma=(out_size / BLUR_REFERENCE_SIZE) * between(sigma_u, *settings.blur_sigma))


# --- Crop and resize -----------------------------------------------------------------------


def interpolation_matrices(start: torch.Tensor, length: torch.Tensor, in_size: int,
                           out_size: int) -> torch.Tensor:
  """(K, out, in) antialiased bilinear weights resampling input[start:start+length]."""
  start = start.float()[:, None, None]
  length = length.float()[:, None, None]
  step = length / out_size
  outputs = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]
  centres = start + (outputs + 0.5) * step - 0.5
  positions = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :]
  weights = torch.clamp(1.0 - (positions - centres).abs() / torch.clamp(step, min=1.0),
                        min=0.0)
  weights = weights * ((positions >= start) & (positions < start + length))
  return weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)


def crop_resize_flip(clips: torch.Tensor, params: ClipParams, out_size: int) -> torch.Tensor:
  """(K, L, H, W, 3) uint8 -> (K, 3, L, S, S) float32 in [0, 1]."""
  num, length, height, width, _ = clips.shape
  box = params.crop_box
  rows = interpolation_matrices(box[:, 0], box[:, 2], height, out_size)  # (K, S, H)
  cols = interpolation_matrices(box[:, 1], box[:, 3], width, out_size)   # (K, S, W)
  cols = torch.where(params.flip[:, None, None], cols.flip(1), cols) * (1.0 / 255.0)
  planes = clips.permute(0, 4, 1, 2, 3).float()  # (K, 3, L, H, W)
  planes = torch.bmm(planes.reshape(num, 3 * length * height, width), cols.transpose(1, 2))
  planes = torch.matmul(rows[:, None], planes.reshape(num, 3 * length, height, out_size))
  return planes.reshape(num, 3, length, out_size, out_size)


# --- Colour --------------------------------------------------------------------------------


def _per_clip(values: torch.Tensor) -> torch.Tensor:
  """(K,) -> (K, 1, 1, 1) to broadcast against (K, L, S, S) planes."""
  return values[:, None, None, None]


def gray_plane(planes: torch.Tensor) -> torch.Tensor:
  """(K, 3, L, S, S) -> (K, L, S, S) luma."""
  return (GRAY_WEIGHTS[0] * planes[:, 0] + GRAY_WEIGHTS[1] * planes[:, 1]
          + GRAY_WEIGHTS[2] * planes[:, 2])


def rotate_hue(planes: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
  """Hue rotation by `shift` (K,) turns; grey pixels stay (as augment.adjust_hue)."""
  red, green, blue = planes.unbind(dim=1)
  value = torch.maximum(torch.maximum(red, green), blue)
  chroma = value - torch.minimum(torch.minimum(red, green), blue)
  divisor = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
  hue6 = torch.where(value == red, (green - blue) / divisor,
                     torch.where(value == green, 2.0 + (blue - red) / divisor,
                                 4.0 + (red - green) / divisor))
  hue6 = hue6 + 6.0 * _per_clip(shift)

  def channel(n):
    k = torch.remainder(n + hue6, 6.0)
    return value - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)

  return torch.stack([channel(5.0), channel(3.0), channel(1.0)], dim=1)


def color_jitter(planes: torch.Tensor, params: ClipParams) -> torch.Tensor:
  """Brightness, contrast, saturation and hue in each clip's order (ColorJitter); clips
  with `jitter` off get identity factors (f = 1, no hue shift)."""
  order = params.jitter_order
  num = order.shape[0]
  position = torch.argsort(order, dim=1)                       # where each op comes
  blend_ops = order[order != 3].reshape(num, 3)                # the blends, in order
  after_hue = position.gather(1, blend_ops) > position[:, 3:]  # (K, 3)
  factors = torch.stack([params.brightness, params.contrast, params.saturation], dim=1)
  factors = torch.where(params.jitter[:, None], factors.gather(1, blend_ops), 1.0)
  # The blend's other image: 0 (brightness), the frame's mean grey (contrast) or its grey
  # image (saturation), as per-clip weights of the grey image and of its mean.
  gray_weight = (blend_ops == 2).float()
  mean_weight = (blend_ops == 1).float()

  def blend_slot(planes, slot, active):
    factor = torch.where(active[:, slot], factors[:, slot], 1.0)
    gray = gray_plane(planes)  # (K, L, S, S)
    other = (gray * _per_clip(gray_weight[:, slot])
             + gray.mean(dim=(-2, -1), keepdim=True) * _per_clip(mean_weight[:, slot]))
    return torch.lerp(other[:, None], planes, _per_clip(factor)[:, None]).clamp_(0.0, 1.0)

  for slot in range(3):
    planes = blend_slot(planes, slot, ~after_hue)
  planes = rotate_hue(planes, torch.where(params.jitter, params.hue, 0.0))
  for slot in range(3):
    planes = blend_slot(planes, slot, after_hue)
  return planes


# --- Blur and the whole augmentation -------------------------------------------------------


def blur_radius(size: int) -> int:
  return min(max(1, int(0.1 * size) // 2), size - 1)


def blur_matrices(sigma: torch.Tensor, enabled: torch.Tensor, size: int) -> torch.Tensor:
  """(K, size, size) Gaussian filters with reflect borders; the identity where disabled."""
  radius = blur_radius(size)
  offsets = torch.arange(-radius, radius + 1, device=sigma.device)
  kernels = torch.exp(-0.5 * (offsets[None, :].float() / sigma[:, None]) ** 2)
  kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (K, taps)
  sources = (torch.arange(size, device=sigma.device)[:, None] + offsets[None, :]).abs()
  sources = torch.where(sources > size - 1, 2 * (size - 1) - sources, sources)  # reflect
  one_hot = torch.nn.functional.one_hot(sources, size).float()  # (size, taps, size)
  matrices = torch.einsum("kt,ptq->kpq", kernels, one_hot)
  identity = torch.eye(size, device=sigma.device).expand_as(matrices)
  return torch.where(enabled[:, None, None], matrices, identity)


def augment_clips(clips: torch.Tensor, params: ClipParams, out_size: int,
                  settings: AugmentSettings) -> torch.Tensor:
  """(K, L, H, W, 3) uint8 -> (K, L, S, S, 3) normalised float32, contiguous."""
  planes = crop_resize_flip(clips, params, out_size)  # (K, 3, L, S, S)
  planes = color_jitter(planes, params)
  gray = gray_plane(planes)[:, None]
  planes = torch.where(_per_clip(params.grayscale)[:, None], gray.expand_as(planes), planes)
  blur = blur_matrices(params.blur_sigma, params.blur, out_size)  # (K, S, S)
  num, _, length = planes.shape[:3]
  planes = planes.reshape(num, 3 * length, out_size, out_size)
  planes = torch.matmul(torch.matmul(blur[:, None], planes), blur.transpose(1, 2)[:, None])
  frames = planes.reshape(num, 3, length, out_size, out_size).permute(0, 2, 3, 4, 1)
  mean = torch.tensor(settings.mean, device=clips.device)
  std = torch.tensor(settings.std, device=clips.device)
  return ((frames - mean) / std).contiguous()


def video_montage(videos: torch.Tensor, *, num_clips: int, out_size: int,
                  settings: AugmentSettings) -> tuple[torch.Tensor, torch.Tensor]:
  """(N, T, H, W, 3) uint8 -> pseudo-videos (N, T, S, S, 3) float32 and labels (N * s,):
  the source video of pseudo-video n's slot k at n * s + k."""
  num_videos, num_frames, height, width, channels = videos.shape
  if num_frames % num_clips:
    raise ValueError(f"{num_frames} frames do not split into {num_clips} equal clips.")
  clip_length = num_frames // num_clips
  sources = montage_assignment(num_videos, num_clips, videos.device)  # (N, s)
  clip_rows = sources * num_clips + torch.arange(num_clips, device=videos.device)
  clips = videos.reshape(num_videos * num_clips, clip_length, height, width, channels)
  clips = clips[clip_rows.reshape(-1)]  # slot (n, k) at row n * s + k
  params = sample_params(clips.shape[0], (height, width), out_size, settings, videos.device)
  augmented = augment_clips(clips, params, out_size, settings)
  return augmented.reshape(num_videos, num_frames, out_size, out_size, channels), \
      sources.reshape(-1)
