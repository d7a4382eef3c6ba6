"""TCVM heads: Temporal Contrasting (TC, paper Sec. 3.3, Eq. 4-5) and OFC projection."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tcvm_jax import layers

Dtype = Any


def check_tc_k(k: float) -> None:
  if not 0.0 <= k <= 1.0:
    raise ValueError(f"model.tc_k must be in [0, 1] (share of channels that take frame "
                     f"differences); got {k}.")


def _next_frame_difference(x: jax.Array) -> jax.Array:
  """x_i - x_{i+1} along axis 1, the clip padded by repeating its last frame (d_L = 0)."""
  next_frames = jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)
  return x - next_frames


def temporal_difference(x: jax.Array, k: float, second_order: bool = False) -> jax.Array:
  """Eq. 4: frame differences on the first floor(k*C) channels, appearance on the rest.

  x: (N, L, ..., C) features of N clips of L frames each; returns the same shape.
  For channel j < floor(k*C): d_i = x_i - x_{i+1}; other channels keep x_i.

  Last frame: Eq. 4 leaves x_{L+1} undefined. We pad each clip by repeating its last
  frame, so d_L = x_L - x_L = 0 on the difference channels and the last frame
  contributes only its appearance channels. Differences are taken per clip (axis 1), so
  they never cross a clip boundary.

  second_order (D^2, Table 3c): the same difference, same padding, applied again to
  the difference channels: d2_i = d_i - d_{i+1}.
  """
  check_tc_k(k)
  if x.ndim < 3:
    raise ValueError(f"temporal_difference expects (N, L, ..., C); got shape {x.shape}.")
  num_diff_channels = math.floor(k * x.shape[-1])
  if num_diff_channels == 0:
    return x
  differences = _next_frame_difference(x[..., :num_diff_channels])
  if second_order:
    differences = _next_frame_difference(differences)
  return jnp.concatenate([differences, x[..., num_diff_channels:]], axis=-1)


class TCHead(nnx.Module):
  """Temporal Contrasting head: segment features (N, L, h, w, C) -> F_diff (N, C).

  temporal_difference -> spatial mean -> per-frame FC (C -> hidden) + BN (over all N*L
  frames) + ReLU -> shared FC f: hidden -> C/L per frame -> concatenated in time order
  (Eq. 5), so F_diff changes when the frames are reordered (unlike temporal pooling).
  """

  def __init__(
      self,
      num_features: int,
      num_frames: int,
      *,
      k: float = 0.5,
      second_order: bool = False,
      hidden_dim: int = -1,
      dtype: Dtype | None = None,
      bn_axis_name: str | None = None,
      bn_momentum: float = 0.9,
      bn_gradient: str = "auto",
      bn_statistics: str = "auto",
      rngs: nnx.Rngs,
  ):
    check_tc_k(k)
    if num_frames < 1 or num_features % num_frames:
      raise ValueError(
          f"TC head: backbone features C={num_features} must be divisible by the clip "
          f"length L={num_frames} (data.num_frames / montage.num_clips) so that f maps each "
          f"frame to C/L dims.")
    hidden_dim = num_features if hidden_dim == -1 else hidden_dim
    if hidden_dim < 1:
      raise ValueError(f"model.tc_hidden_dim must be -1 (= C) or >= 1; got {hidden_dim}.")
    dtype = jnp.dtype(dtype) if dtype is not None else None
    self.num_features = num_features
    self.num_frames = num_frames
    self.k = k
    self.second_order = second_order
    self.dtype = dtype
    # No bias: the BatchNorm right after removes it.
    self.frame_fc = nnx.Linear(num_features, hidden_dim, use_bias=False, dtype=dtype,
                               kernel_init=layers.torch_linear_init, rngs=rngs)
    self.frame_bn = layers.batch_norm(hidden_dim, axis_name=bn_axis_name,
                                      momentum=bn_momentum, dtype=dtype,
                                      gradient=bn_gradient, statistics=bn_statistics,
                                      rngs=rngs)
    self.frame_projection = nnx.Linear(hidden_dim, num_features // num_frames, dtype=dtype,
                                       kernel_init=layers.torch_linear_init, rngs=rngs)

  def __call__(self, segment_features: jax.Array) -> jax.Array:
    """segment_features: (N, L, h, w, C) -> F_diff (N, C) float32."""
    if segment_features.ndim != 5 or segment_features.shape[1:2] + segment_features.shape[
        -1:] != (self.num_frames, self.num_features):
      raise ValueError(f"TCHead expects (N, {self.num_frames}, h, w, {self.num_features}); "
                       f"got {segment_features.shape}.")
    if self.dtype is not None:
      segment_features = segment_features.astype(self.dtype)
    differences = temporal_difference(segment_features, self.k, self.second_order)
    frame_vectors = differences.mean(axis=(2, 3))  # (N, L, C)
    num_clips = frame_vectors.shape[0]
    hidden = self.frame_fc(frame_vectors.reshape(num_clips * self.num_frames, -1))
    hidden = nnx.relu(self.frame_bn(hidden))  # (N*L, hidden)
    per_frame = self.frame_projection(hidden)  # (N*L, C/L)
    return per_frame.reshape(num_clips, self.num_features).astype(jnp.float32)


class OFCHead(nnx.Module):
  """Original Feature Contrasting head: (N, L, h, w, C) -> z_origin (N, ofc_dim).

  Spatio-temporal mean, then the MoCo v2 MLP: Linear(C, hidden), ReLU, Linear(hidden, dim).
  """

  def __init__(
      self,
      num_features: int,
      *,
      hidden_dim: int = 2048,
      output_dim: int = 128,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    if hidden_dim < 1 or output_dim < 1:
      raise ValueError(f"model.ofc_hidden_dim ({hidden_dim}) and model.ofc_dim "
                       f"({output_dim}) must be >= 1.")
    dtype = jnp.dtype(dtype) if dtype is not None else None
    self.dtype = dtype
    self.hidden = nnx.Linear(num_features, hidden_dim, dtype=dtype,
                             kernel_init=layers.torch_linear_init, rngs=rngs)
    self.output = nnx.Linear(hidden_dim, output_dim, dtype=dtype,
                             kernel_init=layers.torch_linear_init, rngs=rngs)

  def __call__(self, segment_features: jax.Array) -> jax.Array:
    """segment_features: (N, L, h, w, C) -> (N, ofc_dim) float32."""
    if segment_features.ndim != 5:
      raise ValueError(f"OFCHead expects (N, L, h, w, C); got {segment_features.shape}.")
    if self.dtype is not None:
      segment_features = segment_features.astype(self.dtype)
    pooled = segment_features.mean(axis=(1, 2, 3))  # (N, C)
    return self.output(nnx.relu(self.hidden(pooled))).astype(jnp.float32)
