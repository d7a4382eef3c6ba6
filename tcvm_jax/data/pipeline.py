"""tf.data input pipeline over DMVR-format TFRecords (no model imports).

Outputs dicts of NumPy arrays:
  train: {'video': uint8 (B, T, S, S, 3), 'label': int32 (B,), 'video_index': int64 (B,)}
  eval:  the same plus 'view_index' int32 (clip * num_crops + crop) and 'mask' bool (B,)
S = config.data.input_size. The host only takes a random (train) or fixed (eval) S x S
crop of the stored frames; the random resized crop happens on device. Frames whose short
side is below S are resized up first (bilinear), with a warning once per iterator.

Design notes:
  * video_index = shard_index * 2**32 + record_index, where shard_index is the position
    of the file in the sorted glob of the split. It is global (same on every process)
    and `split_video_index` inverts it.
  * Per-process sharding: with at least as many files as processes each process reads
    files[p::P]; otherwise every process reads every file and keeps the records with
    video_index % P == p. Either way each record goes to exactly one process.
  * Determinism: file order and the shuffle buffer are seeded per epoch
    (seed, epoch); sampling and crops use stateless randomness keyed by
    (seed, epoch, video_index); interleave/map keep their order. Two iterators with the
    same arguments yield identical batches (also across runs, unless the program sets
    TF's global seed, which Dataset.shuffle mixes in).
  * Epochs: training batches run across epoch boundaries (no remainder dropped per
    epoch). The shuffle buffer holds serialized records: config.data.shuffle_buffer
    times the record size (about 2.5 MB for a 10 s clip at 128 px) of host memory.
  * Resume: `make_train_dataset(..., start_step=k)` yields what a fresh iterator yields
    from its k-th batch on. It skips k * batch_size_per_process records of the
    (re-created) epoch stream before anything is decoded. Bad records are skipped after
    that point, so with bad records present the resume point can be off by at most the
    number of bad records met before it.
  * Only sampled frames are decoded: the JPEG bytes are gathered by frame index, then
    `decode_and_crop_jpeg` decodes just the crop window (train) or the needed frames
    once each (eval).
  * Bad records (corrupt protobuf, missing image/encoded, undecodable JPEG, empty video,
    missing label) are caught per record, logged with file and record index (each time
    they are met), counted and skipped; the iterator raises once more than
    config.data.max_bad_record_fraction of the records seen (at least one epoch's worth
    is assumed) were bad.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Callable

import numpy as np
import tensorflow as tf
from absl import logging

from tcvm_jax.data import dmvr_format
from tcvm_jax.data import samplers

VIDEO_INDEX_STRIDE = 2**32  # video_index = shard_index * VIDEO_INDEX_STRIDE + record_index
MANIFEST_FILENAME = "manifest.json"
JPEG_MCU_WIDTH = 16  # columns per MCU of 4:2:0 / 4:2:2 JPEGs (8 for 4:4:4 divides it)
CHECK_COMMAND = "python scripts/check_tfrecords.py --input={pattern}"

# Why a record was skipped.
OK, UNPARSEABLE, UNDECODABLE, EMPTY, NO_LABEL = range(5)
REASONS = {
    UNPARSEABLE: "unparseable record (corrupt protobuf or missing image/encoded)",
    UNDECODABLE: "undecodable JPEG among the sampled frames (or frames of unequal size)",
    EMPTY: "empty video (no frames)",
    NO_LABEL: "missing clip/label/index",
}


# --- Files, counts, sharding -------------------------------------------------------


def list_shards(pattern: str) -> list[str]:
  """Sorted files matching `pattern`; the position is the shard index."""
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(
        f"No TFRecord files match {pattern!r}. Convert videos with "
        "`python scripts/make_tfrecords.py --csv=FILE --output_dir=DIR` or use "
        "config.data.name='synthetic'.")
  return files


def split_video_index(video_index: int) -> tuple[int, int]:
  """(shard_index, record_index) of a video_index."""
  return int(video_index) // VIDEO_INDEX_STRIDE, int(video_index) % VIDEO_INDEX_STRIDE


def count_tfrecords(path: str) -> int:
  """Records in one TFRecord file, read from the framing only (no payload is read)."""
  count = 0
  with tf.io.gfile.GFile(path, "rb") as f:
    size = f.size()
    position = 0
    while position < size:
      header = f.read(8)
      if len(header) < 8:
        raise ValueError(f"{path}: truncated TFRecord header at byte {position}. Inspect "
                         f"with `{CHECK_COMMAND.format(pattern=path)}`.")
      (length,) = struct.unpack("<Q", header)
      position += 8 + 4 + length + 4  # length, its crc, payload, payload crc
      if position > size:
        raise ValueError(f"{path}: truncated TFRecord (record {count} ends past the file). "
                         f"Inspect with `{CHECK_COMMAND.format(pattern=path)}`.")
      f.seek(position)
      count += 1
  return count


def manifest_shard_counts(directory: str) -> dict[str, int]:
  """{shard file name: videos} from `manifest.json` in `directory` (empty if absent)."""
  path = os.path.join(directory, MANIFEST_FILENAME)
  if not tf.io.gfile.exists(path):
    return {}
  try:
    with tf.io.gfile.GFile(path) as f:
      manifest = json.load(f)
    counts = {}
    for shard_set in manifest.get("shard_sets", {}).values():
      for shard in shard_set.get("shards", []):
        if not shard.get("incomplete"):
          counts[os.path.basename(shard["file"])] = int(shard["num_videos"])
    return counts
  except (ValueError, KeyError, TypeError, AttributeError) as error:
    logging.warning("Ignoring unreadable %s (%s); counting records instead.", path, error)
    return {}


def shard_record_counts(files: list[str], use_manifest: bool = True) -> list[int]:
  """Records per file: from manifest.json beside the shards when listed, else counted."""
  manifests: dict[str, dict[str, int]] = {}
  counts = []
  for path in files:
    directory = os.path.dirname(path)
    if directory not in manifests:
      manifests[directory] = manifest_shard_counts(directory) if use_manifest else {}
    known = manifests[directory].get(os.path.basename(path))
    counts.append(known if known is not None else count_tfrecords(path))
  return counts


def num_records(pattern: str) -> int:
  """Records (videos) in all files matching `pattern`."""
  return sum(shard_record_counts(list_shards(pattern)))


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """What one process reads: files (with global shard indices) and a record filter."""
  files: list[str]
  shard_indices: list[int]
  record_modulus: int       # keep records with video_index % record_modulus == remainder
  record_remainder: int
  num_records: int          # records this process gets per epoch
  max_num_records: int      # the largest num_records over all processes


def plan_shards(files: list[str], counts: list[int], process_index: int,
                process_count: int) -> ShardPlan:
  """Splits the files (or, with fewer files than processes, the records) over processes."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}; need "
                     "process_count >= 1 and 0 <= process_index < process_count.")

  def records_of(process: int) -> int:
    if len(files) >= process_count:
      return sum(counts[process::process_count])
    total = 0
    for shard, count in enumerate(counts):  # records r with (shard*2^32 + r) % P == p
      first = (process - shard * VIDEO_INDEX_STRIDE) % process_count
      total += max(0, (count - first + process_count - 1) // process_count)
    return total

  per_process = [records_of(p) for p in range(process_count)]
  if len(files) >= process_count:
    shard_indices = list(range(process_index, len(files), process_count))
    modulus, remainder = 1, 0
  else:
    shard_indices = list(range(len(files)))
    modulus, remainder = process_count, process_index
  return ShardPlan(files=[files[i] for i in shard_indices], shard_indices=shard_indices,
                   record_modulus=modulus, record_remainder=remainder,
                   num_records=per_process[process_index], max_num_records=max(per_process))


def split_pattern(config, split: str) -> str:
  """The shard glob of `split` ('train', 'test', ... or a glob itself).

  'synthetic' data is generated on first use. For 'tfrecord' data, 'train' is
  config.data.train_pattern and other splits are `{split}-*.tfrecord` in its directory.
  """
  data = config.data
  if data.name == "synthetic":
    from tcvm_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    overrides = dict(data.get("synthetic_params", None) or {})
    directory = synthetic.ensure_synthetic_dataset(data.synthetic_dir, **overrides)
    return os.path.join(directory, f"{split}-*.tfrecord")
  if data.name != "tfrecord":
    raise ValueError(f"config.data.name={data.name!r}; choose 'tfrecord' or 'synthetic'.")
  if any(ch in split for ch in "*?[") or split.endswith(".tfrecord"):
    return split
  if split == "train":
    return data.train_pattern
  return os.path.join(os.path.dirname(data.train_pattern), f"{split}-*.tfrecord")


def num_train_records(config) -> int:
  """Videos in the train split (all processes): the trainer's epoch length."""
  return num_records(split_pattern(config, "train"))


def steps_per_epoch(config, global_batch_size: int | None = None) -> int:
  """Whole global batches per epoch of the train split (at least 1)."""
  batch_size = global_batch_size or config.batch_size
  return max(1, num_train_records(config) // batch_size)


# --- Bad-record accounting ---------------------------------------------------------


class BadRecordTracker:
  """Counts good and bad records as tf.data passes them; logs each bad one.

  Pure TensorFlow (variables + tf.print), so no Python runs on tf.data threads: a
  Python callback there can deadlock interpreter shutdown while prefetching.
  """

  MAX_EXAMPLES = 5  # bad records quoted in the error message

  def __init__(self, pattern: str, files: list[str], max_fraction: float,
               records_per_epoch: int):
    if not 0.0 <= max_fraction <= 1.0:
      raise ValueError(f"config.data.max_bad_record_fraction={max_fraction}; it must be in "
                       "[0, 1].")
    self.pattern = pattern
    self.files = list(files)
    self.max_fraction = max_fraction
    self.records_per_epoch = records_per_epoch
    self._good = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._bad = tf.Variable(0, dtype=tf.int64, trainable=False)
    # (video_index, reason) of the first bad records; -1 where unused.
    self._examples = tf.Variable(tf.fill([self.MAX_EXAMPLES, 2], tf.constant(-1, tf.int64)),
                                 trainable=False)
    self._file_names = tf.constant(self.files)
    self._reason_texts = tf.constant([REASONS.get(code, "ok") for code in range(len(REASONS) + 1)])

  @property
  def num_good(self) -> int:
    return int(self._good.numpy())

  @property
  def num_bad(self) -> int:
    return int(self._bad.numpy())

  @property
  def bad_records(self) -> list[tuple[str, int, str]]:
    """(file, record index, reason) of the first bad records met."""
    found = []
    for video_index, reason in self._examples.numpy():
      if video_index >= 0:
        shard, record = split_video_index(video_index)
        path = self.files[shard] if shard < len(self.files) else f"<shard {shard}>"
        found.append((path, record, REASONS.get(int(reason), str(reason))))
    return found

  def keep(self, element: dict[str, tf.Tensor]) -> tf.Tensor:
    """A tf.data filter predicate: True for good records; counts and logs the others."""

    def good():
      with tf.control_dependencies([self._good.assign_add(1)]):
        return tf.constant(True)

    def bad():
      video_index, reason = element["video_index"], tf.cast(element["reason"], tf.int64)
      slot = self._bad.read_value()
      with tf.control_dependencies([slot]):
        remember = tf.cond(
            slot < self.MAX_EXAMPLES,
            lambda: self._examples.scatter_nd_update(
                tf.reshape(slot, [1, 1]), tf.stack([video_index, reason])[None]).read_value(),
            lambda: self._examples.read_value())
        shard = tf.clip_by_value(video_index // VIDEO_INDEX_STRIDE, 0, len(self.files) - 1)
        log = tf.print("Skipping bad record", video_index % VIDEO_INDEX_STRIDE, "of",
                       tf.gather(self._file_names, shard), ":",
                       tf.gather(self._reason_texts, reason), output_stream=logging.warning)
      with tf.control_dependencies([remember, log]):
        num_bad = self._bad.assign_add(1)
      # Stop in-graph too: if every record were bad no batch would ever come to check.
      seen = tf.cast(num_bad + self._good.read_value(), tf.float64)
      allowed = self.max_fraction * tf.maximum(seen, float(self.records_per_epoch))
      limit = tf.debugging.Assert(tf.cast(num_bad, tf.float64) <= allowed,
                                  ["Too many bad records"])
      with tf.control_dependencies([limit]):
        return tf.constant(False)

    return tf.cond(element["reason"] == OK, good, bad)

  def check(self) -> None:
    """Raises once bad records exceed the allowed fraction (of >= one epoch)."""
    num_bad = self.num_bad
    seen = self.num_good + num_bad
    allowed = self.max_fraction * max(seen, self.records_per_epoch)
    if num_bad > allowed:
      examples = "; ".join(f"{path} record {record}: {why}"
                           for path, record, why in self.bad_records)
      raise RuntimeError(
          f"{num_bad} of {seen} records read were bad ({num_bad / max(seen, 1):.2%}), more "
          f"than config.data.max_bad_record_fraction={self.max_fraction}. First ones: "
          f"{examples}. Inspect the data with "
          f"`{CHECK_COMMAND.format(pattern=self.pattern)}`.")


class InputIterator:
  """Iterates a tf.data pipeline as dicts of NumPy arrays, enforcing the bad-record limit."""

  def __init__(self, dataset: tf.data.Dataset, tracker: BadRecordTracker,
               records_per_epoch: int, input_size: int, num_batches: int | None = None):
    self.dataset = dataset
    self.tracker = tracker
    self.records_per_epoch = records_per_epoch  # this process's records per epoch
    self.num_batches = num_batches  # eval: batches every process yields; train: None
    self._input_size = input_size
    self._iterator = iter(dataset.as_numpy_iterator())
    self._warned_upscale = False

  def __iter__(self) -> InputIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except (StopIteration, tf.errors.InvalidArgumentError):
      self.tracker.check()  # raises the explanatory error if the limit was the cause
      raise
    self.tracker.check()
    upscaled = batch.pop("upscaled")
    if upscaled.any() and not self._warned_upscale:
      self._warned_upscale = True
      logging.warning(
          "Some stored frames have a short side below config.data.input_size=%d; they are "
          "resized up on the host. Convert with a larger --short_side for full quality.",
          self._input_size)
    return batch


# --- Per-record stages (each may raise; `_guarded` turns raising into a flag) -------


def _plain(function: Callable) -> Callable:
  """Skips autograph: our dataset functions use tf.cond explicitly (saves seconds)."""
  return tf.autograph.experimental.do_not_convert(function)


def _guarded(element: dict[str, tf.Tensor], stage: Callable, fallback: Callable
             ) -> tf.data.Dataset:
  """`stage(element)`, or `fallback(element)` if it raises: a per-record try/except.

  The fallback dataset is only iterated (and its function only run) when `stage` failed.
  """
  attempt = tf.data.Dataset.from_tensors(element).map(_plain(stage)).ignore_errors(
      log_warning=True)
  rescue = tf.data.Dataset.from_tensors(element).map(_plain(fallback))
  return attempt.concatenate(rescue).take(1)


def _parse(element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  parsed = dmvr_format.parse_sequence_example(element["serialized"])
  frames = parsed[dmvr_format.IMAGE_KEY]  # (n,) JPEG bytes
  label = parsed[dmvr_format.LABEL_INDEX_KEY]
  reason = tf.where(tf.size(frames) == 0, EMPTY, tf.where(label < 0, NO_LABEL, OK))
  return {"frames": frames, "label": tf.cast(label, tf.int32),
          "video_index": element["video_index"], "epoch": element["epoch"],
          "reason": tf.cast(reason, tf.int32)}


def _parse_failed(element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {"frames": tf.zeros([0], tf.string), "label": tf.constant(-1, tf.int32),
          "video_index": element["video_index"], "epoch": element["epoch"],
          "reason": tf.constant(UNPARSEABLE, tf.int32)}


def _resize_short_side_up(frames: tf.Tensor, size: int) -> tf.Tensor:
  """(..., h, w, 3) uint8 with short side < size -> short side == size (bilinear)."""
  shape = tf.shape(frames)
  height, width = shape[-3], shape[-2]
  scale = size / tf.cast(tf.minimum(height, width), tf.float64)
  new_size = tf.cast(tf.math.ceil(tf.cast(tf.stack([height, width]), tf.float64) * scale),
                     tf.int32)
  new_size = tf.maximum(new_size, size)
  resized = tf.image.resize(frames, new_size, method="bilinear")
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _decode_train_clip(frames: tf.Tensor, indices: tf.Tensor, size: int, seed: tf.Tensor,
                       num_frames: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(T, S, S, 3) uint8 random S x S window of the sampled frames, and an upscaled flag."""
  selected = tf.gather(frames, indices)  # (T,) JPEG bytes; only these get decoded
  shape = tf.io.extract_jpeg_shape(selected[0])
  height, width = shape[0], shape[1]
  large_enough = tf.minimum(height, width) >= size

  def crop_while_decoding():
    y, x = tf.unstack(samplers.random_crop_offset(height, width, size, seed))
    # libjpeg starts a cropped decode on the MCU grid; for a window starting elsewhere TF
    # decodes the wider, aligned window row by row through a bounce buffer, which cost
    # ~35% more CPU (128 px windows of 228x128 frames). Asking for the aligned window
    # and slicing gives the same pixels without it.
    aligned_x = x - x % JPEG_MCU_WIDTH
    shift = x - aligned_x
    window = tf.stack([y, aligned_x, size, size + shift])
    return tf.stack([
        tf.io.decode_and_crop_jpeg(selected[i], window, channels=3)[:, shift:shift + size]
        for i in range(num_frames)])

  def decode_resize_crop():
    decoded = tf.stack([tf.io.decode_jpeg(selected[i], channels=3) for i in range(num_frames)])
    resized = _resize_short_side_up(decoded, size)
    new_shape = tf.shape(resized)
    y, x = tf.unstack(samplers.random_crop_offset(new_shape[1], new_shape[2], size, seed))
    return resized[:, y:y + size, x:x + size]

  video = tf.cond(large_enough, crop_while_decoding, decode_resize_crop)
  return tf.ensure_shape(video, [num_frames, size, size, 3]), tf.logical_not(large_enough)


def _make_train_decode(config, seed: int) -> tuple[Callable, Callable]:
  data = config.data
  num_frames, size = data.num_frames, data.input_size

  def decode(parsed):
    element_seed = tf.random.fold_in(
        tf.stack([tf.constant(seed, tf.int64), parsed["epoch"]]), parsed["video_index"])
    sample_seed, crop_seed = tf.unstack(tf.random.split(element_seed, 2))

    def sample_and_decode():
      indices = samplers.train_frame_indices(
          tf.size(parsed["frames"]), sampler=data.sampler, num_frames=num_frames,
          stride=data.frame_stride, short_video=data.short_video, seed=sample_seed)
      return _decode_train_clip(parsed["frames"], indices, size, crop_seed, num_frames)

    def skip():
      return tf.zeros([num_frames, size, size, 3], tf.uint8), tf.constant(False)

    video, upscaled = tf.cond(parsed["reason"] == OK, sample_and_decode, skip)
    return {"video": video, "label": parsed["label"], "video_index": parsed["video_index"],
            "upscaled": upscaled, "reason": parsed["reason"]}

  def decode_failed(parsed):
    return {"video": tf.zeros([num_frames, size, size, 3], tf.uint8), "label": parsed["label"],
            "video_index": parsed["video_index"], "upscaled": tf.constant(False),
            "reason": tf.where(parsed["reason"] == OK, UNDECODABLE, parsed["reason"])}

  return decode, decode_failed


def _make_eval_decode(config, num_clips: int, num_crops: int) -> tuple[Callable, Callable]:
  data = config.data
  num_frames, size = data.num_frames, data.input_size
  num_views = num_clips * num_crops

  def decode(parsed):
    def sample_and_decode():
      indices = samplers.eval_frame_indices(
          tf.size(parsed["frames"]), sampler=data.sampler, num_clips=num_clips,
          num_frames=num_frames, stride=data.frame_stride, short_video=data.short_video)
      # Decode each needed frame once, even when clips overlap.
      unique_indices, positions = tf.unique(tf.reshape(indices, [-1]))
      decoded = tf.map_fn(lambda jpeg: tf.io.decode_jpeg(jpeg, channels=3),
                          tf.gather(parsed["frames"], unique_indices),
                          fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
      shape = tf.shape(decoded)
      upscaled = tf.minimum(shape[1], shape[2]) < size
      decoded = tf.cond(upscaled, lambda: _resize_short_side_up(decoded, size),
                        lambda: decoded)
      clips = tf.reshape(tf.gather(decoded, positions),
                         tf.concat([[num_clips, num_frames], tf.shape(decoded)[1:]], 0))
      offsets = samplers.crop_offsets(tf.shape(decoded)[1], tf.shape(decoded)[2], size,
                                      num_crops)
      views = tf.stack([clips[c, :, offsets[k, 0]:offsets[k, 0] + size,
                              offsets[k, 1]:offsets[k, 1] + size]
                        for c in range(num_clips) for k in range(num_crops)])
      return tf.ensure_shape(views, [num_views, num_frames, size, size, 3]), upscaled

    def skip():
      return tf.zeros([num_views, num_frames, size, size, 3], tf.uint8), tf.constant(False)

    views, upscaled = tf.cond(parsed["reason"] == OK, sample_and_decode, skip)
    return {"video": views, "label": parsed["label"], "video_index": parsed["video_index"],
            "upscaled": upscaled, "reason": parsed["reason"]}

  def decode_failed(parsed):
    return {"video": tf.zeros([num_views, num_frames, size, size, 3], tf.uint8),
            "label": parsed["label"], "video_index": parsed["video_index"],
            "upscaled": tf.constant(False),
            "reason": tf.where(parsed["reason"] == OK, UNDECODABLE, parsed["reason"])}

  return decode, decode_failed


def _process_records(records: tf.data.Dataset, decode: Callable, decode_failed: Callable,
                     tracker: BadRecordTracker, parse: Callable | None = None,
                     parse_failed: Callable | None = None) -> tf.data.Dataset:
  """Parses and decodes records in parallel, in order; drops (and counts) bad ones.

  `parse`/`parse_failed` turn a source element into {'frames', 'label', 'video_index',
  'epoch', 'reason'}; the defaults read a serialized DMVR SequenceExample.
  """
  parse = parse or _parse
  parse_failed = parse_failed or _parse_failed

  def diagnose(element):  # only runs after parse+decode raised: which of the two failed?
    return _guarded(element, lambda e: decode_failed(parse(e)),
                    lambda e: decode_failed(parse_failed(e)))

  def one_record(element):
    # One guard around parse+decode keeps the good path to a single small dataset
    # (nesting a guard per stage made the first batch ~8x slower to arrive).
    attempt = tf.data.Dataset.from_tensors(element).map(_plain(lambda e: decode(parse(e))))
    return attempt.ignore_errors(log_warning=True).concatenate(diagnose(element)).take(1)

  def drop_bookkeeping(element):
    return {key: value for key, value in element.items() if key != "reason"}

  decoded = records.interleave(_plain(one_record), cycle_length=16, block_length=1,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return decoded.filter(_plain(tracker.keep)).map(_plain(drop_bookkeeping))


def _read_records(plan: ShardPlan, epoch: tf.Tensor, file_seed: tf.Tensor | None,
                  parallel_reads: int) -> tf.data.Dataset:
  """{'serialized', 'video_index', 'epoch'} of this process's records (one epoch)."""
  files = tf.data.Dataset.from_tensor_slices(
      (tf.constant(plan.shard_indices, tf.int64), tf.constant(plan.files)))
  if file_seed is not None:
    files = files.shuffle(len(plan.files), seed=file_seed, reshuffle_each_iteration=False)

  # Local files unbuffered: records (~2.5 MB for 10 s of 128 px video) are then read
  # straight into their tensor, one copy less (-11% CPU for reading). Remote file
  # systems keep TF's default buffer (many small reads would be slow there).
  buffer_size = None if any("://" in path for path in plan.files) else 0

  def read_file(shard_index, path):
    return tf.data.TFRecordDataset(path, buffer_size=buffer_size).enumerate().map(_plain(
        lambda record_index, serialized: {
            "serialized": serialized, "epoch": epoch,
            "video_index": shard_index * VIDEO_INDEX_STRIDE + record_index}))

  records = files.interleave(_plain(read_file),
                             cycle_length=max(1, min(parallel_reads, len(plan.files))),
                             block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)
  if plan.record_modulus > 1:
    records = records.filter(_plain(
        lambda r: r["video_index"] % plan.record_modulus == plan.record_remainder))
  return records


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def check_train_args(config, batch_size_per_process: int, start_step: int = 0) -> None:
  data = config.data
  samplers.check_sampler_args(data.num_frames, data.frame_stride, data.short_video,
                              data.sampler)
  if batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process={batch_size_per_process}; it must be >= 1.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step}; it must be >= 0.")
  if data.shuffle_buffer < 1:
    raise ValueError(f"config.data.shuffle_buffer={data.shuffle_buffer}; it must be >= 1.")
  if data.input_size < 1:
    raise ValueError(f"config.data.input_size={data.input_size}; it must be >= 1.")


def check_eval_args(config, batch_size_per_process: int, num_clips: int,
                    num_crops: int) -> None:
  check_train_args(config, batch_size_per_process)
  if num_clips < 1:
    raise ValueError(f"num_clips={num_clips}; it must be >= 1.")
  if num_crops not in (1, 3):
    raise ValueError(f"num_crops={num_crops}; it must be 1 (centre) or 3 (side-centre-side).")
  if config.data.sampler == "tsn" and num_clips != 1:
    raise ValueError(f"num_clips={num_clips} with config.data.sampler='tsn'; use num_clips=1.")


def train_batches(records: tf.data.Dataset, config, seed: int, tracker: BadRecordTracker,
                  batch_size: int, **parse_fns: Callable) -> tf.data.Dataset:
  """Source elements -> decoded, sampled, cropped, full training batches."""
  decode, decode_failed = _make_train_decode(config, seed)
  dataset = _process_records(records, decode, decode_failed, tracker, **parse_fns)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches(records: tf.data.Dataset, config, num_clips: int, num_crops: int,
                 tracker: BadRecordTracker, batch_size: int, num_batches: int,
                 **parse_fns: Callable) -> tf.data.Dataset:
  """Source elements -> every view, then masked padding up to `num_batches` batches."""
  decode, decode_failed = _make_eval_decode(config, num_clips, num_crops)
  videos = _process_records(records, decode, decode_failed, tracker, **parse_fns)
  num_views = num_clips * num_crops

  def to_views(video):
    return tf.data.Dataset.from_tensor_slices({
        "video": video["video"],
        "label": tf.fill([num_views], video["label"]),
        "video_index": tf.fill([num_views], video["video_index"]),
        "view_index": tf.range(num_views, dtype=tf.int32),
        "mask": tf.ones([num_views], tf.bool),
        "upscaled": tf.fill([num_views], video["upscaled"]),
    })

  size, num_frames = config.data.input_size, config.data.num_frames
  padding = tf.data.Dataset.from_tensors({
      "video": tf.zeros([num_frames, size, size, 3], tf.uint8),
      "label": tf.constant(-1, tf.int32), "video_index": tf.constant(-1, tf.int64),
      "view_index": tf.constant(-1, tf.int32), "mask": tf.constant(False),
      "upscaled": tf.constant(False)}).repeat()
  views = videos.flat_map(_plain(to_views)).concatenate(padding)
  dataset = views.batch(batch_size, drop_remainder=True).take(num_batches)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())


# --- Public entry points -------------------------------------------------------------


def make_train_dataset(config, *, process_index: int = 0, process_count: int = 1,
                       batch_size_per_process: int, seed: int | None = None,
                       start_step: int = 0, pattern: str | None = None) -> InputIterator:
  """Endless, shuffled training batches for this process.

  Args:
    config: the experiment config (uses config.data.*; see configs/pretrain.py).
    process_index, process_count: this host's place (jax.process_index(), ...).
    batch_size_per_process: videos per yielded batch (drop_remainder: always full).
    seed: shuffle/sampling seed (default config.seed); same seed -> same batches.
    start_step: resume: skip the first `start_step` batches without decoding them.
    pattern: a glob of shards overriding the config's train split.
  Returns:
    An iterator of {'video': uint8 (B, T, S, S, 3), 'label': int32 (B,),
    'video_index': int64 (B,)}; `.records_per_epoch` is this process's epoch length.
  """
  check_train_args(config, batch_size_per_process, start_step)
  seed = config.seed if seed is None else int(seed)
  pattern = pattern or split_pattern(config, "train")
  files = list_shards(pattern)
  plan = plan_shards(files, shard_record_counts(files), process_index, process_count)
  if plan.num_records == 0:
    raise ValueError(f"Process {process_index} of {process_count} gets no records from "
                     f"{pattern!r}; there are fewer records than processes.")
  first_epoch, skip_records = divmod(start_step * batch_size_per_process, plan.num_records)
  shuffle_buffer = config.data.shuffle_buffer

  def epoch_records(epoch):
    epoch_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch
    records = _read_records(plan, epoch, epoch_seed, parallel_reads=16)
    records = records.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    # Resume: drop what earlier steps consumed (before any decoding).
    return records.skip(tf.where(epoch == first_epoch, tf.constant(skip_records, tf.int64), 0))

  epochs = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  records = epochs.flat_map(_plain(epoch_records))
  tracker = BadRecordTracker(pattern, files, config.data.max_bad_record_fraction,
                             plan.num_records)
  dataset = train_batches(records, config, seed, tracker, batch_size_per_process)
  return InputIterator(dataset, tracker, plan.num_records, config.data.input_size)


def make_eval_dataset(config, split: str = "test", *, batch_size_per_process: int,
                      num_clips: int = 1, num_crops: int = 1, process_index: int = 0,
                      process_count: int = 1, pattern: str | None = None) -> InputIterator:
  """Every view (clip x crop) of every video of `split`, in a fixed order, once.

  Each process yields the same number of batches (`.num_batches`: the largest process's
  views / batch size, rounded up); padding entries have mask False, label -1 and
  video_index -1. Average predictions over entries with the same video_index to get
  per-video results.
  Returns an iterator of {'video': uint8 (B, T, S, S, 3), 'label': int32, 'video_index':
  int64, 'view_index': int32 (clip * num_crops + crop), 'mask': bool}, all (B,) but video.
  """
  check_eval_args(config, batch_size_per_process, num_clips, num_crops)
  pattern = pattern or split_pattern(config, split)
  files = list_shards(pattern)
  # Exact counts from the files themselves: a stale manifest must not cut off videos.
  counts = shard_record_counts(files, use_manifest=False)
  plan = plan_shards(files, counts, process_index, process_count)
  num_batches = math.ceil(plan.max_num_records * num_clips * num_crops
                          / batch_size_per_process)
  records = _read_records(plan, tf.constant(0, tf.int64), None, parallel_reads=4)
  tracker = BadRecordTracker(pattern, files, config.data.max_bad_record_fraction,
                             plan.num_records)
  dataset = eval_batches(records, config, num_clips, num_crops, tracker,
                         batch_size_per_process, num_batches)
  return InputIterator(dataset, tracker, plan.num_records, config.data.input_size,
                       num_batches)


def describe(batch: dict[str, Any]) -> str:
  """One line of shapes and dtypes, for logs."""
  return ", ".join(f"{key}: {np.asarray(value).dtype}{tuple(np.shape(value))}"
                   for key, value in sorted(batch.items()))
