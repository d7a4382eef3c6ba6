"""The TFRecord checker: passes good shards, reports each kind of bad record by index."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tcvm_jax.data import check
from tcvm_jax.data import dmvr_format
from tcvm_jax.data import video_decode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["jumping", "running", "waving"]


def jpeg_frames(num_frames: int, seed: int, size=(16, 24)) -> list[bytes]:
  rng = np.random.default_rng(seed)
  return [video_decode.encode_jpeg(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
          for _ in range(num_frames)]


def good_example(num_frames: int, label_index: int, seed: int = 0) -> tf.train.SequenceExample:
  return dmvr_format.make_sequence_example(
      jpeg_frames(num_frames, seed), label_index, CLASSES[label_index], f"v{seed}.mp4", 0.0, 1.0)


def write_shard(path, examples) -> str:
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      writer.write(example if isinstance(example, bytes) else example.SerializeToString())
  return str(path)


def test_good_shards_pass_with_counts(tmp_path):
  dmvr_format.write_label_map(str(tmp_path), CLASSES)
  frame_counts = [3, 5, 4, 6]
  labels = [0, 2, 2, 1]
  write_shard(tmp_path / "train-00000-of-00002.tfrecord",
              [good_example(n, l, i) for i, (n, l) in enumerate(zip(frame_counts[:2], labels))])
  write_shard(tmp_path / "train-00001-of-00002.tfrecord",
              [good_example(n, l, 9 + i) for i, (n, l) in
               enumerate(zip(frame_counts[2:], labels[2:]))])
  files = check.find_tfrecords(str(tmp_path))
  assert [os.path.basename(f) for f in files] == ["train-00000-of-00002.tfrecord",
                                                  "train-00001-of-00002.tfrecord"]
  report = check.check_tfrecords(files)  # label map found beside the shards.
  assert report.ok, report.problems
  assert report.label_map == CLASSES
  assert report.num_records == 4 and report.num_frames == sum(frame_counts)
  assert report.num_jpegs_decoded == sum(frame_counts)
  assert dict(report.records_per_class) == {"jumping": 1, "waving": 2, "running": 1}
  assert report.frame_sizes == {(16, 24): 4}
  sampled = check.check_tfrecords(files, jpeg_check="sample")
  assert sampled.num_jpegs_decoded == sum(min(3, n) for n in frame_counts)
  assert check.check_tfrecords(files, jpeg_check="none").num_jpegs_decoded == 0
  limited = check.check_tfrecords(files, max_records=3)
  assert limited.num_records == 3 and limited.truncated
  assert "No problems found." in check.format_report(report)


def test_bad_records_are_reported_with_file_and_index(tmp_path):
  dmvr_format.write_label_map(str(tmp_path), CLASSES)
  missing_key = good_example(3, 0, 1)
  del missing_key.context.feature[dmvr_format.LABEL_TEXT_KEY]
  bad_jpeg = dmvr_format.make_sequence_example(
      jpeg_frames(2, 2) + [b"\xff\xd8 definitely not a jpeg"], 1, "running", "v.mp4")
  out_of_range = dmvr_format.make_sequence_example(jpeg_frames(2, 3), 7, "waving", "v.mp4")
  wrong_text = dmvr_format.make_sequence_example(jpeg_frames(2, 4), 0, "waving", "v.mp4")
  two_per_frame = good_example(2, 1, 5)
  frame_features = two_per_frame.feature_lists.feature_list[dmvr_format.IMAGE_KEY].feature
  frame_features[1].bytes_list.value.append(jpeg_frames(1, 6)[0])
  empty = dmvr_format.make_sequence_example([], 2, "waving", "v.mp4")
  mixed_sizes = dmvr_format.make_sequence_example(
      jpeg_frames(1, 7) + jpeg_frames(1, 8, size=(8, 8)), 2, "waving", "v.mp4")
  not_a_proto = b"\x0a\xff\xff\xff\x0f"  # a length-delimited field longer than the data.
  unlabelled = dmvr_format.make_sequence_example(jpeg_frames(2, 9), -1, "", "v.mp4")
  shard = write_shard(tmp_path / "bad-00000-of-00001.tfrecord", [
      good_example(2, 0, 0), missing_key, bad_jpeg, out_of_range, wrong_text, two_per_frame,
      empty, mixed_sizes, not_a_proto, unlabelled])
  report = check.check_tfrecords([shard])
  assert not report.ok
  messages = {p.record_index: p.message for p in report.problems}
  assert set(messages) == {1, 2, 3, 4, 5, 6, 7, 8}  # 0 and 9 (unlabelled) are fine.
  assert all(p.file == shard for p in report.problems)
  assert "missing context key 'clip/label/text'" in messages[1]
  assert "frame 2: JPEG does not decode" in messages[2]
  assert "label index 7 outside the label map [0, 3)" in messages[3]
  assert "does not match label map entry 0 'jumping'" in messages[4]
  assert "one bytes value per frame" in messages[5]
  assert "empty video" in messages[6]
  assert "frames differ in size" in messages[7]
  assert "not a SequenceExample" in messages[8]
  assert report.num_records == 10 and report.num_unlabelled == 1
  text = check.format_report(report)
  assert f"{shard} record 3: label index 7" in text


def test_without_label_map_checks_consistency(tmp_path):
  shard = write_shard(tmp_path / "x.tfrecord", [
      dmvr_format.make_sequence_example(jpeg_frames(1, 0), 4, "a", "v"),
      dmvr_format.make_sequence_example(jpeg_frames(1, 1), 4, "b", "v"),
      dmvr_format.make_sequence_example(jpeg_frames(1, 2), -3, "c", "v")])
  report = check.check_tfrecords([shard])
  assert report.label_map is None
  assert [(p.record_index, p.message.split(" has ")[0]) for p in report.problems][:1] == [
      (1, "label index 4")]
  assert report.problems[1].record_index == 2 and "negative" in report.problems[1].message


def test_truncated_file_and_manifest_mismatch(tmp_path):
  shard = write_shard(tmp_path / "t-00000-of-00001.tfrecord",
                      [good_example(2, 0, 0), good_example(2, 1, 1)])
  data = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(data[:-20])  # cut inside the second record.
  (tmp_path / "manifest.json").write_text(json.dumps({"shard_sets": {"t": {"shards": [
      {"file": "t-00000-of-00001.tfrecord", "num_videos": 2}]}}}))
  report = check.check_tfrecords([shard], label_map=CLASSES)
  file_problems = [p.message for p in report.problems if p.record_index is None]
  assert report.num_records == 1
  assert any(m.startswith("unreadable after 1 records") for m in file_problems)
  assert any("manifest.json lists 2 records, the file has 1" in m for m in file_problems)


def test_cli_exit_status(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
      "check_tfrecords", os.path.join(REPO_ROOT, "scripts", "check_tfrecords.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  dmvr_format.write_label_map(str(tmp_path), CLASSES)
  write_shard(tmp_path / "a-00000-of-00001.tfrecord", [good_example(2, 0, 0)])
  assert cli.main([f"--input={tmp_path}"]) == 0
  assert "1 records, 2 frames" in capsys.readouterr().out
  assert cli.main([f"--input={tmp_path}/a-*.tfrecord", "--jpeg_check=sample"]) == 0
  (tmp_path / "two.txt").write_text("only\n")
  assert cli.main([f"--input={tmp_path}", f"--label_map={tmp_path / 'two.txt'}"]) == 1
  assert "label text 'jumping' does not match" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    cli.main([f"--input={tmp_path}/nothing-*.tfrecord"])
  assert exit_info.value.code == 2
