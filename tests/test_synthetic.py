"""The built-in synthetic motion dataset: determinism, balance, scene bias, motion."""

from __future__ import annotations

import collections
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from configs import pretrain
from tcvm_jax.data import dmvr_format, pipeline, synthetic

TINY = synthetic.SyntheticParams(**synthetic.TINY_PARAMS)


def shard_bytes(directory) -> dict[str, bytes]:
  return {os.path.basename(path): open(path, "rb").read()
          for path in sorted(glob.glob(os.path.join(directory, "*.tfrecord")))}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("synthetic") / "tiny")
  return synthetic.ensure_synthetic_dataset(directory, num_workers=1, verbose=False,
                                            **synthetic.TINY_PARAMS)


def read_records(directory, split):
  records = []
  for path in sorted(glob.glob(os.path.join(directory, f"{split}-*.tfrecord"))):
    for serialized in tf.data.TFRecordDataset(path):
      records.append(dmvr_format.parse_sequence_example(serialized))
  return records


def test_same_seed_same_bytes_any_worker_count_other_seed_differs(tiny_dir, tmp_path):
  two_workers = synthetic.generate_synthetic_dataset(str(tmp_path / "a"), TINY, num_workers=2,
                                                     verbose=False)
  assert shard_bytes(two_workers) == shard_bytes(tiny_dir)
  other = synthetic.generate_synthetic_dataset(
      str(tmp_path / "b"), synthetic.SyntheticParams(**{**synthetic.TINY_PARAMS, "seed": 1}),
      num_workers=1, verbose=False)
  first, second = shard_bytes(tiny_dir), shard_bytes(other)
  assert first.keys() == second.keys()
  assert all(first[name] != second[name] for name in first)


def test_records_labels_sizes_and_manifest_agree(tiny_dir):
  manifest = json.load(open(os.path.join(tiny_dir, "manifest.json")))
  metadata = json.load(open(os.path.join(tiny_dir, synthetic.METADATA_FILENAME)))
  assert dmvr_format.read_label_map(tiny_dir) == list(synthetic.MOTION_CLASSES)
  assert len(synthetic.MOTION_CLASSES) >= 10
  for split, expected_videos in (("train", TINY.num_train), ("test", TINY.num_test)):
    records = read_records(tiny_dir, split)
    assert len(records) == expected_videos == manifest["splits"][split]["num_videos"]
    labels = [int(r[dmvr_format.LABEL_INDEX_KEY]) for r in records]
    texts = [r[dmvr_format.LABEL_TEXT_KEY].numpy().decode() for r in records]
    assert texts == [synthetic.MOTION_CLASSES[label] for label in labels]
    assert labels == [video["label"] for video in metadata[split]]
    counts = collections.Counter(labels)
    assert max(counts.values()) - min(counts.get(c, 0) for c in range(12)) <= 1  # balanced
    assert manifest["splits"][split]["videos_per_class"] == {
        synthetic.MOTION_CLASSES[c]: counts.get(c, 0) for c in range(12)}
    frames = [int(tf.size(r[dmvr_format.IMAGE_KEY])) for r in records]
    assert all(TINY.min_frames <= n <= TINY.max_frames for n in frames)
    assert sum(frames) == manifest["splits"][split]["num_frames"]
    shards = manifest["shard_sets"][split]["shards"]
    assert sum(s["num_videos"] for s in shards) == expected_videos
    first = tf.io.decode_jpeg(records[0][dmvr_format.IMAGE_KEY][0]).numpy()
    assert first.shape == (TINY.height, TINY.width, 3)


def test_scene_bias_in_train_and_independence_in_test():
  params = synthetic.SyntheticParams(num_train=2400, num_test=2400, scene_bias=0.8)
  num_classes = len(synthetic.MOTION_CLASSES)

  def best_guess_accuracy(feature, labels):
    """Accuracy of predicting the class by the majority class of each feature value."""
    table = collections.defaultdict(collections.Counter)
    for value, label in zip(feature, labels):
      table[value][label] += 1
    return sum(max(c.values()) for c in table.values()) / len(labels)

  for split in ("train", "test"):
    specs = synthetic.sample_video_specs(params, split)
    labels = [s.label for s in specs]
    own = np.mean([s.background == synthetic.own_background(s.label) for s in specs])
    background_accuracy = best_guess_accuracy([s.background for s in specs], labels)
    if split == "train":
      assert abs(own - 0.8) < 0.03
      assert background_accuracy > 0.75  # the scene is a shortcut in train...
    else:
      assert abs(own - 1 / len(synthetic.BACKGROUND_FILES)) < 0.03
      assert background_accuracy < 1.6 / num_classes  # ...and useless in test
    # Appearance never carries the class, in either split.
    for feature in ([s.shape for s in specs], [s.texture for s in specs],
                    [int(s.radius_fraction * 50) for s in specs],
                    [s.num_frames for s in specs]):
      assert best_guess_accuracy(feature, labels) < 1.6 / num_classes
  unbiased = synthetic.SyntheticParams(num_train=600, scene_bias=0.0)
  assert not any(s.background == synthetic.own_background(s.label)
                 for s in synthetic.sample_video_specs(unbiased, "train"))


