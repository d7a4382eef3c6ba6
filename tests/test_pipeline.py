"""The tf.data pipeline on small hand-written DMVR shards whose pixels encode their origin.

Frame f of a video is flat grey 8 * f + 4 + 80 * b in 16-px column block b (JPEG keeps
flat 8x8 blocks almost exactly), so a decoded pixel tells which frame, and which part of
the frame, the pipeline delivered.
"""

from __future__ import annotations

import importlib.util
import json
import logging as py_logging
import os

import numpy as np
import pytest
import tensorflow as tf

from configs import pretrain
from tcvm_jax.data import dmvr_format, pipeline, samplers

BLOCK = 16
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frame_jpeg(frame_index: int, height: int, width: int) -> bytes:
  blocks = np.arange(width) // BLOCK
  row = 8 * frame_index + 4 + 80 * blocks
  image = np.broadcast_to(row[None, :, None], (height, width, 3)).astype(np.uint8)
  return tf.io.encode_jpeg(image, quality=95).numpy()


def decode_frame_indices(video: np.ndarray, block: int = 0) -> np.ndarray:
  """(T,) frame index per frame from the top-left pixel, given its column block."""
  values = video[:, 0, 0, 0].astype(np.int64) - 80 * block
  return values // 8


def write_shards(directory, videos_per_shard: list[list[int]], *, height: int = 16,
                 width: int = 16, prefix: str = "train") -> dict[int, tuple[int, int]]:
  """Writes shards; videos_per_shard[s] lists frame counts. Returns {video_index: (n, label)}."""
  os.makedirs(directory, exist_ok=True)
  num_shards = len(videos_per_shard)
  truth = {}
  for shard, frame_counts in enumerate(videos_per_shard):
    path = os.path.join(directory, f"{prefix}-{shard:05d}-of-{num_shards:05d}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
      for record, n in enumerate(frame_counts):
        label = (shard * 7 + record) % 5
        jpegs = [frame_jpeg(f, height, width) for f in range(n)]
        writer.write(dmvr_format.make_sequence_example(
            jpegs, label, f"class{label}", f"s{shard}r{record}").SerializeToString())
        truth[shard * pipeline.VIDEO_INDEX_STRIDE + record] = (n, label)
  return truth


def make_config(directory, *, num_frames=4, stride=2, input_size=16, sampler="dense",
                short_video="loop", shuffle_buffer=8, max_bad=0.0):
  config = pretrain.get_config("demo")
  config.data.name = "tfrecord"
  config.data.train_pattern = os.path.join(str(directory), "train-*.tfrecord")
  config.data.num_frames = num_frames
  config.data.frame_stride = stride
  config.data.input_size = input_size
  config.data.sampler = sampler
  config.data.short_video = short_video
  config.data.shuffle_buffer = shuffle_buffer
  config.data.max_bad_record_fraction = max_bad
  return config


def take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
  directory = tmp_path_factory.mktemp("shards")
  # 5 shards, 14 videos, lengths from 3 (shorter than a 4x2 clip: loops) to 20.
  truth = write_shards(directory, [[12, 3, 20], [9, 15], [7, 11, 5], [20, 6], [10, 13, 8, 4]])
  return directory, truth


def test_train_batches_have_the_contract_dtypes_shapes_and_dense_clips(small_shards):
  directory, truth = small_shards
  config = make_config(directory)
  iterator = pipeline.make_train_dataset(config, batch_size_per_process=5, seed=0)
  assert iterator.records_per_epoch == len(truth)
  seen = set()
  for batch in take(iterator, 6):  # 30 clips: more than two epochs
    assert set(batch) == {"video", "label", "video_index"}
    assert batch["video"].dtype == np.uint8 and batch["video"].shape == (5, 4, 16, 16, 3)
    assert batch["label"].dtype == np.int32 and batch["video_index"].dtype == np.int64
    for video, label, video_index in zip(batch["video"], batch["label"], batch["video_index"]):
      n, true_label = truth[int(video_index)]
      assert label == true_label
      indices = decode_frame_indices(video)
      start = indices[0]
      assert 0 <= start <= max(0, n - 7)
      np.testing.assert_array_equal(indices, (start + 2 * np.arange(4)) % n)
      seen.add(int(video_index))
  assert seen == set(truth)  # every video shows up within two epochs


def test_tsn_and_pad_settings_reach_the_output(small_shards):
  directory, truth = small_shards
  config = make_config(directory, num_frames=4, sampler="tsn")
  batch = next(pipeline.make_train_dataset(config, batch_size_per_process=14, seed=3))
  for video, video_index in zip(batch["video"], batch["video_index"]):
    n = truth[int(video_index)][0]
    indices = decode_frame_indices(video)
    bounds = [(i * n // 4, max((i + 1) * n // 4, i * n // 4 + 1)) for i in range(4)]
    assert all(lo <= index < hi for index, (lo, hi) in zip(indices, bounds))
  config = make_config(directory, num_frames=4, stride=2, short_video="pad")
  batch = next(pipeline.make_train_dataset(config, batch_size_per_process=14, seed=3))
  for video, video_index in zip(batch["video"], batch["video_index"]):
    n = truth[int(video_index)][0]
    if n < 7:
      np.testing.assert_array_equal(decode_frame_indices(video),
                                    np.minimum(2 * np.arange(4), n - 1))


def test_same_seed_same_batches_other_seed_other_batches(small_shards):
  directory, _ = small_shards
  config = make_config(directory)
  first = take(pipeline.make_train_dataset(config, batch_size_per_process=4, seed=5), 4)
  again = take(pipeline.make_train_dataset(config, batch_size_per_process=4, seed=5), 4)
  other = take(pipeline.make_train_dataset(config, batch_size_per_process=4, seed=6), 4)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a["video_index"], c["video_index"])
             or not np.array_equal(a["video"], c["video"]) for a, c in zip(first, other))


def test_resume_at_a_step_continues_the_same_stream(small_shards):
  directory, _ = small_shards
  config = make_config(directory)
  fresh = take(pipeline.make_train_dataset(config, batch_size_per_process=4, seed=2), 7)
  # Step 5 starts in the second epoch (14 records per epoch, 20 consumed).
  resumed = take(pipeline.make_train_dataset(config, batch_size_per_process=4, seed=2,
                                             start_step=5), 2)
  for a, b in zip(fresh[5:], resumed):
    np.testing.assert_array_equal(a["video_index"], b["video_index"])
    np.testing.assert_array_equal(a["video"], b["video"])


@pytest.mark.parametrize("frame_counts", [
    [[5, 6, 7], [8, 9], [4, 5, 6], [7], [3, 3]],   # 5 files > 3 processes: files split
    [[5, 6, 7, 8, 9, 4, 5], [6, 7, 3, 3]],          # 2 files < 3 processes: records split
])
def test_processes_cover_every_record_exactly_once(tmp_path, frame_counts):
  truth = write_shards(tmp_path, frame_counts)
  config = make_config(tmp_path)
  process_count = 3
  train_sets, eval_lists, eval_batches = [], [], []
  for process in range(process_count):
    train = pipeline.make_train_dataset(config, process_index=process,
                                        process_count=process_count,
                                        batch_size_per_process=1, seed=0)
    epoch = take(train, train.records_per_epoch)  # exactly one epoch of this process
    indices = [int(b["video_index"][0]) for b in epoch]
    assert len(set(indices)) == len(indices)
    train_sets.append(set(indices))
    evaluation = pipeline.make_eval_dataset(config, "train", batch_size_per_process=2,
                                            process_index=process,
                                            process_count=process_count)
    batches = list(evaluation)
    eval_batches.append(len(batches))
    eval_lists.append([int(i) for b in batches for i in b["video_index"][b["mask"]]])
  assert sum(len(s) for s in train_sets) == len(truth)
  assert set().union(*train_sets) == set(truth)
  all_eval = [i for found in eval_lists for i in found]
  assert sorted(all_eval) == sorted(truth)  # none dropped, none duplicated
  assert len(set(eval_batches)) == 1  # every process runs the same number of eval steps
  for process in range(process_count):
    assert set(eval_lists[process]) == train_sets[process]


def test_eval_views_clips_crops_and_padding(tmp_path):
  truth = write_shards(tmp_path, [[9, 5], [7]], width=48, prefix="test")  # values < 80
  config = make_config(tmp_path, num_frames=3, stride=2)
  evaluation = pipeline.make_eval_dataset(config, "test", batch_size_per_process=4,
                                          num_clips=2, num_crops=3)
  batches = list(evaluation)
  assert len(batches) == evaluation.num_batches == 5  # 3 videos x 6 views = 18 -> 5 x 4
  views = {}
  for batch in batches:
    assert batch["video"].shape == (4, 3, 16, 16, 3) and batch["mask"].dtype == bool
    for j in range(4):
      if not batch["mask"][j]:
        assert batch["video_index"][j] == -1 and batch["label"][j] == -1
        continue
      key = (int(batch["video_index"][j]), int(batch["view_index"][j]))
      assert key not in views
      views[key] = batch["video"][j]
      assert batch["label"][j] == truth[key[0]][1]
  assert len(views) == 18
  for (video_index, view), video in views.items():
    n = truth[video_index][0]
    clip, crop = divmod(view, 3)
    # Landscape 16x48 frames: crops at x = 0, 16, 32, i.e. column blocks 0, 1, 2.
    expected = samplers.uniform_clip_indices(n, 2, 3, 2).numpy()[clip]
    np.testing.assert_array_equal(decode_frame_indices(video, block=crop), expected)
    assert np.all(video[..., 0] // 80 == crop)  # the whole window inside one block


def test_small_frames_are_resized_up_with_one_warning(tmp_path, caplog):
  write_shards(tmp_path, [[6, 6, 6]], height=16, width=16)
  config = make_config(tmp_path, num_frames=2, input_size=24)
  iterator = pipeline.make_train_dataset(config, batch_size_per_process=3, seed=0)
  with caplog.at_level(py_logging.WARNING):
    batches = take(iterator, 2)
  assert batches[0]["video"].shape == (3, 2, 24, 24, 3)
  assert sum("input_size=24" in r.getMessage() for r in caplog.records) == 1


def write_bad_shard(directory) -> dict[str, int]:
  """Good videos around four bad ones; returns {kind: record index}."""
  good = dmvr_format.make_sequence_example([frame_jpeg(f, 16, 16) for f in range(6)], 1,
                                           "class1", "good")
  undecodable = dmvr_format.make_sequence_example(
      [frame_jpeg(0, 16, 16)] + [b"\xff\xd8 not a jpeg"] * 5, 1, "class1", "bad_jpeg")
  missing_key = tf.train.SequenceExample()
  missing_key.context.feature[dmvr_format.LABEL_INDEX_KEY].int64_list.value.append(1)
  empty = dmvr_format.make_sequence_example([], 1, "class1", "empty")
  records = [good.SerializeToString()] * 3 + [
      b"\x0a\xff\xff corrupt protobuf", undecodable.SerializeToString(),
      missing_key.SerializeToString(), empty.SerializeToString()] + [
      good.SerializeToString()] * 3
  with tf.io.TFRecordWriter(os.path.join(directory, "train-00000-of-00001.tfrecord")) as w:
    for record in records:
      w.write(record)
  return {"corrupt": 3, "jpeg": 4, "missing_key": 5, "empty": 6}


def test_bad_records_are_counted_logged_and_skipped(tmp_path):
  bad = write_bad_shard(tmp_path)
  config = make_config(tmp_path, num_frames=2, max_bad=0.5)
  evaluation = pipeline.make_eval_dataset(config, "train", batch_size_per_process=4)
  batches = list(evaluation)
  found = sorted(int(i) for b in batches for i in b["video_index"][b["mask"]])
  assert found == [0, 1, 2, 7, 8, 9]  # only the good ones, once each
  tracker = evaluation.tracker
  assert tracker.num_bad == 4 and tracker.num_good == 6
  reasons = {record: why for _, record, why in tracker.bad_records}
  assert set(reasons) == set(bad.values())
  assert all(path.endswith("train-00000-of-00001.tfrecord")
             for path, _, _ in tracker.bad_records)
  assert reasons[bad["corrupt"]] == pipeline.REASONS[pipeline.UNPARSEABLE]
  assert reasons[bad["missing_key"]] == pipeline.REASONS[pipeline.UNPARSEABLE]
  assert reasons[bad["jpeg"]] == pipeline.REASONS[pipeline.UNDECODABLE]
  assert reasons[bad["empty"]] == pipeline.REASONS[pipeline.EMPTY]
  # Training skips them too: never a bad index in a batch.
  train = pipeline.make_train_dataset(config, batch_size_per_process=4, seed=0)
  for batch in take(train, 6):
    assert not set(batch["video_index"].tolist()) & set(bad.values())


def test_too_many_bad_records_fail_with_a_way_to_inspect(tmp_path):
  write_bad_shard(tmp_path)
  config = make_config(tmp_path, num_frames=2, max_bad=0.1)  # 4 of 10 are bad
  with pytest.raises(RuntimeError, match=r"check_tfrecords\.py --input=.*train-\*\.tfrecord"):
    list(pipeline.make_eval_dataset(config, "train", batch_size_per_process=2))
  with pytest.raises(RuntimeError, match="max_bad_record_fraction=0.1"):
    take(pipeline.make_train_dataset(config, batch_size_per_process=2, seed=0), 5)


def test_all_bad_records_fail_instead_of_waiting_forever(tmp_path):
  empty = dmvr_format.make_sequence_example([], 1, "class1", "empty").SerializeToString()
  with tf.io.TFRecordWriter(os.path.join(tmp_path, "train-00000-of-00001.tfrecord")) as w:
    for _ in range(4):
      w.write(empty)
  config = make_config(tmp_path, num_frames=2, max_bad=0.5)
  with pytest.raises(RuntimeError, match=r"(\d+) of \1 records read were bad \(100.00%\)"):
    next(pipeline.make_train_dataset(config, batch_size_per_process=2, seed=0))


def test_record_counts_from_framing_and_manifest(tmp_path):
  write_shards(tmp_path, [[3, 4, 5], [6]])
  pattern = os.path.join(str(tmp_path), "train-*.tfrecord")
  files = pipeline.list_shards(pattern)
  assert [pipeline.count_tfrecords(f) for f in files] == [3, 1]
  assert pipeline.num_records(pattern) == 4
  assert pipeline.num_train_records(make_config(tmp_path)) == 4
  assert pipeline.steps_per_epoch(make_config(tmp_path), global_batch_size=3) == 1
  # A converter manifest beside the shards is trusted, so nothing needs to be read.
  manifest = {"shard_sets": {"train": {"shards": [
      {"file": os.path.basename(files[0]), "num_videos": 30},
      {"file": os.path.basename(files[1]), "num_videos": 10}]}}}
  with open(os.path.join(str(tmp_path), "manifest.json"), "w") as f:
    json.dump(manifest, f)
  assert pipeline.num_records(pattern) == 40
  with open(files[1], "r+b") as f:  # a truncated file is reported, not miscounted
    f.truncate(os.path.getsize(files[1]) - 3)
  with pytest.raises(ValueError, match="truncated"):
    pipeline.count_tfrecords(files[1])


def test_video_index_and_patterns(tmp_path):
  assert pipeline.split_video_index(3 * pipeline.VIDEO_INDEX_STRIDE + 17) == (3, 17)
  config = make_config(tmp_path)
  assert pipeline.split_pattern(config, "test") == os.path.join(str(tmp_path),
                                                                "test-*.tfrecord")
  with pytest.raises(FileNotFoundError, match="make_tfrecords.py"):
    pipeline.list_shards(os.path.join(str(tmp_path), "nothing-*.tfrecord"))
  with pytest.raises(ValueError, match="process_index"):
    pipeline.plan_shards(["a"], [1], 3, 3)


def test_ucf101_tfds_missing_gives_conversion_hint(tmp_path):
  from tcvm_jax.data import tfds_ucf101
  with pytest.raises(FileNotFoundError, match="make_tfrecords.py --format=ucf101"):
    tfds_ucf101.make_ucf101_dataset(make_config(tmp_path), "train", data_dir=str(tmp_path),
                                    batch_size_per_process=2)


def noise_jpeg(height: int, width: int, seed: int, chroma_downsampling: bool) -> bytes:
  """A JPEG of uniform noise: every 8x8 block and chroma sample differs (worst case)."""
  image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(image, quality=90, chroma_downsampling=chroma_downsampling).numpy()


@pytest.mark.parametrize("chroma_downsampling", [True, False])  # 16 / 8 px MCUs
def test_train_crop_gives_the_pixels_of_a_plain_cropped_decode(chroma_downsampling):
  # 24x77 frames, 16 px windows: y in [0, 8], x in [0, 61], mostly off the MCU grid.
  frames = tf.constant([noise_jpeg(24, 77, f, chroma_downsampling) for f in range(3)])
  indices = tf.constant([2, 0, 1, 2], tf.int64)
  offsets_seen = set()
  for step in range(24):
    seed = tf.constant([step, 11], tf.int64)
    video, upscaled = pipeline._decode_train_clip(frames, indices, 16, seed, 4)
    y, x = samplers.random_crop_offset(24, 77, 16, seed).numpy().tolist()
    offsets_seen.add((y > 0, x % 16))
    assert video.shape == (4, 16, 16, 3) and not upscaled
    for position, index in enumerate(indices.numpy()):
      expected = tf.io.decode_and_crop_jpeg(frames[index], [y, x, 16, 16], channels=3)
      np.testing.assert_array_equal(video[position], expected)
  assert len({shift for _, shift in offsets_seen}) >= 8  # many positions off the grid
  assert {below_top for below_top, _ in offsets_seen} == {False, True}


def test_train_windows_start_at_any_column(tmp_path):
  # 16x48 frames (column blocks 0-2), 16 px windows: x anywhere in [0, 32].
  truth = write_shards(tmp_path, [[6] * 8], width=48)
  config = make_config(tmp_path, num_frames=2, stride=1)
  starts = set()
  for batch in take(pipeline.make_train_dataset(config, batch_size_per_process=8, seed=1), 4):
    for video, video_index in zip(batch["video"], batch["video_index"]):
      block_of_column = video[0, 0, :, 0].astype(np.int64) // 80  # pixel = 8f + 4 + 80b
      first_change = np.flatnonzero(np.diff(block_of_column))
      x = 16 * block_of_column[0] + (15 - first_change[0] if len(first_change) else 0)
      assert 0 <= x <= 32
      # One window for the whole clip, each of its columns in place.
      np.testing.assert_array_equal(video[..., 0] // 80,
                                    np.broadcast_to((x + np.arange(16)) // 16, (2, 16, 16)))
      frame_of_pixel = video[..., 0] % 80 // 8
      n = truth[int(video_index)][0]
      start = frame_of_pixel[0, 0, 0]
      np.testing.assert_array_equal(frame_of_pixel,
                                    np.broadcast_to(((start + np.arange(2)) % n)[:, None, None],
                                                    (2, 16, 16)))
      starts.add(int(x))
  assert len({x % 16 for x in starts}) >= 6  # windows off the 16 px MCU grid came through


def load_throughput_script():
  spec = importlib.util.spec_from_file_location(
      "input_throughput", os.path.join(REPO_ROOT, "scripts", "input_throughput.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_throughput_script_reports_consistent_figures(tmp_path, capsys):
  write_shards(tmp_path, [[9, 7, 8], [6, 9]], width=48)
  script = load_throughput_script()
  code = script.main([
      f"--config={os.path.join(REPO_ROOT, 'configs', 'pretrain.py')}:demo",
      f"--pattern={os.path.join(str(tmp_path), 'train-*.tfrecord')}", "--num_frames=2",
      "--frame_stride=2", "--input_size=16", "--shuffle_buffer=4", "--batch_size=2",
      "--warmup=1", "--batches=3", "--repeats=2", "--json"])
  assert code == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["batch_shape"] == [2, 2, 16, 16, 3]
  assert result["clips_per_window"] == 6 and result["windows"] == 2
  assert result["records"] == 5 and result["frame_size"] == "16x48"
  assert result["bad_records"] == 0
  assert result["cores_available"] == len(os.sched_getaffinity(0))
  for name in ("clips_per_cpu_s", "clips_per_s"):
    spread = result[f"{name}_range"]
    assert spread["min"] <= result[name] <= spread["max"]
  assert result["cpu_ms_per_clip"] == pytest.approx(1e3 / result["clips_per_cpu_s"], rel=1e-2)
  assert result["clips_per_s_per_available_core"] == pytest.approx(
      result["clips_per_s"] / result["cores_available"], rel=1e-2)
  assert 0.0 < result["main_thread_cpu_share"] <= 1.0
  assert 0.0 <= result["system_cpu_share"] <= 1.0


def test_throughput_script_rejects_bad_frame_sizes(capsys):
  script = load_throughput_script()
  assert script.parse_frame_size("128x228") == (128, 228)
  for bad in ("128", "128x", "axb", "16x228"):
    with pytest.raises(ValueError, match="frame_size"):
      script.parse_frame_size(bad)
  assert script.main(["--frame_size=12x3"]) == 2
  assert "frame_size" in capsys.readouterr().err
