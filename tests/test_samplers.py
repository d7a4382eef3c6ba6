"""Sampler index arithmetic (TF ops) against straightforward NumPy references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tcvm_jax.data import samplers


# --- NumPy references, written from the definitions, element by element ---------------


def ref_dense(n: int, start: int, num_frames: int, stride: int, mode: str) -> np.ndarray:
  out = []
  for i in range(num_frames):
    index = start + i * stride
    if index >= n:
      index = index % n if mode == "loop" else n - 1
    out.append(index)
  return np.array(out)


def ref_max_start(n: int, num_frames: int, stride: int) -> int:
  return max(0, n - ((num_frames - 1) * stride + 1))


def ref_uniform_starts(n: int, num_clips: int, num_frames: int, stride: int) -> np.ndarray:
  max_start = ref_max_start(n, num_frames, stride)
  if num_clips == 1:
    return np.array([max_start // 2])
  return np.floor(np.linspace(0, max_start, num_clips) + 0.5).astype(np.int64)


def ref_tsn(n: int, num_frames: int, u: np.ndarray | None) -> np.ndarray:
  out = []
  for i in range(num_frames):
    begin, end = (i * n) // num_frames, ((i + 1) * n) // num_frames
    length = max(end - begin, 1)
    offset = length // 2 if u is None else min(int(np.floor(u[i] * length)), length - 1)
    out.append(begin + offset)
  return np.array(out)


def ref_crops(h: int, w: int, size: int, num_crops: int) -> np.ndarray:
  free_y, free_x = max(h - size, 0), max(w - size, 0)
  centre = (free_y // 2, free_x // 2)
  if num_crops == 1:
    return np.array([centre])
  if w >= h:
    return np.array([(free_y // 2, 0), centre, (free_y // 2, free_x)])
  return np.array([(0, free_x // 2), centre, (free_y, free_x // 2)])


# --- Tests ----------------------------------------------------------------------------


def test_dense_indices_match_reference_over_a_grid():
  for n, num_frames, stride, mode in itertools.product(
      (1, 2, 5, 16, 31, 32, 63, 64, 100), (1, 4, 8, 16, 32), (1, 2, 3), ("loop", "pad")):
    max_start = ref_max_start(n, num_frames, stride)
    assert int(samplers.max_dense_start(n, num_frames, stride)) == max_start
    for start in sorted({0, max_start // 2, max_start}):
      got = samplers.dense_indices(n, start, num_frames, stride, mode).numpy()
      np.testing.assert_array_equal(got, ref_dense(n, start, num_frames, stride, mode),
                                    err_msg=f"n={n} T={num_frames} s={stride} {mode}")
      assert got.min() >= 0 and got.max() < n


def test_paper_setting_32_frames_stride_2():
  # 32 frames at stride 2 span 63 frames; a 300-frame video allows starts 0..237.
  got = samplers.dense_indices(300, 10, 32, 2).numpy()
  np.testing.assert_array_equal(got, np.arange(10, 10 + 64, 2))
  assert int(samplers.max_dense_start(300, 32, 2)) == 237
  # A 40-frame video is shorter than the span: loop wraps, pad repeats the last frame.
  np.testing.assert_array_equal(samplers.dense_indices(40, 0, 32, 2, "loop").numpy(),
                                np.arange(0, 64, 2) % 40)
  np.testing.assert_array_equal(samplers.dense_indices(40, 0, 32, 2, "pad").numpy(),
                                np.minimum(np.arange(0, 64, 2), 39))


def test_random_dense_start_is_uniform_over_the_valid_range():
  n, num_frames, stride = 20, 4, 3  # span 10 -> starts 0..10
  starts = [int(samplers.random_dense_start(n, num_frames, stride, tf.constant([7, s])))
            for s in range(400)]
  assert min(starts) == 0 and max(starts) == 10
  counts = np.bincount(starts, minlength=11)
  assert counts.min() > 400 / 11 / 3  # every start is reachable, roughly evenly
  # Stateless: the same seed gives the same start; videos shorter than the span start at 0.
  assert int(samplers.random_dense_start(n, num_frames, stride, tf.constant([7, 3]))) == starts[3]
  assert int(samplers.random_dense_start(5, num_frames, stride, tf.constant([1, 2]))) == 0


def test_random_dense_indices_are_a_strided_run_from_a_valid_start():
  for seed in range(20):
    got = samplers.random_dense_indices(100, 8, 2, tf.constant([seed, 1])).numpy()
    assert 0 <= got[0] <= ref_max_start(100, 8, 2)
    np.testing.assert_array_equal(got, ref_dense(100, got[0], 8, 2, "loop"))


def test_uniform_clip_starts_and_indices():
  for n, num_clips, num_frames, stride in itertools.product(
      (1, 10, 37, 64, 65, 300), (1, 2, 3, 5, 10), (4, 8, 32), (1, 2)):
    starts = samplers.uniform_clip_starts(n, num_clips, num_frames, stride).numpy()
    np.testing.assert_array_equal(starts, ref_uniform_starts(n, num_clips, num_frames, stride))
    indices = samplers.uniform_clip_indices(n, num_clips, num_frames, stride, "pad").numpy()
    assert indices.shape == (num_clips, num_frames)
    for clip, start in enumerate(starts):
      np.testing.assert_array_equal(indices[clip], ref_dense(n, start, num_frames, stride, "pad"))
  # 10 clips over 300 frames at 32x2: first starts at 0, last ends at the last frame.
  indices = samplers.uniform_clip_indices(300, 10, 32, 2).numpy()
  assert indices[0, 0] == 0 and indices[-1, -1] == 299


def test_tsn_indices_match_reference():
  rng = np.random.default_rng(0)
  for n, num_frames in itertools.product((1, 3, 7, 8, 16, 17, 100, 301), (1, 4, 8, 16)):
    np.testing.assert_array_equal(samplers.tsn_indices(n, num_frames).numpy(),
                                  ref_tsn(n, num_frames, None))
    u = rng.random(num_frames)
    u[0] = 0.0
    got = samplers.tsn_indices(n, num_frames, tf.constant(u)).numpy()
    np.testing.assert_array_equal(got, ref_tsn(n, num_frames, u))
    assert np.all(np.diff(got) >= 0) and got.min() >= 0 and got.max() < n
    if n >= num_frames:  # one frame from each segment: all distinct
      assert len(set(got.tolist())) == num_frames


def test_random_tsn_draws_cover_each_segment():
  n, num_frames = 40, 4  # segments of 10 frames
  draws = np.stack([samplers.random_tsn_indices(n, num_frames, tf.constant([3, s])).numpy()
                    for s in range(200)])
  for segment in range(num_frames):
    assert set(draws[:, segment].tolist()) == set(range(10 * segment, 10 * segment + 10))


def test_train_and_eval_dispatch():
  seed = tf.constant([1, 2])
  dense = samplers.train_frame_indices(50, sampler="dense", num_frames=8, stride=2,
                                       short_video="loop", seed=seed).numpy()
  np.testing.assert_array_equal(dense, samplers.random_dense_indices(50, 8, 2, seed).numpy())
  tsn = samplers.train_frame_indices(50, sampler="tsn", num_frames=8, stride=2,
                                     short_video="loop", seed=seed).numpy()
  np.testing.assert_array_equal(tsn, samplers.random_tsn_indices(50, 8, seed).numpy())
  tsn_eval = samplers.eval_frame_indices(50, sampler="tsn", num_clips=1, num_frames=8, stride=2,
                                         short_video="loop").numpy()
  np.testing.assert_array_equal(tsn_eval, ref_tsn(50, 8, None)[None])


def test_crop_offsets_match_reference():
  for (h, w), size, num_crops in itertools.product(
      ((128, 160), (160, 128), (128, 128), (112, 300), (64, 64)), (64, 112, 128), (1, 3)):
    got = samplers.crop_offsets(h, w, size, num_crops).numpy()
    np.testing.assert_array_equal(got, ref_crops(h, w, size, num_crops))
    assert np.all(got >= 0) and np.all(got[:, 0] + size <= max(h, size))
    assert np.all(got[:, 1] + size <= max(w, size))


def test_random_crop_offset_covers_every_window():
  offsets = np.stack([samplers.random_crop_offset(6, 9, 4, tf.constant([0, s])).numpy()
                      for s in range(300)])
  assert set(offsets[:, 0].tolist()) == set(range(3))
  assert set(offsets[:, 1].tolist()) == set(range(6))


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match="config.data.frame_stride"):
    samplers.dense_indices(10, 0, 4, 0)
  with pytest.raises(ValueError, match="config.data.short_video"):
    samplers.dense_indices(10, 0, 4, 1, "wrap")
  with pytest.raises(ValueError, match="config.data.sampler"):
    samplers.train_frame_indices(10, sampler="i3d", num_frames=4, stride=1,
                                 short_video="loop", seed=tf.constant([0, 0]))
  with pytest.raises(ValueError, match="num_crops"):
    samplers.crop_offsets(10, 10, 4, 2)
  with pytest.raises(ValueError, match="num_clips"):
    samplers.uniform_clip_starts(10, 0, 4, 1)
