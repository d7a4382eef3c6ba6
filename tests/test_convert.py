"""Converter tests: PyAV-encoded videos -> DMVR TFRecords -> parsed back and compared."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import tensorflow as tf

from tcvm_jax.data import convert
from tcvm_jax.data import dataset_lists
from tcvm_jax.data import dmvr_format
from tcvm_jax.data import video_decode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH, NUM_FRAMES, SOURCE_FPS = 32, 48, 12, 10
JPEG_TOLERANCE = 8.0  # mean absolute error on 0-255, codec + JPEG loss together.


# --- Synthetic videos ---------------------------------------------------------------

def reference_frames(num_frames: int = NUM_FRAMES) -> np.ndarray:
  """Smooth moving patterns (codec friendly) that differ clearly from frame to frame."""
  y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
  frames = []
  for k in range(num_frames):
    red = 128 + 90 * np.sin(2 * np.pi * (x + 4 * k) / WIDTH)
    green = 128 + 90 * np.cos(2 * np.pi * (y + 3 * k) / HEIGHT)
    blue = np.full_like(x, 40 + 14 * k)
    frames.append(np.stack([red, green, blue], -1))
  return np.clip(np.round(frames), 0, 255).astype(np.uint8)  # (T, H, W, 3)


def write_video(path: str, codec: str, frames: np.ndarray, fps: int = SOURCE_FPS) -> None:
  # Near-lossless settings: what remains is mostly 4:2:0 chroma subsampling.
  options = {"mpeg4": {"qmin": "1", "qmax": "2"}, "libx264": {"crf": "8"},
             "libvpx-vp9": {"crf": "8", "b": "0"},
             "mjpeg": {"qmin": "1", "qmax": "2"}}.get(codec, {})
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    stream.options = options
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def available_codec_containers() -> list[tuple[str, str]]:
  """Several codec/container pairs, whichever this PyAV build can encode."""
  wanted = [("mpeg4", "mp4"), ("libx264", "mkv"), ("mjpeg", "avi"), ("libvpx-vp9", "webm"),
            ("mpeg4", "avi")]
  return [(codec, ext) for codec, ext in wanted if codec in av.codecs_available]


def read_records(paths) -> list[dict]:
  records = []
  for serialized in tf.data.TFRecordDataset(sorted(paths)):
    parsed = dmvr_format.parse_sequence_example(serialized)
    records.append({
        "frames": np.stack([tf.io.decode_jpeg(j).numpy()
                            for j in parsed[dmvr_format.IMAGE_KEY].numpy()]),
        "label_index": int(parsed[dmvr_format.LABEL_INDEX_KEY]),
        "label_text": parsed[dmvr_format.LABEL_TEXT_KEY].numpy().decode(),
        "filename": parsed[dmvr_format.FILENAME_KEY].numpy().decode(),
        "start": int(parsed[dmvr_format.START_TIMESTAMP_KEY]),
        "end": int(parsed[dmvr_format.END_TIMESTAMP_KEY]),
    })
  return records


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  """Videos in several codecs, a corrupt file, and a CSV that also lists a missing file."""
  folder = tmp_path_factory.mktemp("videos")
  frames = reference_frames()
  rows, expected = [], {}
  for number, (codec, ext) in enumerate(available_codec_containers()):
    name = f"clips/{codec}_{number}.{ext}"
    os.makedirs(folder / "clips", exist_ok=True)
    write_video(str(folder / name), codec, frames)
    label = ["waving", "jumping", "running"][number % 3]
    rows.append(f"{name},{label}")
    expected[name] = label
  (folder / "clips" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500)
  rows += ["clips/corrupt.mp4,waving", "clips/missing.mp4,jumping"]
  (folder / "list.csv").write_text("\n".join(rows) + "\n")
  return folder, expected, frames


# --- Pure arithmetic ----------------------------------------------------------------

@pytest.mark.parametrize("height,width,short,expected", [
    (32, 48, 16, (16, 24)), (240, 320, 128, (128, 170)), (320, 240, 128, (170, 128)),
    (256, 340, 128, (128, 170)), (720, 1280, 128, (128, 228)), (64, 64, 128, (128, 128)),
    (30, 50, 0, (30, 50))])
def test_resized_shape_examples(height, width, short, expected):
  # By hand: e.g. 1280 * 128 / 720 = 227.6 -> nearest even 228.
  assert video_decode.resized_shape(height, width, short) == expected


def test_resized_shape_invariants():
  rng = np.random.default_rng(0)
  for _ in range(200):
    height, width = (int(v) for v in rng.integers(16, 2000, size=2))
    short = 2 * int(rng.integers(8, 200))
    new_height, new_width = video_decode.resized_shape(height, width, short)
    assert min(new_height, new_width) == short
    assert new_height % 2 == 0 and new_width % 2 == 0
    exact_long = max(height, width) * short / min(height, width)
    assert abs(max(new_height, new_width) - exact_long) <= 1.0 + 1e-9
  with pytest.raises(ValueError, match="short_side must be even"):
    video_decode.resized_shape(32, 48, 15)


def brute_force_nearest(times, fps, start, end):
  """For each target start + k/fps < end: argmin |time - target| (first = earlier on ties)."""
  chosen, k = [], 0
  while start + k / fps < end - 1e-9:
    target = start + k / fps
    chosen.append(int(np.argmin([abs(t - target) for t in times])))
    k += 1
  return chosen


def test_resample_indices_match_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(100):
    source_fps = float(rng.choice([12.5, 24, 25, 29.97, 30, 60]))
    count = int(rng.integers(1, 80))
    times = np.arange(count) / source_fps + rng.uniform(-0.2, 0.2, count) / source_fps
    times = np.sort(times.clip(0))
    start = float(rng.choice([0.0, times[count // 3]]))
    times = times[times >= start]
    end = float(times[-1] + 1 / source_fps)
    fps = float(rng.choice([1, 5, 8, 10, 15, 30, 50]))
    expected = brute_force_nearest(times, fps, start, end)
    assert video_decode.resample_indices(times, fps, start, end).tolist() == expected
    assert video_decode.select_nearest_frames(times, fps, start, end) == expected


def test_resample_arithmetic():
  times = np.arange(60) / 30.0  # 2 s at 30 fps.
  assert video_decode.resample_indices(times, 10, 0.0, 2.0).tolist() == list(range(0, 60, 3))
  assert len(video_decode.resample_indices(times, 15, 0.0, 2.0)) == 30
  # Upsampling repeats frames: 2 s at 60 fps from 30 fps -> each source frame twice.
  up = video_decode.resample_indices(times, 60, 0.0, 2.0)
  assert len(up) == 120 and np.all(np.bincount(up) == 2)
  assert video_decode.num_target_frames(2.0, 5) == 10
  assert video_decode.num_target_frames(1.99, 5) == 10
  assert video_decode.num_target_frames(2.01, 5) == 11


def test_decode_video_fps_resize_and_trim(video_folder):
  folder, _, frames = video_folder
  path = str(folder / "clips" / "mpeg4_0.mp4")
  full = video_decode.decode_video(path, short_side=0)
  assert full.frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
  np.testing.assert_allclose(full.frame_times, np.arange(NUM_FRAMES) / SOURCE_FPS, atol=1e-6)
  assert full.end_seconds == pytest.approx(NUM_FRAMES / SOURCE_FPS)
  # 5 fps from 10 fps keeps source frames 0, 2, 4, ...: identify each by nearest content.
  resampled = video_decode.decode_video(path, fps=5, short_side=0)
  nearest = [int(np.argmin([mean_abs_error(f, r) for r in frames])) for f in resampled.frames]
  assert nearest == list(range(0, NUM_FRAMES, 2))
  # Trim [0.35, 0.8) s: source frames at 0.4 .. 0.7 s.
  trimmed = video_decode.decode_video(path, 0.35, 0.8, short_side=0)
  nearest = [int(np.argmin([mean_abs_error(f, r) for r in frames])) for f in trimmed.frames]
  assert nearest == [4, 5, 6, 7]
  # Resize: the short side 16 halves 32x48; compare with 2x2 mean pooling of the source.
  small = video_decode.decode_video(path, short_side=16)
  pooled = frames.reshape(NUM_FRAMES, 16, 2, 24, 2, 3).mean(axis=(2, 4))
  assert small.frames.shape == (NUM_FRAMES, 16, 24, 3)
  assert mean_abs_error(small.frames, pooled) < JPEG_TOLERANCE
  with pytest.raises(video_decode.VideoDecodeError, match="file not found"):
    video_decode.decode_video(str(folder / "nope.mp4"))


def test_seeking_into_a_long_video_matches_decoding_from_the_start(tmp_path):
  codec, ext = available_codec_containers()[0]
  path = str(tmp_path / f"long.{ext}")
  frames = reference_frames(60)
  with av.open(path, "w") as container:  # 2 s at 30 fps, a keyframe every 10 frames.
    stream = container.add_stream(codec, rate=30)
    stream.width, stream.height, stream.gop_size = WIDTH, HEIGHT, 10
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  full = video_decode.decode_video(path, short_side=0)
  clip = video_decode.decode_video(path, 1.05, 1.5, short_side=0)
  indices = np.round(clip.frame_times * 30).astype(int)
  assert indices.tolist() == list(range(32, 45))  # frames at 32/30 .. 44/30 s.
  np.testing.assert_array_equal(clip.frames, full.frames[indices])
  # From 0.5 s to the end at 12.5 fps: ceil(1.5 * 12.5) = 19 targets 0.5 + k * 0.08 s.
  resampled = video_decode.decode_video(path, 0.5, None, fps=12.5, short_side=0)
  targets = 0.5 + np.arange(19) * 0.08
  assert np.round(resampled.frame_times * 30).astype(int).tolist() == \
      np.round(targets * 30).astype(int).tolist()
  assert resampled.end_seconds == pytest.approx(2.0)


# --- Conversion ---------------------------------------------------------------------

def convert_csv(folder, output_dir, **option_overrides):
  dataset = dataset_lists.load_dataset_list("csv", str(folder / "list.csv"))
  options = convert.ConvertOptions(
      short_side=option_overrides.pop("short_side", 0), filename_root=str(folder),
      **option_overrides)
  return convert.convert_dataset(dataset, str(output_dir), num_shards=2, options=options,
                                 log=open(os.devnull, "w"))


def test_round_trip_codecs_labels_pixels_and_failures(video_folder, tmp_path):
  folder, expected, frames = video_folder
  result = convert_csv(folder, tmp_path)
  shards = sorted(tmp_path.glob("train-*-of-00002.tfrecord"))
  assert [p.name for p in shards] == ["train-00000-of-00002.tfrecord",
                                      "train-00001-of-00002.tfrecord"]
  records = read_records([str(p) for p in shards])
  label_map = dmvr_format.read_label_map(str(tmp_path))
  assert label_map == sorted(set(expected.values()))
  assert sorted(r["filename"] for r in records) == sorted(expected)
  for record in records:
    assert record["label_text"] == expected[record["filename"]]
    assert label_map[record["label_index"]] == record["label_text"]
    assert record["frames"].shape == frames.shape, record["filename"]
    assert mean_abs_error(record["frames"], frames) < JPEG_TOLERANCE, record["filename"]
    assert record["start"] == 0 and record["end"] == NUM_FRAMES * 100_000  # microseconds.
  # The corrupt and the missing file are reported with a reason, and nothing else is lost.
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  failures = {os.path.basename(f["path"]): f["reason"] for f in
              manifest["shard_sets"]["train"]["failures"]}
  assert set(failures) == {"corrupt.mp4", "missing.mp4"}
  assert failures["missing.mp4"] == "file not found"
  assert failures["corrupt.mp4"]
  train = manifest["splits"]["train"]
  assert train["num_videos"] == len(expected) and train["num_failed"] == 2
  assert train["num_frames"] == len(expected) * NUM_FRAMES
  counts = {label: list(expected.values()).count(label) for label in set(expected.values())}
  assert train["videos_per_class"] == counts
  per_shard = [s["num_videos"] for s in manifest["shard_sets"]["train"]["shards"]]
  assert per_shard == [sum(1 for _ in tf.data.TFRecordDataset(str(p))) for p in shards]
  assert result["run"]["num_videos"] == len(expected)


def test_dmvr_key_layout(video_folder, tmp_path):
  folder, _, _ = video_folder
  convert_csv(folder, tmp_path, short_side=16, fps=5)
  shard = sorted(tmp_path.glob("train-*.tfrecord"))[0]
  serialized = next(iter(tf.data.TFRecordDataset(str(shard)))).numpy()
  example = tf.train.SequenceExample.FromString(serialized)
  kinds = {key: feature.WhichOneof("kind") for key, feature in example.context.feature.items()}
  assert kinds == {"clip/label/index": "int64_list", "clip/label/text": "bytes_list",
                   "video/filename": "bytes_list", "clip/start/timestamp": "int64_list",
                   "clip/end/timestamp": "int64_list"}
  assert all(len(getattr(example.context.feature[k], kind).value) == 1
             for k, kind in kinds.items())
  assert list(example.feature_lists.feature_list) == ["image/encoded"]
  frame_features = example.feature_lists.feature_list["image/encoded"].feature
  assert len(frame_features) == NUM_FRAMES // 2  # 1.2 s at 5 fps.
  for feature in frame_features:
    assert feature.WhichOneof("kind") == "bytes_list" and len(feature.bytes_list.value) == 1
    assert tf.io.decode_jpeg(feature.bytes_list.value[0]).shape == (16, 24, 3)


def test_trimmed_clip_from_csv(video_folder, tmp_path):
  folder, _, frames = video_folder
  codec, ext = available_codec_containers()[0]
  (tmp_path / "trim.csv").write_text(f"path,label,start,end\n"
                                     f"{folder}/clips/{codec}_0.{ext},waving,0.5,1.0\n")
  dataset = dataset_lists.load_dataset_list("csv", str(tmp_path / "trim.csv"))
  convert.convert_dataset(dataset, str(tmp_path / "out"), num_shards=1,
                          options=convert.ConvertOptions(short_side=0),
                          log=open(os.devnull, "w"))
  (record,) = read_records([str(p) for p in (tmp_path / "out").glob("*.tfrecord")])
  assert (record["start"], record["end"]) == (500_000, 1_000_000)
  assert mean_abs_error(record["frames"], frames[5:10]) < JPEG_TOLERANCE


def test_resume_rewrites_only_the_missing_shard(video_folder, tmp_path):
  folder, _, _ = video_folder
  first = convert_csv(folder, tmp_path)
  shards = sorted(tmp_path.glob("train-*.tfrecord"))
  contents = {p.name: p.read_bytes() for p in shards}
  mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
  assert first["run"]["shards_converted"] == sorted(contents)
  shards[1].unlink()
  second = convert_csv(folder, tmp_path)
  assert second["run"]["shards_converted"] == [shards[1].name]
  assert second["run"]["shards_skipped"] == [shards[0].name]
  assert shards[0].stat().st_mtime_ns == mtimes[shards[0].name]
  assert {p.name: p.read_bytes() for p in shards} == contents  # identical output.
  # The manifest still covers both shards, including the skipped shard's failures.
  assert second["num_videos"] == first["num_videos"]
  assert second["num_failed"] == first["num_failed"] == 2
  # Other settings in the same folder: refused (a glob would mix shards) unless overwrite.
  with pytest.raises(convert.ConversionError, match="--overwrite"):
    convert_csv(folder, tmp_path, short_side=16)
  third = convert_csv(folder, tmp_path, short_side=16, overwrite=True)
  assert third["run"]["shards_converted"] == sorted(contents)


def test_shard_assignment_is_deterministic_and_complete():
  records = [dataset_lists.VideoRecord(f"/v/{i:03d}.mp4", f"c{i % 4}") for i in range(23)]
  shards = convert.assign_to_shards(records, 5)
  reordered = convert.assign_to_shards(records[::-1], 5)
  assert shards == reordered
  assert sorted(r.path for s in shards for r in s) == sorted(r.path for r in records)
  assert [len(s) for s in shards] == [5, 5, 5, 4, 4]  # round robin over 23 videos.
  assert convert.assign_to_shards(records, 5) != convert.assign_to_shards(records, 4)
  assert convert.shard_filename("train", 3, 16) == "train-00003-of-00016.tfrecord"


def test_progress_line_format():
  line = convert.format_progress(3, 16, 120, 500, 120 / 12.3)
  assert line == "[shard 3/16] 120/500 videos, 12.3 videos/s, ETA 0:00:31"


def _load_script(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "scripts",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli_exit_codes_in_process(tmp_path, capsys):
  cli = _load_script("make_tfrecords")
  (tmp_path / "bad.csv").write_text("nothere.mp4,a\nalso_missing.avi,b\n")
  code = cli.main([f"--csv={tmp_path / 'bad.csv'}", f"--output_dir={tmp_path / 'out'}",
                   "--num_workers=1"])
  assert code == 1  # every video failed.
  assert "every video failed" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--format=ucf101", f"--output_dir={tmp_path / 'out2'}"])
  assert exit_info.value.code == 2
  with pytest.raises(SystemExit) as exit_info:
    cli.main([f"--csv={tmp_path / 'bad.csv'}", f"--output_dir={tmp_path / 'o3'}",
              "--short_side=15"])
  assert exit_info.value.code == 2
  assert "short_side must be even" in capsys.readouterr().err


def test_cli_subprocess_with_two_workers(video_folder, tmp_path):
  folder, expected, frames = video_folder
  output_dir = tmp_path / "cli"
  completed = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "make_tfrecords.py"),
       f"--csv={folder / 'list.csv'}", f"--output_dir={output_dir}", "--num_shards=2",
       "--num_workers=2", "--short_side=0", "--jpeg_quality=95"],
      capture_output=True, text=True, timeout=240)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "[shard 2/2]" in completed.stderr
  assert "missing.mp4: file not found" in completed.stderr
  records = read_records([str(p) for p in output_dir.glob("train-*.tfrecord")])
  assert sorted(r["filename"] for r in records) == sorted(expected)
  for record in records:
    assert mean_abs_error(record["frames"], frames) < JPEG_TOLERANCE


def test_official_layout_with_splits_and_unused_videos(video_folder, tmp_path):
  """HMDB51 split files -> train and test shard sets; fold-unused videos only counted."""
  folder, _, frames = video_folder
  codec, ext = available_codec_containers()[0]
  source = folder / "clips" / f"{codec}_0.{ext}"
  splits = tmp_path / "splits"
  splits.mkdir()
  for label, assignment in [("brush_hair", "1 2 0 1"), ("cartwheel", "2 1 1 0")]:
    lines = []
    for number, split_id in enumerate(assignment.split()):
      name = f"{label}_{number}.avi"
      os.makedirs(tmp_path / "videos" / label, exist_ok=True)
      (tmp_path / "videos" / label / name).write_bytes(source.read_bytes())
      lines.append(f"{name} {split_id}")
    (splits / f"{label}_test_split1.txt").write_text("\n".join(lines) + "\n")
  dataset = dataset_lists.load_dataset_list("hmdb51", str(splits),
                                            video_root=str(tmp_path / "videos"))
  options = convert.ConvertOptions(short_side=16, filename_root=str(tmp_path / "videos"))
  result = convert.convert_dataset(dataset, str(tmp_path / "out"), num_shards=1,
                                   options=options, log=open(os.devnull, "w"))
  assert result["splits"]["train"]["videos_per_class"] == {"brush_hair": 2, "cartwheel": 2}
  assert result["splits"]["test"]["videos_per_class"] == {"brush_hair": 1, "cartwheel": 1}
  assert result["excluded_splits"] == {dataset_lists.UNUSED_SPLIT: 2}
  assert dmvr_format.read_label_map(str(tmp_path / "out")) == ["brush_hair", "cartwheel"]
  test_records = read_records([str(tmp_path / "out" / "test-00000-of-00001.tfrecord")])
  assert sorted((r["filename"], r["label_index"]) for r in test_records) == [
      ("brush_hair/brush_hair_1.avi", 0), ("cartwheel/cartwheel_0.avi", 1)]
  assert all(r["frames"].shape == (NUM_FRAMES, 16, 24, 3) for r in test_records)
  with pytest.raises(convert.ConversionError, match="one shard set but 2 splits"):
    convert.convert_dataset(dataset, str(tmp_path / "out2"), shard_prefix="x",
                            options=options, log=open(os.devnull, "w"))
