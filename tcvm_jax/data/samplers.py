"""Frame and crop index arithmetic for the input pipeline (TensorFlow ops).

Every function works on scalar/1-D int tensors, so the same code runs eagerly and inside
tf.data graphs; the tests compare them against NumPy references. Randomness is stateless
(an explicit `seed` of shape (2,)), which keeps the pipeline reproducible and resumable.

Samplers (n = frames in the stored video, T = frames to sample):
  dense ("I3D", the paper's): T frames at `stride` from a start in [0, max(0, n - span)],
    span = (T - 1) * stride + 1. Short videos `loop` (index mod n) or `pad` (repeat the
    last frame).
  tsn (Table 3e): the video split into T equal segments, one random frame per segment
    (train) or the segment centre (eval); with n < T frames repeat.
  eval clips: N dense clips whose starts are uniformly spaced over [0, max(0, n - span)]
    (rounded half up); a single clip takes the centre.
  crops: 1 (centre) or 3 (start / centre / end along the long side, centred on the short
    side) square windows.
"""

from __future__ import annotations

import tensorflow as tf

SHORT_VIDEO_MODES = ("loop", "pad")
SAMPLERS = ("dense", "tsn")


def clip_span(num_frames: int, stride: int) -> int:
  """Frames covered by one dense clip: (T - 1) * stride + 1."""
  return (num_frames - 1) * stride + 1


def check_sampler_args(num_frames: int, stride: int, short_video: str = "loop",
                       sampler: str = "dense") -> None:
  """Raises a ValueError naming the config field for out-of-range sampler settings."""
  if sampler not in SAMPLERS:
    raise ValueError(f"config.data.sampler={sampler!r}; choose one of {SAMPLERS}.")
  if num_frames < 1:
    raise ValueError(f"config.data.num_frames={num_frames}; it must be >= 1.")
  if stride < 1:
    raise ValueError(f"config.data.frame_stride={stride}; it must be >= 1.")
  if short_video not in SHORT_VIDEO_MODES:
    raise ValueError(
        f"config.data.short_video={short_video!r}; choose one of {SHORT_VIDEO_MODES}.")


def max_dense_start(video_frames: tf.Tensor, num_frames: int, stride: int) -> tf.Tensor:
  """Largest start such that the clip fits: max(0, n - span)."""
  video_frames = tf.cast(video_frames, tf.int64)
  return tf.maximum(video_frames - clip_span(num_frames, stride), 0)


def dense_indices(video_frames: tf.Tensor, start: tf.Tensor, num_frames: int, stride: int,
                  short_video: str = "loop") -> tf.Tensor:
  """Frame indices (..., T) int64 of dense clips starting at `start` (scalar or (N,))."""
  check_sampler_args(num_frames, stride, short_video)
  video_frames = tf.cast(video_frames, tf.int64)
  raw = (tf.cast(start, tf.int64)[..., None]
         + tf.range(num_frames, dtype=tf.int64) * stride)
  if short_video == "loop":
    return tf.math.floormod(raw, tf.maximum(video_frames, 1))
  return tf.minimum(raw, tf.maximum(video_frames - 1, 0))


def random_dense_start(video_frames: tf.Tensor, num_frames: int, stride: int,
                       seed: tf.Tensor) -> tf.Tensor:
  """Uniform start in [0, max(0, n - span)] (int64 scalar)."""
  upper = max_dense_start(video_frames, num_frames, stride) + 1  # exclusive
  return tf.random.stateless_uniform([], seed=seed, minval=tf.constant(0, tf.int64),
                                     maxval=upper, dtype=tf.int64)


def random_dense_indices(video_frames: tf.Tensor, num_frames: int, stride: int,
                         seed: tf.Tensor, short_video: str = "loop") -> tf.Tensor:
  """The paper's training sampler: (T,) indices from a random start."""
  start = random_dense_start(video_frames, num_frames, stride, seed)
  return dense_indices(video_frames, start, num_frames, stride, short_video)


