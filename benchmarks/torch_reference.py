"""A PyTorch reference of the TCVM pretraining step, to time JAX against (issue #6).

The same network as `tcvm_jax` (backbones.py, heads.py, model.py) and the same loss
(losses.py), written the way a PyTorch user would:

  R3D50 / r3d_tiny  nn.Conv3d over (B, C, T, H, W), channels_last_3d (pytorchvideo slow_r50
                    layout: (1,7,7) stem with stride (1,2,2), (1,3,3) max-pool, temporal
                    kernel 3 in conv_a of res4/res5, stride on the 3x3 conv).
  TSM50 / tsm_tiny  nn.Conv2d over (B*T, C, H, W), channels_last, temporal shift (1/8 of the
                    channels from the next frame, 1/8 from the previous, zero fill) on the
                    input of every residual branch.
  TC head           Eq. 4 differences on floor(k*C) channels -> spatial mean -> per-frame FC
                    (no bias) + BN + ReLU -> shared FC C -> C/L -> concatenated over L.
  OFC head          spatio-temporal mean -> Linear(C, 2048) -> ReLU -> Linear(2048, 128).
  Loss              alpha * InfoNCE(z_origin) + beta * InfoNCE(z_diff), multi-positive.
  Update            torch.optim.SGD(momentum=0.9, weight_decay=1e-4), as optax in optim.py.

Module and parameter names mirror the Flax model's (`backbone.stages.2.0.conv_a.weight`
<-> `backbone/stages/2/0/conv_a/kernel`) so tests can copy weights across and compare.

The timed step is the JAX step's work: Video Montage and per-clip MoCo v2 augmentation of
device-resident uint8 videos (benchmarks/torch_montage.py, batched tensor ops), then
forward, backward and update. It is also timed without the montage (on fixed,
already-augmented float pseudo-videos) and the montage alone, for like-for-like ratios of
either part.

Never imported by the `tcvm_jax` package. Run by scripts/benchmark.py in its own process
(`python benchmarks/torch_reference.py --spec=FILE --json=FILE`), so that PyTorch and JAX
never share a GPU's memory or its CUDA libraries; `--serve` (for benchmark.py --interleave)
keeps the process and times one step per request.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence, TextIO

import torch
from torch import nn

if __package__:
  from benchmarks import torch_montage
else:  # run as a script: benchmarks/ is on sys.path
  import torch_montage  # pylint: disable=g-import-not-at-top

POSITIVE_REDUCTIONS = ("mean", "sum")
# config.augment's switches of how JAX computes, not what: tcvm_jax.augment.COMPUTE_CHOICES
# (tests compare them; this module stays JAX-free). The reference keeps float32 planes and
# its own blur and jitter.
COMPUTE_FIELDS = ("plane_dtype", "blur_rows", "jitter_kernel")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  stage_sizes: tuple[int, ...]
  stage_temporal_kernels: tuple[int, ...]
  width: int
  shift_div: int | None  # None: R3D (Conv3d layout); else TSM (Conv2d layout).


# Must match tcvm_jax/backbones.py BACKBONES (tests compare parameter counts).
BACKBONES = {
    "r3d50": BackboneSpec((3, 4, 6, 3), (1, 1, 3, 3), 64, None),
    "tsm50": BackboneSpec((3, 4, 6, 3), (1, 1, 1, 1), 64, 8),
    "r3d_tiny": BackboneSpec((1, 1, 1, 1), (1, 1, 3, 3), 8, None),
    "tsm_tiny": BackboneSpec((1, 1, 1, 1), (1, 1, 1, 1), 8, 8),
}


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
  """Everything the reference needs, read off the pretraining config by the benchmark."""
  backbone: str = "r3d_tiny"
  num_frames: int = 16        # T of a pseudo-video.
  num_clips: int = 4          # s; clips have L = T / s frames.
  frame_size: int = 56        # montage.output_size.
  tc_k: float = 0.5
  tc_second_order: bool = False
  tc_hidden_dim: int = -1
  ofc_hidden_dim: int = 2048
  ofc_dim: int = 128
  bn_momentum: float = 0.9    # Flax convention: running = m * running + (1 - m) * batch.
  temperature: float = 0.07
  alpha: float = 0.5
  beta: float = 0.5
  positive_reduction: str = "mean"
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 1e-4
  input_size: int = 64        # data.input_size: the uint8 frames the montage crops.
  montage_variant: str = "C-A-S"
  augment: dict[str, Any] | None = None  # config.augment; None: AugmentSettings' defaults.

  def __post_init__(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f"model.backbone={self.backbone!r}; the torch reference knows "
                       f"{sorted(BACKBONES)}.")
    if self.num_clips < 1 or self.num_frames % self.num_clips:
      raise ValueError(f"data.num_frames ({self.num_frames}) must be a positive multiple of "
                       f"montage.num_clips ({self.num_clips}).")
    if self.positive_reduction not in POSITIVE_REDUCTIONS:
      raise ValueError(f"loss.positive_reduction={self.positive_reduction!r}; choose from "
                       f"{POSITIVE_REDUCTIONS}.")
    if self.montage_variant != "C-A-S":
      raise ValueError(f"montage.variant={self.montage_variant!r}: the torch reference "
                       "implements the paper's 'C-A-S' only.")
    self.augment_settings  # pylint: disable=pointless-statement  # fails early on bad fields

  @property
  def augment_settings(self) -> torch_montage.AugmentSettings:
    fields = {name: tuple(value) if isinstance(value, (list, tuple)) else value
              for name, value in (self.augment or {}).items()
              if name not in COMPUTE_FIELDS}
    return torch_montage.AugmentSettings(**fields)

  @property
  def clip_length(self) -> int:
    return self.num_frames // self.num_clips

  @property
  def is_3d(self) -> bool:
    return BACKBONES[self.backbone].shift_div is None


# ----------------------------------------------------------------------------- backbone


def temporal_shift(x: torch.Tensor, num_frames: int, shift_div: int) -> torch.Tensor:
  """TSM on (B*T, C, H, W): channels [0, C/div) from frame t+1, [C/div, 2C/div) from t-1.

  Works in the (B, T, H, W, C) view of channels_last memory, so the result is
  channels_last again without an extra copy.
  """
  channels, height, width = x.shape[1:]
  fold = channels // shift_div
  if fold == 0:
    return x
  frames = x.permute(0, 2, 3, 1).reshape(-1, num_frames, height, width, channels)
  zeros = torch.zeros_like(frames[:, :1, ..., :fold])
  from_next = torch.cat([frames[:, 1:, ..., :fold], zeros], dim=1)
  from_previous = torch.cat([zeros, frames[:, :-1, ..., fold:2 * fold]], dim=1)
  shifted = torch.cat([from_next, from_previous, frames[..., 2 * fold:]], dim=-1)
  return shifted.reshape(-1, height, width, channels).permute(0, 3, 1, 2)


def _conv(in_features: int, out_features: int, kernel_size: tuple[int, int, int],
          stride: int, is_3d: bool) -> nn.Module:
  kt, kh, kw = kernel_size
  if is_3d:
    return nn.Conv3d(in_features, out_features, kernel_size, stride=(1, stride, stride),
                     padding=(kt // 2, kh // 2, kw // 2), bias=False)
  if kt != 1:
    raise ValueError(f"The 2D (TSM) layout has no temporal kernels; got {kernel_size}.")
  return nn.Conv2d(in_features, out_features, (kh, kw), stride=stride,
                   padding=(kh // 2, kw // 2), bias=False)


def _batch_norm(num_features: int, is_3d: bool, flax_momentum: float) -> nn.Module:
  cls = nn.BatchNorm3d if is_3d else nn.BatchNorm2d
  return cls(num_features, eps=1e-5, momentum=1.0 - flax_momentum)


class Bottleneck(nn.Module):
  """(kt,1,1) -> (1,3,3) with spatial stride -> (1,1,1), x4; TSM on the branch input."""

  def __init__(self, in_features: int, inner_features: int, *, temporal_kernel: int,
               stride: int, shift_div: int | None, num_frames: int, is_3d: bool,
               bn_momentum: float):
    super().__init__()
    out_features = 4 * inner_features
    self.shift_div = shift_div
    self.num_frames = num_frames
    self.conv_a = _conv(in_features, inner_features, (temporal_kernel, 1, 1), 1, is_3d)
    self.bn_a = _batch_norm(inner_features, is_3d, bn_momentum)
    self.conv_b = _conv(inner_features, inner_features, (1, 3, 3), stride, is_3d)
    self.bn_b = _batch_norm(inner_features, is_3d, bn_momentum)
    self.conv_c = _conv(inner_features, out_features, (1, 1, 1), 1, is_3d)
    self.bn_c = _batch_norm(out_features, is_3d, bn_momentum)
    nn.init.zeros_(self.bn_c.weight)  # zero_init_residual, as the Flax model.
    if stride != 1 or in_features != out_features:
      self.shortcut_conv = _conv(in_features, out_features, (1, 1, 1), stride, is_3d)
      self.shortcut_bn = _batch_norm(out_features, is_3d, bn_momentum)
    else:
      self.shortcut_conv = self.shortcut_bn = None
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    residual = temporal_shift(x, self.num_frames, self.shift_div) if self.shift_div else x
    residual = self.relu(self.bn_a(self.conv_a(residual)))
    residual = self.relu(self.bn_b(self.conv_b(residual)))
    residual = self.bn_c(self.conv_c(residual))
    shortcut = x
    if self.shortcut_conv is not None:
      shortcut = self.shortcut_bn(self.shortcut_conv(x))
    return self.relu(residual + shortcut)


class VideoResNet(nn.Module):
  """(1,7,7)/2 stem, (1,3,3)/2 max-pool, 4 bottleneck stages, no temporal stride.

  Input (B, 3, T, H, W) in the 3D layout, (B*T, 3, H, W) in the 2D (TSM) layout; output
  in the same layout with C = `num_features` channels at H/32, W/32.
  """

  def __init__(self, spec: BackboneSpec, *, num_frames: int, bn_momentum: float = 0.9):
    super().__init__()
    is_3d = spec.shift_div is None
    self.stem_conv = _conv(3, spec.width, (1, 7, 7), 2, is_3d)
    self.stem_bn = _batch_norm(spec.width, is_3d, bn_momentum)
    self.relu = nn.ReLU(inplace=True)
    if is_3d:
      self.max_pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    else:
      self.max_pool = nn.MaxPool2d(3, stride=2, padding=1)
    stages = []
    in_features = spec.width
    for stage_index, (num_blocks, temporal_kernel) in enumerate(
        zip(spec.stage_sizes, spec.stage_temporal_kernels)):
      inner_features = spec.width * 2**stage_index
      blocks = []
      for block_index in range(num_blocks):
        blocks.append(Bottleneck(
            in_features, inner_features, temporal_kernel=temporal_kernel,
            stride=2 if stage_index > 0 and block_index == 0 else 1,
            shift_div=spec.shift_div, num_frames=num_frames, is_3d=is_3d,
            bn_momentum=bn_momentum))
        in_features = 4 * inner_features
      stages.append(nn.ModuleList(blocks))
    self.stages = nn.ModuleList(stages)
    self.num_features = in_features
    for module in self.modules():
      if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, videos: torch.Tensor) -> torch.Tensor:
    x = self.max_pool(self.relu(self.stem_bn(self.stem_conv(videos))))
    for blocks in self.stages:
      for block in blocks:
        x = block(x)
    return x


# ----------------------------------------------------------------------------- heads


def temporal_difference(frame_vectors: torch.Tensor, k: float,
                        second_order: bool = False) -> torch.Tensor:
  """Eq. 4 on (N, L, C): x_i - x_{i+1} on the first floor(k*C) channels, d_L = 0."""
  num_diff_channels = math.floor(k * frame_vectors.shape[-1])
  if num_diff_channels == 0:
    return frame_vectors

  def next_difference(x):
    return x - torch.cat([x[:, 1:], x[:, -1:]], dim=1)

  differences = next_difference(frame_vectors[..., :num_diff_channels])
  if second_order:
    differences = next_difference(differences)
  return torch.cat([differences, frame_vectors[..., num_diff_channels:]], dim=-1)


class TCHead(nn.Module):
  """Frame vectors (N, L, C) -> F_diff (N, C). Spatial pooling happens before the
  difference here (after it in Flax); both are linear, so the function is the same."""

  def __init__(self, num_features: int, clip_length: int, *, k: float, second_order: bool,
               hidden_dim: int, bn_momentum: float):
    super().__init__()
    hidden_dim = num_features if hidden_dim == -1 else hidden_dim
    if num_features % clip_length:
      raise ValueError(f"TC head: C={num_features} must be divisible by L={clip_length}.")
    self.k = k
    self.second_order = second_order
    self.frame_fc = nn.Linear(num_features, hidden_dim, bias=False)
    self.frame_bn = nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=1.0 - bn_momentum)
    self.frame_projection = nn.Linear(hidden_dim, num_features // clip_length)

  def forward(self, frame_vectors: torch.Tensor) -> torch.Tensor:
    num_clips, clip_length, _ = frame_vectors.shape
    differences = temporal_difference(frame_vectors, self.k, self.second_order)
    hidden = self.frame_fc(differences.reshape(num_clips * clip_length, -1))
    hidden = torch.relu(self.frame_bn(hidden))
    return self.frame_projection(hidden).reshape(num_clips, -1)


class OFCHead(nn.Module):
  """Frame vectors (N, L, C) -> z_origin (N, ofc_dim)."""

  def __init__(self, num_features: int, hidden_dim: int, output_dim: int):
    super().__init__()
    self.hidden = nn.Linear(num_features, hidden_dim)
    self.output = nn.Linear(hidden_dim, output_dim)

  def forward(self, frame_vectors: torch.Tensor) -> torch.Tensor:
    return self.output(torch.relu(self.hidden(frame_vectors.mean(dim=1))))


class TCVMReference(nn.Module):
  """Backbone + TC + OFC heads. forward(pseudo_videos in the backbone's layout) ->
  (z_origin (B, s, ofc_dim), z_diff (B, s, C)), both float32."""

  def __init__(self, spec: ReferenceSpec):
    super().__init__()
    self.spec = spec
    self.backbone = VideoResNet(BACKBONES[spec.backbone], num_frames=spec.num_frames,
                                bn_momentum=spec.bn_momentum)
    num_features = self.backbone.num_features
    self.tc_head = TCHead(num_features, spec.clip_length, k=spec.tc_k,
                          second_order=spec.tc_second_order, hidden_dim=spec.tc_hidden_dim,
                          bn_momentum=spec.bn_momentum)
    self.ofc_head = OFCHead(num_features, spec.ofc_hidden_dim, spec.ofc_dim)

  def forward(self, pseudo_videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    spec = self.spec
    features = self.backbone(pseudo_videos)
    if spec.is_3d:
      frame_vectors = features.mean(dim=(3, 4)).transpose(1, 2)  # (B, T, C)
    else:
      frame_vectors = features.mean(dim=(2, 3)).reshape(-1, spec.num_frames,
                                                        features.shape[1])  # (B, T, C)
    batch = frame_vectors.shape[0]
    segments = frame_vectors.reshape(batch * spec.num_clips, spec.clip_length, -1)
    z_diff = self.tc_head(segments).float()
    z_origin = self.ofc_head(segments).float()
    return z_origin.reshape(batch, spec.num_clips, -1), z_diff.reshape(batch, spec.num_clips, -1)


def to_backbone_layout(videos_bthwc: torch.Tensor, spec: ReferenceSpec) -> torch.Tensor:
  """(B, T, H, W, 3) -> (B, 3, T, H, W) channels_last_3d, or (B*T, 3, H, W) channels_last.

  Both are views of the (B, T, H, W, 3) memory: no copy."""
  if spec.is_3d:
    return videos_bthwc.permute(0, 4, 1, 2, 3)
  batch, frames, height, width, channels = videos_bthwc.shape
  return videos_bthwc.reshape(batch * frames, height, width, channels).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- loss


def multi_positive_infonce(embeddings: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 0.07,
                           positive_reduction: str = "mean") -> torch.Tensor:
  """Eq. 1-2 as tcvm_jax.losses.multi_positive_infonce: (N, D), (N,) -> scalar."""
  if positive_reduction not in POSITIVE_REDUCTIONS:
    raise ValueError(f"loss.positive_reduction={positive_reduction!r}; choose from "
                     f"{POSITIVE_REDUCTIONS}.")
  z = nn.functional.normalize(embeddings.float(), dim=-1, eps=1e-12)
  logits = (z @ z.T) / temperature  # (N, N)
  num = logits.shape[0]
  not_self = ~torch.eye(num, dtype=torch.bool, device=logits.device)
  positive = (labels[:, None] == labels[None, :]) & not_self
  log_denominator = torch.logsumexp(logits.masked_fill(~not_self, -math.inf), dim=1)
  log_prob = logits - log_denominator[:, None]
  num_positives = positive.sum(dim=1)
  per_anchor = -(log_prob * positive).sum(dim=1)
  if positive_reduction == "mean":
    per_anchor = per_anchor / num_positives.clamp(min=1)
  has_positive = num_positives > 0
  return (per_anchor * has_positive).sum() / has_positive.sum().clamp(min=1)


class PretrainingObjective(nn.Module):
  """(pseudo-videos, labels (B*s,)) -> alpha * L_origin + beta * L_diff (Eq. 3)."""

  def __init__(self, model: TCVMReference):
    super().__init__()
    self.model = model

  def forward(self, pseudo_videos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    spec = self.model.spec
    z_origin, z_diff = self.model(pseudo_videos)
    num = labels.shape[0]
    # The loss in float32 even under bf16 autocast, as in the JAX step.
    with torch.autocast(z_origin.device.type, enabled=False):
      loss_origin = multi_positive_infonce(z_origin.reshape(num, -1), labels,
                                           spec.temperature, spec.positive_reduction)
      loss_diff = multi_positive_infonce(z_diff.reshape(num, -1), labels, spec.temperature,
                                         spec.positive_reduction)
    return spec.alpha * loss_origin + spec.beta * loss_diff


def count_parameters(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class ReferenceStep:
  """One built training step; each call does one step (asynchronous on CUDA) and returns
  the loss.

  run / eager_run              the whole step: montage + augmentation of device-resident
                               uint8 videos, forward, backward, SGD (eager_run without
                               torch.compile: the fallback).
  model_run / eager_model_run  forward + backward + SGD on fixed, already-augmented float
                               pseudo-videos (the step without the montage).
  montage_run / eager_montage_run  the montage + augmentation alone.
  """
  run: Callable[[], torch.Tensor]
  eager_run: Callable[[], torch.Tensor]
  model_run: Callable[[], torch.Tensor]
  eager_model_run: Callable[[], torch.Tensor]
  montage_run: Callable[[], torch.Tensor]
  eager_montage_run: Callable[[], torch.Tensor]
  model: TCVMReference
  device: torch.device
  compile_error: str | None = None

  def synchronize(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def eager(self) -> "ReferenceStep":
    """The same step with every part eager (after a torch.compile failure)."""
    return dataclasses.replace(self, run=self.eager_run, model_run=self.eager_model_run,
                               montage_run=self.eager_montage_run)


def build_train_step(spec: ReferenceSpec, *, batch_size: int, dtype: str = "float32",
                     compile_model: bool = False, device: str | None = None,
                     seed: int = 0) -> ReferenceStep:
  """Model, SGD and device-resident inputs: uint8 videos (B, T, input_size, input_size, 3)
  for the whole step, float pseudo-videos (B, T, S, S, 3) for the model-only step."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}; choose 'float32' or 'bfloat16'.")
  if batch_size < 1:
    raise ValueError(f"batch_size ({batch_size}) must be >= 1.")
  torch.manual_seed(seed)
  device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default f32 precision on GPU.
    torch.backends.cudnn.allow_tf32 = True
  memory_format = torch.channels_last_3d if spec.is_3d else torch.channels_last
  model = TCVMReference(spec).to(device)
  model = model.to(memory_format=memory_format)
  objective = PretrainingObjective(model).train()
  sgd_kwargs = dict(lr=spec.learning_rate, momentum=spec.momentum,
                    weight_decay=spec.weight_decay)
  try:
    optimizer = torch.optim.SGD(model.parameters(), fused=device.type == "cuda", **sgd_kwargs)
  except (RuntimeError, TypeError):
    optimizer = torch.optim.SGD(model.parameters(), **sgd_kwargs)

  # The whole step's input: raw uint8 videos, as the JAX step gets them.
  videos = torch.randint(0, 256, (batch_size, spec.num_frames, spec.input_size,
                                  spec.input_size, 3), dtype=torch.uint8, device=device)
  settings = spec.augment_settings

  def montage(videos):
    return torch_montage.video_montage(videos, num_clips=spec.num_clips,
                                       out_size=spec.frame_size, settings=settings)

  # The model-only step's input: already-augmented, normalised pseudo-videos, and labels
  # as the montage gives them (each source's s clips somewhere in the batch).
  fixed_videos = torch.randn(batch_size, spec.num_frames, spec.frame_size, spec.frame_size,
                             3, device=device)
  fixed_labels = torch.arange(batch_size * spec.num_clips, device=device) // spec.num_clips
  fixed_labels = fixed_labels[torch.randperm(fixed_labels.shape[0], device=device)]
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def make_steps(step_objective, step_montage):
    def update(pseudo_videos, labels) -> torch.Tensor:
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = step_objective(to_backbone_layout(pseudo_videos, spec), labels)
      loss.backward()
      optimizer.step()
      return loss.detach()

    def montage_step() -> torch.Tensor:
      with torch.no_grad():
        return step_montage(videos)[0]

    def train_step() -> torch.Tensor:
      with torch.no_grad():
        pseudo_videos, labels = step_montage(videos)
      return update(pseudo_videos, labels)

    return train_step, lambda: update(fixed_videos, fixed_labels), montage_step

  eager = make_steps(objective, montage)
  compiled, compile_error = eager, None
  if compile_model:
    try:
      compiled = make_steps(torch.compile(objective), torch.compile(montage))
    except Exception as error:  # pylint: disable=broad-except
      compile_error = f"{type(error).__name__}: {str(error)[:500]}"
  return ReferenceStep(run=compiled[0], eager_run=eager[0], model_run=compiled[1],
                       eager_model_run=eager[1], montage_run=compiled[2],
                       eager_montage_run=eager[2], model=model, device=device,
                       compile_error=compile_error)