def test_motion_defines_the_class_and_stays_in_frame():
  rng = np.random.default_rng(0)
  height, width, radius, frames = 64, 80, 8.0, 24
  for name in synthetic.MOTION_CLASSES:
    for _ in range(20):
      centres, scales, angles = synthetic.motion_trajectory(name, rng, frames, height, width,
                                                            radius)
      extent = 1.25 * radius * scales[:, None]  # half-size of the drawn object
      assert np.all(centres - extent >= -1e-6)
      assert np.all(centres + extent <= np.array([width, height]) + 1e-6)
      dx, dy = np.diff(centres, axis=0).T
      moving = not np.allclose(np.diff(centres, axis=0), 0)
      if name == "move_left":
        assert np.all(dx < 0) and np.allclose(dy, 0) and np.allclose(dx, dx[0])
      elif name == "move_right":
        assert np.all(dx > 0) and np.allclose(dy, 0)
      elif name == "move_up":
        assert np.all(dy < 0) and np.allclose(dx, 0)
      elif name == "move_down":
        assert np.all(dy > 0) and np.allclose(dx, 0)
      elif name == "move_diagonal":
        assert np.allclose(np.abs(dx), np.abs(dy)) and np.all(np.abs(dx) > 0)
      elif name == "accelerate":
        speed = np.hypot(dx, dy)
        assert np.all(np.diff(speed) > 0)
      elif name == "still_then_move":
        speed = np.hypot(dx, dy)
        assert speed[0] == 0 and speed[-1] > 0
      elif name == "oscillate":
        along = dx if abs(dx).sum() > abs(dy).sum() else dy
        assert np.sum(np.diff(np.sign(along[np.abs(along) > 1e-9])) != 0) >= 2  # turns back
      elif name in ("rotate_cw", "rotate_ccw"):
        assert not moving and np.allclose(scales, 1)
        turns = np.diff(angles)
        assert np.all(turns > 0) if name == "rotate_cw" else np.all(turns < 0)
      elif name in ("zoom_in", "zoom_out"):
        assert not moving
        growth = np.diff(scales)
        assert np.all(growth > 0) if name == "zoom_in" else np.all(growth < 0)
        assert np.isclose(scales[frames // 2 - 1] * scales[frames // 2], 1, atol=0.1)
      if name not in ("rotate_cw", "rotate_ccw"):
        assert np.allclose(angles, angles[0])  # only rotation classes turn


def test_rendered_object_moves_over_a_drifting_background():
  params = synthetic.SyntheticParams(**synthetic.TINY_PARAMS)
  spec = next(s for s in synthetic.sample_video_specs(params, "test")
              if synthetic.MOTION_CLASSES[s.label] == "move_right")
  video = synthetic.render_video(spec, params)
  assert video.dtype == np.uint8 and video.shape == (spec.num_frames, 64, 80, 3)
  np.testing.assert_array_equal(video, synthetic.render_video(spec, params))
  assert not np.array_equal(video[0], video[-1])
  assert len(synthetic.BACKGROUND_FILES) >= len(synthetic.MOTION_CLASSES)
  backgrounds = synthetic.load_backgrounds(64, 80)
  assert len({b.tobytes()[:4096] for b in backgrounds}) == len(backgrounds)  # distinct


def test_ensure_reuses_regenerates_and_protects(tiny_dir, tmp_path):
  manifest = os.path.join(tiny_dir, "manifest.json")
  before = os.path.getmtime(manifest)
  assert synthetic.ensure_synthetic_dataset(tiny_dir, num_workers=1, verbose=False,
                                            **synthetic.TINY_PARAMS) == tiny_dir
  assert os.path.getmtime(manifest) == before  # matching fingerprint: nothing rewritten
  copy = str(tmp_path / "copy")
  synthetic.ensure_synthetic_dataset(copy, num_workers=1, verbose=False,
                                     **{**synthetic.TINY_PARAMS, "num_train": 12})
  first = synthetic.read_fingerprint(copy)
  synthetic.ensure_synthetic_dataset(copy, num_workers=1, verbose=False,
                                     **{**synthetic.TINY_PARAMS, "num_train": 13})
  assert synthetic.read_fingerprint(copy) != first
  assert json.load(open(os.path.join(copy, "manifest.json")))["splits"]["train"][
      "num_videos"] == 13
  foreign = tmp_path / "user_data"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="config.data.synthetic_dir"):
    synthetic.ensure_synthetic_dataset(str(foreign), num_workers=1, verbose=False,
                                       **synthetic.TINY_PARAMS)
  assert (foreign / "notes.txt").read_text() == "keep me"
  with pytest.raises(ValueError, match="scene_bias"):
    synthetic.SyntheticParams(scene_bias=1.5).validate()


def test_demo_config_reads_the_synthetic_dataset(tiny_dir):
  config = pretrain.get_config("demo")
  config.data.synthetic_dir = tiny_dir
  config.data.synthetic_params = dict(synthetic.TINY_PARAMS)
  assert pipeline.num_train_records(config) == TINY.num_train
  batch = next(pipeline.make_train_dataset(config, batch_size_per_process=4, seed=0))
  assert batch["video"].shape == (4, config.data.num_frames, config.data.input_size,
                                  config.data.input_size, 3)
  assert set(batch["label"].tolist()) <= set(range(len(synthetic.MOTION_CLASSES)))
