"""Video decoding for the TFRecord converter: PyAV decode, trim, fps resampling, resize, JPEG.

Time is measured in seconds from the start of the video stream (the stream's own
`start_time` is subtracted), which is what clip start/end columns in dataset lists mean.

Resampling to a target fps picks, for each target time `start + k / fps` inside the clip,
the decoded frame whose timestamp is nearest (ties go to the earlier frame). Frames are
resized so that the short side has the requested length, keeping the aspect ratio and
rounding the long side to an even number of pixels.

No TensorFlow here: the converter's worker processes use this module, and JPEG encoding
goes through Pillow (libjpeg-turbo, as fast as `tf.io.encode_jpeg`), which is installed
with scikit-image. `tf.io.encode_jpeg` is the fallback when Pillow is missing.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Iterable, Iterator

import av
import numpy as np

try:
  from PIL import Image
except ImportError:  # pragma: no cover - Pillow ships with scikit-image.
  Image = None

# Frames this close (seconds) before the clip start still count as inside it; container
# timestamps are rounded to their time base.
_TIME_TOLERANCE = 1e-4
# Distances to two frames closer than this (seconds) are a tie, resolved to the earlier
# frame; without it float rounding would break exact ties (e.g. 2x upsampling) at random.
_TIE_TOLERANCE = 1e-9


class VideoDecodeError(Exception):
  """A video could not be decoded; the message says why."""


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
  frames: np.ndarray        # (T, H, W, 3) uint8 RGB.
  frame_times: np.ndarray   # (T,) seconds: timestamps of the source frames picked.
  source_fps: float         # the stream's average frame rate (0.0 if unknown).
  start_seconds: float      # clip start actually used.
  end_seconds: float        # clip end actually used (clamped to the end of the video).


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(H, W) with the short side `short_side`, aspect kept, long side rounded to even.

  `short_side <= 0` keeps the source size.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"Frame size must be positive, got {height}x{width}.")
  if short_side <= 0:
    return height, width
  if short_side % 2:
    raise ValueError(f"short_side must be even (JPEG/YUV friendly), got {short_side}.")
  scale = short_side / min(height, width)
  def even(x: float) -> int:
    return max(2, 2 * int(round(x * scale / 2)))
  if height <= width:
    return short_side, even(width)
  return even(height), short_side


def num_target_frames(duration_seconds: float, fps: float) -> int:
  """How many target times `k / fps` fall in [0, duration)."""
  if fps <= 0:
    raise ValueError(f"fps must be > 0, got {fps}.")
  if duration_seconds <= 0:
    return 0
  # The epsilon keeps e.g. 2.0 s * 5 fps at exactly 10 frames despite float rounding.
  return max(0, int(math.ceil(duration_seconds * fps - 1e-6)))


def resample_indices(
    frame_times: np.ndarray, fps: float, start_seconds: float, end_seconds: float
) -> np.ndarray:
  """Index of the nearest frame (ties: earlier) for each target time in [start, end).

  Reference implementation of what `select_nearest_frames` does while streaming.
  """
  frame_times = np.asarray(frame_times, np.float64)
  count = num_target_frames(end_seconds - start_seconds, fps)
  if count == 0 or frame_times.size == 0:
    return np.zeros((0,), np.int64)
  targets = start_seconds + np.arange(count) / fps
  right = np.clip(np.searchsorted(frame_times, targets, side="left"), 0, frame_times.size - 1)
  left = np.clip(right - 1, 0, None)
  take_left = (np.abs(targets - frame_times[left])
               <= np.abs(frame_times[right] - targets) + _TIE_TOLERANCE)
  return np.where(take_left, left, right).astype(np.int64)


class NearestFrameSelector:
  """Streaming nearest-frame choice for target times `start + k / fps` (ties: earlier).

  Feed increasing frame times one at a time with `push`; each call returns the frame
  indices chosen for the targets that frame settles (always the previous or the current
  frame), so a decoder never keeps more than two frames. `finish(end)` settles the
  targets between the last frame and the clip end. Same result as `resample_indices`.
  """

  def __init__(self, fps: float, start_seconds: float):
    if fps <= 0:
      raise ValueError(f"fps must be > 0, got {fps}.")
    self.fps = fps
    self.start_seconds = start_seconds
    self.num_emitted = 0
    self._previous: tuple[int, float] | None = None
    self._num_pushed = 0

  def _target(self, k: int) -> float:
    return self.start_seconds + k / self.fps

  def push(self, time: float) -> list[int]:
    index = self._num_pushed
    self._num_pushed += 1
    chosen = []
    while self._target(self.num_emitted) <= time:
      target = self._target(self.num_emitted)
      previous = self._previous
      if previous is None or (target - previous[1]) > (time - target) + _TIE_TOLERANCE:
        chosen.append(index)
      else:
        chosen.append(previous[0])
      self.num_emitted += 1
    self._previous = (index, time)
    return chosen

  def finish(self, end_seconds: float) -> list[int]:
    if self._previous is None:
      return []
    total = num_target_frames(end_seconds - self.start_seconds, self.fps)
    chosen = [self._previous[0]] * max(0, total - self.num_emitted)
    self.num_emitted += len(chosen)
    return chosen


def select_nearest_frames(
    frame_times: Iterable[float], fps: float, start_seconds: float, end_seconds: float
) -> list[int]:
  """`NearestFrameSelector` over a whole list of times in [start, end)."""
  selector = NearestFrameSelector(fps, start_seconds)
  chosen = []
  total = num_target_frames(end_seconds - start_seconds, fps)
  for time in frame_times:
    chosen.extend(selector.push(time))
  chosen.extend(selector.finish(end_seconds))
  return chosen[:total]


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
  """JPEG bytes of one (H, W, 3) uint8 RGB frame."""
  if not 1 <= quality <= 100:
    raise ValueError(f"jpeg_quality must be in [1, 100], got {quality}.")
  if Image is not None:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.encode_jpeg(frame, quality=int(quality)).numpy()


def _stream_offset_seconds(stream: av.video.stream.VideoStream) -> float:
  if stream.start_time is None or stream.time_base is None:
    return 0.0
  return float(stream.start_time * stream.time_base)


def _frame_duration_seconds(frame: av.VideoFrame, stream, fallback: float) -> float:
  """Duration of one frame; used to know where the last frame ends."""
  if getattr(frame, "duration", None) and frame.time_base is not None:
    duration = float(frame.duration * frame.time_base)
    if duration > 0:
      return duration
  if stream.average_rate:
    return 1.0 / float(stream.average_rate)
  return fallback


def _decoded_frames(container, stream, offset: float) -> Iterator[tuple[float, av.VideoFrame]]:
  """(time in seconds from stream start, frame) in presentation order."""
  rate = float(stream.average_rate) if stream.average_rate else 0.0
  last_time = -math.inf
  for count, frame in enumerate(container.decode(stream)):
    if frame.time is not None:
      time = float(frame.time) - offset
    elif rate:
      time = count / rate  # containers without timestamps: assume constant rate.
    else:
      raise VideoDecodeError("frames carry no timestamps and the stream has no frame rate")
    if time <= last_time:  # a repeated or out-of-order timestamp; keep order monotonic.
      time = last_time + 1e-6
    last_time = time
    yield time, frame


@dataclasses.dataclass
class ClipInfo:
  """Filled in by `iter_video_frames`; `end_seconds` is known once iteration ends."""
  start_seconds: float = 0.0
  end_seconds: float = math.nan   # clip end actually used (clamped to the video's end).
  source_fps: float = 0.0         # the stream's average frame rate (0.0 if unknown).


def iter_video_frames(
    path: str,
    start_seconds: float | None = None,
    end_seconds: float | None = None,
    fps: float | None = None,
    short_side: int = 128,
    decode_threads: int = 1,
    info: ClipInfo | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
  """Yields (source timestamp, (H, W, 3) uint8 RGB frame) for [start, end) of `path`.

  Frames come one at a time, so a caller that encodes them at once never holds a long
  video in memory. Args as in `decode_video`; `info` receives the clip's timing.

  Raises:
    VideoDecodeError: the file is missing, not a video, corrupt, or has no frames in
      the requested interval.
  """
  start = float(start_seconds or 0.0)
  end = math.inf if end_seconds is None else float(end_seconds)
  if fps is not None and not fps > 0:
    raise ValueError(f"fps must be > 0 or None, got {fps}.")
  if start < 0:
    raise VideoDecodeError(f"clip start must be >= 0 s, got {start}")
  if end <= start:
    raise VideoDecodeError(f"clip end ({end} s) must be after its start ({start} s)")
  if not os.path.isfile(path):
    raise VideoDecodeError("file not found")
  info = info if info is not None else ClipInfo()
  info.start_seconds = start
  try:
    yield from _iter_frames(path, start, end, fps, short_side, decode_threads, info,
                            seek=start > 0)
  except VideoDecodeError:
    raise
  except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as error:
    raise VideoDecodeError(f"{type(error).__name__}: {error}") from error


def decode_video(
    path: str,
    start_seconds: float | None = None,
    end_seconds: float | None = None,
    fps: float | None = None,
    short_side: int = 128,
    decode_threads: int = 1,
) -> DecodedVideo:
  """Decodes [start, end) of the first video stream of `path` into RGB frames.

  Args:
    path: the video file.
    start_seconds: clip start; None or 0 means the beginning.
    end_seconds: clip end; None means the end of the video.
    fps: resample to this frame rate (nearest frame per target time); None keeps every
      source frame.
    short_side: resize so the short side has this many pixels (even); <= 0 keeps size.
    decode_threads: codec threads; 0 lets FFmpeg choose (use 1 with many processes).

  Raises:
    VideoDecodeError: as `iter_video_frames`.
  """
  info = ClipInfo()
  picked = list(iter_video_frames(path, start_seconds, end_seconds, fps, short_side,
                                  decode_threads, info))
  return DecodedVideo(
      frames=np.stack([frame for _, frame in picked]),
      frame_times=np.asarray([time for time, _ in picked], np.float64),
      source_fps=info.source_fps, start_seconds=info.start_seconds,
      end_seconds=info.end_seconds)


def _iter_frames(path, start, end, fps, short_side, decode_threads, info: ClipInfo,
                 seek: bool) -> Iterator[tuple[float, np.ndarray]]:
  with av.open(path) as container:
    if not container.streams.video:
      raise VideoDecodeError("no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = decode_threads
    if decode_threads != 1:
      stream.thread_type = "AUTO"
    offset = _stream_offset_seconds(stream)
    info.source_fps = float(stream.average_rate) if stream.average_rate else 0.0
    if seek:
      try:
        container.seek(int((start + offset) / stream.time_base), stream=stream,
                       backward=True, any_frame=False)
      except av.error.FFmpegError:
        seek = False  # unseekable: decode from the beginning, dropping early frames.

    shape: tuple[int, int] | None = None
    cached: tuple[int, np.ndarray] | None = None  # a frame picked several times.

    def to_rgb(index: int, frame: av.VideoFrame) -> np.ndarray:
      nonlocal shape, cached
      if cached is not None and cached[0] == index:
        return cached[1]
      if shape is None:  # every frame gets the first frame's output size.
        shape = resized_shape(frame.height, frame.width, short_side)
      height, width = shape
      shrinking = height * width < frame.height * frame.width
      rgb = frame.reformat(width=width, height=height, format="rgb24",
                           interpolation="AREA" if shrinking else "BICUBIC",
                           threads=1).to_ndarray()
      cached = (index, rgb)
      return rgb

    selector = NearestFrameSelector(fps, start) if fps is not None else None
    num_picked = 0
    # The newest two in-clip frames: all a streaming nearest-frame choice can pick.
    recent: list[tuple[int, float, av.VideoFrame]] = []
    first = True
    for time, frame in _decoded_frames(container, stream, offset):
      if first and seek and time > start + _TIME_TOLERANCE:
        # The seek landed after the clip start (a bad index): decode from the beginning.
        yield from _iter_frames(path, start, end, fps, short_side, decode_threads, info,
                                seek=False)
        return
      first = False
      if time < start - _TIME_TOLERANCE:
        continue
      if time >= end:
        break
      index = recent[-1][0] + 1 if recent else 0
      recent = recent[-1:] + [(index, time, frame)]
      if selector is None:
        num_picked += 1
        yield time, to_rgb(index, frame)
        continue
      for chosen in selector.push(time):
        _, chosen_time, chosen_frame = next(r for r in recent if r[0] == chosen)
        num_picked += 1
        yield chosen_time, to_rgb(chosen, chosen_frame)
    if not recent:
      shown_end = "end" if math.isinf(end) else f"{end:.3f}"
      raise VideoDecodeError(f"no frames in [{start:.3f}, {shown_end}) s")
    last_index, last_time, last_frame = recent[-1]
    video_end = last_time + _frame_duration_seconds(last_frame, stream, 1.0 / (fps or 25.0))
    info.end_seconds = min(end, video_end)
    if selector is not None:
      for _ in selector.finish(info.end_seconds):
        num_picked += 1
        yield last_time, to_rgb(last_index, last_frame)
  if not num_picked:
    raise VideoDecodeError(
        f"no frames selected at {fps} fps in [{start:.3f}, {info.end_seconds:.3f}) s")