def uniform_clip_starts(video_frames: tf.Tensor, num_clips: int, num_frames: int,
                        stride: int) -> tf.Tensor:
  """(N,) starts spaced uniformly over [0, max_start], rounded half up; N=1 -> centre."""
  if num_clips < 1:
    raise ValueError(f"num_clips={num_clips}; it must be >= 1.")
  max_start = max_dense_start(video_frames, num_frames, stride)
  if num_clips == 1:
    return tf.reshape(max_start // 2, [1])
  steps = tf.range(num_clips, dtype=tf.int64)
  # round(k * max_start / (N - 1)) in exact integer arithmetic.
  return (2 * steps * max_start + (num_clips - 1)) // (2 * (num_clips - 1))


def uniform_clip_indices(video_frames: tf.Tensor, num_clips: int, num_frames: int,
                         stride: int, short_video: str = "loop") -> tf.Tensor:
  """(N, T) frame indices of N uniformly spaced dense clips (evaluation)."""
  starts = uniform_clip_starts(video_frames, num_clips, num_frames, stride)
  return dense_indices(video_frames, starts, num_frames, stride, short_video)


def tsn_segment_bounds(video_frames: tf.Tensor, num_frames: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Segment i covers [floor(i n / T), floor((i + 1) n / T)); returns (starts, lengths>=1)."""
  video_frames = tf.cast(video_frames, tf.int64)
  edges = tf.range(num_frames + 1, dtype=tf.int64) * video_frames // num_frames
  starts = edges[:-1]
  lengths = tf.maximum(edges[1:] - starts, 1)  # n < T: empty segments reuse their start
  return starts, lengths


def tsn_indices(video_frames: tf.Tensor, num_frames: int,
                offsets_uniform: tf.Tensor | None = None) -> tf.Tensor:
  """TSN indices (T,): start + floor(u * length) per segment; u=None gives the centres."""
  starts, lengths = tsn_segment_bounds(video_frames, num_frames)
  if offsets_uniform is None:
    offsets = lengths // 2
  else:
    offsets = tf.cast(tf.floor(tf.cast(offsets_uniform, tf.float64)
                               * tf.cast(lengths, tf.float64)), tf.int64)
    offsets = tf.minimum(offsets, lengths - 1)  # guards u == 1.0 exactly
  return starts + offsets


def random_tsn_indices(video_frames: tf.Tensor, num_frames: int, seed: tf.Tensor) -> tf.Tensor:
  """TSN training sampler: one uniformly random frame per segment."""
  offsets_uniform = tf.random.stateless_uniform([num_frames], seed=seed, dtype=tf.float64)
  return tsn_indices(video_frames, num_frames, offsets_uniform)


def train_frame_indices(video_frames: tf.Tensor, *, sampler: str, num_frames: int,
                        stride: int, short_video: str, seed: tf.Tensor) -> tf.Tensor:
  """(T,) training indices for the configured sampler."""
  check_sampler_args(num_frames, stride, short_video, sampler)
  if sampler == "dense":
    return random_dense_indices(video_frames, num_frames, stride, seed, short_video)
  return random_tsn_indices(video_frames, num_frames, seed)


def eval_frame_indices(video_frames: tf.Tensor, *, sampler: str, num_clips: int,
                       num_frames: int, stride: int, short_video: str) -> tf.Tensor:
  """(N, T) evaluation indices: uniform dense clips, or N copies of the TSN centres."""
  check_sampler_args(num_frames, stride, short_video, sampler)
  if sampler == "dense":
    return uniform_clip_indices(video_frames, num_clips, num_frames, stride, short_video)
  if num_clips != 1:
    raise ValueError(f"num_clips={num_clips} with config.data.sampler='tsn'; TSN evaluation "
                     "takes the segment centres, so use num_clips=1.")
  return tsn_indices(video_frames, num_frames)[None]


def crop_offsets(height: tf.Tensor, width: tf.Tensor, crop_size: int,
                 num_crops: int) -> tf.Tensor:
  """(num_crops, 2) int32 (y, x) corners of square crops; see the module docstring."""
  if num_crops not in (1, 3):
    raise ValueError(f"num_crops={num_crops}; it must be 1 (centre) or 3 (start/centre/end).")
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  free_y = tf.maximum(height - crop_size, 0)
  free_x = tf.maximum(width - crop_size, 0)
  centre = tf.stack([free_y // 2, free_x // 2])
  if num_crops == 1:
    return centre[None]
  landscape = width >= height  # the long side is the one the three crops walk along
  first = tf.where(landscape, tf.stack([free_y // 2, 0]), tf.stack([0, free_x // 2]))
  last = tf.where(landscape, tf.stack([free_y // 2, free_x]), tf.stack([free_y, free_x // 2]))
  return tf.stack([first, centre, last])


def random_crop_offset(height: tf.Tensor, width: tf.Tensor, crop_size: int,
                       seed: tf.Tensor) -> tf.Tensor:
  """(2,) int32 (y, x) uniform over every window that fits."""
  upper = tf.stack([tf.maximum(tf.cast(height, tf.int32) - crop_size, 0),
                    tf.maximum(tf.cast(width, tf.int32) - crop_size, 0)]) + 1
  uniform = tf.random.stateless_uniform([2], seed=seed, dtype=tf.float32)
  return tf.minimum(tf.cast(tf.floor(uniform * tf.cast(upper, tf.float32)), tf.int32),
                    upper - 1)
