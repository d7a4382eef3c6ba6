"""The TCVM model: backbone on pseudo-videos, features cut back into clips, TC + OFC heads.

Paper Sec. 3.1 / 3.3: the backbone sees whole pseudo-videos of T frames (no temporal
down-sampling); its frame-wise features are cut into s segments of L = T/s frames, one
per montage clip, and each segment goes through the TC head (z_diff, Eq. 4-5) and the
OFC head (z_origin).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tcvm_jax import backbones, heads

Dtype = Any


class TCVM(nnx.Module):
  """Backbone + TC head + OFC head. Train/eval mode via `model.train()` / `model.eval()`."""

  def __init__(
      self,
      backbone: backbones.VideoResNet,
      *,
      num_clips: int,
      num_frames: int,
      tc_k: float = 0.5,
      tc_second_order: bool = False,
      tc_hidden_dim: int = -1,
      ofc_hidden_dim: int = 2048,
      ofc_dim: int = 128,
      dtype: Dtype | None = None,
      bn_axis_name: str | None = None,
      bn_momentum: float = 0.9,
      bn_gradient: str = "auto",
      bn_statistics: str = "auto",
      rngs: nnx.Rngs,
  ):
    check_clip_split(num_frames, num_clips)
    self.num_clips = num_clips
    self.num_frames = num_frames
    self.clip_length = num_frames // num_clips
    num_features = backbone.num_features
    self.num_features = num_features
    self.backbone = backbone
    self.tc_head = heads.TCHead(
        num_features, self.clip_length, k=tc_k, second_order=tc_second_order,
        hidden_dim=tc_hidden_dim, dtype=dtype, bn_axis_name=bn_axis_name,
        bn_momentum=bn_momentum, bn_gradient=bn_gradient, bn_statistics=bn_statistics,
        rngs=rngs)
    self.ofc_head = heads.OFCHead(num_features, hidden_dim=ofc_hidden_dim,
                                  output_dim=ofc_dim, dtype=dtype, rngs=rngs)

  def __call__(self, pseudo_videos: jax.Array) -> dict[str, jax.Array]:
    """pseudo_videos: (B, T, H, W, 3), normalised.

    Returns {'frame_features': (B, T, h, w, C) in the compute dtype,
             'z_origin': (B, s, ofc_dim) float32, 'z_diff': (B, s, C) float32},
    where index j along s is the j-th clip (frames [j*L, (j+1)*L)) of each pseudo-video.
    """
    if pseudo_videos.ndim != 5 or pseudo_videos.shape[1] != self.num_frames:
      raise ValueError(f"TCVM expects pseudo-videos (B, {self.num_frames}, H, W, 3) "
                       f"(data.num_frames={self.num_frames}); got {pseudo_videos.shape}.")
    batch = pseudo_videos.shape[0]
    frame_features = self.backbone(pseudo_videos)  # (B, T, h, w, C)
    # Consecutive frames of one pseudo-video form its s clips, in order.
    segment_features = frame_features.reshape(
        batch * self.num_clips, self.clip_length, *frame_features.shape[2:])  # (B*s, L, h, w, C)
    z_diff = self.tc_head(segment_features)  # (B*s, C)
    z_origin = self.ofc_head(segment_features)  # (B*s, ofc_dim)
    return {
        "frame_features": frame_features,
        "z_origin": z_origin.reshape(batch, self.num_clips, -1),
        "z_diff": z_diff.reshape(batch, self.num_clips, -1),
    }

  def encode(self, videos: jax.Array) -> jax.Array:
    """videos: (B, T', H, W, 3) -> (B, C) float32 backbone features pooled over T', h, w.

    Any T' works (retrieval / linear probes); the heads are not used.
    """
    frame_features = self.backbone(videos)
    return frame_features.astype(jnp.float32).mean(axis=(1, 2, 3))


def check_clip_split(num_frames: int, num_clips: int) -> None:
  if num_clips < 1 or num_frames < 1 or num_frames % num_clips:
    raise ValueError(
        f"data.num_frames ({num_frames}) must be a positive multiple of montage.num_clips "
        f"({num_clips}): each pseudo-video is cut into s clips of T/s frames.")


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> TCVM:
  """TCVM from the full pretraining config (configs/pretrain.py)."""
  model_config = config.model
  num_frames = config.data.num_frames
  num_clips = config.montage.num_clips
  # Validate cheap settings before building a large backbone.
  check_clip_split(num_frames, num_clips)
  heads.check_tc_k(model_config.tc_k)
  if model_config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16'; got {model_config.dtype!r}.")
  dtype = jnp.dtype(model_config.dtype)
  options = backbones.compute_options(model_config)
  backbone = backbones.get_backbone(
      model_config.backbone, dtype=dtype, bn_axis_name=model_config.bn_axis_name,
      bn_momentum=model_config.bn_momentum, rngs=rngs, **options)
  return TCVM(
      backbone, num_clips=num_clips, num_frames=num_frames, tc_k=model_config.tc_k,
      tc_second_order=model_config.tc_second_order, tc_hidden_dim=model_config.tc_hidden_dim,
      ofc_hidden_dim=model_config.ofc_hidden_dim, ofc_dim=model_config.ofc_dim, dtype=dtype,
      bn_axis_name=model_config.bn_axis_name, bn_momentum=model_config.bn_momentum,
      bn_gradient=options["bn_gradient"], bn_statistics=options["bn_statistics"], rngs=rngs)