def _compile_or_fall_back(step: ReferenceStep
                          ) -> tuple[ReferenceStep, float | None, str | None]:
  """Calls each part of a torch.compile'd step once, which compiles it. Returns the step,
  the first whole step's time (compile + one step) and None; or, where compiling failed
  (here or in `build_train_step`), the eager step, None and the error."""
  if step.run is step.eager_run:
    return step, None, step.compile_error
  try:
    start = time.perf_counter()
    step.run()
    step.synchronize()
    compile_time_s = time.perf_counter() - start
    step.model_run()
    step.montage_run()
    step.synchronize()
  except Exception as error:  # pylint: disable=broad-except
    return step.eager(), None, f"{type(error).__name__}: {str(error)[:500]}"
  return step, compile_time_s, None


def _timed_calls(run: Callable[[], Any], step: ReferenceStep, count: int) -> list[float]:
  """`count` synchronised calls of `run`, in seconds each."""
  times = []
  for _ in range(count):
    start = time.perf_counter()
    run()
    step.synchronize()
    times.append(time.perf_counter() - start)
  return times


def benchmark_train_step(spec: ReferenceSpec, *, batch_size: int, dtype: str = "float32",
                         steps: int = 10, warmup: int = 2, compile_model: bool = False,
                         device: str | None = None, seed: int = 0) -> dict[str, Any]:
  """Times the whole step (montage + augmentation + forward + backward + SGD), the step
  without the montage, and the montage alone.

  Returns a dict of figures; `step_time_s` is the whole step's median over `steps` timed
  steps, each synchronised. `compile_time_s` is the first compiled call (compile + one
  step).
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps ({steps}) must be >= 1 and warmup ({warmup}) >= 0.")
  step = build_train_step(spec, batch_size=batch_size, dtype=dtype,
                          compile_model=compile_model, device=device, seed=seed)
  device = step.device
  step, compile_time_s, compile_error = _compile_or_fall_back(step)
  if compile_error is not None:
    print(f"torch.compile failed, timing eager mode instead: {compile_error}",
          file=sys.stderr)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  for run in (step.run, step.model_run, step.montage_run):
    for _ in range(warmup):
      run()
  step.synchronize()
  step_times = _timed_calls(step.run, step, steps)
  model_step_times = _timed_calls(step.model_run, step, steps)
  montage_times = _timed_calls(step.montage_run, step, steps)
  # Back to back, one wait at the end (how training runs): hides per-step host latency.
  start = time.perf_counter()
  for _ in range(steps):
    loss = step.run()
  step.synchronize()
  chained_step_time_s = (time.perf_counter() - start) / steps
  final_loss = float(loss)
  step_time_s = statistics.median(step_times)
  montage_time_s = statistics.median(montage_times)
  model = step.model
  return {
      "torch_version": torch.__version__,
      "device": str(device),
      "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else "cpu"),
      "num_threads": torch.get_num_threads(),
      "dtype": dtype,
      "memory_format": "channels_last_3d" if spec.is_3d else "channels_last",
      "batch_size": batch_size,
      "step_time_s": step_time_s,
      "step_times_s": step_times,
      "step_time_min_s": min(step_times),
      "chained_step_time_s": chained_step_time_s,
      "videos_per_s": batch_size / step_time_s,
      "model_step_time_s": statistics.median(model_step_times),
      "model_step_times_s": model_step_times,
      "model_step_time_min_s": min(model_step_times),
      "montage_time_s": montage_time_s,
      "montage_share": montage_time_s / step_time_s,
      "compiled": compile_model and compile_error is None,
      "compile_time_s": compile_time_s,
      "compile_error": compile_error,
      "final_loss": final_loss,
      "backbone_params": count_parameters(model.backbone),
      "total_params": count_parameters(model),
      "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                            if device.type == "cuda" else None),
      "includes_montage": True,
  }


SERVED_STEPS = ("step", "model_step")  # serve_steps' requests: the whole step, no montage


def serve_steps(step: ReferenceStep, *, warmup: int, commands: TextIO,
                replies: TextIO) -> int:
  """Runs one timed step per line read from `commands`, replying its seconds: "step" the
  whole step (montage included), "model_step" the step without the montage.

  For a parent process that alternates its own JAX steps with these (benchmark.py
  --interleave): the two steps see the same load from other jobs on a shared host, and
  each keeps its own process, heap and thread pools. In one process, PyTorch's step ran
  6-30 % slower once an XLA:CPU program had been compiled beside it (docs/performance.md).
  A step built with torch.compile is compiled during the warm-up; if that fails, the
  eager step is served. Replies "ready compiled" or "ready eager" after the warm-up;
  stops at end of input or "stop". Returns the number of timed steps.
  """
  step, _, compile_error = _compile_or_fall_back(step)
  if compile_error is not None:
    print(f"torch.compile failed, serving the eager step: {compile_error}", file=sys.stderr)
  compiled = step.run is not step.eager_run
  for run in (step.run, step.model_run):
    for _ in range(warmup):
      run()
  step.synchronize()
  runs = dict(zip(SERVED_STEPS, (step.run, step.model_run)))
  print(f"ready {'compiled' if compiled else 'eager'}", file=replies, flush=True)
  count = 0
  for line in commands:
    command = line.strip()
    if command == "stop":
      break
    if command not in runs:
      raise ValueError(f"unknown command {command!r}; expected one of {SERVED_STEPS} or "
                       "'stop'.")
    start = time.perf_counter()
    runs[command]()
    step.synchronize()
    print(repr(time.perf_counter() - start), file=replies, flush=True)
    count += 1
  return count


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--spec", required=True, help="JSON file: ReferenceSpec fields plus "
                      "batch_size, dtype, steps, warmup, compile_model.")
  parser.add_argument("--json", help="where to write the figures (timed run).")
  parser.add_argument("--serve", action="store_true", help="build the step (compiled with "
                      "compile_model), warm it up, then time one step per 'step' (whole) or "
                      "'model_step' (without the montage) line on stdin and print its "
                      "seconds (see serve_steps).")
  args = parser.parse_args(argv)
  if not (args.serve or args.json):
    parser.error("give --json=FILE, or --serve.")
  with open(args.spec) as f:
    request = json.load(f)
  if request.pop("retain_host_memory", False):
    # The JAX step's process keeps freed memory (tcvm_jax/host_memory.py); so does this one.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tcvm_jax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.retain_freed_memory()
  run_kwargs = {key: request.pop(key) for key in
                ("batch_size", "dtype", "steps", "warmup", "compile_model") if key in request}
  spec = ReferenceSpec(**request)
  if args.serve:
    step = build_train_step(spec, batch_size=run_kwargs["batch_size"],
                            dtype=run_kwargs.get("dtype", "float32"),
                            compile_model=run_kwargs.get("compile_model", False))
    serve_steps(step, warmup=run_kwargs.get("warmup", 2), commands=sys.stdin,
                replies=sys.stdout)
    return 0
  figures = benchmark_train_step(spec, **run_kwargs)
  with open(args.json, "w") as f:
    json.dump(figures, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
